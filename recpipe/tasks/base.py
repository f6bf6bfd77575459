"""The task plugin interface: what a prompt, a reward and a task are.

A task hands out prompts (chat messages plus a gold answer) and scores a
response to one of them. The generator applies the model's chat template to
`Prompt.messages`, samples K responses, and calls `score_responses` (see
scoring.py), which turns every response into a `RewardResult`; the result maps
onto the rollout table's `reward`, `reward_parts`, `reward_terms` and `reward_error` columns.

    from recpipe.tasks import get_task, score_responses
    task = get_task("arithmetic")
    prompts = task.prompts("train", limit=4, seed=0)
    results = score_responses(task, prompts, ["7", "The answer is 7.", "", "12"])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

from recpipe.errors import RecpipeError


class TaskError(RecpipeError, ValueError):
    """A task that cannot be built or scored as configured: bad options, unreadable data, a reward function
    that returns no finite number."""


CORRECT_REWARD = 1.0
FORMAT_BONUS = 0.1  # +0.1 for the expected answer format, -0.1 otherwise
MAX_ERROR_CHARS = 500  # error strings land in Parquet; an exception message may quote a 10 MB response


@dataclass(frozen=True)
class Prompt:
    """One prompt of a task.

    prompt_id: stable id within the task (same problem -> same id, whatever the seed or limit).
    messages: chat messages, e.g. [{"role": "user", "content": "What is 3 + 4? ..."}].
    answer: the gold final answer as canonical text (a number, see answers.canonical_number).
    """

    prompt_id: str
    messages: list[dict[str, Any]]
    answer: str


class RewardTerm(NamedTuple):
    """One reward function's share of a reward: reward = sum(weight * value) over the terms."""

    name: str  # "task", "math" or "module:function"
    weight: float
    value: float  # unweighted


@dataclass(frozen=True)
class RewardResult:
    """The reward of one response: reward = correctness + format.

    correctness: 1.0 for the right final answer, else 0.0.
    format: +0.1 when the response has the task's expected answer format, else -0.1.
    error: "ExcType: message" or "timeout after Xs" when scoring failed; then all three numbers are 0.0.
    terms: with several weighted reward functions (recpipe.tasks.rewards), each one's name, weight and
        unweighted value; reward is then their weighted sum. None: the task's own reward, one term "task".
    """

    reward: float
    correctness: float
    format: float
    error: str | None = None
    terms: tuple[RewardTerm, ...] | None = None

    def __post_init__(self) -> None:
        # A NaN reward would silently poison group means and advantages downstream.
        for field in ("reward", "correctness", "format"):
            value = getattr(self, field)
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"RewardResult.{field}={value!r}: expected a finite float")
        for term in self.terms or ():
            for value in (term.weight, term.value):
                if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                    raise ValueError(f"RewardResult.terms: {term!r}: expected finite floats")

    @classmethod
    def from_parts(cls, correct: bool, formatted: bool) -> RewardResult:
        """The standard reward: 1.0 if correct else 0.0, plus +0.1 / -0.1 for the format."""
        correctness = CORRECT_REWARD if correct else 0.0
        fmt = FORMAT_BONUS if formatted else -FORMAT_BONUS
        return cls(reward=correctness + fmt, correctness=correctness, format=fmt)

    @classmethod
    def failed(cls, error: str) -> RewardResult:
        """Scoring failed: zero reward, the reason kept (truncated to MAX_ERROR_CHARS)."""
        if len(error) > MAX_ERROR_CHARS:
            error = error[: MAX_ERROR_CHARS - 3] + "..."
        return cls(reward=0.0, correctness=0.0, format=0.0, error=error)

    def as_row(self) -> dict[str, Any]:
        """The rollout table's reward columns: reward, reward_parts{correctness, format}, reward_terms (so that
        reward = sum(weight * value) on every row: none when scoring failed), reward_error."""
        if self.error is not None:
            terms: tuple[RewardTerm, ...] = ()
        else:
            terms = self.terms if self.terms is not None else (RewardTerm("task", 1.0, self.reward),)
        return {
            "reward": self.reward,
            "reward_parts": {"correctness": self.correctness, "format": self.format},
            "reward_terms": [t._asdict() for t in terms],
            "reward_error": self.error,
        }


@runtime_checkable
class Task(Protocol):
    """What a task plugin implements.

    name: the task name recorded in the rollout table.
    prompts(split, limit, seed): the prompts of "train" or "test"; deterministic for given arguments.
        seed orders them (None keeps the task's canonical order); limit takes the first `limit`.
    score(prompt, response): the reward of one response. It may raise: score_responses records the
        exception as the reward error and gives that response zero reward.
    Optional: chat_template, a Jinja chat template used instead of the model's to turn messages into
        token ids (recpipe.generate.rollouts.prompt_token_ids; the dataset task's option).
    """

    name: str

    def prompts(self, split: str, limit: int | None = None, seed: int | None = 0) -> list[Prompt]: ...

    def score(self, prompt: Prompt, response: str) -> RewardResult: ...


SPLITS = ("train", "test")


def check_prompts_args(split: str, limit: int | None) -> None:
    """Shared argument checks of Task.prompts (ValueError naming the bad argument)."""
    if split not in SPLITS:
        raise TaskError(f"split={split!r}: expected one of {list(SPLITS)}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise TaskError(f"limit={limit!r}: expected None or an int >= 0")


def check_response(response: object) -> str:
    """Built-in scorers accept text only; None or bytes means the caller passed the wrong thing."""
    if not isinstance(response, str):
        raise ValueError(f"response={type(response).__name__}: expected str")
    return response
