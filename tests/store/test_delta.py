"""The archive's Delta Lake guarantees, on a local disk and on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time

import polars as pl
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from recpipe.schema import SCHEMA_VERSION, table_spec
from recpipe.store import RunLocked, Store, StoreError, parse_as_of
from recpipe.store.compact import vacuum_table
from recpipe.store.lease import Lease, LeaseLost
from recpipe.store.location import Location, LocationError
from tests import ROOT
from tests.support import synthetic_rollouts


def rows(store: Store, table: str = "rollouts", **kw) -> list[str]:
    return sorted(store.read(table, **kw).column("rollout_id").to_pylist())


def spawn(where, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.store.append_worker", where.uri, *args], env=where.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def test_one_shard_is_one_transaction_named_by_its_id(where):
    store = where.create()
    assert store.append_rollouts(synthetic_rollouts(shard_id="s1"), shard_id="s1") is True
    assert store.append_rollouts(synthetic_rollouts(shard_id="s1", seed=9), shard_id="s1") is False
    assert store.versions()["rollouts"] == 1 and store.versions()["groups"] == 1
    assert store.delta("rollouts").transaction_version("run=r/policy_version=0/s1") == 1
    assert len(rows(store)) == 8


def test_many_writers_and_a_compactor_land_every_row_exactly_once(where):
    store = where.create()
    workers = [spawn(where, str(w), "5") for w in range(3)] + [spawn(where, "9", "3", "--compact")]
    for proc in workers:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    store = where.open()
    shared = {f"s{i}" for i in range(5)}
    own = {f"w{w}-{i}" for w in range(3) for i in range(5)} | {f"w9-{i}" for i in range(3)}
    got = store.read("rollouts").column("shard_id").to_pylist()
    assert sorted(set(got)) == sorted(shared | own)
    assert len(got) == 8 * len(shared | own)  # 2 groups x 4 samples per shard, none twice
    assert len(set(rows(store))) == len(got)
    groups = store.read("groups")
    assert groups.num_rows == 2 * len(shared | own)


def test_two_trainers_on_one_run_one_is_refused(where):
    store = where.create()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys,time; from recpipe.store import Store; "
         "Store(sys.argv[1]).lock('r', 'trainer').acquire(); print('held', flush=True); time.sleep(120)", where.uri],
        env=where.env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=f"trainer lease held by pid {holder.pid} "):
            store.lock("r", "trainer").acquire()
    finally:
        holder.kill()
        holder.wait()
    with store.lock("r", "trainer") as lease:  # a killed holder on this host frees it at once
        assert lease.held


def test_a_lease_of_another_machine_is_taken_only_after_it_expires(where):
    store = where.create()
    other = Lease(store, "r", "trainer", ttl_s=3.0)
    other.holder = "elsewhere:4242:1:beef"  # as if held by a process on another host
    other._commit(store, 1, released=False)
    mine = Lease(store, "r", "trainer", ttl_s=3.0)
    with pytest.raises(RunLocked, match="pid .* on "):
        mine.acquire()
    time.sleep(3.5)  # it was not renewed
    mine.acquire()
    try:
        # The old holder, back, finds the lease gone and stops before writing.
        other.epoch = 1
        with pytest.raises(LeaseLost):
            other.check()
        mine.check()
    finally:
        mine.release()


def test_two_commits_of_one_application_transaction_version_cannot_both_land(where):
    store = where.create()
    lease = Lease(store, "r", "loop")
    assert lease._commit(store, 1, released=False) is True
    rival = Lease(store, "r", "loop")
    assert rival._commit(store, 1, released=False) is False  # epoch 1 is taken, whoever tries
    assert store.read("leases").num_rows == 1


def test_time_travel_returns_the_rows_of_a_version(where):
    store = where.create()
    store.append_rollouts(synthetic_rollouts(shard_id="a"), shard_id="a")
    first = store.versions()
    before = dt.datetime.now(dt.UTC)
    time.sleep(1.1)  # S3 servers give commit times to the second (Last-Modified)
    store.append_rollouts(synthetic_rollouts(shard_id="b"), shard_id="b")
    assert len(rows(store)) == 16
    assert len(rows(store, as_of=first)) == 8
    assert len(rows(store, as_of=first["rollouts"])) == 8
    assert len(rows(store, as_of=before)) == 8
    with pytest.raises(StoreError, match="has no version"):
        store.read("rollouts", as_of=99)


def test_as_of_text_forms():
    assert parse_as_of("12") == 12
    assert parse_as_of("groups=4, rollouts=3") == {"groups": 4, "rollouts": 3}
    assert parse_as_of('{"groups": 4}') == {"groups": 4}
    assert parse_as_of("2026-12-01T14:00:00") == dt.datetime(2026, 12, 1, 14, tzinfo=dt.UTC)
    for bad, message in [("nope", "expected a table version"), ("tables=1", "unknown table"),
                         ("groups=x", "whole number")]:
        with pytest.raises(StoreError, match=message):
            parse_as_of(bad)


def test_other_delta_readers_see_the_same_rows(where):
    store = where.create()
    for v in range(2):
        store.append_rollouts(synthetic_rollouts(shard_id=f"s{v}", policy_version=v), shard_id=f"s{v}")
    store.compact("rollouts")
    ours = store.read("rollouts").sort_by("rollout_id")
    options = store.location.storage_options or None
    theirs = DeltaTable(store.table_uri("rollouts"), storage_options=options).to_pyarrow_table()
    theirs = theirs.select(ours.column_names).sort_by("rollout_id")
    assert theirs.column("rollout_id").equals(ours.column("rollout_id"))
    assert theirs.column("policy_version").cast(pa.int32()).equals(ours.column("policy_version"))
    assert theirs.column("behaviour_logprobs").equals(ours.column("behaviour_logprobs"))
    frame = pl.read_delta(store.table_uri("rollouts"), storage_options=options)
    assert sorted(frame["rollout_id"].to_list()) == ours.column("rollout_id").to_pylist()


def test_vacuum_keeps_what_recorded_selections_read(tmp_path):
    from recpipe.select import select

    store = Store.create(tmp_path / "store")
    for i in range(3):
        store.append_rollouts(synthetic_rollouts(shard_id=f"s{i}", seed=i, rewards=[[0, 1, 0, 1]] * 2),
                              shard_id=f"s{i}")
    batch = select(store, "schedule", run="r", step=0, groups=4)
    chosen = sorted(batch.rollout_ids)
    store.compact("rollouts")
    store.compact("groups")
    assert vacuum_table(store, "rollouts", 0)["files_deleted"] == 0  # the selection read those files
    again = select(store, "schedule", run="r", step=0, groups=4, as_of=batch.read_versions)
    assert sorted(again.rollout_ids) == chosen
    assert vacuum_table(store, "rollouts", 0, keep_lineage=False)["files_deleted"] == 3


def test_unsafe_s3_settings_are_refused():
    with pytest.raises(LocationError, match="conditional_put"):
        Location.parse("s3://bucket/x", {"conditional_put": "none"})
    with pytest.raises(LocationError, match="AWS_S3_ALLOW_UNSAFE_RENAME"):
        Location.parse("s3://bucket/x", {"AWS_S3_ALLOW_UNSAFE_RENAME": "true"})
    with pytest.raises(StoreError, match="only local paths and s3"):
        Store("gs://bucket/x")


@pytest.mark.parametrize("during", ["commit", "compact", "vacuum"])
def test_kill_9_leaves_every_table_at_a_whole_version(where, during):
    store = where.create()
    base = 40 if during == "vacuum" else 6
    for i in range(base):
        store.append_rollouts(synthetic_rollouts(shard_id=f"base{i}", seed=i), shard_id=f"base{i}")
    expected = set(rows(store))
    if during == "vacuum":
        store.compact("rollouts")  # 40 files replaced: vacuum has 40 to delete, none a reader still uses
    code = {
        "commit": "for i in range(1000):\n"
                  "    s.append_rollouts(synthetic_rollouts(shard_id=f'k{i}', seed=i, groups=50), shard_id=f'k{i}')",
        "compact": "for i in range(1000):\n"
                   "    s.append_rollouts(synthetic_rollouts(shard_id=f'c{i}', seed=i), shard_id=f'c{i}')\n"
                   "    s.compact('rollouts')",
        "vacuum": "from recpipe.store.compact import vacuum_table\n"
                  "while True:\n    vacuum_table(s, 'rollouts', 0, keep_lineage=False)",
    }[during]
    code = "from tests.support import synthetic_rollouts\n" + code
    proc = subprocess.Popen([sys.executable, "-c", f"import sys\nfrom recpipe.store import Store\ns = Store(sys.argv[1])\n"
                             f"print('go', flush=True)\n{code}", where.uri], env=where.env,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "go"
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:  # readers keep reading while it works
        assert expected <= set(rows(where.open()))
    assert proc.poll() is None, "the worker should still be at work"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    after = where.open()
    got = after.read("rollouts").column("rollout_id").to_pylist()
    assert len(got) == len(set(got)) and expected <= set(got)  # nothing lost, nothing twice
    shards = set(after.read("rollouts").column("shard_id").to_pylist())
    for shard in shards - {f"base{i}" for i in range(base)}:  # each committed shard is whole
        size = 50 * 4 if during == "commit" else 2 * 4
        assert after.read("rollouts", "shard_id = $s", {"s": shard}).num_rows == size, shard


def _delta_rs_files(store: Store, table: str, version: int) -> list[tuple]:
    """The oracle: delta-rs's own list of the version's live files (path, size, partition values)."""
    actions = pa.table(DeltaTable(store.table_uri(table), version=version,
                                  storage_options=store.location.storage_options or None).get_add_actions(flatten=True))
    parts = [c for c in actions.column_names if c.startswith("partition.")]
    return sorted(zip(*(actions.column(c).to_pylist() for c in ["path", "size_bytes", *parts]), strict=True))


def _snapshot_files(snap) -> list[tuple]:
    return sorted(zip(*(snap.actions.column(c).to_pylist() for c in snap.actions.column_names), strict=True))


def test_a_snapshot_advanced_from_the_commits_after_a_cached_version_lists_what_delta_rs_lists(where, monkeypatch):
    """A new version's file list is built from an earlier cached one plus the commits after it (adds,
    compaction's removes); it must equal delta-rs's list of that version, and a
    commit that changes the table's metadata must send the reader back to delta-rs."""
    store = where.create()
    for run, version, shard in (("a", 0, "s1"), ("a", 0, "s2"), ("b", 1, "s3")):
        store.append_rollouts(synthetic_rollouts(run=run, policy_version=version, shard_id=shard), shard_id=shard)
    store.snapshot("groups")  # the cached base
    full = DeltaTable.get_add_actions
    monkeypatch.setattr(DeltaTable, "get_add_actions", lambda *a, **k: pytest.fail("advanced without delta-rs"))
    for run, version, shard in (("a", 0, "s4"), ("b", 1, "s5"), ("c", 2, "s6")):
        store.append_rollouts(synthetic_rollouts(run=run, policy_version=version, shard_id=shard), shard_id=shard)
        store.snapshot("groups")  # one commit after the last cached version
    assert store.compact("groups", run="a")["files_merged"] == 3  # one commit: 1 add, 3 removes
    snap = store.snapshot("groups")
    monkeypatch.setattr(DeltaTable, "get_add_actions", full)
    assert len(snap.actions) == 4 and _snapshot_files(snap) == _delta_rs_files(store, "groups", snap.version)
    assert [f.values for f in snap.files_of("a")] == [{"run": "a", "policy_version": 0}]
    keys = {("a", 0), ("c", 2), ("c", 3), ("zz", 0)}
    assert snap.files_in(keys) == {k: [f for f in snap.files if tuple(f.values.values()) == k] for k in keys}
    assert [len(snap.files_in(keys)[k]) for k in (("a", 0), ("c", 2), ("c", 3), ("zz", 0))] == [1, 1, 0, 0]
    assert snap.actions.schema == store.snapshot("groups", 1).actions.schema  # typed as delta-rs types them
    store.delta("groups").alter.set_table_properties({"delta.appendOnly": "false"})  # a metaData action
    store.append_rollouts(synthetic_rollouts(run="c", policy_version=2, shard_id="s7"), shard_id="s7")
    calls = []
    monkeypatch.setattr(DeltaTable, "get_add_actions", lambda self, *a, **k: calls.append(1) or full(self, *a, **k))
    snap = store.snapshot("groups")
    assert calls and _snapshot_files(snap) == _delta_rs_files(store, "groups", snap.version)


