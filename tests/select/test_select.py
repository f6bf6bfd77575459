"""select() with the named queries and filters on small archives with known answers."""

from __future__ import annotations

import hashlib
import json
import math

import duckdb
import pytest

from recpipe.algorithms import behaviour_version, preset
from recpipe.select import (
    EmptySelection,
    SelectionError,
    lineage_shard,
    recorded_steps,
    replay_lineage,
    select,
)
from recpipe.select.queries import queries_dir

MIXED = [1.1, -0.1, 0.1, 0.9]  # as conftest.MIXED

# The archive (conftest.build_archive): run a, versions 0..3, shards s0 then s1, groups p0 p1 of
# rewards MIXED = [1.1, -0.1, 0.1, 0.9] (mean 0.5); run b, versions 0..1, shard s0.


def ids(batch) -> list[str]:
    return [g for _, g in batch.groups]


def version_groups(v: int) -> list[str]:
    return [f"a-v{v}-s0/p0", f"a-v{v}-s0/p1", f"a-v{v}-s1/p0", f"a-v{v}-s1/p1"]


# ---- schedule ------------------------------------------------------------------------------------
def test_schedule_takes_unused_groups_of_version_v_of_s_in_id_order(archive):
    first = select(archive, "schedule", run="a", step=0, groups=3)
    assert ids(first) == version_groups(0)[:3]  # shard id order, then group id
    assert [s for s, _ in first.groups] == ["a"] * 3
    # 4 responses per group, advantages r - 0.5, selection weight 1, nothing dropped
    assert len(first) == 12 and first.rollouts.column("kept").to_pylist() == [True] * 12
    assert first.advantages[:4] == pytest.approx([0.6, -0.6, -0.4, 0.4], abs=1e-12)
    assert first.weights == [1.0] * 12
    # step 1 with k = 2 still trains on version 0: only the one group step 0 left
    second = select(archive, "schedule", {"sync_interval": 2}, run="a", step=1, groups=3)
    assert ids(second) == version_groups(0)[3:]
    with pytest.raises(EmptySelection, match="schedule: the query chose no group"):
        select(archive, "schedule", {"sync_interval": 4}, run="a", step=3, groups=3)


@pytest.mark.parametrize(("k", "o"), [(1, 0), (2, 0), (1, 2), (3, 1)])
def test_schedule_follows_the_sync_schedule(archive, k, o):
    for step in range(4):
        batch = select(archive, "schedule", {"sync_interval": k, "sync_offset": o}, run="a", step=step, groups=1)
        v = behaviour_version(step, k, o)
        assert batch.rollouts.column("policy_version").unique().to_pylist() == [v]
        assert batch.rollouts.column("staleness").unique().to_pylist() == [step - v]


def test_schedule_order_does_not_depend_on_commit_order(empty_store, shard):
    """Generator workers commit a version's shards in any order; the batches must not follow it."""
    for name, minute in (("s-b", 0), ("s-a", 5)):  # s-b committed (and stamped) before s-a
        shard(empty_store, "r", 0, name, [MIXED], minute=minute)
    batch = select(empty_store, "schedule", run="r", step=0, groups=1)
    assert ids(batch) == ["s-a/p0"]


def test_schedule_only_reads_its_own_run(archive):
    batch = select(archive, "schedule", run="b", step=1, groups=8)
    assert ids(batch) == ["b-v1-s0/p0", "b-v1-s0/p1"]  # a partial batch: all there is
    with pytest.raises(EmptySelection, match="chose 2 group.*min_groups=3"):
        select(archive, "schedule", run="b", step=0, groups=8, min_groups=3)


