"""The read-only DuckDB connection selection runs on: Store.connect(read_only=True)'s tables, cheaper.

    con = selection_connection(store, rollouts=False)            # groups, batches, policies, steps, evals
    con = selection_connection(store, rollouts=False, run="a")   # the same, holding only run a's rows
    ...
    con.close()

Every table is a recpipe.store.datasets.TableDataset: nothing is listed or read until a statement
scans the table, then only the partition folders the statement's filters keep are listed and only
the columns it names are read, page checksums verified. A query whose header says ``-- scope: run``
(schedule, fresh) gets tables over its run's folders only: every table is partitioned by run first,
so the other runs' files are not even listed. The big ``rollouts`` table is registered only when the
statement may need it (a user's SQL file, or the exclude_truncated filter); the second stage reads
the chosen partitions' files itself (selection._responses) and needs no table.

Opening a DuckDB database costs 30-40 ms, as much as a whole run-scoped selection, so one locked-down
in-memory database (recpipe.store.sql.lock_down: no file system access at all) is kept per process
and every call gets a fresh cursor (its own connection): registered relations stay private to the
cursor, and each scan sees the store's files as they are now.

One more relation, ``versions`` (run, policy_version): the policy versions that have rollouts in the
archive, read from the groups table's folder names (1 ms for 800 partitions) instead of its files
- replay's "newest version of each run" without a second scan of the groups table.
"""

from __future__ import annotations

import threading

import duckdb
import pyarrow as pa

from recpipe.schema import table_names
from recpipe.store import Store
from recpipe.store.datasets import TableDataset, parquet_files, partition_folders
from recpipe.store.sql import locked_connection

_database_con: duckdb.DuckDBPyConnection | None = None  # shared by every store: it holds no paths
_database_lock = threading.Lock()


def archive_versions(store: Store, run: str | None = None) -> pa.Table:
    """(run, policy_version) of every groups partition folder holding a file (of ``run`` only, if given)."""
    parts = [values for folder, values in partition_folders(store.root, "groups", run) if parquet_files(folder)]
    return pa.table({"run": pa.array([v["run"] for v in parts], pa.string()),
                     "policy_version": pa.array([v["policy_version"] for v in parts], pa.int32())})


def _database() -> duckdb.DuckDBPyConnection:
    """A cursor on the process's locked-down in-memory database (no file access, settings frozen)."""
    global _database_con
    with _database_lock:
        if _database_con is None:
            _database_con = locked_connection()
        return _database_con.cursor()


def selection_connection(store: Store, *, rollouts: bool, run: str | None = None) -> duckdb.DuckDBPyConnection:
    """A locked-down connection with one table per archive table (rollouts only if ``rollouts``) and
    the ``versions`` relation. Close it after use.

    run: only that run's partitions (the caller checked the name: letters, digits, ``_ . -``).
    """
    con = _database()
    for table in table_names():
        if table == "rollouts" and not rollouts:
            continue
        con.register(table, TableDataset(store.root, table, run=run))
    con.register("versions", archive_versions(store, run))
    return con
