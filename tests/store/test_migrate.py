"""Converting an archive of the old Parquet-folder format (recpipe up to 7f76fa5) into Delta tables.

The old stores are written here file by file, as the old writer laid them out: hive folders, partition
columns inside the files, the shard ids in the footer (``recpipe.shards``), schema_version 2 in the schema
metadata, one compacted file holding several shards, a marker without "format"."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from recpipe.schema import conform, migrations, table_names, table_schema, table_spec
from recpipe.store import MARKER, Store, StoreError, group_summary
from recpipe.store.datasets import read_table
from recpipe.store.doctor import diagnose, repair
from recpipe.store.migrate import LEGACY_DIR, MigrationError, migrate_legacy, missing_columns, needs_migration
from tests.store.test_doctor import flip_page_bytes
from tests.support import synthetic_rollouts

OLD = 2  # the schema version of the last Parquet-folder recpipe
T0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


# ---- the old writer -----------------------------------------------------------------------------

def old_schema(table: str, version: int = OLD) -> pa.Schema:
    """The table's schema as ``version`` wrote it: the current one without the columns (and struct fields,
    ``generator.tokenizer``) added since."""
    added = {c["name"] for v, tables in migrations().items() if v >= version for c in tables.get(table, [])}

    def without(field: pa.Field, prefix: str) -> pa.Field:
        if not pa.types.is_struct(field.type):
            return field
        kept = [without(f, f"{prefix}{f.name}.") for f in field.type if f"{prefix}{f.name}" not in added]
        return field.with_type(pa.struct(kept))

    return pa.schema([without(f, f"{f.name}.") for f in table_schema(table) if f.name not in added],
                     metadata=table_schema(table).metadata)


def write_old_file(root: Path, table: str, name: str, rows: pa.Table, shards: list[str], version: int = OLD) -> Path:
    """One file as the old commit_parquet wrote it (partition columns inside, shard ids in the footer)."""
    spec = table_spec(table)
    values = {c: rows.column(c)[0].as_py() for c in spec.partition_by}
    folder = root / table / "/".join(f"{c}={values[c]}" for c in spec.partition_by)
    folder.mkdir(parents=True, exist_ok=True)
    schema = old_schema(table, version)
    data = rows.select(schema.names).cast(schema)
    data = data.set_column(data.schema.get_field_index("schema_version"), "schema_version",
                           pa.array([version] * data.num_rows, pa.int32()))
    meta = {b"table": table.encode(), b"schema_version": str(version).encode(),
            b"recpipe.shards": json.dumps(shards).encode()}
    path = folder / name
    pq.write_table(data.replace_schema_metadata(meta), path, compression="zstd", write_page_checksum=True)
    return path


def rows(table: str, **values) -> dict:
    return {**dict.fromkeys(table_schema(table).names), "created_at": T0, "schema_version": OLD, **values}


def old_rows(table: str, data: pa.Table) -> pa.Table:
    """What the old store holds, in the current schema (migration defaults) - the rows a conversion must keep."""
    schema = table_schema(table)
    data = data.select(old_schema(table).names)
    data = data.set_column(data.schema.get_field_index("schema_version"), "schema_version",
                           pa.array([OLD] * data.num_rows, pa.int32()))
    defaults = {c["name"]: c["default"] for v, t in migrations().items() if v >= OLD for c in t.get(table, [])}
    for name in schema.names:
        if name not in data.column_names:
            data = data.append_column(name, pa.array([defaults[name]] * data.num_rows, schema.field(name).type))
    return conform(table, data)


def legacy_store(root: Path) -> dict[str, pa.Table]:
    """An old-format store; returns every table's rows as the conversion must keep them."""
    root.mkdir(parents=True)
    (root / MARKER).write_text(json.dumps({"schema_version": OLD}) + "\n")
    shards = {("r", 0): ["s0", "s1"], ("r", 1): ["s2"], ("q", 0): ["q0"]}
    rollouts = {s: synthetic_rollouts(run=run, policy_version=v, shard_id=s, seed=i)
                for i, ((run, v), names) in enumerate(shards.items()) for s in names}
    for s, data in rollouts.items():
        write_old_file(root, "rollouts", f"{s}.parquet", data, [s])
    summaries = {s: group_summary(data) for s, data in rollouts.items()}
    # run r, version 0: the two summaries compacted into one file (sorted by the key, as compaction did)
    merged = pa.concat_tables([summaries["s0"], summaries["s1"]]).sort_by("group_id")
    write_old_file(root, "groups", "compact-0123456789abcdef.parquet", merged, ["s0", "s1"])
    for s in ("s2", "q0"):
        write_old_file(root, "groups", f"{s}.parquet", summaries[s], [s])
    tables = {"rollouts": pa.concat_tables(rollouts.values()), "groups": pa.concat_tables(summaries.values())}

    policies = conform("policies", [rows("policies", run="r", version=v, step=None if v == 0 else v - 1,
                                         checkpoint="/models/base" if v == 0 else f"checkpoints/r/v{v:06d}",
                                         parent_version=None if v == 0 else v - 1, base_model="/models/base")
                                    for v in (0, 1)])
    write_old_file(root, "policies", "compact-fedcba9876543210.parquet", policies, ["v000000", "v000001"])
    steps = conform("steps", [rows("steps", run="r", step=0, policy_version=1, applied=True, loss=0.25,
                                   tokens=40, seconds=1.5)])
    write_old_file(root, "steps", "step-000000.parquet", steps, ["step-000000"])
    batches = conform("batches", [rows("batches", run="r", step=0, rollout_id=f"s0/p0/{i}", group_id="s0/p0",
                                       source_run="r", policy_version=0, query_name="recent", query_hash="ab",
                                       params="{}", weight=1.0, advantage=0.5 - i / 4, read_versions="x")
                                  for i in range(4)])
    write_old_file(root, "batches", "step-000000.parquet", batches, ["step-000000"])
    evals = conform("evals", [rows("evals", run="r", policy_version=1, task="arithmetic", split="test",
                                   accuracy=0.5, n=20)])
    write_old_file(root, "evals", "eval-v000001.parquet", evals, ["eval-v000001"])
    timings = conform("timings", [rows("timings", run="r", stage="generate", item="s0", seconds=2.0)])
    write_old_file(root, "timings", "generate-s0-1.parquet", timings, ["generate-s0-1"])
    tables.update(policies=policies, steps=steps, batches=batches, evals=evals, timings=timings)

    ckpt = root / "checkpoints" / "r" / "v000001"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    (root / "locks").mkdir()
    (root / "locks" / "r.lock").write_text("")
    return {t: old_rows(t, data) for t, data in tables.items()}


