"""recpipe doctor on Delta tables: damaged and missing files, tables that disagree, and their repairs as
Delta transactions (real stores, real damage: flipped bytes, deleted files, shards committed halfway)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from recpipe.store import Store, StoreError, group_summary, table_configuration
from recpipe.store.compact import compact_table
from recpipe.store.datasets import read_table
from recpipe.store.doctor import diagnose, repair
from tests.support import synthetic_rollouts


def filled_store(root: Path, shards: int = 3, versions: tuple[int, ...] = (0,)) -> Store:
    """``shards`` generation shards s0.. of 2 groups x 4 rollouts each, per policy version."""
    store = Store.create(root)
    for v in versions:
        for i in range(shards):
            name = f"s{i}" if v == 0 else f"v{v}s{i}"
            store.append_rollouts(synthetic_rollouts(shard_id=name, policy_version=v, seed=i), shard_id=name)
    return store


def flip_page_bytes(path: str | Path, fs: pafs.FileSystem | None = None) -> None:
    """Damage a data page of the file's largest column (its page checksum no longer matches), on a local
    disk or on ``fs`` (S3)."""
    fs = fs or pafs.LocalFileSystem()
    with fs.open_input_file(str(path)) as f:
        data = bytearray(f.read())
    meta = pq.ParquetFile(pa.BufferReader(bytes(data))).metadata
    column = max((meta.row_group(0).column(i) for i in range(meta.num_columns)), key=lambda c: c.total_compressed_size)
    end = (column.dictionary_page_offset or column.data_page_offset) + column.total_compressed_size
    for i in range(end - 4, end):  # the end of its last page's payload, which the page's CRC covers
        data[i] ^= 0xFF
    with fs.open_output_stream(str(path)) as out:
        out.write(bytes(data))


def file_of(store: Store, table: str, shard: str):  # noqa: ANN201 - a DataFile
    return next(f for f in store.snapshot(table).files if f.shard_id == shard)


def kinds(report) -> list[str]:
    return sorted(p.kind for p in report.problems)


def consistent(store: Store) -> tuple[int, int]:
    """Rollouts and groups agree (both ways), no rollout twice; returns their row counts."""
    con = store.connect()
    try:
        for sql in ("SELECT count(*) FROM groups g ANTI JOIN rollouts r USING (group_id)",
                    "SELECT count(*) FROM rollouts r ANTI JOIN groups g USING (group_id)",
                    "SELECT count(*) - count(DISTINCT rollout_id) FROM rollouts"):
            assert con.execute(sql).fetchone()[0] == 0, sql
        return (con.execute("SELECT count(*) FROM rollouts").fetchone()[0],
                con.execute("SELECT count(*) FROM groups").fetchone()[0])
    finally:
        con.close()


def log_actions(store: Store, table: str, kind: str) -> list[dict]:
    """Every ``kind`` action (add, remove, txn) in the table's Delta log, oldest first."""
    found = []
    for entry in sorted((store.root / table / "_delta_log").glob("*.json")):
        for line in entry.read_text().splitlines():
            action = json.loads(line)
            if kind in action:
                found.append(action[kind])
    return found


def test_repairs_on_a_local_disk_and_on_s3(where):
    """Damage, a deleted file and a half-committed shard at once, on both kinds of storage."""
    store = where.create()
    for i in range(3):
        store.append_rollouts(synthetic_rollouts(shard_id=f"s{i}", seed=i), shard_id=f"s{i}")
    store.append("groups", group_summary(synthetic_rollouts(shard_id="s9", seed=9)), shard_id="s9")
    fs = store.location.fs
    bad = file_of(store, "rollouts", "s1")
    flip_page_bytes(bad.path, fs)
    fs.delete_file(file_of(store, "groups", "s2").path)

    report = diagnose(store)
    assert kinds(report) == ["corrupt", "missing-file", "missing-groups", "orphan-groups"]
    repair(store, report)

    assert diagnose(where.open()).ok
    assert consistent(store) == (16, 4)
    assert set(store.read("groups").column("shard_id").to_pylist()) == {"s0", "s2"}
    copy = fs.get_file_info(store.location.path("quarantine", "rollouts", bad.relative))
    assert copy.type == pafs.FileType.File and copy.size == bad.size


def test_a_healthy_store_has_no_problems(tmp_path):
    store = filled_store(tmp_path / "store", versions=(0, 1))
    store.compact("groups")
    report = diagnose(store)
    assert report.ok, [(p.kind, p.detail) for p in report.problems]
    assert report.files_checked == 6 + 2


