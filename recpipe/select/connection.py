"""The read-only DuckDB connection selection runs on: Store.connect()'s views, bound more cheaply.

    con = selection_connection(store, rollouts=False)    # groups, batches, policies, steps, evals
    con = selection_connection(store, rollouts=False, run="a")   # the same, holding only run a's rows

Why not ``store.connect(read_only=True)``: DuckDB binds a view when it is created, and a view with
``union_by_name = true`` reads the footer of every file it globs. With 800 partitions that costs
0.2-0.6 s per connection and again ~0.1 s per query on the view - more than the whole selection.
Here ``union_by_name`` is used only for tables that have schema migrations (schemas/tables.yaml:
files of several schema versions), and the big ``rollouts`` view is only created when the
statement needs it (a user's SQL file, or the exclude_truncated filter); the second stage reads the
chosen partitions' files by path and needs no view. A query whose header says ``-- scope: run``
(schedule, fresh) gets views over its run's folders only: every table is partitioned by run first,
so the other runs' files are not even listed. Same lock-down as Store.connect(read_only=True).
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from recpipe.schema import migrations, table_names, table_spec
from recpipe.store import Store
from recpipe.store.sql import lock_down


def _duck_type(arrow_type: pa.DataType) -> str:
    if pa.types.is_int32(arrow_type):
        return "INTEGER"
    if pa.types.is_int64(arrow_type):
        return "BIGINT"
    return "VARCHAR"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _files_pattern(table: str, run: str | None) -> str:
    """Glob of a table's files below its folder, e.g. ``run=*/policy_version=*/*.parquet``."""
    levels = [f"{c}=*" for c in table_spec(table).partition_by]
    if run is not None:
        levels[0] = f"run={run}"  # every table is partitioned by run first (checked by the caller)
    return "/".join([*levels, "*.parquet"])


def selection_connection(store: Store, *, rollouts: bool, run: str | None = None) -> duckdb.DuckDBPyConnection:
    """In-memory DuckDB with one view per table (the rollouts view only if ``rollouts``), locked down.

    run: only that run's partitions (the caller checked the name: letters, digits, ``_ . -``).
    """
    migrated = {table for changes in migrations().values() for table in changes}
    con = duckdb.connect()
    for table in table_names():
        if table == "rollouts" and not rollouts:
            continue
        spec = table_spec(table)
        if run is not None and spec.partition_by[:1] != ("run",):
            raise ValueError(f"table {table!r} is not partitioned by run first; a run-scoped view cannot be built")
        pattern = _files_pattern(table, run)
        if next(store.table_dir(table).glob(pattern), None) is not None:  # stops at the first file
            hive_types = ", ".join(
                f"{_quote(c)}: {_quote(_duck_type(spec.schema.field(c).type))}" for c in spec.partition_by
            )
            union = "true" if table in migrated else "false"
            # DDL takes no prepared parameters; the glob is a path inside the store, quoted.
            con.execute(
                f"CREATE VIEW {table} AS SELECT * FROM read_parquet({_quote(str(store.table_dir(table) / pattern))}, "
                f"hive_partitioning = true, hive_types = {{{hive_types}}}, union_by_name = {union})"
            )
        else:
            empty = spec.schema.empty_table()  # noqa: F841 - referenced by name in the SQL below
            con.execute(f"CREATE TABLE {table} AS SELECT * FROM empty")
    lock_down(con, store.root)
    return con