def old_shards(root: Path) -> set[tuple[str, tuple, str]]:
    """(table, partition values, shard) of every file of an old store, from the footers."""
    found = set()
    for table in table_names():
        spec = table_spec(table)
        for path in sorted((root / table).rglob("*.parquet")) if (root / table).is_dir() else []:
            meta = pq.read_schema(path).metadata
            data = pq.read_table(path, columns=list(spec.partition_by))
            values = tuple((c, data.column(c)[0].as_py()) for c in spec.partition_by)
            found |= {(table, values, s) for s in json.loads(meta[b"recpipe.shards"])}
    return found


def by_key(table: str, data: pa.Table) -> pa.Table:
    return data.sort_by([(c, "ascending") for c in table_spec(table).key])


def tables_of(store: Store) -> dict[str, pa.Table]:
    return {t: by_key(t, read_table(store, t)) for t in table_names()}


# ---- tests --------------------------------------------------------------------------------------

def test_an_old_store_is_refused_until_converted_and_then_holds_every_row(tmp_path):
    root = tmp_path / "store"
    expected = legacy_store(root)
    checkpoint = (root / "checkpoints" / "r" / "v000001" / "config.json").read_bytes()
    with pytest.raises(StoreError, match="old Parquet-folder format.*doctor --store .* --migrate"):
        Store(root)
    assert needs_migration(root)

    summary = migrate_legacy(root)

    assert summary["migrated"] and not summary["quarantined"]
    # tables the old format did not have (leases, trained_tokens) are created empty
    assert {t: s["rows"] for t, s in summary["tables"].items()} == {t: 0 for t in table_names()} | {
        t: d.num_rows for t, d in expected.items()}
    assert "delete that folder" in summary["message"]
    assert json.loads((root / MARKER).read_text())["format"] == "delta" and not needs_migration(root)
    store = Store(root)
    got = tables_of(store)
    for table, data in expected.items():
        assert got[table].equals(by_key(table, data)), table  # every column and value, partition columns too
    assert got["batches"].column("read_versions").to_pylist() == ["{}"] * 4  # the migration default
    assert set(got["rollouts"].column("schema_version").to_pylist()) == {OLD}  # as the writer wrote them
    assert got["leases"].num_rows == 0
    # Delta tables any Delta reader opens; files without the partition columns (the Delta convention)
    assert DeltaTable(str(root / "groups")).version() == 3  # created, then one commit per old partition folder
    assert not {"run", "policy_version"} & set(pq.read_schema(store.files("rollouts")[0]).names)
    con = store.connect(read_only=True)
    assert con.execute("SELECT count(*) FROM rollouts r JOIN groups g USING (group_id)").fetchone()[0] == 32
    # nothing deleted, checkpoints untouched
    assert (root / LEGACY_DIR / "rollouts" / "run=r" / "policy_version=0" / "s0.parquet").is_file()
    assert (root / LEGACY_DIR / "groups" / "run=r" / "policy_version=0" / "compact-0123456789abcdef.parquet").is_file()
    assert (root / "checkpoints" / "r" / "v000001" / "config.json").read_bytes() == checkpoint
    assert diagnose(store).ok
    assert migrate_legacy(root)["migrated"] is False  # a second run has nothing to do
    from recpipe.doctor import migrate_archive

    assert migrate_archive(root) is None  # what `recpipe doctor --migrate` calls first: a no-op now


