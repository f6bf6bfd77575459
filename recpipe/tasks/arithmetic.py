"""The default task: seeded one-operation arithmetic, e.g. "What is 3 + 7? Answer with just the number."

    from recpipe.tasks import get_task
    task = get_task("arithmetic")                              # a + b, a and b in 1..10
    task = get_task("arithmetic", operation="mul", low=2, high=12)
    task = get_task("arithmetic", operation="add-add", low=1, high=20, n_train=4000, n_test=400)  # a + b + c
    task.prompts("train", limit=8, seed=0)

Why these defaults: with SmolLM2-135M-Instruct at temperature 1.0, a + b over 1..10 is right in
21-24% of samples and 76-80% of 8-sample groups are mixed (EXPERIMENTS.md): the reward varies inside
groups, which is what group-relative RL learns from. Wider ranges are harder (1..99: 6% right).

Two operations: `operation` may chain operators with "-", e.g. "add-add" asks "What is a + b + c?"
and "mul-add" "What is a * b + c?" (the usual precedence: * before + and -). The defaults have only
100 problems and SmolLM2 solves most held-out ones greedily, too few and too easy to compare
algorithms. Measured for the study (EXPERIMENTS.md, temperature 1.0, groups of 8): add over 1..30
is greedy-right 37% of the time with half the groups mixed (some right, some wrong); 1..50: 28%,
27% mixed; chains are beyond SmolLM2 (add-add over 1..15: 3.5% greedy).

Splits: the task draws n_test + n_train distinct ordered operand tuples from [low, high]^operands
with a fixed `split_seed`; the first n_test are "test", the rest "train". So the splits never share
a tuple (b + a may still be in train when a + b is in test: the prompt text differs) and do not
depend on the `seed` that `prompts` uses to order and sub-sample a split.

Reward (RewardResult.from_parts): correctness 1.0 when the response's answer equals the gold number,
plus format +0.1 when the whole response is the bare number (spaces and a final "." allowed: "7", "7.",
"$7"), else -0.1. The small model almost never answers with the bare number, so the answer is looked
for in free text, in this order:
  1. the first number right after "answer" ("The answer is 7", "Answer: **7**");
  2. else the first number right after "is", "=", "equals", "gives", "makes", "get(s)" ("3 + 4 = 7");
  3. else the last number in the response.
A number in 1. or 2. that starts an expression ("What is 3 + 4", "= 3 + 4 = 7") is skipped, so echoing
the question does not count as answering it. Numbers follow answers.py: ASCII digits only, "1,234",
"-3", "3.0" == 3, "$5"; responses longer than answers.MAX_PARSE_CHARS are parsed by head and tail.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import ClassVar

from recpipe.tasks import answers
from recpipe.tasks.base import Prompt, RewardResult, TaskError, check_prompts_args, check_response

OPERATIONS = {"add": ("+", lambda a, b: a + b), "sub": ("-", lambda a, b: a - b), "mul": ("*", lambda a, b: a * b)}
PROMPT_TEMPLATE = "What is {a} {symbol} {b}? Answer with just the number."
MAX_OPERATIONS = 3  # four operands: beyond that SmolLM2 is right almost never, and ids grow long

_ANSWER_CUE = re.compile(r"answer(?:\s+is)?[\s:=*]*$", re.IGNORECASE | re.ASCII)
_RESULT_CUE = re.compile(
    r"(?:\bis|=|\bequals?|\bequal to|\bgives?|\bmakes?|\bgets?)[\s*]*$", re.IGNORECASE | re.ASCII
)
_STARTS_EXPRESSION = re.compile(r"\s*[-+*/x×÷^]\s*\$?[0-9(]", re.ASCII)


def extract_answer(text: str) -> str | None:
    """Canonical final answer found in an arithmetic response (rules in the module docstring), or None."""
    return answers.cued_answer(text, (_ANSWER_CUE, _RESULT_CUE), latest_first=False, accept=_not_an_operand)


def _not_an_operand(text: str, match: re.Match[str]) -> bool:
    return _STARTS_EXPRESSION.match(answers.after(text, match)) is None


def evaluate_chain(values: tuple[int, ...], operations: tuple[str, ...]) -> int:
    """``values[0] op0 values[1] op1 ...`` with * before + and - (as the prompt reads), no eval()."""
    terms, signs = [values[0]], [1]
    for op, value in zip(operations, values[1:], strict=True):
        if op == "mul":
            terms[-1] *= value
        else:
            terms.append(value)
            signs.append(1 if op == "add" else -1)
    return sum(sign * term for sign, term in zip(signs, terms, strict=True))


@dataclass(frozen=True)
class ArithmeticTask:
    """Seeded arithmetic prompts "What is a <op> b?" with a, b in [low, high].

    operation: "add" (a + b), "sub" (a - b) or "mul" (a * b), or up to three of them chained with "-"
        ("add-add": a + b + c, "mul-add": a * b + c). Default "add".
    low, high: inclusive operand range. Default 1..10 (100 ordered pairs).
    n_train, n_test: distinct operand tuples per split; n_train + n_test <= (high - low + 1) ** operands
        (operands = operations + 1). Default 80 / 20.
    split_seed: seed of the train/test partition; change it only to get a different partition.
    """

    name: ClassVar[str] = "arithmetic"

    operation: str = "add"
    low: int = 1
    high: int = 10
    n_train: int = 80
    n_test: int = 20
    split_seed: int = 20250101

    def __post_init__(self) -> None:
        ops = self.operation.split("-") if isinstance(self.operation, str) else [None]
        if not all(op in OPERATIONS for op in ops) or len(ops) > MAX_OPERATIONS:
            raise TaskError(f"operation={self.operation!r}: expected one of {sorted(OPERATIONS)}, or up to "
                             f"{MAX_OPERATIONS} of them joined by '-' (e.g. 'add-add', 'mul-add')")
        for field in ("low", "high", "n_train", "n_test", "split_seed"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TaskError(f"{field}={value!r}: expected an int")
        if self.low > self.high:
            raise TaskError(f"low={self.low} > high={self.high}: expected low <= high")
        if self.n_train < 0 or self.n_test < 0:
            raise TaskError(f"n_train={self.n_train}, n_test={self.n_test}: expected both >= 0")
        if self.n_train + self.n_test > self._n_pairs:
            raise TaskError(
                f"n_train + n_test = {self.n_train + self.n_test} > {self._n_pairs} distinct operand tuples "
                f"in [{self.low}, {self.high}]^{self.operands}: lower n_train/n_test or widen low..high"
            )

    @property
    def operations(self) -> tuple[str, ...]:
        return tuple(self.operation.split("-"))

    @property
    def operands(self) -> int:
        return len(self.operations) + 1

    @property
    def _n_pairs(self) -> int:
        return (self.high - self.low + 1) ** self.operands

    def _split_pairs(self, split: str) -> list[tuple[int, ...]]:
        # random.sample over a range never materialises it, so huge operand ranges are fine.
        picked = random.Random(self.split_seed).sample(range(self._n_pairs), self.n_test + self.n_train)
        chosen = picked[: self.n_test] if split == "test" else picked[self.n_test :]
        width = self.high - self.low + 1
        # Index -> base-`width` digits, most significant first (for two operands: i // width, i % width).
        return [tuple(self.low + i // width ** (self.operands - 1 - d) % width for d in range(self.operands))
                for i in sorted(chosen)]

    def prompts(self, split: str, limit: int | None = None, seed: int | None = 0) -> list[Prompt]:
        """The split's prompts, shuffled by `seed` (None: sorted by (a, b)), the first `limit` of them."""
        check_prompts_args(split, limit)
        pairs = self._split_pairs(split)
        if seed is not None:
            random.Random(seed).shuffle(pairs)
        return [self._prompt(values) for values in pairs[:limit]]

    def _prompt(self, values: tuple[int, ...]) -> Prompt:
        ops = self.operations
        # "a + b", "a + b * c": the template's "{a} {symbol} {b}" with b standing for the rest of the chain.
        rest = " ".join(f"{OPERATIONS[op][0]} {v}" for op, v in zip(ops[1:], values[2:], strict=True))
        b = f"{values[1]} {rest}" if rest else str(values[1])
        return Prompt(
            prompt_id="_".join([self.operation, *map(str, values)]),  # content-based: stable across seeds
            messages=[{"role": "user", "content": PROMPT_TEMPLATE.format(a=values[0], symbol=OPERATIONS[ops[0]][0], b=b)}],
            answer=str(evaluate_chain(values, ops)),
        )

    def score(self, prompt: Prompt, response: str) -> RewardResult:
        """1.0 for the right number anywhere the rules find it, +0.1 for the bare-number form, else -0.1."""
        text = check_response(response)
        correct = extract_answer(text) == answers.gold_number(prompt.answer)
        return RewardResult.from_parts(correct=correct, formatted=answers.is_bare_number(text))
