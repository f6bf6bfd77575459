"""Batch selection: DuckDB SQL over the archive picks each training step's groups (docs/architecture.md).

    from recpipe.select import select, replay_lineage
    batch = select(store, "fresh", {"max_staleness": 2}, run="a", step=7, groups=8)
    batch.rollouts      # one row per response: ids, advantage, weight, token payload
    batch = replay_lineage(store, "a", step=7)     # the same rollouts again, for retraining

queries    load_query, query_names, Query, Param: named queries in schemas/queries/*.sql
selection  select, replay_lineage, recorded_steps: the two SQL stages and lineage
batch      Batch, lineage_rows, BATCH_COLUMNS
validate   EmptySelection, QueryResultError, SelectionError: checks on a query's result
connection selection_connection: the lean, locked-down DuckDB connection selection runs on
"""

from recpipe.select.batch import BATCH_COLUMNS, Batch, lineage_rows, lineage_shard
from recpipe.select.queries import Param, Query, QueryError, load_query, query_names
from recpipe.select.selection import compose, recorded_steps, replay_lineage, rerun_recorded, select
from recpipe.select.validate import EmptySelection, QueryResultError, SelectionError

__all__ = [
    "BATCH_COLUMNS",
    "Batch",
    "EmptySelection",
    "Param",
    "Query",
    "QueryError",
    "QueryResultError",
    "SelectionError",
    "compose",
    "lineage_rows",
    "lineage_shard",
    "load_query",
    "query_names",
    "recorded_steps",
    "rerun_recorded",
    "replay_lineage",
    "select",
]