def test_every_old_shard_is_committed_once_so_reruns_add_nothing(tmp_path):
    root = tmp_path / "store"
    legacy_store(root)
    shards = old_shards(root)
    migrate_legacy(root)
    store = Store(root)
    for table, values, shard in shards:
        assert store.is_committed(table, dict(values), shard), (table, values, shard)
    before = tables_of(store)
    # s1's summary was inside the compacted groups file: its shard is committed all the same
    assert store.append_rollouts(synthetic_rollouts(shard_id="s1", seed=0), shard_id="s1") is False
    assert store.append("policies", [{**before["policies"].to_pylist()[1]}], shard_id="v000001") is False
    assert tables_of(store)["rollouts"].equals(before["rollouts"])
    assert tables_of(store)["groups"].equals(before["groups"])
    assert store.append_rollouts(synthetic_rollouts(shard_id="s3", seed=3), shard_id="s3") is True
    # one transaction per old partition folder, carrying the application transaction of each of its shards
    commits = [h for h in DeltaTable(str(root / "groups")).history() if "migrate" in h.get("recpipe.operation", "")]
    assert sorted(h["recpipe.operation"] for h in commits) == [
        "migrate run=q/policy_version=0 (1 legacy files)", "migrate run=r/policy_version=0 (1 legacy files)",
        "migrate run=r/policy_version=1 (1 legacy files)"]


