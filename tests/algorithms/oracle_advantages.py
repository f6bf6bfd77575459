"""The tests' reference for group-relative advantages (GRPO's std normalization, RED-Drop's balancing).

Production computes advantages in SQL (schemas/queries/_advantages.sql, select()'s second stage); this is
the independent Python version the tests check it against (tests/algorithms/test_advantages.py,
tests/select/test_sql_advantages.py) and the trainer tests build batches with.

    advantages, kept = group_advantages([1.0, 0.0, 0.0, 0.0], preset("red-drop"), random.Random(0))

One group = the K responses to one prompt. Per docs/algorithms.md:
    A_i = r_i - mean_g                      (mean over the kept responses)
    A_i = (r_i - mean_g) / (std_g + 1e-6)   when std_normalize (population std, ddof = 0)
A group with a single kept response has mean 0 and std 1. RED-Drop (drop="balance") calls a response
positive if r_i >= the mean over the whole group; when negatives outnumber positives it drops
#neg - #pos negatives uniformly at random: they get A = 0 and kept = False (they stay in the batch and
still count in the token-mean denominator), and mean/std are recomputed over the kept responses.

Means and stds use ``statistics`` (exact rational sums, correctly rounded), so equal rewards give exactly
0 and "r_i >= mean" does not flip on float summation order.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence

import torch

from recpipe.algorithms.config import LossConfig

STD_EPS = 1e-6  # added to the std before dividing, as in GRPO


def _check_rewards(rewards: Sequence[float]) -> list[float]:
    if len(rewards) == 0:
        raise ValueError("rewards: a group needs at least one response; got an empty group")
    out = []
    for i, r in enumerate(rewards):
        if r is None or not math.isfinite(float(r)):
            raise ValueError(f"rewards[{i}] must be a finite number; got {r!r}")
        out.append(float(r))
    return out


def _sample(population: list[int], k: int, generator: random.Random | torch.Generator) -> list[int]:
    """k distinct items of population, uniformly at random, from either kind of seeded generator."""
    if isinstance(generator, random.Random):
        return generator.sample(population, k)
    if isinstance(generator, torch.Generator):
        order = torch.randperm(len(population), generator=generator, device=generator.device)[:k]
        return [population[j] for j in order.tolist()]
    raise ValueError(f"generator must be random.Random or torch.Generator; got {type(generator).__name__}")


def balance_drop(rewards: Sequence[float], generator: random.Random | torch.Generator | None) -> list[bool]:
    """RED-Drop's choice for one group: kept[i] is False for the negatives dropped to balance the group."""
    r = _check_rewards(rewards)
    mean_all = statistics.mean(r)
    positive = [x >= mean_all for x in r]  # never all False: max(r) >= mean
    negatives = [i for i, p in enumerate(positive) if not p]
    surplus = len(negatives) - (len(r) - len(negatives))
    kept = [True] * len(r)
    if surplus <= 0:
        return kept
    if generator is None:
        # Which negatives go is random by definition; an implicit unseeded choice would make the run
        # irreproducible, a fixed default seed would drop the same sample indices in every group.
        raise ValueError(
            "generator: drop='balance' must drop negatives at random; pass a seeded random.Random or "
            "torch.Generator (or use batch_group_advantages(..., seed=...))"
        )
    for i in _sample(negatives, surplus, generator):
        kept[i] = False
    return kept


def group_advantages(
    rewards: Sequence[float],
    config: LossConfig,
    generator: random.Random | torch.Generator | None = None,
) -> tuple[list[float], list[bool]]:
    """Advantages of one group's responses and which of them were kept (False = dropped by RED-Drop).

    generator is only used (and then required) when config.drop == "balance" has negatives to drop.
    """
    r = _check_rewards(rewards)
    kept = balance_drop(r, generator) if config.drop == "balance" else [True] * len(r)
    kept_rewards = [x for x, k in zip(r, kept, strict=True) if k]
    if len(kept_rewards) == 1:
        mean, std = 0.0, 1.0  # no baseline from a group of one
    else:
        mean = statistics.mean(kept_rewards)
        std = statistics.pstdev(kept_rewards, mean)
    scale = 1.0 / (std + STD_EPS) if config.std_normalize else 1.0
    advantages = [(x - mean) * scale if k else 0.0 for x, k in zip(r, kept, strict=True)]
    return advantages, kept


def batch_group_advantages(
    groups: Sequence[Sequence[float]], config: LossConfig, seed: int = 0
) -> tuple[list[list[float]], list[list[bool]]]:
    """group_advantages for many groups, in order, with one random.Random(seed): same seed, same drops."""
    generator = random.Random(seed)
    advantages, kept = [], []
    for i, rewards in enumerate(groups):
        try:
            a, k = group_advantages(rewards, config, generator)
        except ValueError as exc:
            raise ValueError(f"groups[{i}]: {exc}") from exc
        advantages.append(a)
        kept.append(k)
    return advantages, kept
