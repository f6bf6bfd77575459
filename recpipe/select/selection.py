"""Choose a training batch from the archive with SQL, compute advantages and weights, record lineage.

    batch = select(store, "schedule", {"sync_interval": 20}, run="a", step=25, groups=96,
                   loss_config=preset("red-drop"), seed=0)
    batch = replay_lineage(store, "a", step=25)        # the same rollouts, for retraining

Two stages, both SQL (schemas/queries):
1. the query picks groups from the one-row-per-group ``groups`` table (1.25M rows for 10M rollouts),
   composed as ``WITH eligible AS (_eligible.sql) SELECT * FROM (<query>)`` so it can use the shared
   filters; a user's .sql file runs through the read-only guard of recpipe.store.sql, and its result
   is checked (recpipe.select.validate);
2. ``_advantages.sql`` reads the chosen groups' responses - read by pyarrow from their partitions' files
   only (``_responses``; the SQL connection itself has no file access), only the
   columns it needs - and computes advantage and weight with window functions over each group.
The batch is then recorded in ``batches`` (one row per response, shard ``step-<step>``). If that shard
already exists, select() returns the recorded batch instead of choosing again: a loop that crashed
after selecting resumes on exactly the data it had chosen. Reading a recorded batch back (that resume,
and replay_lineage) takes the same second stage (``_batch_rows``): its lineage rows are a per-response
choice in the recorded order, whose recorded weights and advantages replace the computed ones.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recpipe.algorithms import LossConfig
from recpipe.config import RUN_NAME
from recpipe.errors import checked_int
from recpipe.select.batch import BATCH_COLUMNS, Batch, lineage_rows, lineage_shard
from recpipe.select.connection import selection_connection
from recpipe.select.queries import SET_BY_SELECT, Query, QueryError, bind, load_query, param_table
from recpipe.select.validate import EmptySelection, SelectionError, check_complete, check_groups, check_result
from recpipe.store import AsOf, Store, StoreError
from recpipe.store.datasets import DataFile, read_table
from recpipe.store.sql import check_read_only, run_read_only

DROPS = ("none", "balance")


# ---- parameters ----------------------------------------------------------------------------------
def _check_values(values: dict[str, Any], query: str) -> dict[str, Any]:
    """The checks on bound values that a header's type cannot say."""
    if values.get("drop", "none") not in DROPS:
        raise QueryError(f"{query}: parameter 'drop' is {values['drop']!r}; allowed: {', '.join(DROPS)}")
    if (values.get("staleness_decay") or 0.0) < 0:
        raise QueryError(f"{query}: parameter 'staleness_decay' is {values['staleness_decay']}; must be >= 0")
    return values


def _statement_values(con: duckdb.DuckDBPyConnection, sql: str, values: dict[str, Any]) -> dict[str, Any]:
    """Only the parameters the statement uses: DuckDB refuses extra ones."""
    used = con.extract_statements(sql)[-1].named_parameters
    return {name: values[name] for name in used}


def _check_run(name: str, value: Any) -> None:
    if not isinstance(value, str) or not re.match(RUN_NAME, value):
        raise QueryError(f"{name} must be 1-64 letters, digits, '_', '.' or '-' (not starting with one of the "
                         f"last three); got {value!r}")


def _check_int(name: str, value: Any, minimum: int) -> int:
    return checked_int(name, value, minimum, QueryError)


# ---- the two stages ------------------------------------------------------------------------------
NO_TRUNCATED = "SELECT NULL::VARCHAR AS run, NULL::INTEGER AS policy_version, NULL::VARCHAR AS group_id WHERE false"


def compose(query: Query, eligible: Query, truncated: Query | None = None) -> str:
    """Stage 1's statement: the query with the shared filters in scope as ``eligible``.

    Trusted SQL text of the query files is nested; values stay $parameters. ``truncated`` (the
    _truncated.sql query) is composed in only when the exclude_truncated filter is on, so that other
    selections never touch the rollouts table.
    """
    return (f"WITH truncated AS (\n{truncated.body if truncated else NO_TRUNCATED}\n),\n"
            f"eligible AS (\n{eligible.body}\n)\nSELECT * FROM (\n{query.body}\n) AS selection")


