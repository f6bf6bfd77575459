"""Bring an older archive up to the current schema, in place, keeping every row: ``recpipe doctor --migrate``.

    summary = migrate_legacy("store")     # what `recpipe doctor --store store --migrate` runs first

Two kinds of older archive:

* a Delta store of an older ``schema_version`` (3 on): ``upgrade_schema`` adds the columns tables.yaml
  added since (top-level columns and fields of struct columns, all nullable) to each Delta table's
  schema, one metadata-only commit per table, and rewrites the marker's schema_version. No file is
  rewritten: the rows already written read the new columns as null (so do recpipe's own scans before
  the upgrade; the upgrade makes other Delta readers - delta-rs, polars, Spark - see the columns too);
* the old Parquet-folder format, converted as follows.

The old format (recpipe up to commit 7f76fa5): ``<root>/<table>/<col>=<value>/.../<shard>.parquet``, files
that include the partition columns, the shard ids a file holds in its footer (``recpipe.shards``, several
for a compacted file), the writer's schema version in the schema metadata, and a store marker without a
``format``. Old-format stores were always local directories.

Per table:

1. the old folder is moved aside to ``<root>/legacy-parquet/<table>`` (one rename). A rerun after a crash
   finds the aside folder and starts that table again: a Delta table left half-written is discarded;
2. every old file is read with its page checksums verified and conformed to the current schema (columns
   added since its schema version get the defaults of tables.yaml's ``migrations``). A file that cannot be
   read, or does not fit the schema, is moved to ``<root>/quarantine/legacy/<table>/...`` and reported,
   never silently dropped; its shards stay uncommitted, so re-running them writes them again;
3. each old file becomes one new Parquet file without the partition columns (``<shard>~<uuid>.parquet``,
   or ``compact-<uuid>.parquet`` for a file holding several shards), and each old partition folder one
   Delta transaction whose commit carries one application transaction per old shard id
   (``Store.shard_key``): re-running an old generation shard or training step later adds nothing twice;
4. verified: the files the table lists are exactly those written; each one read back through the store
   equals (``pyarrow.Table.equals``, every column and value, partition columns from the log) the old file
   read again from disk; row counts agree; every old shard is committed. A table that fails is discarded
   and the conversion stops with an error naming the file; nothing old is deleted. A verified table gets
   ``legacy-parquet/<table>/.recpipe-migrated``, so a rerun keeps it.

Only when every table is verified is the store marker rewritten (``"format": "delta"``): until then
``Store(...)`` keeps refusing the store. Nothing is deleted: ``legacy-parquet/`` stays until the user
removes it. Checkpoints are not touched. No other process may write the store while it is converted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake.transaction import AddAction, CommitProperties, Transaction

from recpipe.schema import SCHEMA_VERSION, conform, migrations, table_names, table_schema, table_spec
from recpipe.store import COMMIT_HOOKS, FORMAT, MARKER, Store, StoreError, read_marker
from recpipe.store.datasets import DataFile, file_stats, read_table
from recpipe.store.files import fsync_dir, write_parquet
from recpipe.store.location import Location, LocationError

__all__ = ["LEGACY_DIR", "MigrationError", "conform_legacy", "migrate_legacy", "missing_columns", "needs_migration",
           "upgrade_schema"]

LEGACY_DIR = "legacy-parquet"
DONE_FILE = ".recpipe-migrated"
SHARDS_KEY = "recpipe.shards"  # the old footer key: the shard ids a file holds
OLD_SCHEMA_VERSION = 2  # what the last Parquet-folder recpipe wrote (files without the key are that old)


class MigrationError(StoreError):
    """The conversion could not be verified; nothing old was deleted."""


def needs_migration(uri: str | Path, storage_options: dict[str, str] | None = None) -> bool:
    """Whether ``uri`` holds a store in the old Parquet-folder format (a marker without ``format``), or a
    Delta store of an older schema_version."""
    try:
        marker = read_marker(Location.parse(uri, storage_options))
    except LocationError:
        return False
    if marker is None:
        return False
    return marker.get("format") != FORMAT or int(marker.get("schema_version", SCHEMA_VERSION)) < SCHEMA_VERSION


# ---- an older Delta schema -----------------------------------------------------------------------

def missing_columns(have: pa.Schema, want: pa.Schema) -> list[tuple[pa.Field, list[str]]]:
    """The fields of ``want`` that ``have`` lacks, whole or in part: (field of ``want``, the missing
    names, dotted below a struct: ``generator.tokenizer``)."""
    def lacking(old: pa.DataType, new: pa.DataType, prefix: str) -> list[str]:
        if pa.types.is_struct(new) and pa.types.is_struct(old):
            names = {f.name: f for f in old}
            return [n for f in new for n in ([f"{prefix}.{f.name}"] if f.name not in names
                                             else lacking(names[f.name].type, f.type, f"{prefix}.{f.name}"))]
        return []

    out = []
    for field in want:
        if field.name not in have.names:
            out.append((field, [field.name]))
        elif names := lacking(have.field(field.name).type, field.type, field.name):
            out.append((field, names))
    return out


def upgrade_schema(uri: str | Path, storage_options: dict[str, str] | None = None) -> dict[str, Any]:
    """Add the columns of the current tables.yaml to an older Delta store's tables (see the module doc);
    returns what was added. Safe beside running writers (a metadata commit; their appends retry) and to
    rerun. MigrationError if a missing column is not nullable (old rows would have no value for it)."""
    from deltalake import Field

    store = Store(uri, storage_options)
    marker = read_marker(store.location) or {}
    plan = {table: missing for table in table_names()
            if (missing := missing_columns(pa.schema(store.delta(table).schema().to_arrow()), table_schema(table)))}
    strict = [f"{t}.{n}" for t, missing in plan.items() for f, names in missing for n in names
              if not _nullable_path(f, n)]
    if strict:
        raise MigrationError(f"tables.yaml adds non-nullable column(s) {', '.join(strict)}, which the rows already "
                             "written cannot have; make them nullable (nothing was changed)")
    added: dict[str, list[str]] = {}
    for table, missing in plan.items():
        names = [n for _, ns in missing for n in ns]
        store.delta(table).alter.add_columns([Field.from_arrow(f) for f, _ in missing], commit_properties=CommitProperties(
            custom_metadata={"recpipe.operation": f"schema_version {SCHEMA_VERSION}: add {', '.join(names)}"}))
        store._tables.pop(table, None)
        left = missing_columns(pa.schema(store.delta(table).schema().to_arrow()), table_schema(table))
        if left:
            raise MigrationError(f"{table}: the Delta schema still lacks {left[0][1]} after adding it")
        added[table] = names
    _write_marker(store.location, {**marker, "schema_version": SCHEMA_VERSION,
                                   "upgraded": {"from": marker.get("schema_version"),
                                                "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}})
    columns = ", ".join(f"{t}.{n}" for t, names in added.items() for n in names) or "no columns"
    message = (f"upgraded the schema from version {marker.get('schema_version')} to {SCHEMA_VERSION}: added "
               f"{columns} (rows written before read them as null); no data file was rewritten")
    return {"store": store.uri, "migrated": True, "tables": {t: {"added": n} for t, n in added.items()},
            "quarantined": [], "message": message}


def _nullable_path(field: pa.Field, dotted: str) -> bool:
    """Whether the field ``dotted`` names below ``field`` (or ``field`` itself) is nullable."""
    for name in dotted.split(".")[1:]:
        field = field.type.field(name)
    return field.nullable


def _write_marker(location: Location, marker: dict[str, Any]) -> None:
    body = (json.dumps(marker) + "\n").encode()
    if not location.is_local:
        with location.fs.open_output_stream(location.path(MARKER)) as out:  # one PUT: atomic on S3
            out.write(body)
        return
    root = Path(location.uri)
    tmp = root / f".{MARKER}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MARKER)
    fsync_dir(root)


# ---- reading the old format ----------------------------------------------------------------------

@dataclass
class LegacyFile:
    path: Path
    relative: str  # inside the table's folder: run=a/policy_version=3/s0.parquet
    values: dict[str, Any]
    shards: list[str]
    version: int  # the schema version that wrote it


def _typed(table: str, column: str, text: str) -> Any:
    return int(text) if pa.types.is_integer(table_schema(table).field(column).type) else text


def _partition_folders(base: Path, table: str) -> list[tuple[Path, dict[str, Any]]]:
    """(folder, partition values) of each old partition folder; hidden names (temp files, compaction's
    staging folders) are skipped."""
    levels: list[tuple[Path, dict[str, Any]]] = [(base, {})]
    for column in table_spec(table).partition_by:
        deeper = []
        for folder, values in levels:
            names = sorted(e.name for e in os.scandir(folder) if e.is_dir() and e.name.startswith(f"{column}="))
            deeper += [(folder / n, {**values, column: _typed(table, column, n[len(column) + 1:])}) for n in names]
        levels = deeper
    return levels


def _old_version(data: pa.Table, default: int) -> int:
    raw = (data.schema.metadata or {}).get(b"schema_version")
    return int(raw) if raw else default


def conform_legacy(table: str, data: pa.Table, version: int) -> pa.Table:
    """Rows of an old file in the current schema: columns added since ``version`` get their migration
    defaults, every other value stays as it was (the schema_version column too). ValueError if they do not fit."""
    schema = table_schema(table)
    defaults = {c["name"]: c.get("default") for v, tables in migrations().items() if v >= version
                for c in tables.get(table, [])}
    for name in schema.names:
        if name not in data.column_names:
            if name not in defaults:
                raise StoreError(f"{table}: column {name!r} missing (schema_version {version}) and tables.yaml "
                                 "has no migration default for it")
            data = data.append_column(name, pa.array([defaults[name]] * data.num_rows, schema.field(name).type))
    return conform(table, data.replace_schema_metadata(None))


def _read_legacy(path: Path, table: str, default_version: int) -> tuple[pa.Table, list[str], int]:
    data = pq.read_table(path, page_checksum_verification=True)
    raw = (data.schema.metadata or {}).get(SHARDS_KEY.encode())
    shards = json.loads(raw) if raw else [path.stem]
    version = _old_version(data, default_version)
    return conform_legacy(table, data, version), [str(s) for s in shards], version


# ---- one table -----------------------------------------------------------------------------------

def _quarantine(root: Path, table: str, file: Path, aside: Path) -> Path:
    target = root / "quarantine" / "legacy" / table / file.relative_to(aside)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(file, target)
    fsync_dir(target.parent)
    return target


def _earlier_quarantine(root: Path, table: str) -> list[dict[str, str]]:
    base = root / "quarantine" / "legacy" / table
    return [{"table": table, "path": str(p), "reason": "quarantined by an earlier run of the conversion"}
            for p in sorted(base.rglob("*.parquet"))] if base.is_dir() else []


def _commit_partition(store: Store, table: str, values: dict[str, Any],
                      written: list[tuple[str, int, pa.Table]], shards: list[str]) -> None:
    """One Delta transaction: the partition's new files plus an application transaction per old shard."""
    spec = table_spec(table)
    now = int(time.time() * 1000)
    log_values = {c: str(values[c]) for c in spec.partition_by}
    adds = [AddAction(relative, size, log_values, now, True, file_stats(rows)) for relative, size, rows in written]
    name = "/".join(f"{c}={values[c]}" for c in spec.partition_by)
    props = CommitProperties(
        app_transactions=[Transaction(store.shard_key(table, values, s), 1) for s in sorted(set(shards))],
        custom_metadata={"recpipe.operation": f"migrate {name or table} ({len(written)} legacy files)"})
    store.delta(table).create_write_transaction(adds, mode="append", schema=spec.schema,
                                                partition_by=list(spec.partition_by) or None,
                                                commit_properties=props, post_commithook_properties=COMMIT_HOOKS)


