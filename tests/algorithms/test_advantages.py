"""Group advantages: group baselines, GRPO's std normalization, and RED-Drop's balancing.

Production computes them in SQL (schemas/queries/_advantages.sql, select()'s second stage); the
Python group_advantages is the reference it is checked against. Each known answer below is checked
on both: the SQL runs here on in-memory Arrow tables, exactly as select() runs it.
"""

from __future__ import annotations

import math
import random

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import torch

from recpipe.algorithms import LossConfig, preset
from recpipe.select.queries import load_query
from recpipe.select.selection import RESPONSE_COLUMNS
from tests.algorithms.oracle_advantages import STD_EPS, balance_drop, batch_group_advantages, group_advantages
from tests.select.synthetic import synthetic_shard

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


# ---- the production SQL ---------------------------------------------------------------------------
class SqlAdvantages:
    """_advantages.sql over one group per entry of ``groups`` (rewards in sample order), as select() runs it."""

    def __init__(self, groups: list[list[float]]):
        (self.size,) = {len(g) for g in groups}  # one shard: groups of one size
        rows = synthetic_shard(run="t", policy_version=0, shard_id="s", groups=len(groups), group_size=self.size,
                               rewards=groups).select(list(RESPONSE_COLUMNS))
        chosen = pa.table({"run": pa.array(["t"] * len(groups)), "group_id": rows.column("group_id").unique(),
                           "weight": pa.array(np.ones(len(groups))),
                           "position": pa.array(np.arange(len(groups)), pa.int32())})
        self.stage = load_query("_advantages")
        self.con = duckdb.connect()
        self.con.register("chosen_rollouts", rows)
        self.con.register("chosen", chosen)

    def __call__(self, config: LossConfig, seed: int = 0, step: int = 0) -> tuple[list[list[float]], list[list[bool]]]:
        values = {name: p.default for name, p in self.stage.params.items()}
        values.update(step=step, seed=seed, std_normalize=config.std_normalize, drop=config.drop)
        out = self.con.sql(self.stage.body, params=values).to_arrow_table()
        adv, kept, k = out.column("advantage").to_pylist(), out.column("kept").to_pylist(), self.size
        return [adv[i:i + k] for i in range(0, len(adv), k)], [kept[i:i + k] for i in range(0, len(kept), k)]


def sql_advantages(groups: list[list[float]], config: LossConfig, seed: int = 0,
                   step: int = 0) -> tuple[list[list[float]], list[list[bool]]]:
    return SqlAdvantages(groups)(config, seed, step)


def test_sql_mean_baseline_std_normalization_and_single_responses():
    (adv,), (kept,) = sql_advantages([[1.0, 0.0, 0.5, 0.5]], REINFORCE)
    assert adv == [0.5, -0.5, 0.0, 0.0] and kept == [True] * 4
    (adv,), _ = sql_advantages([[1.0, 0.0, 0.5, 0.5]], GRPO)
    assert adv == pytest.approx([0.5 / (math.sqrt(0.125) + 1e-6), -0.5 / (math.sqrt(0.125) + 1e-6), 0, 0])
    assert sql_advantages([[0.7]], REINFORCE) == ([[0.7]], [[True]])
    assert sql_advantages([[0.7]], GRPO)[0] == [[pytest.approx(0.7 / (1 + STD_EPS))]]


@pytest.mark.parametrize("config", [REINFORCE, GRPO, RED_DROP])
def test_sql_equal_rewards_give_exact_zeros(config):
    adv, kept = sql_advantages([[v] * 3 for v in (0.0, 1.0, 0.1, -0.3)], config)
    assert adv == [[0.0] * 3] * 4 and kept == [[True] * 3] * 4


def test_sql_red_drop_balances_the_group_over_the_kept_only():
    stage = SqlAdvantages([[1.0, 0.0, 0.0, 0.0, 0.0]])
    for seed in range(20):
        (adv,), (kept,) = stage(RED_DROP, seed=seed)
        assert kept.count(False) == 3 and kept[0] and adv[0] == 0.5
        assert sorted(adv) == [-0.5, 0.0, 0.0, 0.0, 0.5]
        assert all(a == 0.0 for a, k in zip(adv, kept, strict=True) if not k)
    (adv,), (kept,) = sql_advantages([[3.0, 2.0, 0.0, 0.0, 0.0, 0.0]], preset("red-drop", std_normalize=True), seed=1)
    std = math.sqrt(1.6875)
    assert kept[:2] == [True, True] and kept.count(False) == 2
    assert adv[:2] == pytest.approx([1.75 / (std + 1e-6), 0.75 / (std + 1e-6)])
    assert sorted(adv[2:]) == pytest.approx([-1.25 / (std + 1e-6)] * 2 + [0.0, 0.0])


def test_sql_red_drop_keeps_balanced_groups_whole():
    groups = [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 2.0, 1.0]]
    assert sql_advantages(groups, RED_DROP) == sql_advantages(groups, REINFORCE)
    assert all(all(k) for k in sql_advantages(groups, RED_DROP)[1])


def test_sql_red_drop_is_seeded_and_uniform():
    # 200 groups [1, 0, 0, 0] (drop 2 of the 3 negatives): the draw orders md5(seed:step:rollout_id), so
    # each group draws on its own, and each negative is dropped in 2/3 of them (133; +-5 sigma is 100..167)
    stage = SqlAdvantages([[1.0, 0.0, 0.0, 0.0]] * 200)
    _, kept = stage(RED_DROP, seed=0)
    assert all(k.count(False) == 2 and k[0] for k in kept)
    for i in (1, 2, 3):
        assert 100 <= sum(not k[i] for k in kept) <= 167
    assert stage(RED_DROP, seed=0)[1] == kept  # same seed and step: the same drops
    assert stage(RED_DROP, seed=1)[1] != kept and stage(RED_DROP, seed=0, step=1)[1] != kept


@pytest.mark.parametrize("config", [REINFORCE, GRPO])
def test_sql_equals_the_reference(config):
    rng = random.Random(0)
    for size in (1, 2, 3, 8):
        groups = [[rng.choice([-0.1, 0.1, 0.9, 1.1, 0.0]) for _ in range(size)] for _ in range(30)]
        adv, kept = sql_advantages(groups, config)
        for g, a, k in zip(groups, adv, kept, strict=True):
            expected, expected_kept = group_advantages(g, config)
            assert a == pytest.approx(expected, rel=1e-9, abs=1e-12) and k == expected_kept, g
