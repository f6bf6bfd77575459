"""Several reward functions, weighted, instead of the task's single reward (TRL's reward_funcs/reward_weights).

    recpipe loop --task dataset --set task.options.path=qa.jsonl \\
        --set 'task.options.reward_funcs=["math", "my_rewards:brevity"]' \\
        --set 'task.options.reward_weights=[1.0, 0.2]'
    get_task("gsm8k", reward_funcs=["task", "my_rewards:brevity"], reward_weights=[1.0, 0.5])

A reward function is ``fn(prompt: Prompt, response: str) -> float`` (or a RewardResult, whose ``reward``
counts), named by "module:function", or one of the built-ins: "task" (the task's own reward), "math"
(recpipe.tasks.math_reward: math-verify correctness and format). The rollout's ``reward`` is
sum(weight_i * fn_i); each function's name, weight and unweighted value are kept in ``RewardResult.terms``
(the rollout's ``reward_terms`` column). ``correctness`` and ``format`` are those of the first function returning a RewardResult (the
task's own, or "math"), else 0.0: they stay what evaluation's accuracy counts. Weights default to 1.0
each. A function that raises or returns a non-finite number fails the response's scoring (zero
reward, the error recorded), as any scorer failure does (recpipe.tasks.scoring).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from recpipe.tasks.base import Prompt, RewardResult, RewardTerm, Task, TaskError

RewardFn = Callable[[Prompt, str], Any]


def builtin_reward(name: str, task: Task) -> RewardFn | None:
    if name == "task":
        return task.score
    if name == "math":
        from recpipe.tasks.math_reward import math_reward, warm_up

        warm_up()
        return math_reward
    return None


def resolve_rewards(task: Task, funcs: Sequence[str], weights: Sequence[float] | None) -> list[tuple[str, RewardFn, float]]:
    """(name, function, weight) for each entry of ``funcs``; ValueError naming a bad entry."""
    from recpipe.tasks.registry import import_callable

    if isinstance(funcs, str) or not funcs:
        raise TaskError(f"reward_funcs={funcs!r}: expected a non-empty list of names ('task', 'math' or "
                         "'module:function')")
    weights = [1.0] * len(funcs) if weights is None else list(weights)
    if len(weights) != len(funcs):
        raise TaskError(f"reward_weights has {len(weights)} entries, reward_funcs {len(funcs)}: one weight each")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
            raise TaskError(f"reward_weights={weights!r}: expected finite numbers")
    resolved = []
    for name, weight in zip(funcs, weights, strict=True):
        fn = builtin_reward(name, task) if isinstance(name, str) else None
        if fn is None:
            fn = import_callable(name, "reward_funcs entry")
        if name in [n for n, _, _ in resolved]:
            raise TaskError(f"reward_funcs names {name!r} twice")
        resolved.append((name, fn, float(weight)))
    return resolved


@dataclass(frozen=True)
class WeightedRewards:
    """A task whose reward is the weighted sum of several reward functions (see the module docstring)."""

    task: Task
    funcs: tuple[tuple[str, RewardFn, float], ...]

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def chat_template(self) -> str | None:
        return getattr(self.task, "chat_template", None)

    def prompts(self, split: str, limit: int | None = None, seed: int | None = 0) -> list[Prompt]:
        return self.task.prompts(split, limit=limit, seed=seed)

    def score(self, prompt: Prompt, response: str) -> RewardResult:
        terms: list[RewardTerm] = []
        first: RewardResult | None = None
        total = 0.0
        for name, fn, weight in self.funcs:
            value = fn(prompt, response)
            if isinstance(value, RewardResult):
                if value.error is not None:
                    return value  # its scorer failed: the response's scoring failed
                first = first or value
                value = value.reward
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"reward function {name!r} returned {value!r}, expected a finite number")
            terms.append(RewardTerm(name, weight, float(value)))
            total += weight * float(value)
        return RewardResult(reward=total, correctness=first.correctness if first else 0.0,
                            format=first.format if first else 0.0, terms=tuple(terms))