def _new_name(values_path: str, shards: list[str]) -> str:
    shard = shards[0] if len(shards) == 1 and "~" not in shards[0] else None
    name = f"{shard}~{uuid.uuid4().hex[:12]}.parquet" if shard else f"compact-{uuid.uuid4().hex[:16]}.parquet"
    return f"{values_path}/{name}".lstrip("/")


def _convert_table(store: Store, root: Path, table: str, aside: Path, default_version: int,
                   quarantined: list[dict[str, str]]) -> dict[str, tuple[LegacyFile, int]]:
    """Write the Delta table from the aside folder; returns {new relative path: (old file, new size)}."""
    spec = table_spec(table)
    store.delta(table)  # created empty (a table the old store never wrote stays empty)
    written: dict[str, tuple[LegacyFile, int]] = {}
    for folder, values in _partition_folders(aside, table):
        files = sorted(p for p in folder.iterdir() if p.suffix == ".parquet" and not p.name.startswith(".")
                       and p.is_file())
        batch: list[tuple[str, int, pa.Table]] = []
        shards: list[str] = []
        values_path = "/".join(f"{c}={values[c]}" for c in spec.partition_by)
        for path in files:
            try:
                rows, file_shards, version = _read_legacy(path, table, default_version)
            except Exception as exc:  # unreadable, damaged or not this table's shape: keep it, report it
                target = _quarantine(root, table, path, aside)
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                quarantined.append({"table": table, "path": str(target), "reason": f"{type(exc).__name__}: {reason}"})
                continue
            relative = _new_name(values_path, file_shards)
            body = rows.drop_columns(list(spec.partition_by))
            size = write_parquet(store.location.fs, store.location.path(table, relative), body)
            batch.append((relative, size, body))
            shards += file_shards
            written[relative] = (LegacyFile(path, str(path.relative_to(aside)), values, file_shards, version), size)
        if batch:
            _commit_partition(store, table, values, batch, shards)
    return written