def test_tables_without_recpipes_properties_get_them_and_keep_their_rows(tmp_path):
    """A store whose tables an older recpipe created (log cleanup on, another checkpoint interval)."""
    store = filled_store(tmp_path / "store")
    for table, interval in (("rollouts", "10"), ("steps", "100")):
        store.delta(table).alter.set_table_properties({"delta.checkpointInterval": interval,
                                                       "delta.enableExpiredLogCleanup": "true"})
    before = store.read("rollouts").sort_by("rollout_id")
    report = diagnose(store)
    assert kinds(report) == ["table-settings", "table-settings"]
    details = {p.table: p.detail for p in report.problems}
    assert "delta.checkpointInterval=10 (recpipe sets 100)" in details["rollouts"]
    assert "delta.checkpointInterval=100 (recpipe sets 10)" in details["steps"]
    assert "delta.enableExpiredLogCleanup=true (recpipe sets false)" in details["steps"]
    repair(store, report)
    assert diagnose(Store(tmp_path / "store")).ok
    for table in ("rollouts", "steps"):
        configuration = Store(tmp_path / "store").delta(table).metadata().configuration
        assert {k: configuration[k] for k in table_configuration(table)} == table_configuration(table)
    assert store.read("rollouts").sort_by("rollout_id").equals(before)
    store.append_rollouts(synthetic_rollouts(shard_id="s9", seed=9), shard_id="s9")  # appends still commit
    assert consistent(store) == (4 * 8, 4 * 2)


def test_a_damaged_file_is_quarantined_and_removed_by_a_delta_commit(tmp_path):
    store = filled_store(tmp_path / "store")
    keep = read_table(store, "rollouts").filter(pc.field("shard_id") != "s1")
    bad = file_of(store, "rollouts", "s1")
    flip_page_bytes(bad.path)
    damaged = Path(bad.path).read_bytes()
    with pytest.raises(StoreError, match=f"{bad.relative.rsplit('/', 1)[1]}.*recpipe doctor"):
        store.read("rollouts")

    report = diagnose(store)
    assert kinds(report) == ["corrupt"]
    assert (report.problems[0].path, report.problems[0].relative) == (bad.path, bad.relative)
    repair(store, report)

    copy = store.root / "quarantine" / "rollouts" / bad.relative
    assert copy.read_bytes() == damaged  # kept as it was
    removes = [r for r in log_actions(store, "rollouts", "remove") if r["path"] == bad.relative]
    assert len(removes) == 1 and removes[0]["dataChange"] is True
    assert Path(bad.path).exists()  # in storage until vacuum: older versions still list it
    assert bad.relative not in {f.relative for f in store.snapshot("rollouts").files}
    assert consistent(store) == (16, 4)  # queries work again; the shard's summary went first
    after = read_table(store, "rollouts")
    assert after.sort_by("rollout_id").equals(keep.sort_by("rollout_id"))  # the other rows intact
    assert diagnose(store).ok


def test_a_file_with_other_columns_is_corrupt(tmp_path):
    store = filled_store(tmp_path / "store")
    values = {"run": "r", "policy_version": 0}
    store.add_files("rollouts", [("run=r/policy_version=0/odd~000000000000.parquet", pa.table({"x": [1, 2]}),
                                  values)], app_id="test/odd")
    report = diagnose(store)
    assert kinds(report) == ["corrupt"] and "unexpected ['x']" in report.problems[0].detail
    repair(store, report)
    assert diagnose(store).ok and consistent(store) == (24, 6)


def test_a_deleted_rollouts_file_is_dropped_from_the_log_with_its_summary(tmp_path):
    store = filled_store(tmp_path / "store")
    gone = file_of(store, "rollouts", "s0")
    Path(gone.path).unlink()  # as an operator deleting a file by hand
    report = diagnose(store)
    assert kinds(report) == ["missing-file"] and report.problems[0].relative == gone.relative
    repair(store, report)
    assert diagnose(store).ok
    assert consistent(store) == (16, 4)
    assert set(store.read("groups").column("shard_id").to_pylist()) == {"s1", "s2"}


def test_a_deleted_summary_file_is_rebuilt_from_the_rollouts(tmp_path):
    store = filled_store(tmp_path / "store")
    original = read_table(store, "groups").sort_by("group_id")
    Path(file_of(store, "groups", "s2").path).unlink()
    report = diagnose(store)
    assert kinds(report) == ["missing-file", "missing-groups"]
    repair(store, report)
    assert diagnose(store).ok
    assert read_table(store, "groups").sort_by("group_id").equals(original)


