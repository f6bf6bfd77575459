import os
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow.parquet as pq
import pytest

from recpipe.store import RunLocked, Store, StoreError, connect
from recpipe.store.compact import vacuum_table
from tests import ROOT
from tests.support import synthetic_rollouts


@pytest.fixture
def store(tmp_path):
    return Store.create(tmp_path / "store")


def count(store, table, where="true"):
    con = store.connect()
    return con.execute(f"SELECT count(*) FROM {table} WHERE {where}").fetchone()[0]


def test_empty_store_has_every_view(store):
    con = connect(store.root)
    for table in ("rollouts", "groups", "policies", "batches", "steps", "evals"):
        assert con.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0
    cols = [r[0] for r in con.execute("DESCRIBE rollouts").fetchall()]
    assert "behaviour_logprobs" in cols


def test_open_requires_a_store(tmp_path):
    with pytest.raises(StoreError, match="not a recpipe store"):
        Store(tmp_path)
    (tmp_path / "file.txt").write_text("precious")
    with pytest.raises(StoreError, match="not empty"):
        Store.create(tmp_path)
    assert (tmp_path / "file.txt").read_text() == "precious"


def test_append_is_idempotent_per_shard(store):
    rows = synthetic_rollouts(shard_id="s1", groups=3, group_size=4)
    assert store.append_rollouts(rows, shard_id="s1") is True
    assert store.append_rollouts(rows, shard_id="s1") is False
    assert count(store, "rollouts") == 12
    assert count(store, "groups") == 3
    files = store.snapshot("rollouts").files
    assert [(f.shard_id, f.values) for f in files] == [("s1", {"run": "r", "policy_version": 0})]
    assert files[0].relative.startswith("run=r/policy_version=0/s1~")
    # The shard is one Delta transaction, named by its application transaction id.
    assert store.delta("rollouts").transaction_version("run=r/policy_version=0/s1") == 1
    assert store.delta("rollouts").version() == 1


def test_shard_answers_stay_right_between_two_writers_of_one_table(store):
    """A store remembers which shards it saw committed (and its own commits) between reads of the log; a
    commit by another writer in between must still be seen, whatever this store remembered before it."""
    other = Store(store.root)
    rows = {s: synthetic_rollouts(shard_id=s, groups=1, group_size=2) for s in "abcd"}
    partition = {"run": "r", "policy_version": 0}
    assert store.append("rollouts", rows["a"], shard_id="a")
    assert store.append("rollouts", rows["b"], shard_id="b")   # right after our own: nothing between
    since = time.monotonic()
    assert not store.is_committed("rollouts", partition, "c")  # remembered as absent; the log read here
    # is newer than `since`, so an append given fresh_since=since does not read it again
    assert other.append("rollouts", rows["c"], shard_id="c")   # another writer commits c meanwhile
    assert store.append("rollouts", rows["d"], shard_id="d", fresh_since=since)  # lands after theirs
    for shard in "abcd":                                       # c is not added a second time
        assert store.append("rollouts", rows[shard], shard_id=shard) is False
        assert other.append("rollouts", rows[shard], shard_id=shard) is False
        assert store.is_committed("rollouts", partition, shard)
    assert count(store, "rollouts") == 8
    # An unchanged table is not read again, and a changed one is.
    version = store.delta("rollouts").version()
    assert store.delta("rollouts").version() == version
    assert other.append("rollouts", synthetic_rollouts(shard_id="e", groups=1, group_size=2), shard_id="e")
    assert store.delta("rollouts").version() == version + 1


def test_partition_columns_keep_their_types(store):
    store.append_rollouts(synthetic_rollouts(policy_version=3, shard_id="a"), shard_id="a")
    con = store.connect()
    types = dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE rollouts)").fetchall())
    assert types["policy_version"] == "INTEGER"
    assert con.execute("SELECT DISTINCT policy_version FROM rollouts").fetchall() == [(3,)]


def test_group_summary_matches_rollouts(store):
    rewards = [[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]]
    store.append_rollouts(synthetic_rollouts(rewards=rewards, shard_id="g"), shard_id="g")
    con = store.connect()
    got = con.execute("SELECT prompt_id, n, reward_mean, reward_std FROM groups ORDER BY prompt_id").fetchall()
    assert got == [("p0", 4, 0.5, 0.5), ("p1", 4, 0.5, 0.0)]


def test_groups_completed_after_crash_between_commits(store):
    rows = synthetic_rollouts(shard_id="s1")
    store.append("rollouts", rows, shard_id="s1")  # as if killed before the summary commit
    assert count(store, "groups") == 0
    assert store.append_rollouts(rows, shard_id="s1") is False
    assert count(store, "groups") == 2 and count(store, "rollouts") == 8


