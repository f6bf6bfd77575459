"""Faults 3, 8: corrupted data files, a full or read-only disk (an older archive: tests/store/test_migrate.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recpipe.store import Store, StoreError, StoreWriteError
from recpipe.store.doctor import diagnose, repair
from tests.faults.mounts import read_only, small_disk
from tests.support import synthetic_rollouts

RECPIPE = [sys.executable, "-m", "recpipe.cli"]


def filled_store(root, shards=3):
    store = Store.create(root)
    for i in range(shards):
        store.append_rollouts(synthetic_rollouts(shard_id=f"s{i}", seed=i), shard_id=f"s{i}")
    return store


def corrupt(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "random":
        path.write_bytes(os.urandom(len(data)))
    elif how == "wrong_schema":
        pq.write_table(pa.table({"x": [1, 2, 3]}), path)


@pytest.mark.parametrize("how", ["truncated", "random", "wrong_schema"])
def test_corrupt_file_is_named_and_quarantined(tmp_path, how):
    store = filled_store(tmp_path / "store")
    bad = Path(store.files("rollouts")[1])
    corrupt(bad, how)
    if how != "wrong_schema":  # a readable file of the wrong shape still queries; doctor finds it
        with pytest.raises(StoreError, match=f"{bad.name}.*recpipe doctor"):
            store.read("rollouts")
    doctor = subprocess.run([*RECPIPE, "doctor", "--store", str(store.root)], capture_output=True, text=True)
    assert doctor.returncode == 1
    assert bad.name in doctor.stdout and ("corrupt" in doctor.stdout or "schema" in doctor.stdout)
    fixed = subprocess.run([*RECPIPE, "doctor", "--store", str(store.root), "--repair"], capture_output=True, text=True)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert (store.root / "quarantine" / bad.relative_to(store.root)).exists()  # moved, not deleted
    con = store.connect()
    assert con.execute("SELECT count(*) FROM rollouts").fetchone()[0] == 16  # the two good shards
    assert con.execute("SELECT count(*) FROM groups").fetchone()[0] == 4  # the bad shard's summary went too
    assert con.execute("SELECT count(*) FROM rollouts r ANTI JOIN groups g USING (group_id)").fetchone()[0] == 0


def test_rerun_of_a_quarantined_shard_writes_it_again(tmp_path):
    store = filled_store(tmp_path / "store")
    corrupt(Path(store.files("rollouts")[0]), "truncated")
    repair(store, diagnose(store))
    assert store.append_rollouts(synthetic_rollouts(shard_id="s0", seed=0), shard_id="s0") is True
    assert store.connect().execute("SELECT count(*) FROM rollouts").fetchone()[0] == 24


def test_disk_full_commits_nothing_and_keeps_what_was_there(tmp_path):
    with small_disk(tmp_path / "small", "400k") as disk:
        store = filled_store(disk / "store", shards=1)
        big = synthetic_rollouts(shard_id="big", groups=400, group_size=8, response_length=200, seed=1)
        with pytest.raises(StoreWriteError, match="no space left on device.*nothing was committed"):
            store.append_rollouts(big, shard_id="big")
        assert [f.shard_id for f in store.snapshot("rollouts").files] == ["s0"]
        assert len(list((store.root / "rollouts").rglob("*.parquet"))) == 1  # the partial file was removed
        assert store.connect().execute("SELECT count(*) FROM rollouts").fetchone()[0] == 8
        assert store.is_committed("rollouts", {"run": "r", "policy_version": 0}, "big") is False


def test_read_only_store_refuses_writes_and_still_reads(tmp_path):
    store = filled_store(tmp_path / "store", shards=1)
    with read_only(store.root):
        with pytest.raises(StoreWriteError, match="nothing was committed|cannot create"):
            store.append_rollouts(synthetic_rollouts(shard_id="new", policy_version=1), shard_id="new")
        with pytest.raises(StoreWriteError, match="Read-only file system"):
            store.append_rollouts(synthetic_rollouts(shard_id="new2"), shard_id="new2")
        assert store.connect().execute("SELECT count(*) FROM rollouts").fetchone()[0] == 8
        sql = subprocess.run([*RECPIPE, "sql", "--store", str(store.root), "--format", "json",
                              "SELECT count(*) AS n FROM rollouts"], capture_output=True, text=True)
        assert sql.returncode == 0 and json.loads(sql.stdout) == {"n": 8}