def _one_select(con: duckdb.DuckDBPyConnection, query: Query) -> None:
    statements = check_read_only(con, query.text)  # raises QueryRefused for anything but reads
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        raise QueryError(f"{query.name}: a selection query must be exactly one SELECT statement; "
                         f"found {len(statements)} statement(s)")


def _rollout_files(store: Store, groups: pa.Table, version: int | None) -> list[DataFile]:
    """Rollouts files holding the chosen groups, at rollouts ``version``: files of their partitions (run,
    policy_version), and within a partition only the groups' shard files when their shard ids are known
    and each has its own file (a compacted partition's merged file holds every shard)."""
    shards: dict[tuple[str, int], set[str | None]] = {}
    shard_ids = groups.column("shard_id").to_pylist() if "shard_id" in groups.column_names else [None] * groups.num_rows
    for run, policy, shard in zip(groups.column("run").to_pylist(), groups.column("policy_version").to_pylist(),
                                  shard_ids, strict=True):
        shards.setdefault((run, policy), set()).add(shard)
    by_partition = store.snapshot("rollouts", version).files_in(set(shards))  # keys (run, policy_version)
    files: list[DataFile] = []
    for key, wanted in sorted(shards.items()):
        present = by_partition[key]
        if None not in wanted:
            exact = [f for f in present if f.shard_id in wanted]
            if len({f.shard_id for f in exact}) == len(wanted):
                present = exact
        files.extend(present)
    return files


# The rollouts columns _advantages.sql reads; nothing else of the token payload files is decoded.
RESPONSE_COLUMNS = ("run", "group_id", "rollout_id", "sample_index", "policy_version", "reward", "generator",
                    "finish_reason", "response_length", "prompt_token_ids", "response_token_ids",
                    "behaviour_logprobs")


def _responses(store: Store, chosen: pa.Table, query: str, version: int | None) -> pa.Table:
    """The chosen groups' rows of the rollouts table (at ``version``), read by pyarrow from their files."""
    wanted = pc.field("group_id").isin(pc.unique(chosen.column("group_id")))
    files = _rollout_files(store, chosen, version)
    if not files:
        raise SelectionError(f"{query}: the chosen groups' rollouts partitions hold no files; "
                             "a rollouts file is missing - run `recpipe doctor`")
    try:
        return read_table(store, "rollouts", files=files, columns=RESPONSE_COLUMNS, filter=wanted)
    except OSError as exc:
        raise SelectionError(f"{query}: cannot read the chosen groups' rollouts ({exc})") from None


# One row per group of a trusted per-response choice (recorded lineage) that names its policy_version:
# n is its own row count per group, no lookup in the groups summary.
FROM_CHOICE = """
SELECT run, group_id, CAST(any_value(policy_version) AS INTEGER) AS policy_version, CAST(count(*) AS INTEGER) AS n,
       NULL::VARCHAR AS shard_id, any_value(group_weight) AS weight,
       CAST(row_number() OVER (ORDER BY min(pos)) - 1 AS INTEGER) AS position
FROM choice
GROUP BY run, group_id
ORDER BY min(pos)
"""


