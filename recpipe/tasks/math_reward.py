"""Math answers checked by Hugging Face's math-verify: LaTeX, fractions, ``\\boxed{}``, sets, intervals.

    from recpipe.tasks.math_reward import math_reward
    math_reward(prompt, "... so the answer is $\\boxed{\\frac{1}{2}}$")   # gold "0.5": correct

``math_reward(prompt, response) -> RewardResult``: correctness 1.0 when math-verify finds the response's
final answer equal to ``prompt.answer`` (symbolically, floats to 6 digits), else 0.0; format +0.1 when
the response marks its answer (``\\boxed{}``, "####", "the answer is"), else -0.1. A gold answer that
is not mathematics (a name, a word) matches as normalised text too. Usable as a task's
``match: math`` (recpipe.tasks.dataset) or as one of several weighted reward functions ("math").

Time: math-verify's own timeouts use SIGALRM, which works only in the main thread; recpipe scores
in a worker thread with its own per-response limit (recpipe.tasks.scoring), so they are off here.
"""

from __future__ import annotations

import logging

from recpipe.tasks import answers
from recpipe.tasks.base import Prompt, RewardResult, check_response

# One "timeout is disabled" warning per call otherwise: the limit is score_responses's (see above).
logging.getLogger("math_verify").setLevel(logging.ERROR)
_READY = False


def _parse(text: str) -> list:
    from math_verify import parse

    return parse(text, parsing_timeout=None)


def warm_up() -> None:
    """Import math-verify, build its LaTeX parser and run sympy's first simplification now (~2.5 s each the
    first time, on 2 busy cores): done by the tasks that use it when they are built, not in a response's scoring time
    limit (a first wrong answer, "1/3" for 1/2, took 3 s there)."""
    global _READY
    if not _READY:
        from math_verify import verify

        verify(_parse("$\\frac{1}{2}$"), _parse("1/3"), timeout_seconds=None)  # unequal: sympy's simplify runs
        _READY = True


def math_equal(gold: str, response: str) -> bool:
    """True when the response's final answer is mathematically the gold one (or, for a non-math gold, the
    same normalised text)."""
    from math_verify import verify

    from recpipe.tasks.dataset import marked_answer, normalise

    text = answers.clip(response)
    marked, _ = marked_answer(text)
    if marked is not None and normalise(marked) == normalise(gold):  # "Paris": math-verify reads P*a*r*i*s
        return True
    gold_parsed = _parse(gold if "$" in gold or "\\(" in gold else f"${gold}$")
    return bool(gold_parsed) and bool(verify(gold_parsed, _parse(text), timeout_seconds=None))


def math_reward(prompt: Prompt, response: str) -> RewardResult:
    from recpipe.tasks.dataset import marked_answer

    text = check_response(response)
    _, formatted = marked_answer(answers.clip(text))
    return RewardResult.from_parts(correct=math_equal(prompt.answer, text), formatted=formatted)
