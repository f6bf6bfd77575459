"""The read-only DuckDB connection selection runs on: Store.connect()'s views, bound more cheaply.

    con = selection_connection(store, rollouts=False)            # groups, batches, policies, steps, evals
    con = selection_connection(store, rollouts=False, run="a")   # the same, holding only run a's rows
    ...
    con.close()

Why not ``store.connect(read_only=True)``: DuckDB binds a view when it is created, and a view with
``union_by_name = true`` reads the footer of every file it globs. With 800 partitions that costs
0.2-0.6 s per connection and again ~0.1 s per query on the view - more than the whole selection.
Here ``union_by_name`` is used only for tables that have schema migrations (schemas/tables.yaml:
files of several schema versions), and the big ``rollouts`` view is only created when the
statement needs it (a user's SQL file, or the exclude_truncated filter); the second stage reads the
chosen partitions' files by path and needs no view. A query whose header says ``-- scope: run``
(schedule, fresh) gets views over its run's folders only: every table is partitioned by run first,
so the other runs' files are not even listed. Same lock-down as Store.connect(read_only=True).

Opening a DuckDB database costs 30-40 ms, as much as a whole run-scoped selection, so one locked-down
in-memory database is kept per store and every call gets a fresh cursor (its own connection) holding
TEMP views (2 ms to create): registered relations and views stay private to the cursor, and each
call sees the store's files as they are now.

One more relation, ``versions`` (run, policy_version): the policy versions that have rollouts in the
archive, read from the groups table's folder names (1 ms for 800 partitions) instead of its files
- replay's "newest version of each run" without a second scan of the groups table.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import duckdb
import pyarrow as pa

from recpipe.schema import migrations, table_names, table_spec
from recpipe.store import Store, duck_type, sql_str
from recpipe.store.sql import lock_down

CACHED_DATABASES = 4  # one per store a process selects from
_databases: OrderedDict[str, duckdb.DuckDBPyConnection] = OrderedDict()
_databases_lock = threading.Lock()


def _files_pattern(table: str, run: str | None) -> str:
    """Glob of a table's files below its folder, e.g. ``run=*/policy_version=*/*.parquet``."""
    levels = [f"{c}=*" for c in table_spec(table).partition_by]
    if run is not None:
        if levels[:1] != ["run=*"]:
            raise ValueError(f"table {table!r} is not partitioned by run first; a run-scoped view cannot be built")
        levels[0] = f"run={run}"
    return "/".join([*levels, "*.parquet"])


def archive_versions(store: Store, run: str | None = None) -> pa.Table:
    """(run, policy_version) of every groups partition folder holding a file (of ``run`` only, if given)."""
    runs, versions = [], []
    base = store.table_dir("groups")
    if run is not None:
        run_dirs = [base / f"run={run}"]
    else:
        run_dirs = [Path(e.path) for e in os.scandir(base) if e.name.startswith("run=")] if base.is_dir() else []
    for run_dir in run_dirs:
        if not run_dir.is_dir():
            continue
        for entry in os.scandir(run_dir):
            if entry.name.startswith("policy_version=") and any(
                f.name.endswith(".parquet") and not f.name.startswith(".") for f in os.scandir(entry.path)
            ):
                runs.append(run_dir.name[len("run="):])
                versions.append(int(entry.name[len("policy_version="):]))
    return pa.table({"run": pa.array(runs, pa.string()), "policy_version": pa.array(versions, pa.int32())})


def _database(store: Store) -> duckdb.DuckDBPyConnection:
    """The store's locked-down in-memory database (reads only inside the store, settings frozen)."""
    key = str(store.root)
    with _databases_lock:
        if key not in _databases:
            con = duckdb.connect()
            lock_down(con, store.root)
            _databases[key] = con
        _databases.move_to_end(key)
        while len(_databases) > CACHED_DATABASES:
            _databases.popitem(last=False)  # dropped, not closed: closing would close cursors in use
        return _databases[key].cursor()


def selection_connection(store: Store, *, rollouts: bool, run: str | None = None) -> duckdb.DuckDBPyConnection:
    """A locked-down connection with one view per table (rollouts only if ``rollouts``) and the
    ``versions`` relation. Close it after use.

    run: only that run's partitions (the caller checked the name: letters, digits, ``_ . -``).
    """
    migrated = {table for changes in migrations().values() for table in changes}
    con = _database(store)
    for table in table_names():
        if table == "rollouts" and not rollouts:
            continue
        spec = table_spec(table)
        pattern = _files_pattern(table, run)
        if next(store.table_dir(table).glob(pattern), None) is not None:  # stops at the first file
            hive_types = ", ".join(
                f"{sql_str(c)}: {sql_str(duck_type(spec.schema.field(c).type))}" for c in spec.partition_by
            )
            union = "true" if table in migrated else "false"
            # DDL takes no prepared parameters; the glob is a path inside the store, quoted.
            con.execute(
                f"CREATE TEMP VIEW {table} AS SELECT * FROM read_parquet("
                f"{sql_str(str(store.table_dir(table) / pattern))}, hive_partitioning = true, "
                f"hive_types = {{{hive_types}}}, union_by_name = {union})"
            )
        else:
            con.register(table, spec.schema.empty_table())  # no files yet: an empty table of the schema
    con.register("versions", archive_versions(store, run))
    return con