# ---- fresh ---------------------------------------------------------------------------------------
def test_fresh_takes_the_newest_groups_within_the_staleness_window(archive):
    batch = select(archive, "fresh", {"max_staleness": 1}, run="a", step=3, groups=10)
    # current version = step = 3; versions 3 and 2, newest first (s1 is newer than s0)
    assert ids(batch) == [f"a-v3-s1/p{i}" for i in (0, 1)] + [f"a-v3-s0/p{i}" for i in (0, 1)] + \
        [f"a-v2-s1/p{i}" for i in (0, 1)] + [f"a-v2-s0/p{i}" for i in (0, 1)]
    again = select(archive, "fresh", {"max_staleness": 3}, run="a", step=4, groups=10)
    assert ids(again) == version_groups(1)[2:] + version_groups(1)[:2]  # 2, 3 used up; 0 is too old
    only = select(archive, "fresh", {"max_staleness": 0, "current_version": 0}, run="b", step=9, groups=10)
    assert ids(only) == ["b-v0-s0/p0", "b-v0-s0/p1"]


def test_staleness_decay_weights(archive):
    batch = select(archive, "fresh", {"max_staleness": 3, "staleness_decay": 0.5}, run="a", step=3, groups=16)
    for version, weight in zip(batch.rollouts.column("policy_version").to_pylist(), batch.weights, strict=True):
        assert weight == pytest.approx(math.exp(-0.5 * (3 - version)))
    with pytest.raises(ValueError, match="staleness_decay.*>= 0"):
        select(archive, "fresh", {"staleness_decay": -1.0}, run="a", step=5, groups=2)


# ---- replay --------------------------------------------------------------------------------------
def test_replay_ranks_the_archive_by_recency_and_uses(archive):
    first = select(archive, "replay", {"use_penalty": 10.0}, run="r", step=0, groups=6)
    # priority 0: the newest version of each run (a v3: 4 groups, b v1: 2 groups)
    assert sorted(ids(first)) == sorted(version_groups(3) + ["b-v1-s0/p0", "b-v1-s0/p1"])
    second = select(archive, "replay", {"use_penalty": 10.0}, run="r", step=1, groups=6)
    assert sorted(ids(second)) == sorted(version_groups(2) + ["b-v0-s0/p0", "b-v0-s0/p1"])
    # every group used once: with max_uses=1 only never-used groups remain (a v0, a v1)
    third = select(archive, "replay", {"max_uses": 1}, run="r", step=2, groups=20)
    assert sorted(ids(third)) == sorted(version_groups(0) + version_groups(1))
    with pytest.raises(EmptySelection):
        select(archive, "replay", {"max_uses": 1}, run="r", step=3, groups=20)
    # uses are counted per training run: another run sees no uses
    other = select(archive, "replay", {"use_penalty": 10.0}, run="r2", step=0, groups=6)
    assert sorted(ids(other)) == sorted(ids(first))


def test_replay_can_be_restricted_to_some_runs(archive):
    batch = select(archive, "replay", {"runs": ["b"]}, run="r", step=0, groups=10)
    assert sorted(ids(batch)) == ["b-v0-s0/p0", "b-v0-s0/p1", "b-v1-s0/p0", "b-v1-s0/p1"]
    assert ids(batch)[:2] in (["b-v1-s0/p0", "b-v1-s0/p1"], ["b-v1-s0/p1", "b-v1-s0/p0"])  # newest first


# ---- filters -------------------------------------------------------------------------------------
@pytest.fixture
def varied(empty_store, shard):
    """One partition of run x, version 0, whose groups each trip one filter."""
    s = empty_store
    shard(s, "x", 0, "plain", [[1.1, -0.1, 0.1, 0.9]], minute=0, max_tokens=8)          # mean 0.5
    shard(s, "x", 0, "flat", [[1.1, 1.1, 1.1, 1.1]], minute=1, max_tokens=8)           # zero variance
    shard(s, "x", 0, "low", [[-0.1, -0.1, 0.1, -0.1]], minute=2, max_tokens=8)         # mean -0.05
    shard(s, "x", 0, "cut", [[1.1, -0.1, 0.1, 0.9]], minute=3, max_tokens=8, truncated=[(0, 2)])
    shard(s, "x", 0, "long", [[1.1, -0.1, 0.1, 0.9]], minute=4, max_tokens=400, truncated=[(0, 0)])
    shard(s, "x", 0, "gsm", [[1.1, -0.1, 0.1, 0.9]], minute=5, max_tokens=8, task="gsm8k")
    shard(s, "x", 0, "err", [[1.1, -0.1, 0.1, 0.9]], minute=6, max_tokens=8, reward_errors=[(0, 1)])
    return s