def _chosen_groups(con: duckdb.DuckDBPyConnection, choice: pa.Table, *, trust: bool, query: str,
                   timeout_s: float | None) -> pa.Table:
    """One row per chosen group, in the choice's order: run, group_id, policy_version, n, shard_id, weight,
    position; registered as ``chosen``. ``choice`` is registered with its row number (pos) and group weight.

    policy_version and n come from the groups summary (_chosen_groups.sql; unknown groups are an error)
    unless a trusted choice - a named query's, or recorded lineage - has them.
    """
    names = choice.column_names
    per_group = "rollout_id" not in names
    weight = choice.column("weight") if per_group and "weight" in names else pa.array(np.ones(choice.num_rows))
    lookup = not (trust and "policy_version" in names and (not per_group or "n" in names))
    if lookup or not per_group:  # the SQL below and the per-response checks read it
        con.register("choice", choice.append_column("pos", pa.array(np.arange(choice.num_rows)))
                     .append_column("group_weight", weight))
    if lookup:
        chosen = run_read_only(con, load_query("_chosen_groups").body, timeout_s=timeout_s)
    elif per_group:  # a named query's rows are its groups already, in order
        shard_id = choice.column("shard_id") if "shard_id" in names else pa.nulls(choice.num_rows, pa.string())
        chosen = pa.table({"run": choice.column("run"), "group_id": choice.column("group_id"),
                           "policy_version": choice.column("policy_version"), "n": choice.column("n"),
                           "shard_id": shard_id, "weight": weight,
                           "position": pa.array(np.arange(choice.num_rows, dtype=np.int32))})
    else:
        chosen = run_read_only(con, FROM_CHOICE, timeout_s=timeout_s)
    con.register("chosen", chosen)
    if lookup:
        check_groups(con, query, timeout_s)
    return chosen


def _advantages(con: duckdb.DuckDBPyConnection, store: Store, chosen: pa.Table, values: dict[str, Any],
                query: str, timeout_s: float | None, version: int | None) -> pa.Table:
    """Stage 2 over ``chosen`` (registered: run, group_id, weight, position), reading rollouts ``version``."""
    sql = load_query("_advantages").body
    con.register("chosen_rollouts", _responses(store, chosen, query, version))
    try:
        return run_read_only(con, sql, _statement_values(con, sql, values), timeout_s=timeout_s)
    except duckdb.ConversionException as exc:
        raise SelectionError(f"{query}: a chosen group has a reward that is not a finite number with "
                             f"|reward| * group size < 1e10 ({str(exc).splitlines()[0]})") from None


def _batch_rows(con: duckdb.DuckDBPyConnection, store: Store, choice: pa.Table, values: dict[str, Any], *,
                trust: bool, query: str, timeout_s: float | None, rollouts: Callable[[], int], counted: str,
                min_groups: int = 1) -> pa.Table:
    """The batch rows (BATCH_COLUMNS) of a checked choice: its groups' responses in the choice's order with
    advantages and weights (a per-response choice's own weight/advantage replace the computed ones),
    every group checked whole. rollouts: the rollouts version to read, looked up after the groups'."""
    chosen = _chosen_groups(con, choice, trust=trust, query=query, timeout_s=timeout_s)
    if chosen.num_rows < min_groups:
        raise EmptySelection(f"{query}: chose {chosen.num_rows} group(s), fewer than min_groups={min_groups}")
    found = _advantages(con, store, chosen, values, query, timeout_s, rollouts())
    per_response = "rollout_id" in choice.column_names
    if per_response:
        con.register("found", found.append_column("i", pa.array(np.arange(found.num_rows))))
    check_complete(con, chosen, found, query, per_response=per_response, counted=counted, timeout_s=timeout_s)
    own = [c for c in ("weight", "advantage") if c in choice.column_names]
    if per_response and own:
        found = run_read_only(con, f"SELECT f.* EXCLUDE (i) REPLACE ({', '.join(f'c.{c} AS {c}' for c in own)}) "
                              "FROM found AS f JOIN choice AS c ON c.run = f.source_run AND c.rollout_id = f.rollout_id "
                              "ORDER BY f.i", timeout_s=timeout_s)
    return found.select(list(BATCH_COLUMNS))