def _verify_table(store: Store, table: str, written: dict[str, tuple[LegacyFile, int]]) -> dict[str, Any]:
    """The Delta table holds exactly the old rows: see the module doc. Raises MigrationError."""
    delta = store.delta(table)
    actions = pa.table(delta.get_add_actions(flatten=True))
    listed = set(actions.column("path").to_pylist())
    if listed != set(written):
        raise MigrationError(f"{table}: the Delta table lists {len(listed)} files, {len(written)} were written "
                             f"(unexpected: {sorted(listed - set(written))[:3]}, "
                             f"missing: {sorted(set(written) - listed)[:3]})")
    rows = 0
    shards = set()
    for relative, (old, size) in sorted(written.items()):
        new = read_table(store, table, files=[DataFile(store.location.path(table, relative), relative, size,
                                                       old.values)])
        again = conform_legacy(table, pq.read_table(old.path, page_checksum_verification=True), old.version)
        if new.num_rows != again.num_rows or not new.equals(again):
            differ = [c for c in again.column_names if new.num_rows != again.num_rows
                      or not new.column(c).equals(again.column(c))]
            raise MigrationError(f"{table}: {relative} does not hold the rows of {old.path} ({new.num_rows} rows "
                                 f"vs {again.num_rows}; columns that differ: {', '.join(differ) or 'none'})")
        rows += again.num_rows
        for shard in old.shards:
            if delta.transaction_version(store.shard_key(table, old.values, shard)) is None:
                raise MigrationError(f"{table}: shard {shard!r} of {old.path} is not committed in the Delta table")
            shards.add((tuple(old.values.items()), shard))
    old_rows = sum(pq.read_metadata(old.path).num_rows for old, _ in written.values())
    if rows != old_rows:
        raise MigrationError(f"{table}: {rows} rows in the Delta table, {old_rows} in the old files")
    return {"rows": rows, "files": len(written), "shards": len(shards),
            "partitions": len({tuple(old.values.items()) for old, _ in written.values()}),
            "version": delta.version()}


