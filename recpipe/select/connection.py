"""The read-only DuckDB connection selection runs on: Store.connect()'s views, bound more cheaply.

    con = selection_connection(store, rollouts=False)    # groups, batches, policies, steps, evals

Why not ``store.connect(read_only=True)``: DuckDB binds a view when it is created, and a view with
``union_by_name = true`` reads the footer of every file it globs. With 800 partitions that costs
0.2-0.6 s per connection and again ~0.1 s per query on the view - more than the whole selection.
Here ``union_by_name`` is used only for tables that have schema migrations (schemas/tables.yaml:
files of several schema versions), and the big ``rollouts`` view is only created when the
statement needs it (a user's SQL file, or the exclude_truncated filter); the second stage reads the
chosen partitions' files by path and needs no view. Same lock-down as Store.connect(read_only=True).
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


def selection_connection(store: Store, *, rollouts: bool) -> duckdb.DuckDBPyConnection:
    """In-memory DuckDB with one view per table (the rollouts view only if ``rollouts``), locked down."""
    migrated = {table for changes in migrations().values() for table in changes}
    con = duckdb.connect()
    for table in table_names():
        if table == "rollouts" and not rollouts:
            continue
        spec = table_spec(table)
        if store.files(table):
            hive_types = ", ".join(
                f"{_quote(c)}: {_quote(_duck_type(spec.schema.field(c).type))}" for c in spec.partition_by
            )
            union = "true" if table in migrated else "false"
            # DDL takes no prepared parameters; the glob is a path inside the store, quoted.
            con.execute(
                f"CREATE VIEW {table} AS SELECT * FROM read_parquet({_quote(store.glob(table))}, "
                f"hive_partitioning = true, hive_types = {{{hive_types}}}, union_by_name = {union})"
            )
        else:
            empty = spec.schema.empty_table()  # noqa: F841 - referenced by name in the SQL below
            con.execute(f"CREATE TABLE {table} AS SELECT * FROM empty")
    lock_down(con, store.root)
    return con
