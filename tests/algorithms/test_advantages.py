"""group_advantages: group baselines, GRPO's std normalization, and RED-Drop's balancing."""

from __future__ import annotations

import math
import random

import pytest
import torch

from recpipe.algorithms import STD_EPS, balance_drop, batch_group_advantages, group_advantages, preset

REINFORCE = preset("reinforce")
GRPO = preset("grpo")
RED_DROP = preset("red-drop")


def test_mean_baseline_and_std_normalization():
    # rewards [1, 0, 0.5, 0.5]: mean 0.5, A = [0.5, -0.5, 0, 0];
    # population std = sqrt((0.25 + 0.25 + 0 + 0) / 4) = sqrt(0.125) = 0.353553
    adv, kept = group_advantages([1.0, 0.0, 0.5, 0.5], REINFORCE)
    assert adv == [0.5, -0.5, 0.0, 0.0] and kept == [True] * 4
    adv, _ = group_advantages([1.0, 0.0, 0.5, 0.5], GRPO)
    assert adv == pytest.approx([0.5 / (math.sqrt(0.125) + 1e-6), -0.5 / (math.sqrt(0.125) + 1e-6), 0, 0])
    assert adv[0] == pytest.approx(1.414210, abs=1e-6)


def test_single_response_has_mean_zero_std_one():
    assert group_advantages([0.7], REINFORCE) == ([0.7], [True])
    adv, _ = group_advantages([0.7], GRPO)
    assert adv == [pytest.approx(0.7 / (1 + STD_EPS))]


@pytest.mark.parametrize("config", [REINFORCE, GRPO, RED_DROP])
@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, -0.3])
def test_equal_rewards_give_exact_zeros(config, value):
    # 0.1 * 3 summed in floats is 0.30000000000000004: an exact mean keeps these exactly 0 (and kept).
    adv, kept = group_advantages([value] * 3, config)
    assert adv == [0.0, 0.0, 0.0] and kept == [True] * 3


def test_red_drop_balances_the_group():
    # [1, 0, 0, 0, 0]: mean 0.2, 1 positive, 4 negatives -> drop 3 negatives.
    # Kept = the positive and one negative: mean 0.5, A = +0.5 / -0.5; dropped get A = 0.
    for seed in range(20):
        adv, kept = group_advantages([1.0, 0.0, 0.0, 0.0, 0.0], RED_DROP, random.Random(seed))
        assert kept.count(False) == 3
        assert kept[0] and adv[0] == 0.5
        assert sorted(adv) == [-0.5, 0.0, 0.0, 0.0, 0.5]
        assert all(a == 0.0 for a, k in zip(adv, kept, strict=True) if not k)


def test_red_drop_mean_and_std_are_over_kept_only():
    # [3, 2, 0, 0, 0, 0] (mean 5/6): 2 positives, 4 negatives -> drop 2; kept [3, 2, 0, 0]:
    # mean 1.25, std = sqrt((1.75^2 + 0.75^2 + 2 * 1.25^2) / 4) = sqrt(1.6875) = 1.299038.
    cfg = preset("red-drop", std_normalize=True)
    adv, kept = group_advantages([3.0, 2.0, 0.0, 0.0, 0.0, 0.0], cfg, random.Random(1))
    assert kept[:2] == [True, True] and kept.count(False) == 2
    std = math.sqrt(1.6875)
    assert adv[0] == pytest.approx(1.75 / (std + 1e-6))
    assert adv[1] == pytest.approx(0.75 / (std + 1e-6))
    assert sorted(adv[2:]) == pytest.approx([-1.25 / (std + 1e-6)] * 2 + [0.0, 0.0])
    kept_adv = [a for a, k in zip(adv, kept, strict=True) if k]
    assert sum(kept_adv) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    "rewards",
    [
        [1.0, 1.0, 0.0, 0.0],  # 2 vs 2
        [1.0, 1.0, 1.0, 0.0],  # more positives: RED-Drop never drops positives
        [0.0, 1.0, 2.0],  # r = mean counts as positive: 2 positives vs 1 negative
        [5.0],
    ],
)
def test_red_drop_keeps_balanced_groups_whole(rewards):
    # No negatives to drop: no generator needed, and the result is plain REINFORCE.
    assert group_advantages(rewards, RED_DROP) == group_advantages(rewards, REINFORCE)
    assert all(group_advantages(rewards, RED_DROP)[1])


def test_red_drop_is_seeded_and_uniform():
    rewards = [1.0, 0.0, 0.0, 0.0]  # drop 2 of the 3 negatives
    a = [group_advantages(rewards, RED_DROP, random.Random(s))[1] for s in range(200)]
    b = [group_advantages(rewards, RED_DROP, random.Random(s))[1] for s in range(200)]
    assert a == b
    # Uniform: each negative is dropped 2/3 of the time (133 of 200 expected; +-5 sigma is 100..167).
    for i in (1, 2, 3):
        dropped = sum(not kept[i] for kept in a)
        assert 100 <= dropped <= 167
    # torch.Generator works too and is just as reproducible.
    t1 = group_advantages(rewards, RED_DROP, torch.Generator().manual_seed(3))
    t2 = group_advantages(rewards, RED_DROP, torch.Generator().manual_seed(3))
    assert t1 == t2 and t1[1].count(False) == 2


def test_red_drop_needs_a_generator_only_when_it_drops():
    with pytest.raises(ValueError, match="generator"):
        group_advantages([1.0, 0.0, 0.0], RED_DROP)
    with pytest.raises(ValueError, match="generator"):
        balance_drop([1.0, 0.0, 0.0], generator="not a generator")
    # Without drop the generator is never touched.
    assert group_advantages([1.0, 0.0, 0.0], REINFORCE)[0] == pytest.approx([2 / 3, -1 / 3, -1 / 3])


@pytest.mark.parametrize("rewards", [[], [1.0, float("nan")], [None, 1.0], [float("inf")]])
def test_bad_rewards_raise(rewards):
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(rewards, REINFORCE)


def test_batch_group_advantages_is_deterministic_per_seed():
    groups = [[1.0, 0.0, 0.0, 0.0, 0.0, 0.0]] * 6 + [[0.2, 0.4]]
    adv1, kept1 = batch_group_advantages(groups, RED_DROP, seed=7)
    adv2, kept2 = batch_group_advantages(groups, RED_DROP, seed=7)
    assert (adv1, kept1) == (adv2, kept2)
    assert [k.count(False) for k in kept1] == [4] * 6 + [0]
    assert adv1[-1] == pytest.approx([-0.1, 0.1])
    # Different seeds choose differently somewhere (6 groups x C(5,4) = 5 choices each).
    assert any(batch_group_advantages(groups, RED_DROP, seed=s)[1] != kept1 for s in range(8, 12))
    with pytest.raises(ValueError, match=r"groups\[1\]"):
        batch_group_advantages([[1.0], []], REINFORCE)