ALL = ["plain", "flat", "low", "cut", "long", "gsm"]  # "err" is out by default (exclude_reward_errors)


@pytest.mark.parametrize(("params", "expected"), [
    ({}, ALL),
    ({"drop_zero_variance": True}, [g for g in ALL if g != "flat"]),
    ({"min_reward_mean": 0.0}, [g for g in ALL if g != "low"]),
    ({"max_reward_mean": 0.6}, [g for g in ALL if g != "flat"]),
    ({"min_reward_mean": 0.4, "max_reward_mean": 0.6}, ["plain", "cut", "long", "gsm"]),
    ({"exclude_truncated": True}, [g for g in ALL if g not in ("cut", "long")]),
    ({"max_response_length": 8}, [g for g in ALL if g != "long"]),
    ({"task": "gsm8k"}, ["gsm"]),
    ({"exclude_reward_errors": False}, ALL + ["err"]),
])
def test_filters(varied, params, expected):
    batch = select(varied, "schedule", params, run="x", step=0, groups=10)
    assert ids(batch) == sorted(f"{g}/p0" for g in expected)  # schedule: id order


def test_filters_apply_to_every_named_query(varied):
    for step, query in enumerate(("fresh", "replay")):
        batch = select(varied, query, {"task": "gsm8k"}, run="x", step=step, groups=10)
        assert ids(batch) == ["gsm/p0"]


def test_a_filter_that_leaves_nothing_says_so(varied):
    with pytest.raises(EmptySelection, match=r"schedule: the query chose no group.*run='x', step=0, "
                                             r"params \{'task': 'poetry'\}"):
        select(varied, "schedule", {"task": "poetry"}, run="x", step=0, groups=10)
    assert recorded_steps(varied, "x") == []  # nothing recorded for an empty selection


def test_unknown_and_reserved_parameters_are_refused(archive):
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['max_stalenes'\]; allowed: .*max_staleness"):
        select(archive, "fresh", {"max_stalenes": 2}, run="a", step=0, groups=2)
    with pytest.raises(ValueError, match="set by select"):
        select(archive, "fresh", {"run": "b"}, run="a", step=0, groups=2)
    with pytest.raises(ValueError, match="set by select"):
        select(archive, "fresh", {"drop": "none"}, run="a", step=0, groups=2, loss_config=preset("red-drop"))
    with pytest.raises(ValueError, match="'drop' is 'sometimes'; allowed: none, balance"):
        select(archive, "fresh", {"drop": "sometimes"}, run="a", step=0, groups=2)
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        select(archive, "fresh", run="a", step=-1, groups=2)
    with pytest.raises(ValueError, match="groups must be an integer >= 1"):
        select(archive, "fresh", run="a", step=0, groups=0)


# ---- files, lineage, resume ----------------------------------------------------------------------
def test_groups_spread_over_files_and_compacted_partitions(archive):
    before = select(archive, "schedule", run="a", step=0, groups=4)  # both shard files of a/v0
    assert ids(before) == version_groups(0)
    assert before.rollouts.column("sample_index").to_pylist() == [0, 1, 2, 3] * 4
    archive.compact("rollouts", run="a")
    archive.compact("groups", run="a")
    assert len(archive.files("rollouts", run="a")) == 4  # one merged file per partition now
    # the same groups, read back from the merged files, come out identical
    again = select(archive, "lineage", {"source_run": "a"}, run="a2", step=0, groups=4)
    payload = ["rollout_id", "advantage", "reward", "prompt_token_ids", "response_token_ids", "behaviour_logprobs"]
    assert again.rollouts.select(payload).equals(before.rollouts.select(payload))
    assert ids(select(archive, "schedule", run="a", step=1, groups=4)) == version_groups(1)
    assert replay_lineage(archive, "a", 0).rollout_ids == before.rollout_ids


