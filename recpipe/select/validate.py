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

import pyarrow as pa
import pyarrow.compute as pc

from recpipe.errors import RecpipeError


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


def _first(values: list) -> str:
    shown = ", ".join(repr(v) for v in values[:SHOWN])
    return shown + (f" ... ({len(values)} in all)" if len(values) > SHOWN else "")


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


def check_complete(choice: pa.Table, found: pa.Table, expected: dict[tuple[str, str], int], query: str) -> None:
    """Every chosen group must come back whole from the archive, and a per-response choice must name all
    of its group's responses.

    choice: the checked query result; found: the second stage's rows (source_run, group_id, rollout_id);
    expected: (run, group_id) -> responses in the group according to the groups summary.
    """
    counts: dict[tuple[str, str], int] = {}
    for run, group in zip(found.column("source_run").to_pylist(), found.column("group_id").to_pylist(), strict=True):
        counts[(run, group)] = counts.get((run, group), 0) + 1
    short = [f"{r}:{g} ({counts.get((r, g), 0)} of {n})" for (r, g), n in expected.items() if counts.get((r, g), 0) != n]
    if short:
        raise SelectionError(
            f"{query}: {len(short)} chosen group(s) are not whole in the archive (responses found of the "
            f"groups summary's count): {_first(short)}; a rollouts file is missing or damaged - run "
            "`recpipe doctor`"
        )
    if "rollout_id" not in choice.column_names:
        return
    archive: dict[tuple[str, str], set[str]] = {}
    for run, group, rid in zip(found.column("source_run").to_pylist(), found.column("group_id").to_pylist(),
                               found.column("rollout_id").to_pylist(), strict=True):
        archive.setdefault((run, group), set()).add(rid)
    chosen: dict[tuple[str, str], set[str]] = {}
    for run, group, rid in zip(choice.column("run").to_pylist(), choice.column("group_id").to_pylist(),
                               choice.column("rollout_id").to_pylist(), strict=True):
        chosen.setdefault((run, group), set()).add(rid)
    for key, rids in chosen.items():
        foreign = rids - archive.get(key, set())
        if foreign:
            raise QueryResultError(f"{query}: rollout(s) {_first(sorted(foreign))} are not responses of group "
                                   f"{key[0]}:{key[1]} in the archive")
        left_out = archive[key] - rids
        if left_out:
            raise QueryResultError(
                f"{query}: group {key[0]}:{key[1]} is incomplete: the query returned {len(rids)} of its "
                f"{len(archive[key])} responses (missing {_first(sorted(left_out))}); advantages are relative "
                "to the whole group, so choose every response of a group or none"
            )