def _migrate_table(store: Store, root: Path, table: str, default_version: int,
                   quarantined: list[dict[str, str]]) -> dict[str, Any]:
    old, aside = root / table, root / LEGACY_DIR / table
    done = aside / DONE_FILE
    if aside.is_dir():
        if done.is_file() and old.is_dir():
            result = json.loads(done.read_text())
            with contextlib.suppress(Exception):
                if store.delta(table).version() == result["version"]:
                    quarantined += result.get("quarantined", [])
                    return result
        done.unlink(missing_ok=True)
        if old.exists():  # a Delta table an interrupted conversion left half-written: start it again
            shutil.rmtree(old)
        store._tables.pop(table, None)
    else:
        if (old / "_delta_log").exists():
            raise MigrationError(f"{old} is already a Delta table although the store marker names the old format; "
                                 f"nothing was changed (is {root} a mix of two stores?)")
        aside.parent.mkdir(parents=True, exist_ok=True)
        if old.is_dir():
            os.rename(old, aside)
        else:
            aside.mkdir()  # the old store never wrote this table
        fsync_dir(aside.parent)
        fsync_dir(root)
    before = len(quarantined)
    quarantined += _earlier_quarantine(root, table)
    written = _convert_table(store, root, table, aside, default_version, quarantined)
    try:
        result = _verify_table(store, table, written)
    except MigrationError:
        store._tables.pop(table, None)
        shutil.rmtree(old, ignore_errors=True)  # never leave an unverified table where readers would look
        raise
    result["quarantined"] = quarantined[before:]
    done.write_text(json.dumps(result) + "\n")
    return result


