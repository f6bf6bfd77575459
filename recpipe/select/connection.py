"""The read-only DuckDB connection selection runs on: Store.connect(read_only=True)'s tables (Store.register),
on a cheaper connection, at pinned versions.

    con, pins = selection_connection(store, sql)                   # the tables sql names, latest versions
    con, pins = selection_connection(store, sql, run="a")          # only run a's files
    con, pins = selection_connection(store, sql, as_of=recorded_versions)
    ...
    con.close()

Every table is a recpipe.store.datasets.TableDataset read at one Delta version, fixed when the
selection first reads it (recpipe.store.Pins; lineage records them): every read of a table in the selection
sees the same state however many writers commit meanwhile (rollouts are committed before their
groups summary, so the rollouts a chosen summary names are always in the later-pinned rollouts
version), and re-running the selection as of those versions reads exactly the same rows. Nothing is read until a statement scans
a table, then only the files whose partition values the statement's filters keep, and only the
columns it names. A query whose header says ``-- scope: run`` (schedule, fresh) gets tables holding
its run's files only. Only the tables the statement names are registered (a word match on the SQL
text: every reference to a table spells its name, and a false match costs one registration, ~0.4 ms):
the big ``rollouts`` table only for a user's SQL file that reads it or the exclude_truncated filter.
The second stage reads the chosen groups' files itself (selection._responses), from the same pinned
rollouts version.

Opening a DuckDB database costs 30-40 ms, as much as a whole run-scoped selection, so one locked-down
in-memory database (recpipe.store.sql.lock_down: no file system access at all) is kept per process
and every call gets a fresh cursor (its own connection): registered relations stay private to the
cursor.

One more relation, ``versions`` (run, policy_version): the policy versions that have rollouts in the
archive, read from the groups table's partition values in the log instead of its files - replay's
"newest version of each run" without a second scan of the groups table.
"""

from __future__ import annotations

import re
import threading

import duckdb
import pyarrow as pa

from recpipe.schema import table_names
from recpipe.store import AsOf, Pins, Store
from recpipe.store.sql import locked_connection

_database_con: duckdb.DuckDBPyConnection | None = None  # shared by every store: it holds no paths
_database_lock = threading.Lock()


def archive_versions(store: Store, run: str | None = None, version: int | None = None) -> pa.Table:
    """(run, policy_version) of every groups partition holding a file (of ``run`` only, if given)."""
    parts = store.snapshot("groups", version).partitions(run)
    return pa.table({"run": pa.array([v["run"] for v in parts], pa.string()),
                     "policy_version": pa.array([v["policy_version"] for v in parts], pa.int32())})


def _database() -> duckdb.DuckDBPyConnection:
    """A cursor on the process's locked-down in-memory database (no file access, settings frozen)."""
    global _database_con
    with _database_lock:
        if _database_con is None:
            _database_con = locked_connection()
        return _database_con.cursor()


def named_tables(sql: str) -> list[str]:
    """The archive tables (and ``versions``) whose names occur as words in ``sql``."""
    words = {word.lower() for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", sql)}
    return [t for t in [*table_names(), "versions"] if t in words]


def selection_connection(store: Store, sql: str, *, run: str | None = None, as_of: AsOf = None,
                         fresh_since: float | None = None) -> tuple[duckdb.DuckDBPyConnection, Pins]:
    """A locked-down connection with the tables ``sql`` names (recpipe.store.Store.register, and the
    ``versions`` relation), each read at one version (recpipe.store.Pins), and the pins. Close the
    connection after use.

    run: only that run's files (the caller checked the name: letters, digits, ``_ . -``).
    as_of: the versions to read (default: the latest of each table when the selection first reads it).
    fresh_since: see Store.delta (a table's log read since then, e.g. by the same selection, is not read again).
    """
    pins = Pins(store, as_of, fresh_since)
    tables = named_tables(sql)
    con = store.register(_database(), [t for t in tables if t != "versions"], as_of=pins, run=run)
    if "versions" in tables:
        con.register("versions", archive_versions(store, run, pins.version("groups")))
    return con, pins
