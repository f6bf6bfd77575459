"""Checks on what a selection query returned, before anything is trained on or recorded.

A query (named or a user's file) returns either
- one row per chosen group: ``run``, ``group_id`` (VARCHAR, required), optionally ``policy_version``
  (INTEGER), ``n`` (responses in the group), ``shard_id`` (the file holding it) and ``weight`` (a
  selection weight for the whole group); or
- one row per chosen response (it has a ``rollout_id`` column): ``run``, ``group_id``, ``rollout_id``,
  optionally ``policy_version``, ``weight`` and ``advantage`` per response, which then replace the
  computed ones. Groups must be complete: advantages are relative to the whole group.
Every failure raises QueryResultError saying what is wrong and in which rows.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from recpipe.errors import RecpipeError
from recpipe.store.sql import run_read_only


class SelectionError(RecpipeError, ValueError):
    """Selection could not produce a batch."""


class EmptySelection(SelectionError):
    """The query chose no group (or fewer than asked for): there is nothing to train on."""


class QueryResultError(SelectionError):
    """The query's result does not have the shape a batch needs."""


REQUIRED = {"run": "string", "group_id": "string"}
OPTIONAL = {"policy_version": "integer", "n": "integer", "shard_id": "string", "weight": "number",
            "rollout_id": "string", "advantage": "number"}
SHOWN = 5  # offending values quoted in an error message


def _kind(t: pa.DataType) -> str:
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "number"
    return str(t)


def _first(values: list, total: int | None = None) -> str:
    """The first SHOWN values, and how many there are in all (``total``, default len(values)) if more."""
    total = len(values) if total is None else total
    shown = ", ".join(repr(v) for v in values[:SHOWN])
    return shown + (f" ... ({total} in all)" if total > SHOWN else "")


def check_result(table: pa.Table, query: str, groups: int, context: str = "") -> pa.Table:
    """Validate a query's result and return it with normalized types.

    groups: the most groups the batch may have ($groups); more means the query forgot ``LIMIT $groups``.
    context: how the query was called (run, step, parameters), quoted when nothing was chosen.
    """
    names = table.column_names
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise QueryResultError(
            f"{query}: the result lacks column(s) {missing}; a selection query returns one row per group "
            f"(run, group_id[, policy_version, n, weight]) or per response (run, group_id, rollout_id"
            f"[, weight, advantage]); it returned columns {names}"
        )
    wanted = {**REQUIRED, **{c: k for c, k in OPTIONAL.items() if c in names}}
    for column, kind in wanted.items():
        got = _kind(table.schema.field(column).type)
        if got != kind and not (kind == "number" and got == "integer"):
            raise QueryResultError(
                f"{query}: column {column!r} must be {'a' if kind != 'integer' else 'an'} {kind} "
                f"column; it is {table.schema.field(column).type}"
            )
        nulls = table.column(column).null_count
        if nulls:
            raise QueryResultError(f"{query}: column {column!r} has {nulls} NULL value(s); none allowed")
    if table.num_rows == 0:
        raise EmptySelection(f"{query}: the query chose no group; nothing to train on ({context}; see the "
                             "query's header for what it selects, and check the filters)")
    casts = {"policy_version": pa.int32(), "n": pa.int32(), "weight": pa.float64(), "advantage": pa.float64()}
    table = table.select(list(wanted))
    for column, kind in casts.items():
        if column in wanted:
            table = table.set_column(table.schema.get_field_index(column), column,
                                     pc.cast(table.column(column), kind))
    for column in ("weight", "advantage"):
        if column in wanted:
            values = table.column(column)
            bad = pc.invert(pc.is_finite(values))
            if column == "weight":
                bad = pc.or_(bad, pc.less(values, 0))
            if pc.any(bad).as_py():
                rows = pc.indices_nonzero(bad).to_pylist()
                raise QueryResultError(f"{query}: column {column!r} must be finite"
                                       + (" and >= 0" if column == "weight" else "")
                                       + f"; rows {_first(rows)} are not: {_first(pc.take(values, rows).to_pylist())}")
    per_rollout = "rollout_id" in wanted
    if "advantage" in wanted and not per_rollout:
        raise QueryResultError(f"{query}: an 'advantage' column needs one row per response (a 'rollout_id' column)")
    key = ["run", "rollout_id"] if per_rollout else ["run", "group_id"]
    counts = table.group_by(key).aggregate([([], "count_all")])
    duplicated = counts.filter(pc.greater(counts.column("count_all"), 1))
    if duplicated.num_rows:
        what = "response" if per_rollout else "group"
        pairs = [f"{r}:{x}" for r, x in zip(duplicated.column(key[0]).to_pylist(),
                                              duplicated.column(key[1]).to_pylist(), strict=True)]
        raise QueryResultError(f"{query}: {duplicated.num_rows} {what}(s) appear more than once: {_first(pairs)}; "
                               f"each {what} may be chosen once per batch")
    n_groups = table.select(["run", "group_id"]).group_by(["run", "group_id"]).aggregate([]).num_rows
    if n_groups > groups:
        raise QueryResultError(f"{query}: chose {n_groups} groups but groups={groups}; add LIMIT $groups "
                               "(or raise groups)")
    return table