def migrate_legacy(uri: str | Path, storage_options: dict[str, str] | None = None) -> dict[str, Any]:
    """Convert the old-format store at ``uri`` into Delta tables in place; returns what was converted.

    Raises MigrationError (a StoreError) if a table cannot be verified: the store then stays in the old
    format, with the old files of the tables converted so far in ``legacy-parquet/`` (run it again once
    the named file is dealt with). Safe to rerun after a crash at any point.
    """
    try:
        location = Location.parse(uri, storage_options)
    except LocationError as exc:
        raise StoreError(str(exc)) from None
    marker = read_marker(location)
    if marker is None:
        raise StoreError(f"{location.uri} is not a recpipe store (run `recpipe init --store {uri}`)")
    if marker.get("format") == FORMAT:
        if int(marker.get("schema_version", SCHEMA_VERSION)) < SCHEMA_VERSION:
            return upgrade_schema(uri, storage_options)
        return {"store": location.uri, "migrated": False, "tables": {}, "quarantined": [],
                "message": f"{location.uri} is already in the Delta format; nothing to convert"}
    if not location.is_local:
        raise StoreError(f"{location.uri}: stores in the old Parquet-folder format were local directories; "
                         "convert the local copy, then upload the converted store")
    root = Path(location.uri)
    default_version = int(marker.get("schema_version", OLD_SCHEMA_VERSION))
    store = Store(location.uri, location.storage_options or None, converting=True)
    tables: dict[str, Any] = {}
    quarantined: list[dict[str, str]] = []
    for table in table_names():
        tables[table] = _migrate_table(store, root, table, default_version, quarantined)
    _write_marker(location, {"schema_version": SCHEMA_VERSION, "format": FORMAT,
                             "migrated": {"from": marker, "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                                          "legacy_dir": LEGACY_DIR}})
    rows = sum(t["rows"] for t in tables.values())
    message = (f"converted {rows} rows of {sum(1 for t in tables.values() if t['rows'])} tables to Delta, every "
               f"row verified; the old files are kept in {root / LEGACY_DIR}: delete that folder once you no "
               "longer need them")
    if quarantined:
        message += (f"; {len(quarantined)} damaged old file(s) were moved to {root / 'quarantine' / 'legacy'} and "
                    "are not in the new tables: run `recpipe doctor` to see what that leaves inconsistent")
    return {"store": str(root), "migrated": True, "tables": tables, "quarantined": quarantined,
            "legacy_dir": str(root / LEGACY_DIR), "message": message}