def test_bad_rows_write_nothing(store):
    rows = synthetic_rollouts().drop_columns(["reward"])
    with pytest.raises(ValueError, match="reward"):
        store.append_rollouts(rows, shard_id="bad")
    assert store.files("rollouts") == []
    mixed = synthetic_rollouts(policy_version=0).to_pylist() + synthetic_rollouts(policy_version=1).to_pylist()
    with pytest.raises(StoreError, match="spans 2 values of 'policy_version'"):
        store.append("rollouts", mixed, shard_id="mixed")


def test_compaction_keeps_every_row_and_shard_identity(store):
    for v in (0, 1):
        for i in range(4):
            sid = f"v{v}-s{i}"
            store.append_rollouts(synthetic_rollouts(policy_version=v, shard_id=sid, seed=i), shard_id=sid)
    before = store.connect().sql("SELECT * FROM rollouts ORDER BY rollout_id").to_arrow_table()
    stats = store.compact("rollouts")
    assert stats == {"partitions": 2, "files_merged": 8, "files_written": 2}
    assert len(store.files("rollouts")) == 2
    after = store.connect().sql("SELECT * FROM rollouts ORDER BY rollout_id").to_arrow_table()
    assert after.equals(before)
    # A shard merged into a compact file is still known as committed.
    again = synthetic_rollouts(policy_version=1, shard_id="v1-s2", seed=2)
    assert store.append_rollouts(again, shard_id="v1-s2") is False
    assert count(store, "rollouts") == 64


WRITER = textwrap.dedent("""
    import sys, time
    import recpipe.store
    from recpipe.store import Store
    from tests.support import synthetic_rollouts

    write_parquet = recpipe.store.write_parquet

    def write_then_stop(*args, **kwargs):  # the data file is on disk; the commit would come next
        size = write_parquet(*args, **kwargs)
        print("written", flush=True)
        time.sleep(600)
        return size

    recpipe.store.write_parquet = write_then_stop
    store = Store(sys.argv[1])
    rows = synthetic_rollouts(shard_id="big", groups=40, group_size=8, response_length=64)
    store.append_rollouts(rows, shard_id="big")
""")


def test_writer_killed_mid_write_leaves_nothing_visible(store):
    # Killed at the worst point: its data file is written, the commit naming it is not.
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(store.root)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "written", f"the writer ended early ({proc.poll()})"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    part = store.root / "rollouts" / "run=r" / "policy_version=0"
    assert list(part.glob("*.parquet")), "the data file should be on disk at the kill"
    assert store.delta("rollouts").version() == 0  # no commit: the written file is in no version
    assert store.files("rollouts") == []
    assert count(store, "rollouts") == 0
    assert vacuum_table(store, "rollouts", 0)["files_deleted"] == 1  # the unreferenced file goes
    assert not list(part.glob("*.parquet"))
    rows = synthetic_rollouts(shard_id="big", groups=10, group_size=8)
    assert store.append_rollouts(rows, shard_id="big") is True
    assert count(store, "rollouts") == 80
    assert pq.read_table(store.files("rollouts")[0]).num_rows == 80


def test_second_writer_is_refused_and_stale_lock_is_taken(store):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys,time; from recpipe.store import Store; "
         "l=Store(sys.argv[1]).lock('r', 'loop').acquire(); print('held', flush=True); time.sleep(60)",
         str(store.root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=rf"loop lease held by pid {holder.pid} "):
            store.lock("r", "loop").acquire()
        with store.lock("other", "loop"):  # other runs are independent
            pass
        with store.lock("r", "trainer"):  # and so are other roles of the run
            pass
    finally:
        holder.kill()
        holder.wait()
    with store.lock("r", "loop") as lock:  # the killed holder's lease is free at once (same host, pid gone)
        assert lock.held


def test_a_snapshot_lists_one_runs_files_and_partitions_as_its_whole_file_list_does(store):
    for run, version, shard in (("a", 0, "s1"), ("b", 0, "s2"), ("a", 3, "s3"), ("a", 3, "s4")):
        store.append_rollouts(synthetic_rollouts(run=run, policy_version=version, shard_id=shard), shard_id=shard)
    snap = store.snapshot("groups")
    assert [f.relative for f in snap.files] == sorted(f.relative for f in snap.files) and len(snap.files) == 4
    for run in ("a", "b", "missing"):
        assert snap.files_of(run) == [f for f in snap.files if f.values["run"] == run]
        assert snap.partitions(run) == [v for v in snap.partitions() if v["run"] == run]
    assert snap.partitions() == [{"run": "a", "policy_version": 0}, {"run": "a", "policy_version": 3},
                                 {"run": "b", "policy_version": 0}]
    assert [type(v["policy_version"]) for v in snap.partitions()] == [int, int, int]
    empty = store.snapshot("evals")
    assert (empty.files, empty.files_of("a"), empty.partitions(), empty.partitions("a")) == ((), [], [], [])
