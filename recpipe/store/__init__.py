"""The rollout archive: one Delta Lake table per archive table, under one store URI.

    store = Store.create("store")                       # or "s3://bucket/prefix"
    store.append("rollouts", rows, shard_id="abc123")   # one transaction; a re-run adds nothing
    con = store.connect()                                # DuckDB with every table registered
    con.sql("SELECT policy_version, avg(reward) FROM rollouts GROUP BY 1").show()

Layout: ``<uri>/<table>/`` is a Delta table (``_delta_log/`` plus hive-partitioned Parquet files,
partition columns as schemas/tables.yaml says); any Delta reader (delta-rs, polars, Spark, DuckDB's
delta extension) opens it. Checkpoints live in ``<uri>/checkpoints/<run>/v<version>``; a store on S3
keeps a local copy of the ones this machine uses under ``store.root`` (recpipe.store.location).

Commits: ``append`` writes one Parquet file (pyarrow: page checksums, byte-stream-split log-probs)
and adds it in one Delta transaction that carries an application transaction id naming the shard
(``<partition>/<shard_id>``). The id is what makes a shard idempotent: a shard whose id is in the
table's log is never added again, and two writers racing on the same shard cannot both commit -
delta-rs fails the second with a concurrent-transaction conflict (measured), which ``append`` reads
as "already committed". Commits of different shards never conflict; delta-rs retries them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError, TableNotFoundError
from deltalake.transaction import AddAction, CommitProperties, PostCommitHookProperties, Transaction

from recpipe.errors import RecpipeError
from recpipe.schema import SCHEMA_VERSION, conform, table_names, table_spec
from recpipe.store.datasets import TableDataset, damaged, file_stats, read_table
from recpipe.store.files import StoreWriteError, write_parquet
from recpipe.store.lease import Lease, RunLocked
from recpipe.store.location import Location, LocationError

__all__ = ["Store", "StoreError", "StoreWriteError", "RunLocked", "connect", "MARKER", "AsOf", "Pins",
           "table_configuration"]

MARKER = ".recpipe-store"
FORMAT = "delta"
COMMIT_ATTEMPTS = 5  # beyond delta-rs's own retries of non-conflicting commits
# After each commit delta-rs writes a checkpoint (every delta.checkpointInterval versions, kept) and, by
# default, lists the log to delete commit files older than the log retention (30 days): that listing was
# ~7 ms of every ~15-25 ms commit at 10M rollouts, and deleting old commits would end time travel to the
# versions recorded selections read. recpipe never deletes log entries (a table property tells other
# writers too).
COMMIT_HOOKS = PostCommitHookProperties(create_checkpoint=True, cleanup_expired_logs=False)


def table_configuration(table: str) -> dict[str, str]:
    """The Delta table properties recpipe gives ``table`` (at creation; `recpipe doctor --repair` sets them
    on older tables):

    - no expired-log cleanup by any writer, so every version a recorded selection read stays loadable;
    - a checkpoint every ``checkpoint_interval`` commits (schemas/tables.yaml; 10, Delta's default is 100).
      delta-rs 1.6.6 replays the log from the last checkpoint in every commit, refresh and application-
      transaction lookup, so their cost grows with the commits since it: a lineage commit plus refresh on
      the 10M benchmark's 750-file batches table took 10 + 8 ms at 26 commits past a checkpoint and
      21 + 19 ms at 86; every 10 commits ~15 ms on average, checkpoint writes included. A checkpoint lists
      every live file, so rollouts and groups (a file per generation shard until compacted: 196k groups
      files at 100M rollouts, up to 150 MB a checkpoint) keep 100.
    """
    return {"delta.enableExpiredLogCleanup": "false",
            "delta.checkpointInterval": str(table_spec(table).checkpoint_interval)}


# as_of: a version of every table read, {table: version}, or a point in time (each table as of it).
AsOf = int | dict[str, int] | dt.datetime | None


class StoreError(RecpipeError, ValueError):
    """The store is missing, not a recpipe store, or asked for something it cannot do."""


class Store:
    """A set of Delta tables plus checkpoints, under one local path or S3 URI."""

    def __init__(self, uri: str | Path, storage_options: dict[str, str] | None = None, *, converting: bool = False):
        """converting: open a store whose marker still names the old format (recpipe.store.migrate only)."""
        try:
            self.location = Location.parse(uri, storage_options)
        except LocationError as exc:
            raise StoreError(str(exc)) from None
        self.uri = self.location.uri
        self.root = self.location.cache_dir()  # the local folder: the store itself, or its cache
        marker = read_marker(self.location)
        if marker is None:
            raise StoreError(f"{self.uri} is not a recpipe store (run `recpipe init --store {uri}`)")
        if marker.get("format") != FORMAT and not converting:
            raise StoreError(f"{self.uri} holds an archive in the old Parquet-folder format; convert it with "
                             f"`recpipe doctor --store {uri} --migrate` (every row is kept and verified)")
        self._tables: dict[str, DeltaTable] = {}
        self._refreshed: dict[str, float] = {}  # when each table's log was last read (time.monotonic)
        self._txns: dict[str, tuple[int, dict[str, int]]] = {}  # table: (version, {app id: txn version})

    @classmethod
    def create(cls, uri: str | Path, storage_options: dict[str, str] | None = None) -> Store:
        """Open the store at ``uri``, creating it (and every table) if needed."""
        try:
            location = Location.parse(uri, storage_options)
        except LocationError as exc:
            raise StoreError(str(exc)) from None
        fs, marker = location.fs, location.path(MARKER)
        try:
            if fs.get_file_info(marker).type != pafs.FileType.File:
                if location.is_local:
                    root = Path(location.uri)
                    if root.exists() and not root.is_dir():
                        raise StoreError(f"{uri} is a file, not a directory; choose another --store")
                    if root.exists() and any(root.iterdir()):
                        raise StoreError(f"{uri} exists and is not empty; refusing to turn it into a store")
                elif fs.get_file_info(pafs.FileSelector(location.path(), allow_not_found=True, recursive=False)):
                    raise StoreError(f"{uri} already holds objects; refusing to turn it into a store")
                fs.create_dir(location.path(), recursive=True)
                with fs.open_output_stream(marker) as out:
                    out.write((json.dumps({"schema_version": SCHEMA_VERSION, "format": FORMAT}) + "\n").encode())
        except OSError as exc:
            raise StoreWriteError(getattr(exc, "errno", None) or 5, f"cannot create store at {uri}: {exc}") from exc
        store = cls(uri, storage_options)
        for table in table_names():
            store.delta(table)
        return store

    @staticmethod
    def exists(uri: str | Path, storage_options: dict[str, str] | None = None) -> bool:
        """Whether ``uri`` holds a recpipe store (of any format version)."""
        try:
            location = Location.parse(uri, storage_options)
            return location.fs.get_file_info(location.path(MARKER)).type == pafs.FileType.File
        except (LocationError, OSError):
            return False

    def runs(self) -> list[str]:
        """Every run with rows in the archive."""
        return sorted({v["run"] for table in ("policies", "groups", "batches", "steps")
                       for v in self.snapshot(table).partitions()})

    # ---- tables ------------------------------------------------------------------------------
    def table_uri(self, table: str) -> str:
        table_spec(table)  # unknown table -> KeyError listing the tables
        return self.location.table_uri(table)

    def delta(self, table: str, as_of: int | dt.datetime | None = None, *,
              fresh_since: float | None = None) -> DeltaTable:
        """The Delta table, at its latest version (created if this store predates it) or ``as_of``.

        fresh_since: a ``time.monotonic()`` value; the log is read again only if it was last read before
        then (one selection reads each table's log once). Default: always read again.
        """
        spec = table_spec(table)
        options = self.location.storage_options or None
        if as_of is not None:
            cached = self._tables.get(table)
            if isinstance(as_of, int) and cached is not None and cached.version() == as_of:
                return cached  # the version this process last read: no second load of the log
            pinned = DeltaTable(self.table_uri(table), storage_options=options)
            try:
                pinned.load_as_version(as_of if isinstance(as_of, int) or as_of.tzinfo else
                                       as_of.replace(tzinfo=dt.UTC))
            except Exception as exc:  # delta-rs raises several types for a version it does not have
                raise StoreError(f"table {table!r} has no version as of {as_of} (its versions are "
                                 f"0..{pinned.version()}): {str(exc).splitlines()[0]}") from None
            return pinned
        cached = self._tables.get(table)
        if cached is not None:
            if fresh_since is None or self._refreshed.get(table, -math.inf) < fresh_since:
                if self._has_newer_commit(table, cached.version()):
                    cached.update_incremental()
                self._refreshed[table] = time.monotonic()
            return cached
        try:
            table_obj = DeltaTable(self.table_uri(table), storage_options=options)
        except TableNotFoundError:
            try:
                table_obj = DeltaTable.create(self.table_uri(table), schema=spec.schema, mode="ignore",
                                              partition_by=list(spec.partition_by) or None,
                                              storage_options=options, description=spec.description,
                                              configuration=table_configuration(table))
            except OSError as exc:
                raise StoreWriteError(getattr(exc, "errno", None) or 5,
                                      f"cannot create table {table!r} in {self.uri}: {exc}") from exc
        self._tables[table] = table_obj
        self._refreshed[table] = time.monotonic()
        return table_obj

    def _has_newer_commit(self, table: str, version: int) -> bool:
        """Whether commit ``version + 1`` of ``table`` exists. Delta commits are the files
        ``_delta_log/<version, 20 digits>.json``, each written once and in order, so its absence means the
        table is still at ``version``: one stat (an S3 HEAD) instead of delta-rs listing the whole log."""
        path = self.location.commit_file(table, version + 1)
        try:
            return self.location.fs.get_file_info(path).type != pafs.FileType.NotFound
        except OSError:
            return True  # cannot tell: let delta-rs read the log (and raise what it finds)

    def versions(self, tables: list[str] | None = None) -> dict[str, int]:
        """The current version of each table (what a selection records, and ``as_of`` takes back)."""
        return {table: self.delta(table).version() for table in (tables or table_names())}

    def resolve_as_of(self, table: str, as_of: AsOf) -> int | None:
        """The version of ``table`` that ``as_of`` names (None: the latest)."""
        if as_of is None:
            return None
        if isinstance(as_of, dict):
            return as_of.get(table)
        if isinstance(as_of, dt.datetime):
            return self.delta(table, as_of).version()
        return as_of

    def files(self, table: str, run: str | None = None, as_of: int | None = None) -> list[str]:
        """Paths (on ``location.fs``) of the data files of ``table`` at its latest version or ``as_of``."""
        return [f.path for f in self.snapshot(table, as_of).files if run is None or f.values.get("run") == run]

    def snapshot(self, table: str, version: int | None = None):  # noqa: ANN201 - datasets.Snapshot
        from recpipe.store.datasets import snapshot

        return snapshot(self, table, version)

    @staticmethod
    def checkpoint_key(run: str, version: int) -> str:
        """Where version ``version`` of ``run`` lives, relative to the store (a path, or an object prefix)."""
        return f"checkpoints/{run}/v{version:06d}"

    def checkpoint_dir(self, run: str, version: int) -> Path:
        return self.root / self.checkpoint_key(run, version)

    def lock(self, run: str, purpose: str = "writer") -> Lease:
        """The exclusive lease of ``run`` for one ``purpose`` (loop, trainer), good across machines."""
        return Lease(self, run, purpose)

    # ---- writes ------------------------------------------------------------------------------
    @staticmethod
    def shard_key(table: str, values: dict[str, Any], shard_id: str) -> str:
        """The application transaction id of one shard of ``table``: its partition and shard id."""
        spec = table_spec(table)
        return "/".join([*(f"{c}={values[c]}" for c in spec.partition_by), shard_id])

    def shard_state(self, table: str, key: str, fresh_since: float | None = None) -> int:
        """The application transaction version of shard ``key``: 0 never committed, odd committed, even
        withdrawn (its rows quarantined by ``recpipe doctor --repair``: a re-run may commit it again)."""
        return self.transaction_version(self.delta(table, fresh_since=fresh_since), table, key)

    def transaction_version(self, delta: DeltaTable, table: str, key: str) -> int:
        """``delta.transaction_version(key) or 0``, remembered for the table version (delta-rs scans the log
        for it: ~10 ms with a few hundred commits)."""
        version = delta.version()
        memo = self._txns.get(table)
        if memo is None or memo[0] != version:
            memo = self._txns[table] = (version, {})
        if key not in memo[1]:
            memo[1][key] = delta.transaction_version(key) or 0
        return memo[1][key]

    def _after_commit(self, table: str, delta: DeltaTable, read: int, txns: Sequence[tuple[str, int]]) -> None:
        """Bring the cached table to our commit. If it landed right after the version we read (no other
        commit between), the application transaction versions remembered for ``read`` still hold, plus
        ours: the next "already committed?" question is answered without delta-rs scanning the log."""
        try:
            delta.update_incremental()
        except OSError:
            self._refreshed.pop(table, None)  # the next read loads it
            return
        self._refreshed[table] = time.monotonic()
        memo = self._txns.get(table)
        if memo is not None and memo[0] == read and delta.version() == read + 1:
            self._txns[table] = (read + 1, {**memo[1], **dict(txns)})

    def is_committed(self, table: str, values: dict[str, Any], shard_id: str,
                     fresh_since: float | None = None) -> bool:
        return self.shard_state(table, self.shard_key(table, values, shard_id), fresh_since) % 2 == 1

    def append(self, table: str, rows: pa.Table | list[dict[str, Any]], *, shard_id: str,
               fresh_since: float | None = None) -> bool:
        """Commit ``rows`` as one transaction named by ``shard_id``; False if that shard is already committed.

        All rows must belong to one partition. Rows are checked against the table's schema first, so a
        bad batch raises before anything is written.
        """
        if not shard_id or "/" in shard_id or shard_id.startswith(".") or "~" in shard_id:
            raise StoreError(f"bad shard id {shard_id!r}")
        data = conform(table, rows)
        if data.num_rows == 0:
            raise StoreError(f"{table}: refusing to commit an empty shard {shard_id!r}")
        spec = table_spec(table)
        values = {}
        for column in spec.partition_by:
            distinct = data.column(column).unique().to_pylist()
            if len(distinct) != 1:
                raise StoreError(f"{table}: shard {shard_id!r} spans {len(distinct)} values of {column!r}; one expected")
            values[column] = distinct[0]
        key = self.shard_key(table, values, shard_id)
        delta = self.delta(table, fresh_since=fresh_since)
        state = self.transaction_version(delta, table, key)
        if state % 2 == 1:
            return False
        relative = "/".join([*(f"{c}={values[c]}" for c in spec.partition_by),
                             f"{shard_id}~{uuid.uuid4().hex[:12]}.parquet"])
        return self.add_files(table, [(relative, data.drop_columns(list(spec.partition_by)), values)],
                              app_id=key, app_version=state + 1, operation=f"append shard {shard_id}",
                              checked_at=delta.version(), fresh_since=fresh_since)

    def add_files(self, table: str, files: list[tuple[str, pa.Table, dict[str, Any]]], *, app_id: str,
                  app_version: int = 1, removes: list[Any] | None = None, operation: str = "append",
                  also: Sequence[tuple[str, int]] = (), data_change: bool | None = None,
                  checked_at: int | None = None, fresh_since: float | None = None) -> bool:
        """Write each (relative path, rows without partition columns, partition values) file, then commit
        them (and ``removes``) in one transaction carrying ``app_id`` at ``app_version`` (and the
        application transactions ``also``, e.g. shards a repair withdraws).

        data_change: whether the added files change the table's rows (default: unless there are removes,
        i.e. a rewrite of the same rows, as compaction does). Returns False, deleting the files written,
        if that application transaction is already in the log (another writer committed it first);
        raises StoreWriteError if commits keep failing. checked_at: the table version at which the caller
        saw ``app_id`` below ``app_version`` (its check is not repeated at that version).
        """
        spec = table_spec(table)
        fs = self.location.fs
        adds = []
        for relative, rows, values in files:
            path = self.location.path(table, relative)
            size = write_parquet(fs, path, rows)
            adds.append(AddAction(relative, size, {c: str(values[c]) for c in spec.partition_by},
                                  int(time.time() * 1000), not removes if data_change is None else data_change,
                                  file_stats(rows)))
        txns = [Transaction(app_id, app_version), *(Transaction(a, v) for a, v in also)]
        props = CommitProperties(app_transactions=txns,
                                 custom_metadata={"recpipe.operation": operation})
        error: Exception | None = None
        for attempt in range(COMMIT_ATTEMPTS):
            delta = self.delta(table, fresh_since=fresh_since if attempt == 0 else None)
            # A commit of this application transaction before the version we read would not conflict with
            # ours: it must be looked for. One after it makes delta-rs fail ours (a conflict), then we look.
            if attempt or checked_at != delta.version():
                done = delta.transaction_version(app_id)
                if done is not None and done >= app_version:
                    break
            read = delta.version()
            try:
                delta.create_write_transaction([*adds, *(removes or [])], mode="append", schema=spec.schema,
                                               partition_by=list(spec.partition_by) or None,
                                               commit_properties=props, post_commithook_properties=COMMIT_HOOKS)
                self._after_commit(table, delta, read, [(app_id, app_version), *also])
                return True
            except CommitFailedError as exc:  # a concurrent commit of the same app id: re-read, then decide
                error = exc
            except OSError as exc:
                error = exc
                break
        for relative, _, _ in files:  # never referenced by the log: nothing to keep
            with contextlib.suppress(OSError):
                fs.delete_file(self.location.path(table, relative))
        done = self.delta(table).transaction_version(app_id)
        if done is not None and done >= app_version:
            return False
        raise StoreWriteError(5, f"{table}: could not commit {operation} ({error}); nothing was committed")

    def append_rollouts(self, rows: pa.Table, *, shard_id: str) -> bool:
        """Commit a generation shard: its rollouts, then its one-row-per-group summary.

        The summary is derived from the rollouts; if a crash fell between the two commits, a rerun of the
        shard completes the summary and writes no rollout twice.
        """
        data = conform("rollouts", rows)
        wrote = self.append("rollouts", data, shard_id=shard_id)
        values = {"run": data.column("run")[0].as_py(), "policy_version": data.column("policy_version")[0].as_py()}
        if not self.is_committed("groups", values, shard_id):
            if not wrote:  # summarise what is stored, not what this rerun produced
                data = self.read_shard("rollouts", values, shard_id)
            self.append("groups", group_summary(data), shard_id=shard_id)
        return wrote

    def read_shard(self, table: str, values: dict[str, Any], shard_id: str) -> pa.Table:
        """The rows one shard committed (by its shard_id column, or the table's shard template)."""
        rows = read_table(self, table, filter=_partition_filter(values) & self._shard_rows(table, shard_id))
        if rows.num_rows == 0:
            raise StoreError(f"{table}: shard {shard_id!r} not found in partition {values}")
        return rows

    @staticmethod
    def _shard_rows(table: str, shard_id: str) -> pc.Expression:
        spec = table_spec(table)
        if "shard_id" in spec.schema.names:
            return pc.field("shard_id") == shard_id
        values = spec.shard_filter(shard_id)
        if not values:
            raise StoreError(f"{table}: cannot find the rows of shard {shard_id!r} (the table has no shard_id "
                             "column and no shard template in schemas/tables.yaml)")
        return _partition_filter(values)

    # ---- reads -------------------------------------------------------------------------------
    def connect(self, *, read_only: bool = False, tables: Sequence[str] | None = None,
                as_of: AsOf | Pins = None) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB connection with every table (or only ``tables``) registered by name.

        read_only: the connection is locked down (recpipe.store.sql: no file access, no settings
        changes) - for user SQL. See ``register`` for the tables and ``as_of``.
        """
        from recpipe.store.sql import locked_connection

        return self.register(locked_connection() if read_only else duckdb.connect(), tables, as_of=as_of)

    def register(self, con: duckdb.DuckDBPyConnection, tables: Sequence[str] | None = None, *,
                 as_of: AsOf | Pins = None, run: str | None = None) -> duckdb.DuckDBPyConnection:
        """Register every table (or only ``tables``) on ``con`` by name; returns ``con``.

        Tables are pyarrow datasets over the tables' Delta snapshots (recpipe.store.datasets.TableDataset):
        the latest version at each query, the version ``as_of`` names, or with ``Pins`` the version
        fixed when a query first reads the table. run: only that run's files (a run name, RUN_NAME).
        """
        for table in table_names() if tables is None else tables:
            version = as_of.of(table) if isinstance(as_of, Pins) else self.resolve_as_of(table, as_of)
            con.register(table, TableDataset(self, table, run=run, version=version))
        return con

    def read(self, table: str, where: str | None = None, params: dict[str, Any] | None = None,
             as_of: AsOf = None) -> pa.Table:
        """Rows of ``table`` (optionally filtered by a SQL ``where`` with $params) as Arrow."""
        sql = f"SELECT * FROM {table}" + (f" WHERE {where}" if where else "")
        version = self.resolve_as_of(table, as_of)
        if version is not None:
            self.delta(table, version)  # a version the table does not have: StoreError here, not inside DuckDB
        con = self.connect(tables=[table], as_of=as_of)
        try:
            return con.sql(sql, params=params or None).to_arrow_table()
        except duckdb.Error as exc:
            from recpipe.store.sql import scan_failure

            text = scan_failure(exc)
            if text is not None and "recpipe doctor" in text:
                raise StoreError(text) from None
            raise
        finally:
            con.close()

    def compact(self, table: str, run: str | None = None, min_files: int = 2) -> dict[str, int]:
        from recpipe.store.compact import compact_table

        return compact_table(self, table, run=run, min_files=min_files)

    def damaged(self, path: str, exc: BaseException) -> str:
        return damaged(path, exc, self.uri)


class Pins:
    """The version of each table a reader sees: fixed when it first needs the table (or given by ``as_of``),
    then the same for every later read. ``read`` lists those it read, as selection lineage records.

    fresh_since: see Store.delta (a table's log read since then is not read again).
    """

    def __init__(self, store: Store, as_of: AsOf = None, fresh_since: float | None = None):
        self.store, self.as_of, self.fresh_since = store, as_of, fresh_since
        self.read: dict[str, int] = {}

    def version(self, table: str) -> int:
        if table not in self.read:
            pinned = self.store.resolve_as_of(table, self.as_of)
            self.read[table] = pinned if pinned is not None else \
                self.store.delta(table, fresh_since=self.fresh_since).version()
        return self.read[table]

    def of(self, table: str) -> Callable[[], int]:
        """The table's version, looked up when first called (a dataset's first scan)."""
        return lambda: self.version(table)


def read_marker(location: Location) -> dict[str, Any] | None:
    """The store marker's JSON (None: no marker, not a store)."""
    try:
        with location.fs.open_input_stream(location.path(MARKER)) as f:
            return json.loads(f.read().decode() or "{}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StoreError(f"{location.uri}: cannot read the store marker {MARKER}: {exc}") from None


def parse_as_of(text: str) -> AsOf:
    """``--as-of``: a version of every table read (``12``), versions per table (``groups=41,rollouts=40``,
    or the JSON that ``batches.read_versions`` records), or a time (ISO 8601; UTC unless it says)."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    if text.startswith("{"):
        try:
            versions = json.loads(text)
        except ValueError as exc:
            raise StoreError(f"--as-of {text!r}: not valid JSON ({exc})") from None
    elif "=" in text:
        versions = dict(item.split("=", 1) for item in text.split(","))
    else:
        try:
            when = dt.datetime.fromisoformat(text)
        except ValueError:
            raise StoreError(f"--as-of {text!r}: expected a table version (12), versions per table "
                             "(groups=41,rollouts=40 or JSON) or an ISO time (2026-12-01T14:00:00)") from None
        return when if when.tzinfo else when.replace(tzinfo=dt.UTC)
    names = set(table_names())
    out = {}
    for table, version in versions.items():
        table = str(table).strip()
        if table not in names:
            raise StoreError(f"--as-of: unknown table {table!r}; tables are {', '.join(sorted(names))}")
        if isinstance(version, bool) or not str(version).strip().isdigit():
            raise StoreError(f"--as-of: version of {table} must be a whole number >= 0 (got {version!r})")
        out[table] = int(str(version).strip())
    return out


def _partition_filter(values: dict[str, Any]) -> pc.Expression:
    expr = pc.scalar(True)
    for column, value in values.items():
        expr = expr & (pc.field(column) == value)
    return expr


def group_summary(rollouts: pa.Table) -> pa.Table:
    """One row per group: the columns selection queries scan instead of the token payloads."""
    frame = pl.from_arrow(
        rollouts.select(
            ["run", "group_id", "policy_version", "task", "prompt_id", "reward", "reward_error",
             "response_length", "shard_id", "created_at"]
        )
    )
    summary = frame.group_by(["run", "group_id", "policy_version", "task", "prompt_id", "shard_id"]).agg(
        pl.len().cast(pl.Int32).alias("n"),
        pl.col("reward").mean().alias("reward_mean"),
        pl.col("reward").std(ddof=0).fill_null(0.0).alias("reward_std"),
        pl.col("reward_error").is_not_null().sum().cast(pl.Int32).alias("n_errors"),
        pl.col("response_length").max().cast(pl.Int32).alias("max_response_length"),
        pl.col("created_at").max().alias("created_at"),
    ).with_columns(pl.lit(SCHEMA_VERSION, dtype=pl.Int32).alias("schema_version"))
    return conform("groups", summary.sort("group_id").to_arrow())


def connect(store: str | Path | Store, *, read_only: bool = True, as_of: AsOf = None) -> duckdb.DuckDBPyConnection:
    """``recpipe.connect(store)``: DuckDB with every table registered (read-only by default)."""
    return (store if isinstance(store, Store) else Store(store)).connect(read_only=read_only, as_of=as_of)