def test_lineage_rows_are_written_and_queryable(archive):
    batch = select(archive, "schedule", {"sync_interval": 2}, run="a", step=1, groups=2,
                   loss_config=preset("grpo"), seed=5)
    con = archive.connect(read_only=True)
    rows = con.sql("SELECT * FROM batches WHERE run = 'a' AND step = 1").to_arrow_table().to_pylist()
    assert len(rows) == len(batch) == 8
    text = (queries_dir() / "schedule.sql").read_bytes()
    first = rows[0]
    assert first["query_name"] == "schedule" and first["query_hash"] == hashlib.sha256(text).hexdigest()
    params = json.loads(first["params"])
    assert params["sync_interval"] == 2 and params["std_normalize"] is True and params["seed"] == 5
    assert params["groups"] == 2 and params["run"] == "a" and params["step"] == 1
    assert {r["source_run"] for r in rows} == {"a"} and {r["policy_version"] for r in rows} == {0}
    by_id = {r["rollout_id"]: r for r in rows}
    for rid, adv, w in zip(batch.rollout_ids, batch.advantages, batch.weights, strict=True):
        assert by_id[rid]["advantage"] == adv and by_id[rid]["weight"] == w
    assert archive.is_committed("batches", {"run": "a"}, lineage_shard(1))
    # lineage joins back to the archive with plain SQL
    joined = con.execute("SELECT count(*) FROM batches b JOIN rollouts r ON r.run = b.source_run "
                         "AND r.rollout_id = b.rollout_id WHERE b.run = 'a'").fetchone()[0]
    assert joined == 8


def test_a_recorded_step_is_returned_not_selected_again(archive):
    first = select(archive, "fresh", {"max_staleness": 3}, run="a", step=3, groups=2,
                   loss_config=preset("red-drop"), seed=1)
    # a rerun after a crash - even with another query and loss config - gets the recorded batch
    again = select(archive, "replay", run="a", step=3, groups=5, loss_config=preset("grpo"), seed=9)
    assert again.resumed and not first.resumed
    assert again.rollout_ids == first.rollout_ids
    assert again.advantages == first.advantages and again.weights == first.weights
    assert again.rollouts.column("kept").equals(first.rollouts.column("kept"))
    assert again.query_name == "fresh" and again.params == first.params
    assert recorded_steps(archive, "a") == [3]
    assert len(archive.files("batches", run="a")) == 1


def test_replay_lineage_rebuilds_a_batch_for_retraining(archive):
    recorded = select(archive, "schedule", run="a", step=0, groups=2)
    same = replay_lineage(archive, "a", 0)
    assert same.rollout_ids == recorded.rollout_ids and same.advantages == recorded.advantages
    assert same.rollouts.column("response_token_ids").equals(recorded.rollouts.column("response_token_ids"))
    grpo = replay_lineage(archive, "a", 0, loss_config=preset("grpo"))
    std = math.sqrt(sum((r - 0.5) ** 2 for r in [1.1, -0.1, 0.1, 0.9]) / 4)
    assert grpo.rollout_ids == recorded.rollout_ids
    assert grpo.advantages[:4] == pytest.approx([x / (std + 1e-6) for x in [0.6, -0.6, -0.4, 0.4]])
    assert grpo.params["std_normalize"] is True
    with pytest.raises(SelectionError, match=r"no recorded batch for step 7 \(recorded steps: \[0\]\)"):
        replay_lineage(archive, "a", 7)