def test_a_damaged_summary_file_is_quarantined_and_rebuilt(tmp_path):
    store = filled_store(tmp_path / "store")
    original = read_table(store, "groups").sort_by("group_id")
    flip_page_bytes(file_of(store, "groups", "s1").path)
    report = diagnose(store)
    assert kinds(report) == ["corrupt", "missing-groups"]
    repair(store, report)
    assert diagnose(store).ok
    assert read_table(store, "groups").sort_by("group_id").equals(original)
    key = Store.shard_key("groups", {"run": "r", "policy_version": 0}, "s1")
    # committed (1), withdrawn with the quarantined file (2), committed again by the repair (3)
    assert store.delta("groups").transaction_version(key) == 3


def test_rollouts_without_summary_get_it(tmp_path):
    store = filled_store(tmp_path / "store")
    rows = synthetic_rollouts(shard_id="s3", seed=3)
    store.append("rollouts", rows, shard_id="s3")  # as a generator killed between its two commits
    report = diagnose(store)
    assert [(p.kind, p.shards) for p in report.problems] == [("missing-groups", ("s3",))]
    repair(store, report)
    assert diagnose(store).ok and consistent(store) == (32, 8)
    rebuilt = read_table(store, "groups", filter=pc.field("shard_id") == "s3").sort_by("group_id")
    assert rebuilt.equals(group_summary(rows))


def test_a_summary_without_rollouts_is_removed_and_kept_in_quarantine(tmp_path):
    store = filled_store(tmp_path / "store")
    before = read_table(store, "groups").sort_by("group_id")
    store.append("groups", group_summary(synthetic_rollouts(shard_id="s9", seed=9)), shard_id="s9")
    report = diagnose(store)
    assert [(p.kind, p.shards) for p in report.problems] == [("orphan-groups", ("s9",))]
    repair(store, report)
    assert diagnose(store).ok
    assert read_table(store, "groups").sort_by("group_id").equals(before)
    assert list((store.root / "quarantine" / "groups").rglob("s9~*.parquet"))


def test_summaries_inside_a_compacted_file_are_repaired_after_a_compaction_since_the_report(tmp_path):
    store = filled_store(tmp_path / "store")
    store.append("groups", group_summary(synthetic_rollouts(shard_id="s9", seed=9)), shard_id="s9")
    report = diagnose(store)
    assert kinds(report) == ["orphan-groups"]
    compact_table(store, "groups")  # another process rewrote the partition after the report
    assert len(store.files("groups")) == 1
    repair(store, report)  # reads the partition again: keeps the three good shards' rows of the merged file
    assert diagnose(store).ok
    assert consistent(store) == (24, 6)


def test_a_damaged_compacted_rollouts_file_takes_the_summaries_of_its_shards_along(tmp_path):
    store = filled_store(tmp_path / "store", shards=2, versions=(0, 1))
    compact_table(store, "rollouts", min_files=2)
    merged = next(f for f in store.snapshot("rollouts").files if f.values["policy_version"] == 0)
    assert merged.shard_id is None  # a compacted file: its shards are known only from its rows
    flip_page_bytes(merged.path)
    report = diagnose(store)
    assert "corrupt" in kinds(report)
    repair(store, report)
    assert diagnose(store).ok
    assert consistent(store) == (16, 4)  # version 1's two shards
    assert set(store.read("groups").column("policy_version").to_pylist()) == {1}


def test_a_rollout_stored_twice_is_reported(tmp_path):
    store = filled_store(tmp_path / "store")
    copy = read_table(store, "rollouts", files=[file_of(store, "rollouts", "s0")])
    store.add_files("rollouts", [("run=r/policy_version=0/copy-of-s0.parquet",
                                  copy.drop_columns(["run", "policy_version"]), {"run": "r", "policy_version": 0})],
                    app_id="test/copy")
    report = diagnose(store)
    assert kinds(report) == ["duplicate-rollouts"]
    detail = report.problems[0].detail
    assert "8 rollout id(s)" in detail and "copy-of-s0.parquet" in detail and "s0~" in detail


def test_the_latest_version_of_a_run_needs_its_checkpoint(tmp_path):
    store = filled_store(tmp_path / "store", shards=1)
    row = {"run": "r", "version": 1, "step": 0, "checkpoint": "checkpoints/r/v000001", "parent_version": 0,
           "base_model": "/models/base", "created_at": synthetic_rollouts().column("created_at")[0].as_py(),
           "schema_version": 3}
    store.append("policies", [row], shard_id="v000001")
    report = diagnose(store)
    assert [(p.kind, Path(p.path).name) for p in report.problems] == [("missing-checkpoint", "v000001")]
    (store.root / "checkpoints" / "r" / "v000001").mkdir(parents=True)
    (store.root / "checkpoints" / "r" / "v000001" / "config.json").write_text("{}")
    assert diagnose(store).ok