# ---- public API ----------------------------------------------------------------------------------
def select(
    store: Store,
    query: str | Path = "schedule",
    params: Mapping[str, Any] | None = None,
    *,
    run: str,
    step: int,
    groups: int = 8,
    loss_config: LossConfig | None = None,
    seed: int = 0,
    min_groups: int = 1,
    timeout_s: float | None = 60.0,
    as_of: AsOf = None,
) -> Batch:
    """The batch of training step ``step`` of ``run``, chosen by ``query`` and recorded as lineage.

    query: a named query (schemas/queries: schedule, fresh, replay, lineage) or a path to a .sql file.
    params: the query's and the filters' parameters (see the query headers); run, step, groups and
        seed come from the arguments, std_normalize and drop from loss_config when it is given.
    groups: the most groups the batch holds ($groups); min_groups: fewer chosen raises EmptySelection.
    seed: seeds RED-Drop's random choice (with step and rollout_id) and the replay tie-break.
    If (run, step) already has recorded lineage, that batch is returned (Batch.resumed = True) and
    the query is not run: crash-resume gets the same rollouts, advantages and weights.
    as_of: run the query on the archive as it was (a recorded batch's ``read_versions``, a version of
        every table, or a time); nothing is recorded and recorded lineage is not consulted, so a
        recorded selection re-run as of its versions chooses exactly the same rollouts again.

    Raises EmptySelection when nothing (or fewer than min_groups groups) is chosen, QueryResultError
    when the result has the wrong shape (missing columns, duplicates, incomplete groups), QueryError
    for bad parameters, QueryRefused for SQL that would write or reach outside the store.
    """
    _check_run("run", run)
    step = _check_int("step", step, 0)
    groups = _check_int("groups", groups, 1)
    min_groups = _check_int("min_groups", min_groups, 1)
    seed = _check_int("seed", seed, 0)
    since = time.monotonic()  # each table's log is read once in this selection
    recorded = _recorded(store, run, step, since) if as_of is None else None
    if recorded is not None:
        return _from_lineage(store, recorded, run=run, step=step, timeout_s=timeout_s)

    q = load_query(query)
    eligible, truncated, stage2 = load_query("_eligible"), load_query("_truncated"), load_query("_advantages")
    context: dict[str, Any] = {"run": run, "step": step, "groups": groups, "seed": seed}
    if loss_config is not None:
        context.update(std_normalize=loss_config.std_normalize, drop=loss_config.drop)
    values = _check_values(bind(param_table(q, eligible, truncated, stage2), dict(params or {}), context, q.name),
                           q.name)

    # Stage 1 and the group lookup (_chosen_groups.sql) read only the tables stage 1 names (it reads groups);
    # rollouts only for a user's SQL that names it, or the truncation filter.
    sql = compose(q, eligible, truncated if values["exclude_truncated"] else None)
    con, pins = selection_connection(store, sql, run=run if q.scope == "run" else None, as_of=as_of,
                                     fresh_since=since)
    try:
        if not q.builtin:
            _one_select(con, q)
        result = run_read_only(con, sql, _statement_values(con, sql, values), timeout_s=timeout_s)
        choice = check_result(result, q.name, groups, f"run={run!r}, step={step}, params {dict(params or {})}")
        rows = _batch_rows(con, store, choice, values, trust=q.builtin, query=q.name, timeout_s=timeout_s,
                           rollouts=pins.of("rollouts"), counted="the groups summary's count", min_groups=min_groups)
    finally:
        con.close()
    batch = Batch(run=run, step=step, query_name=q.name, query_hash=q.sha256, params=values,
                  rollouts=rows, read_versions=dict(sorted(pins.read.items())))
    if as_of is not None:
        return batch
    if not store.append("batches", lineage_rows(batch), shard_id=lineage_shard(step), fresh_since=since):
        # Another process recorded this step first: train on what it recorded, not on our choice.
        return _from_lineage(store, _recorded(store, run, step), run=run, step=step, timeout_s=timeout_s)
    return batch


def replay_lineage(
    store: Store,
    source_run: str,
    step: int,
    *,
    loss_config: LossConfig | None = None,
    seed: int | None = None,
    timeout_s: float | None = 60.0,
) -> Batch:
    """The batch ``source_run`` trained on at ``step``, rebuilt from its lineage (same rollout ids).

    Without loss_config the recorded advantages and weights are returned; with one, advantages are
    recomputed under its std_normalize/drop (RED-Drop seeded by ``seed``, default the recorded seed)
    for retraining another algorithm on the same data. Nothing is recorded.
    """
    _check_run("source_run", source_run)
    step = _check_int("step", step, 0)
    recorded = _recorded(store, source_run, step)
    if recorded is None:
        steps = recorded_steps(store, source_run)
        shown = f"recorded steps: {steps[:10]}{' ...' if len(steps) > 10 else ''}" if steps else "no recorded steps"
        raise SelectionError(f"run {source_run!r} has no recorded batch for step {step} ({shown})")
    recompute = None
    if loss_config is not None:
        recompute = {"std_normalize": loss_config.std_normalize, "drop": loss_config.drop}
        if seed is not None:
            recompute["seed"] = _check_int("seed", seed, 0)
    return _from_lineage(store, recorded, run=source_run, step=step, timeout_s=timeout_s, recompute=recompute)


