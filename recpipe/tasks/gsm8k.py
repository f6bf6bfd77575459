"""GSM8K grade-school math word problems (Cobbe et al. 2021, MIT): the paper's task.

    from recpipe.tasks import get_task
    task = get_task("gsm8k")                         # data from the bundled data/gsm8k
    task = get_task("gsm8k", data_dir="/path/gsm8k") # a folder with train.jsonl and test.jsonl
    task.prompts("test", limit=100, seed=0)

Data: `{split}.jsonl`, one {"question", "answer"} object per line; the gold answer is the number
after the last "####" of `answer` ("#### 1,234" -> "1234"). Without `data_dir` the folder is looked
up next to the package: recpipe/data/gsm8k (an installed wheel that bundles data/) and then
<repo>/data/gsm8k (a source checkout). Prompt ids are "gsm8k-{split}-{line index:05d}".

Prompt: the question, then an instruction to reason step by step and end with a line "#### <number>".

Reward (RewardResult.from_parts): correctness 1.0 when the response's final answer equals the gold
number, plus format +0.1 when the response's last non-empty line is exactly the final answer in one
of the two forms "#### 42" or "The answer is 42" (case-insensitive; "final answer is", "$", commas and
a closing "." allowed), else -0.1. The final answer is, in this order:
  1. the number right after the last "####";
  2. else the last number right after "answer" ("the answer is 42", "Final answer: 42");
  3. else the last number in the response (the usual GSM8K fallback; the format term still prefers 1.).
Numbers follow answers.py: ASCII digits only, "1,234", "-3", "3.0" == 3, "$5"; responses longer than
answers.MAX_PARSE_CHARS are parsed by head and tail (the final line is always in the tail).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

from recpipe.tasks import answers
from recpipe.tasks.base import Prompt, RewardResult, TaskError, check_prompts_args, check_response

PROMPT_TEMPLATE = (
    "{question}\n"
    "Solve the problem step by step. "
    'End your response with the final answer on its own line as "#### <number>".'
)

_HASHES_CUE = re.compile(r"####\s*$")
_ANSWER_CUE = re.compile(r"answer(?:\s+is)?[\s:=*]*$", re.IGNORECASE | re.ASCII)
_FINAL_LINE = re.compile(
    r"\s*(?:####|(?:the\s+)?(?:final\s+)?answer\s+is:?)\s*" + answers.NUMBER_RE.pattern + r"\.?\s*",
    re.IGNORECASE | re.ASCII,
)


def default_data_dir() -> Path:
    """The bundled GSM8K folder: recpipe/data/gsm8k if installed with data, else <repo>/data/gsm8k."""
    package_dir = Path(__file__).resolve().parents[1]
    candidates = [package_dir / "data" / "gsm8k", package_dir.parent / "data" / "gsm8k"]
    for candidate in candidates:
        if (candidate / "test.jsonl").is_file():
            return candidate
    raise TaskError(
        f"GSM8K data not found in {[str(c) for c in candidates]}: pass data_dir=<folder with *.jsonl>"
    )


def gold_answer(solution: str) -> str:
    """Canonical gold number of a GSM8K solution: the number after its last "####"."""
    _, sep, tail = solution.rpartition("####")
    number = answers.canonical_number(tail) if sep else None
    if number is None:
        raise TaskError(f"answer={solution[-80:]!r}: expected a solution ending in '#### <number>'")
    return number


@lru_cache(maxsize=8)
def load_split(path: Path) -> tuple[tuple[str, str], ...]:
    """(question, canonical gold answer) per line of a GSM8K jsonl file; cached, the train file is 4 MB."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            try:
                record = json.loads(line)
                rows.append((record["question"], gold_answer(record["answer"])))
            except (ValueError, KeyError, TypeError) as e:
                raise TaskError(f"{path}:{line_no}: bad GSM8K record ({type(e).__name__}: {e})") from e
    return tuple(rows)


def extract_answer(text: str) -> str | None:
    """Canonical final answer of a GSM8K response (rules in the module docstring), or None."""
    return answers.cued_answer(text, (_HASHES_CUE, _ANSWER_CUE), latest_first=True)


def has_final_line(text: str) -> bool:
    """True when the last non-empty line is "#### N" or "The answer is N"."""
    last_line = answers.clip(text).rstrip().rpartition("\n")[2]
    return _FINAL_LINE.fullmatch(last_line) is not None


@dataclass(frozen=True)
class GSM8KTask:
    """GSM8K prompts and rewards.

    data_dir: folder with train.jsonl and test.jsonl. Default: the bundled copy (see default_data_dir).
    """

    name: ClassVar[str] = "gsm8k"

    data_dir: Path = field(default_factory=default_data_dir)

    def __post_init__(self) -> None:
        data_dir = Path(self.data_dir)
        for split in ("train", "test"):
            if not (data_dir / f"{split}.jsonl").is_file():
                raise TaskError(f"data_dir={str(self.data_dir)!r}: no {split}.jsonl in it")
        object.__setattr__(self, "data_dir", data_dir.resolve())  # frozen: normalise once, here

    def prompts(self, split: str, limit: int | None = None, seed: int | None = 0) -> list[Prompt]:
        """The split's problems, shuffled by `seed` (None: file order), the first `limit` of them."""
        check_prompts_args(split, limit)
        rows = load_split(self.data_dir / f"{split}.jsonl")
        order = list(range(len(rows)))
        if seed is not None:
            random.Random(seed).shuffle(order)
        return [
            Prompt(
                prompt_id=f"gsm8k-{split}-{i:05d}",
                messages=[{"role": "user", "content": PROMPT_TEMPLATE.format(question=rows[i][0])}],
                answer=rows[i][1],
            )
            for i in order[:limit]
        ]

    def score(self, prompt: Prompt, response: str) -> RewardResult:
        """1.0 for the right final number, +0.1 for a final "#### N" / "The answer is N" line, else -0.1."""
        text = check_response(response)
        correct = extract_answer(text) == answers.gold_number(prompt.answer)
        return RewardResult.from_parts(correct=correct, formatted=has_final_line(text))