def test_tables_keep_every_commit_for_time_travel_and_checkpoint_every_10(tmp_path):
    """recpipe never deletes log entries (a recorded selection may be re-run as of any version it read);
    delta-rs writes a checkpoint every 10 commits (the table property; rollouts and groups: 100), so a commit, refresh or
    transaction lookup replays at most 9 commits after it."""
    store = Store.create(tmp_path / "store")
    delta = store.delta("steps")
    assert delta.metadata().configuration.get("delta.enableExpiredLogCleanup") == "false"
    assert delta.metadata().configuration.get("delta.checkpointInterval") == "10"
    assert store.delta("groups").metadata().configuration.get("delta.checkpointInterval") == "100"
    blank = dict.fromkeys(table_spec("steps").schema.names)
    for step in range(101):
        row = {**blank, "run": "a", "step": step, "policy_version": step, "applied": True, "tokens": 0,
               "seconds": 0.0, "created_at": dt.datetime.now(dt.UTC), "schema_version": SCHEMA_VERSION}
        store.append("steps", [row], shard_id=f"step-{step:06d}")
    log = tmp_path / "store" / "steps" / "_delta_log"
    assert sorted(p.name for p in log.glob("*.checkpoint.parquet")) == [f"{v:020d}.checkpoint.parquet"
                                                                         for v in range(9, 101, 10)]
    assert len(list(log.glob("*.json"))) == 102  # versions 0 (create) .. 101
    assert store.read("steps", as_of={"steps": 1}).num_rows == 1