def rerun_recorded(store: Store, run: str, step: int, *, timeout_s: float | None = 60.0) -> Batch:
    """Run the selection recorded for (run, step) again, as of the table versions it read: the same query
    and parameters on the same archive state, so it returns the same rollouts. Nothing is recorded.

    Raises SelectionError if the step has no recorded batch, or recorded no versions (written before
    the archive kept them), or its query file has changed since.
    """
    recorded = _recorded(store, run, step)
    if recorded is None:
        raise SelectionError(f"run {run!r} has no recorded batch for step {step}")
    first = recorded.slice(0, 1).to_pylist()[0]
    versions = json.loads(first.get("read_versions") or "{}")
    if not versions:
        raise SelectionError(f"run {run!r} step {step}: its lineage records no table versions (selected before "
                             "the archive recorded them), so it cannot be re-run as of them")
    query = load_query(first["query_name"])
    if query.sha256 != first["query_hash"]:
        raise SelectionError(f"run {run!r} step {step}: query {first['query_name']!r} has changed since it was "
                             "recorded (sha256 differs); re-running it would not be the recorded selection")
    values = json.loads(first["params"])
    params = {k: v for k, v in values.items() if k not in SET_BY_SELECT}
    return select(store, first["query_name"], params, run=run, step=step, groups=values["groups"],
                  seed=values["seed"], timeout_s=timeout_s, as_of=versions)


def recorded_steps(store: Store, run: str) -> list[int]:
    """Steps of ``run`` with recorded lineage."""
    rows = store.read("batches", "run = $run", {"run": run}).column("step")
    return sorted(set(rows.to_pylist()))


# ---- lineage read-back ---------------------------------------------------------------------------
def _recorded(store: Store, run: str, step: int, fresh_since: float | None = None) -> pa.Table | None:
    shard = lineage_shard(step)
    if not store.is_committed("batches", {"run": run}, shard, fresh_since):
        return None
    try:
        rows = store.read_shard("batches", {"run": run}, shard)
    except StoreError:
        return None
    return rows


def _from_lineage(store: Store, lineage: pa.Table, *, run: str, step: int, timeout_s: float | None,
                  recompute: dict[str, Any] | None = None) -> Batch:
    """Rebuild a recorded batch: payload from the archive, advantage/weight as recorded (or recomputed)."""
    first = lineage.slice(0, 1).to_pylist()[0]
    params = json.loads(first["params"])
    values = {name: params.get(name, p.default) for name, p in load_query("_advantages").params.items()}
    values["step"] = params.get("step", step)
    if recompute:
        values.update(recompute)
    # The recorded rows are a per-response choice, in the recorded order: their weights (and advantages,
    # unless recomputed) replace the computed ones, as a user query's own columns would.
    columns = ["source_run", "group_id", "rollout_id", "policy_version", "weight"] + ([] if recompute else ["advantage"])
    choice = lineage.select(columns).rename_columns(["run", *columns[1:]])
    # A per-response choice naming its versions needs no archive table: stage 2 reads its files itself.
    con, pins = selection_connection(store, "", run=run)
    try:
        rows = _batch_rows(con, store, choice, values, trust=True, query=f"lineage of run {run!r} step {step}",
                           timeout_s=timeout_s, rollouts=pins.of("rollouts"), counted="the recorded batch's count")
    finally:
        con.close()
    if recompute:
        params = {**params, **recompute}
    return Batch(run=run, step=step, query_name=first["query_name"], query_hash=first["query_hash"],
                 params=params, rollouts=rows, resumed=True, created_at=first["created_at"],
                 read_versions=json.loads(first.get("read_versions") or "{}"))