def test_lineage_query_retrains_on_another_runs_batches(archive):
    original = select(archive, "schedule", run="a", step=0, groups=3)
    retrain = select(archive, "lineage", {"source_run": "a"}, run="a-retrain", step=0, groups=3,
                     loss_config=preset("grpo"))
    assert sorted(retrain.rollout_ids) == sorted(original.rollout_ids)
    assert retrain.query_name == "lineage" and recorded_steps(archive, "a-retrain") == [0]
    with pytest.raises(ValueError, match="chose 3 groups but groups=2; add LIMIT"):
        select(archive, "lineage", {"source_run": "a", "source_step": 0}, run="a-retrain", step=1, groups=2)


def damage(store, table, shard=None, **values):
    """Overwrite one active data file of ``table`` (in the partition ``values``, of ``shard`` if given)."""
    files = [f for f in store.snapshot(table).files if f.values == values and shard in (None, f.shard_id)]
    assert files, (table, values, shard)
    with open(files[0].path, "r+b") as f:
        f.write(b"damaged!" * 8)


def test_run_scoped_queries_list_only_their_runs_files(archive):
    # schedule and fresh declare `-- scope: run`: another run's (here unreadable) files are never opened
    damage(archive, "groups", run="b", policy_version=0)
    assert ids(select(archive, "schedule", run="a", step=0, groups=1)) == version_groups(0)[:1]
    assert ids(select(archive, "fresh", run="a", step=1, groups=1)) == [version_groups(1)[2]]
    with pytest.raises(duckdb.Error):  # replay reads the whole archive
        select(archive, "replay", run="a", step=2, groups=1)


def test_run_names_are_checked(archive):
    with pytest.raises(ValueError, match="run must be 1-64 letters"):
        select(archive, "schedule", run="a*", step=0, groups=1)


def test_the_trainer_accepts_the_batch(archive):
    from recpipe.train.batching import samples_from_table

    batch = select(archive, "schedule", run="a", step=0, groups=2, loss_config=preset("red-drop"))
    samples = samples_from_table(batch.rollouts)
    assert [s.rollout_id for s in samples] == batch.rollout_ids
    assert [s.advantage for s in samples] == batch.advantages
    assert [s.kept for s in samples] == batch.rollouts.column("kept").to_pylist()
    assert all(len(s.response) == len(s.old_logprobs) > 0 for s in samples)


def test_only_the_chosen_groups_shard_files_are_read(archive):
    # a/v0 holds shards s0 and s1; a batch of s0's groups must not open s1's file
    damage(archive, "rollouts", run="a", policy_version=0, shard="a-v0-s1")
    assert ids(select(archive, "schedule", run="a", step=0, groups=2)) == version_groups(0)[:2]
    with pytest.raises(SelectionError, match=r"cannot read the chosen groups' rollouts .*recpipe doctor"):
        select(archive, "schedule", run="a", step=1, groups=3, params={"sync_interval": 2})


def test_a_non_finite_reward_is_reported(empty_store, shard):
    shard(empty_store, "n", 0, "s", [[1.0, float("nan"), 0.0, 1.0]])
    with pytest.raises(SelectionError, match="reward that is not a finite number"):
        select(empty_store, "schedule", run="n", step=0, groups=1)


def test_a_recorded_selection_reruns_and_reads_back_the_same(archive):
    from recpipe.select import rerun_recorded

    recorded = select(archive, "fresh", {"max_staleness": 3}, run="a", step=3, groups=3,
                      loss_config=preset("red-drop"), seed=2)
    select(archive, "schedule", run="a", step=0, groups=2)  # newer table versions than the recorded ones
    for again in (rerun_recorded(archive, "a", 3), replay_lineage(archive, "a", 3)):
        assert again.rollout_ids == recorded.rollout_ids and again.advantages == recorded.advantages
        assert again.weights == recorded.weights
        assert again.rollouts.column("kept").equals(recorded.rollouts.column("kept"))
        assert again.rollouts.column("response_token_ids").equals(recorded.rollouts.column("response_token_ids"))
    assert recorded_steps(archive, "a") == [0, 3]  # neither recorded anything