def test_a_damaged_old_file_is_quarantined_reported_and_its_shard_can_be_rerun(tmp_path):
    root = tmp_path / "store"
    expected = legacy_store(root)
    bad = root / "rollouts" / "run=r" / "policy_version=0" / "s0.parquet"
    flip_page_bytes(bad)
    damaged = bad.read_bytes()

    summary = migrate_legacy(root)

    moved = root / "quarantine" / "legacy" / "rollouts" / "run=r" / "policy_version=0" / "s0.parquet"
    assert [q["path"] for q in summary["quarantined"]] == [str(moved)]
    assert moved.read_bytes() == damaged and "recpipe doctor" in summary["message"]
    store = Store(root)
    rollouts = tables_of(store)["rollouts"]
    assert set(rollouts.column("shard_id").to_pylist()) == {"s1", "s2", "q0"}
    assert rollouts.num_rows == expected["rollouts"].num_rows - 8
    assert not store.is_committed("rollouts", {"run": "r", "policy_version": 0}, "s0")
    # its summary came over (in the compacted groups file): doctor finds it orphaned and removes it
    report = diagnose(store)
    assert [(p.kind, p.shards) for p in report.problems] == [("orphan-groups", ("s0",))]
    repair(store, report)
    assert diagnose(store).ok
    # the shard was never committed, and the repair withdrew its summary: a rerun writes both again
    assert store.append_rollouts(synthetic_rollouts(shard_id="s0", seed=0), shard_id="s0") is True
    assert store.is_committed("groups", {"run": "r", "policy_version": 0}, "s0")
    assert diagnose(store).ok


def test_rows_that_do_not_survive_the_conversion_stop_it_and_nothing_is_lost(tmp_path):
    root = tmp_path / "store"
    legacy_store(root)
    # a file whose rows say policy_version 0 inside the folder policy_version=1: Delta would take the
    # folder's value, so the rows read back differ from the old ones
    stray = synthetic_rollouts(shard_id="s9", policy_version=0, seed=9)
    path = write_old_file(root, "rollouts", "s9.parquet", stray, ["s9"])
    wrong = root / "rollouts" / "run=r" / "policy_version=1" / "s9.parquet"
    path.rename(wrong)
    files = sorted(p.relative_to(root / "rollouts") for p in (root / "rollouts").rglob("*.parquet"))

    with pytest.raises(MigrationError, match=r"run=r/policy_version=1/s9~.*does not hold the rows.*policy_version"):
        migrate_legacy(root)

    with pytest.raises(StoreError, match="old Parquet-folder format"):
        Store(root)  # the marker still names the old format
    assert not (root / "rollouts").exists()  # the unverified table was discarded
    aside = root / LEGACY_DIR / "rollouts"
    assert sorted(p.relative_to(aside) for p in aside.rglob("*.parquet")) == files  # every old file kept
    wrong_aside = aside / "run=r" / "policy_version=1" / "s9.parquet"
    wrong_aside.rename(tmp_path / "s9.parquet")  # the user takes the stray file out, then runs it again
    migrate_legacy(root)
    assert Store(root).read("rollouts").num_rows == 32


KILLER = """
import os, signal, sys
import recpipe.store.migrate as m
calls, real = [0], m._commit_partition
def dying(*args, **kwargs):
    real(*args, **kwargs)
    calls[0] += 1
    if calls[0] == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
m._commit_partition = dying
m.migrate_legacy(sys.argv[1])
"""