# Checks on the connection's registered `choice` (the checked result, with its row number pos), `chosen`
# (one row per group, recpipe.select.selection._chosen_groups) and `found` (the second stage's rows):
# each is a query that returns no rows when the check passes, and otherwise names the offenders (the
# check that every selection runs, not_whole, is the same in Arrow).
NOT_IN_GROUPS = """
SELECT run || ':' || group_id AS pair, count(*) OVER () AS total
FROM chosen WHERE policy_version IS NULL ORDER BY position LIMIT 5
"""
LISTED_TWICE = """
SELECT run || ':' || group_id AS pair, count(*) OVER () AS total
FROM chosen GROUP BY run, group_id, position HAVING count(*) > 1 ORDER BY position LIMIT 5
"""
# The first group (in the choice's order) of a per-response choice that names a rollout its group does not
# have in the archive (stray), or leaves some of the group's responses out (left_out).
NOT_THE_GROUP = """
WITH picked AS (
    SELECT run, group_id, min(pos) AS pos, count(*) AS n_chosen FROM choice GROUP BY run, group_id
),
stray AS (
    SELECT c.run, c.group_id, list(c.rollout_id ORDER BY c.rollout_id) AS ids
    FROM choice AS c
    WHERE NOT EXISTS (SELECT 1 FROM found AS f
                      WHERE f.source_run = c.run AND f.group_id = c.group_id AND f.rollout_id = c.rollout_id)
    GROUP BY c.run, c.group_id
),
left_out AS (
    SELECT f.source_run AS run, f.group_id, list(f.rollout_id ORDER BY f.rollout_id) AS ids
    FROM found AS f
    WHERE NOT EXISTS (SELECT 1 FROM choice AS c
                      WHERE c.run = f.source_run AND c.group_id = f.group_id AND c.rollout_id = f.rollout_id)
    GROUP BY f.source_run, f.group_id
),
archive AS (
    SELECT source_run AS run, group_id, count(*) AS n_archive FROM found GROUP BY source_run, group_id
)
SELECT p.run, p.group_id, p.n_chosen, coalesce(a.n_archive, 0) AS n_archive, s.ids AS stray, l.ids AS left_out
FROM picked AS p
LEFT JOIN stray AS s ON s.run = p.run AND s.group_id = p.group_id
LEFT JOIN left_out AS l ON l.run = p.run AND l.group_id = p.group_id
LEFT JOIN archive AS a ON a.run = p.run AND a.group_id = p.group_id
WHERE s.ids IS NOT NULL OR l.ids IS NOT NULL
ORDER BY p.pos LIMIT 1
"""


def _offenders(con: duckdb.DuckDBPyConnection, sql: str, timeout_s: float | None) -> list[dict]:
    return run_read_only(con, sql, timeout_s=timeout_s).to_pylist()


def check_groups(con: duckdb.DuckDBPyConnection, query: str, timeout_s: float | None = None) -> None:
    """Every group in ``chosen`` must be in the archive's groups table, once."""
    missing = _offenders(con, NOT_IN_GROUPS, timeout_s)
    if missing:
        raise SelectionError(f"{query}: {missing[0]['total']} chosen group(s) are not in the archive's groups "
                             f"table: {', '.join(r['pair'] for r in missing)}")
    twice = _offenders(con, LISTED_TWICE, timeout_s)
    if twice:
        raise SelectionError(f"{query}: the groups table lists {twice[0]['total']} chosen group(s) more than once "
                             f"({_first([r['pair'] for r in twice], twice[0]['total'])}); "
                             "run `recpipe doctor`")


def not_whole(chosen: pa.Table, found: pa.Table) -> pa.Table:
    """The chosen groups (run, group_id, n, position, found) that ``found`` does not hold exactly n
    responses of, in the choice's order: empty when every group is whole. Arrow, not SQL: this check runs
    in every selection, and a DuckDB statement with a join costs 10-40x as much here (measured)."""
    counts = found.select(["source_run", "group_id"]).group_by(["source_run", "group_id"], use_threads=False) \
        .aggregate([([], "count_all")])
    joined = chosen.select(["run", "group_id", "n", "position"]).join(
        counts, keys=["run", "group_id"], right_keys=["source_run", "group_id"], use_threads=False)
    joined = joined.append_column("found", pc.coalesce(joined.column("count_all"), 0)).drop_columns(["count_all"])
    return joined.filter(pc.not_equal(joined.column("found"), joined.column("n"))).sort_by("position")


def check_complete(con: duckdb.DuckDBPyConnection, chosen: pa.Table, found: pa.Table, query: str, *,
                   per_response: bool, counted: str, timeout_s: float | None = None) -> None:
    """Every chosen group must come back whole from the archive (``chosen.n`` responses: ``counted`` says
    where n comes from), and a per-response choice (registered on ``con`` as ``choice``, with ``found``)
    must name all of its group's responses."""
    short = not_whole(chosen, found)
    if short.num_rows:
        shown = [f"{r['run']}:{r['group_id']} ({r['found']} of {r['n']})" for r in short.slice(0, SHOWN).to_pylist()]
        raise SelectionError(
            f"{query}: {short.num_rows} chosen group(s) are not whole in the archive (responses found of "
            f"{counted}): {_first(shown, short.num_rows)}; a rollouts file is missing or damaged - run "
            "`recpipe doctor`"
        )
    if not per_response:
        return
    for r in _offenders(con, NOT_THE_GROUP, timeout_s):
        if r["stray"]:
            raise QueryResultError(f"{query}: rollout(s) {_first(r['stray'])} are not responses of group "
                                   f"{r['run']}:{r['group_id']} in the archive")
        raise QueryResultError(
            f"{query}: group {r['run']}:{r['group_id']} is incomplete: the query returned {r['n_chosen']} of its "
            f"{r['n_archive']} responses (missing {_first(r['left_out'])}); advantages are relative "
            "to the whole group, so choose every response of a group or none"
        )
