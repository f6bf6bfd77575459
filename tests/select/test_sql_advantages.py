"""The SQL advantages (_advantages.sql), through select(), agree with the oracle (tests/algorithms/oracle_advantages.py)."""

from __future__ import annotations

import random
import statistics

import pytest

from recpipe.algorithms import preset
from recpipe.select import select
from recpipe.store import Store
from tests.algorithms.oracle_advantages import balance_drop, group_advantages

GRID = [-0.1, 0.1, 0.9, 1.1, 0.0, 1.0]  # the default task's rewards, and a failed reward's 0
# Groups where float summation order would flip "r >= mean" or leave a residue in A: the reference
# compares exactly (statistics.mean), and so must the SQL.
TIES = [[0.1, 1.1, -0.9], [0.0, 0.1, 0.2], [0.1, 0.2, 0.3], [1.1, 0.9, 1.0], [0.5], [0.1] * 7,
        [1.1, -0.1, -0.1, -0.1, 1.1, -0.1, -0.1, -0.1]]


@pytest.fixture(scope="module")
def parity_store(tmp_path_factory, shard):
    """Run p: one shard per group size K = 1..8, each with 24 random groups (half on the reward grid,
    half continuous) plus the tie cases of that size."""
    store = Store.create(tmp_path_factory.mktemp("parity") / "store")
    rng = random.Random(0)
    rewards: dict[str, list[float]] = {}
    for k in range(1, 9):
        groups = [[rng.choice(GRID) for _ in range(k)] if g % 2 else [rng.uniform(-1, 2) for _ in range(k)]
                  for g in range(24)]
        groups += [t for t in TIES if len(t) == k]
        for gid, r in zip(shard(store, "p", 0, f"k{k}", groups), groups, strict=True):
            rewards[gid] = r
    path = store.root.parent / "all.sql"
    path.write_text("SELECT run, group_id FROM groups ORDER BY group_id LIMIT $groups\n")
    return store, rewards, str(path)


def _by_group(batch) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in batch.rollouts.select(["group_id", "sample_index", "reward", "advantage", "kept"]).to_pylist():
        out.setdefault(row["group_id"], []).append(row)
    return out


@pytest.mark.parametrize("name", ["reinforce", "grpo"])
def test_sql_advantages_equal_group_advantages(parity_store, name):
    store, rewards, path = parity_store
    config = preset(name)
    batch = select(store, path, run=f"t-{name}", step=0, groups=1000, loss_config=config)
    groups = _by_group(batch)
    assert len(groups) == len(rewards)
    for gid, rows in groups.items():
        assert [r["reward"] for r in rows] == rewards[gid]
        expected, kept = group_advantages(rewards[gid], config)
        assert [r["advantage"] for r in rows] == pytest.approx(expected, rel=1e-9, abs=1e-12), rewards[gid]
        assert [r["kept"] for r in rows] == kept
        if len(set(rewards[gid])) == 1 and len(rows) > 1:
            assert [r["advantage"] for r in rows] == [0.0] * len(rows)  # exactly 0, no float residue


@pytest.mark.parametrize("std_normalize", [False, True])
def test_sql_red_drop_keeps_the_reference_invariants(parity_store, std_normalize):
    store, rewards, path = parity_store
    config = preset("red-drop", std_normalize=std_normalize)
    batch = select(store, path, run=f"t-drop-{std_normalize}", step=0, groups=1000, loss_config=config, seed=3)
    dropped_any = False
    for gid, rows in _by_group(batch).items():
        r = rewards[gid]
        kept = [row["kept"] for row in rows]
        # how many: the reference's own choice (other random picks, same count and same sign test)
        reference = balance_drop(r, random.Random(0))
        assert kept.count(False) == reference.count(False), r
        mean_all = statistics.mean(r)
        assert all(x < mean_all for x, k in zip(r, kept, strict=True) if not k)  # only negatives are dropped
        dropped_any |= not all(kept)
        # advantages: the reference's formula over the kept responses, 0 for the dropped
        kept_r = [x for x, k in zip(r, kept, strict=True) if k]
        mean, std = (0.0, 1.0) if len(kept_r) == 1 else (statistics.mean(kept_r), statistics.pstdev(kept_r))
        scale = 1 / (std + 1e-6) if std_normalize else 1.0
        expected = [(x - mean) * scale if k else 0.0 for x, k in zip(r, kept, strict=True)]
        assert [row["advantage"] for row in rows] == pytest.approx(expected, rel=1e-9, abs=1e-12), r
    assert dropped_any


def test_red_drop_choice_is_seeded(parity_store):
    store, _, path = parity_store
    config = preset("red-drop")

    def kept(run: str, seed: int, step: int = 0) -> list[bool]:
        return select(store, path, run=run, step=step, groups=1000, loss_config=config, seed=seed) \
            .rollouts.column("kept").to_pylist()

    first, same, other = kept("s1", seed=1), kept("s2", seed=1), kept("s3", seed=2)
    assert first == same  # same seed and step: the same responses dropped
    assert first != other and first.count(False) == other.count(False)  # another seed: other picks, same count
    assert kept("s4", seed=1, step=1) != first  # the step is part of the draw: a reused group is redrawn


def test_red_drop_on_a_known_group(empty_store, shard):
    # mean 0.35: one positive (1.1), three negatives -> two of them dropped, A over {1.1, one negative}
    shard(empty_store, "k", 0, "s", [[1.1, 0.1, 0.1, 0.1]])
    batch = select(empty_store, "schedule", run="k", step=0, groups=1, loss_config=preset("red-drop"))
    kept = batch.rollouts.column("kept").to_pylist()
    assert kept[0] and kept.count(False) == 2
    survivor = kept[1:].index(True) + 1
    expected = [0.0] * 4
    expected[0], expected[survivor] = 0.5, -0.5
    assert batch.advantages == pytest.approx(expected)