@pytest.mark.parametrize("commits", [2, 5])  # inside the rollouts table; inside groups, rollouts done
def test_a_conversion_killed_midway_resumes_to_the_same_result(tmp_path, commits):
    root, twin = tmp_path / "store", tmp_path / "twin"
    legacy_store(root)
    shutil.copytree(root, twin)
    shards = old_shards(root)

    killed = subprocess.run([sys.executable, "-c", KILLER, str(root), str(commits)], capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    with pytest.raises(StoreError, match="old Parquet-folder format"):
        Store(root)
    assert (root / LEGACY_DIR / "rollouts").is_dir()

    migrate_legacy(root)
    migrate_legacy(twin)
    store, reference = Store(root), Store(twin)
    assert tables_of(store).keys() == tables_of(reference).keys()
    for table, data in tables_of(reference).items():
        assert tables_of(store)[table].equals(data), table
    for table, values, shard in shards:
        assert store.is_committed(table, dict(values), shard)
    for table in table_names():  # no file twice: each table lists as many files as the uninterrupted one
        assert len(store.files(table)) == len(reference.files(table)), table
    assert diagnose(store).ok


def test_files_of_schema_version_1_get_the_migration_defaults(tmp_path):
    root = tmp_path / "store"
    legacy_store(root)
    v1 = synthetic_rollouts(shard_id="old1", policy_version=2, seed=5)
    write_old_file(root, "rollouts", "old1.parquet", v1, ["old1"], version=1)  # no response_text, no shard_id
    migrate_legacy(root)
    store = Store(root)
    rows = store.read("rollouts", "policy_version = 2")
    assert rows.num_rows == 8
    assert set(rows.column("response_text").to_pylist()) == {""}
    assert set(rows.column("shard_id").to_pylist()) == {"legacy"}
    assert set(rows.column("schema_version").to_pylist()) == {1}
    assert store.is_committed("rollouts", {"run": "r", "policy_version": 2}, "old1")
    report = diagnose(store)  # the old writer wrote no summary for them either
    assert [(p.kind, p.shards) for p in report.problems] == [("missing-groups", ("legacy",))]
    repair(store, report)
    assert diagnose(store).ok


# ---- a Delta store of an older schema_version -------------------------------------------------------

def delta_store_v3(root: Path, drop: tuple[str, ...] = ()) -> Store:
    """A Delta store as schema_version 3 wrote it: tables created without the columns added since, files
    without them (committed as the old writer's appends did: one transaction per shard)."""
    root.mkdir(parents=True)
    (root / MARKER).write_text(json.dumps({"schema_version": 3, "format": "delta"}) + "\n")
    for table in table_names():
        schema = old_schema(table, 3)
        schema = pa.schema([f for f in schema if f.name not in drop], metadata=schema.metadata)
        DeltaTable.create(str(root / table), schema=schema, partition_by=list(table_spec(table).partition_by) or None)
    store = Store(root)
    for version, shard in ((0, "s0"), (1, "s1")):
        rows = synthetic_rollouts(policy_version=version, shard_id=shard, seed=version)
        for table, data in (("rollouts", rows), ("groups", group_summary(rows))):
            values = {"run": "r", "policy_version": version}
            old = data.select(old_schema(table, 3).names).cast(old_schema(table, 3)).drop_columns(["run", "policy_version"])
            store.add_files(table, [(f"run=r/policy_version={version}/{shard}~0.parquet", old, values)],
                            app_id=store.shard_key(table, values, shard))
    return store


def test_an_older_delta_store_gets_the_new_columns_without_any_file_rewritten(tmp_path):
    from recpipe.doctor import migrate_archive

    root = tmp_path / "store"
    store = delta_store_v3(root)
    files = {t: sorted(store.files(t)) for t in table_names()}
    before = by_key("rollouts", store.read("rollouts"))
    assert "reward_terms" not in DeltaTable(str(root / "rollouts")).schema().to_arrow().names
    assert set(before.column("reward_terms").to_pylist()) == {None}  # recpipe reads them as null already
    assert needs_migration(root)
    # Files without the new columns are not damaged (--repair must leave them be); the tables lack only the
    # properties a recpipe of that time did not set.
    assert {p.kind for p in diagnose(store).problems} == {"table-settings"}

    summary = migrate_archive(root)  # what `recpipe doctor --migrate` runs

    assert summary["migrated"] and summary["tables"] == {"rollouts": {"added": ["reward_terms", "generator.tokenizer"]}}
    assert "from version 3 to 4" in summary["message"] and "no data file was rewritten" in summary["message"]
    marker = json.loads((root / MARKER).read_text())
    assert (marker["schema_version"], marker["format"], marker["upgraded"]["from"]) == (4, "delta", 3)
    assert not needs_migration(root) and migrate_archive(root) is None  # a second run has nothing to do
    store = Store(root)
    assert {t: sorted(store.files(t)) for t in table_names()} == files
    assert missing_columns(pa.schema(DeltaTable(str(root / "rollouts")).schema().to_arrow()),
                           table_schema("rollouts")) == []
    assert by_key("rollouts", store.read("rollouts")).equals(before)
    # any Delta reader now sees the new columns: null in the old rows, values in the new ones
    store.append_rollouts(synthetic_rollouts(policy_version=2, shard_id="s2", seed=2), shard_id="s2")
    other = DeltaTable(str(root / "rollouts")).to_pyarrow_table(columns=["policy_version", "reward_terms", "generator"])
    terms = {(v, str(t)) for v, t in zip(other.column("policy_version").to_pylist(),
                                         other.column("reward_terms").to_pylist(), strict=True)}
    assert {v for v, t in terms if t == "None"} == {0, 1} and {v for v, t in terms if t != "None"} == {2}
    assert "tokenizer" in other.schema.field("generator").type.names
    con = store.connect(read_only=True)
    assert con.execute("SELECT count(*) FROM rollouts WHERE reward_terms IS NULL").fetchone()[0] == 16
    report = diagnose(store)  # what remains is the old tables' properties, which --repair sets
    assert {p.kind for p in report.problems} == {"table-settings"}
    repair(store, report)
    assert diagnose(store).ok
    commits = [h.get("recpipe.operation", "") for h in DeltaTable(str(root / "rollouts")).history()]
    assert "schema_version 4: add reward_terms, generator.tokenizer" in commits


def test_an_upgrade_that_would_need_a_value_for_old_rows_is_refused_and_changes_nothing(tmp_path):
    root = tmp_path / "store"
    delta_store_v3(root, drop=("response_text",))  # as if tables.yaml had added a non-nullable column
    with pytest.raises(MigrationError, match=r"non-nullable column\(s\) rollouts.response_text.*nothing was changed"):
        migrate_legacy(root)
    assert json.loads((root / MARKER).read_text())["schema_version"] == 3
    assert "reward_terms" not in DeltaTable(str(root / "rollouts")).schema().to_arrow().names


def test_missing_columns_names_struct_fields():
    have = pa.schema([pa.field("a", pa.int32()), pa.field("g", pa.struct([pa.field("m", pa.string())]))])
    want = pa.schema([pa.field("a", pa.int32()), pa.field("b", pa.list_(pa.int32())),
                      pa.field("g", pa.struct([pa.field("m", pa.string()), pa.field("t", pa.string())]))])
    assert [(f.name, names) for f, names in missing_columns(have, want)] == [("b", ["b"]), ("g", ["g.t"])]
    assert missing_columns(want, want) == []


def test_doctor_migrate_through_the_cli_upgrades_then_finds_nothing_wrong(tmp_path):
    from typer.testing import CliRunner

    from recpipe.cli import app

    root = tmp_path / "store"
    before = by_key("rollouts", delta_store_v3(root).read("rollouts"))
    result = CliRunner().invoke(app, ["doctor", "--store", str(root), "--migrate"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("migrated ") and "from version 3 to 4" in lines[0]
    assert lines[-1].endswith("files checked, 0 problem(s)")
    assert not needs_migration(root)
    assert by_key("rollouts", Store(root).read("rollouts")).equals(before)
    again = CliRunner().invoke(app, ["doctor", "--store", str(root), "--migrate"])  # nothing left to migrate
    assert again.exit_code == 0 and "migrated" not in again.output
