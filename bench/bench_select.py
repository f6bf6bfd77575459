"""Selection benchmark: recpipe.select (DuckDB) vs the same selection in polars (lazy) and pandas, on the
Delta Lake archive; optionally old (Parquet folders, commit 7f76fa5) and new side by side in one run.

    python bench/bench_select.py                          # 10M rollouts, 100 runs x 8 versions (builds once)
    python bench/bench_select.py --rows 200000 --runs 16  # small and quick
    python bench/bench_select.py --rows 200000 --runs 16 --compare-old   # + the old code on an old archive
    python bench/bench_select.py --rows 100000000 --shard-groups 64 --payload selected \
        --queries schedule,fresh --engines duckdb,duckdb-open,polars,pandas   # the 100M point
    python bench/bench_select.py --rebuild                # build the archive again

The archive (bench/out/select-<rows>-<runs>x<versions>[-...]/store, reused while its config matches) has
--runs x --versions partitions of synthetic rollouts (tests/select/synthetic.py; short token payloads so
that it builds fast) and a lineage history: every run has trained steps 0..--history-1 on 96 groups
each, so "not yet used" and replay use counts have real work to do. Default layout: one generation
shard per partition, committed through Store.append_rollouts (a rollouts and a groups commit each).

--shard-groups N: shards of N groups (N=64: 64 x 8 = 512 rollouts, a realistic generation shard), so
that the groups table and the Delta log have as many files and application transactions as an archive
of that size would. The shards of one partition are committed in one transaction per table carrying
every shard's application transaction id (the log holds the same add actions and transaction ids as one
commit per shard, in fewer commits; a reader reads the last checkpoint and the commits after it).
--payload selected: the groups table at full size, but rollouts (token payload) rows only for the
partitions the three queries can choose from: version 6 of the schedule runs, versions 2-6 of the fresh
runs, the newest version of every run (replay, if --queries has it). Selection reads the payload of the
chosen groups only, so the rest of the rollouts table would change nothing but disk space; the "-rollouts" baselines,
which compute per-group facts from all rollout rows, cannot run on such an archive. --queries: a subset
(replay scans every groups file of every run: at 100M with 64-group shards, ~195k files).

For each named query (schedule, fresh, replay) a 96-group batch is selected for --repeat different
runs. Engines, each in its own process (so its peak RSS, by getrusage, is its own):
  duckdb       select() end to end (connection, both SQL stages, validation, lineage write) on one open
               Store, as the loop holds it; before each selection one generation shard is committed (not
               timed, to a "writer" run whose groups all failed their reward, so no answer changes), so
               every selection sees new table versions, as in the loop;
  duckdb-open  select() on a Store opened for that call (the old benchmark's protocol: every Delta log
               is read again each time);
  polars, pandas            the same selection over the same groups table, read with polars'
               scan_delta / deltalake's pyarrow dataset (partition pruning from the Delta log), and the
               same payload columns of the chosen groups, with GRPO advantages;
  polars-rollouts, pandas-rollouts   the same, computing each group's facts from the rollout rows.
The chosen groups are checked to agree across engines (and, with --compare-old, between old and new).
Separately, bytes per response token are measured on a realistic sample (200-token responses, float32
log-probs, written by the store's writer, recpipe.store.files.write_parquet).

--compare-old: a git worktree of --old-commit (default 7f76fa5; made with `git worktree add --detach`,
reused if present), whose own bench/bench_select.py builds an archive of the same size with the old
code (bench/out/select-old-..., reused too) and times its engines in subprocesses with PYTHONPATH at
the worktree; the table shows old and new per query.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import math
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

QUERIES = ("schedule", "fresh", "replay")
# Bench steps lie past the built history (steps 0..6), so their lineage can be told apart and
# withdrawn; schedule's sync_offset and fresh's current_version point them back at version 6, whose
# first 96 groups the history has used, so the "not yet used" test has real work to do.
STEP = {"schedule": 1006, "fresh": 1007, "replay": 1008}
PARAMS = {"schedule": {"sync_offset": 1000}, "fresh": {"current_version": 6, "max_staleness": 4},
          "replay": {"use_penalty": 1.0}}
VERSION = 6  # v(1006) with sync_interval 1, sync_offset 1000; fresh's current version
T0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
WRITER_RUN = "writer"  # the duckdb engine's between-selection commits go here (never selectable)
OLD_COMMIT = "7f76fa5"
ROOT = Path(__file__).resolve().parent.parent
ENGINE_ORDER = ("duckdb", "duckdb-open", "polars", "pandas", "polars-rollouts", "pandas-rollouts")


def run_name(i: int) -> str:
    return f"run{i:03d}"


def shard_name(r: int, v: int, k: int) -> str:
    return f"{run_name(r)}-v{v:06d}-s{k}"


def used_group_ids(r: int, step: int, count: int, shard_groups: int | None) -> list[str]:
    """The first ``count`` groups of version ``step`` of run ``r``, in shard order (what history used)."""
    per = shard_groups or count
    return [f"{shard_name(r, step, i // per)}/p{i % per}" for i in range(count)]


# ---- the archive ---------------------------------------------------------------------------------
_stores: dict[str, Any] = {}


def _store(root: str):  # noqa: ANN202 - recpipe.store.Store, imported in the worker
    """One open Store per build worker process: reopening it per job would re-read every Delta log."""
    from recpipe.store import Store

    if root not in _stores:
        _stores[root] = Store(root)
    return _stores[root]


def _build_partition(job: tuple[str, int, int, int, int, int | None, bool]) -> tuple[int, int, int]:
    """One (run, version) partition; returns (rollout rows written, groups, shards)."""
    import pyarrow.compute as pc

    from recpipe.store import group_summary
    from tests.select.synthetic import synthetic_shard

    root, r, v, groups, group_size, shard_groups, payload = job
    store = _store(root)
    when = T0 + dt.timedelta(hours=v, seconds=r)
    if shard_groups is None:  # one shard, through the store's own commit path
        shard = shard_name(r, v, 0)
        table = synthetic_shard(run=run_name(r), policy_version=v, shard_id=shard, groups=groups,
                                group_size=group_size, seed=r, prompt_length=4, max_tokens=8, created_at=when)
        store.append_rollouts(table, shard_id=shard)
        return table.num_rows, groups, 1
    values = {"run": run_name(r), "policy_version": v}
    folder = f"run={run_name(r)}/policy_version={v}"
    table = _sharded(synthetic_shard(run=run_name(r), policy_version=v, shard_id="x", groups=groups,
                                     group_size=group_size, seed=r, prompt_length=4, max_tokens=8, created_at=when),
                     r, v, group_size, shard_groups, when)
    summary = group_summary(table)
    shard_column = summary.column("shard_id")
    rollout_files, group_files, keys, rows = [], [], [], 0
    for k in range(math.ceil(groups / shard_groups)):
        shard = shard_name(r, v, k)
        name = f"{folder}/{shard}~{uuid.uuid4().hex[:12]}.parquet"
        size = min(shard_groups, groups - k * shard_groups)
        if payload:
            rollout_files.append((name, table.slice(k * shard_groups * group_size, size * group_size)
                                  .drop_columns(["run", "policy_version"]), values))
            rows += size * group_size
        group_files.append((name, summary.filter(pc.equal(shard_column, shard)).drop_columns(["run", "policy_version"]),
                            values))
        keys.append(store.shard_key("groups", values, shard))  # same key in both tables
    also = [(key, 1) for key in keys[1:]]
    if payload:  # rollouts first, then their summaries (as append_rollouts)
        store.add_files("rollouts", rollout_files, app_id=keys[0], also=also,
                        operation=f"bench: {len(keys)} shards")
    store.add_files("groups", group_files, app_id=keys[0], also=also, operation=f"bench: {len(keys)} shards")
    return rows, groups, len(keys)


def _sharded(table, r: int, v: int, group_size: int, shard_groups: int, when: dt.datetime):  # noqa: ANN001, ANN202
    """A partition's rollouts (one synthetic_shard call: fast) re-labelled as consecutive shards of
    ``shard_groups`` groups: the ids, shard_id and created_at (one ms apart, oldest shard first) that
    generating each shard on its own would give."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    n = table.num_rows
    group = np.arange(n) // group_size
    shard, prompt = group // shard_groups, group % shard_groups
    shard_ids = pa.array([shard_name(r, v, k) for k in range(int(shard[-1]) + 1)]).take(pa.array(shard))
    prompt_ids = pc.binary_join_element_wise("p", pa.array(prompt.astype(str)), "")
    group_ids = pc.binary_join_element_wise(shard_ids, prompt_ids, "/")
    stamps = np.datetime64(when.replace(tzinfo=None), "us") + shard.astype("timedelta64[ms]")
    replace = {"shard_id": shard_ids, "prompt_id": prompt_ids, "group_id": group_ids,
               "rollout_id": pc.binary_join_element_wise(group_ids, pa.array((np.arange(n) % group_size).astype(str)), "/"),
               "created_at": pa.array(stamps, pa.timestamp("us", "UTC"))}
    for name, column in replace.items():
        table = table.set_column(table.schema.get_field_index(name), table.schema.field(name), column)
    return table


def _build_history(job: tuple[str, int, int, int, int, int | None]) -> None:
    """Lineage of steps 0..history-1 of one run: step s used the first 96 groups of version s."""
    import pyarrow as pa

    from recpipe.schema import SCHEMA_VERSION
    from recpipe.select import lineage_shard

    root, r, history, groups, group_size, shard_groups = job
    store = _store(root)
    for step in range(history):
        n = groups * group_size
        group_ids = [g for g in used_group_ids(r, step, groups, shard_groups) for _ in range(group_size)]
        store.append("batches", pa.table({
            "run": [run_name(r)] * n, "step": pa.array([step] * n, pa.int32()),
            "rollout_id": [f"{g}/{i % group_size}" for i, g in enumerate(group_ids)], "group_id": group_ids,
            "source_run": [run_name(r)] * n, "policy_version": pa.array([step] * n, pa.int32()),
            "query_name": ["schedule"] * n, "query_hash": ["0" * 64] * n, "params": ["{}"] * n,
            "weight": [1.0] * n, "advantage": [0.0] * n, "read_versions": ["{}"] * n, "created_at": [T0] * n,
            "schema_version": pa.array([SCHEMA_VERSION] * n, pa.int32()),
        }), shard_id=lineage_shard(step))


def payload_partitions(args: argparse.Namespace) -> set[tuple[int, int]]:
    """(run, version) partitions whose rollouts any of the three queries can choose (--payload selected)."""
    index = {run_name(i): i for i in range(args.runs)}
    parts = set()
    if "schedule" in args.queries:
        parts |= {(index[run], VERSION) for run in bench_runs("schedule", args)}
    if "fresh" in args.queries:
        low, high = _version_range("fresh")
        parts |= {(index[run], v) for run in bench_runs("fresh", args) for v in range(low, high + 1)}
    if "replay" in args.queries:
        parts |= {(r, args.versions - 1) for r in range(args.runs)}  # every run's newest version
    return parts


def archive_config(args: argparse.Namespace) -> dict[str, Any]:
    config = {"format": "delta", "rows": args.rows, "runs": args.runs, "versions": args.versions,
              "group_size": args.group_size, "history": args.history, "shard_groups": args.shard_groups,
              "payload": args.payload}
    if args.payload == "selected":  # which partitions have payload depends on the bench runs and queries
        config.update(repeat=args.repeat, queries=list(args.queries))
    return config


def archive_dir(args: argparse.Namespace, old: bool = False) -> Path:
    name = f"select-{'old-' if old else ''}{args.rows}-{args.runs}x{args.versions}"
    if args.shard_groups:
        name += f"-shards{args.shard_groups}"
    if args.payload == "selected":
        name += f"-payload-selected-r{args.repeat}-" + "".join(q[0] for q in args.queries)
    return args.out / name


def build(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    from recpipe.store import Store

    config = archive_config(args)
    marker = root.parent / "built.json"
    if marker.is_file() and not args.rebuild and json.loads(marker.read_text()).get("config") == config:
        return json.loads(marker.read_text())
    shutil.rmtree(root.parent, ignore_errors=True)
    root.parent.mkdir(parents=True)
    Store.create(root)
    groups = max(1, args.rows // (args.runs * args.versions * args.group_size))
    payload = payload_partitions(args) if args.payload == "selected" else None
    jobs = [(str(root), r, v, groups, args.group_size, args.shard_groups, payload is None or (r, v) in payload)
            for r in range(args.runs) for v in range(args.versions)]
    start = time.perf_counter()
    rows = shards = 0
    with mp.get_context("spawn").Pool(args.jobs or os.cpu_count() or 1) as pool:
        for done, (n, _, s) in enumerate(pool.imap_unordered(_build_partition, jobs, chunksize=1), 1):
            rows, shards = rows + n, shards + s
            if done % max(1, len(jobs) // 20) == 0:
                print(f"  built {done}/{len(jobs)} partitions ({shards:,} shards, {rows:,} rollout rows) in "
                      f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        pool.map(_build_history, [(str(root), r, min(args.history, args.versions), min(96, groups), args.group_size,
                                   args.shard_groups) for r in range(args.runs)])
    info = {"config": config, "rollouts": rows, "groups": groups * len(jobs), "partitions": len(jobs),
            "shards": shards, "build_s": round(time.perf_counter() - start, 1), **archive_size(root)}
    marker.write_text(json.dumps(info))
    return info


def archive_size(root: Path) -> dict[str, Any]:
    """Bytes of the active data files (from the Delta logs) and of the logs themselves; files per table."""
    from recpipe.store import Store

    store = Store(root)
    files = {t: store.snapshot(t).files for t in ("rollouts", "groups", "batches")}
    log = sum(p.stat().st_size for p in root.glob("*/_delta_log/*") if p.is_file())
    return {"bytes": sum(f.size for fs in files.values() for f in fs), "log_bytes": log,
            "files": {t: len(fs) for t, fs in files.items()},
            "versions": {t: store.delta(t).version() for t in ("rollouts", "groups", "batches")}}


def forget_bench_lineage(root: Path) -> None:
    """Withdraw the lineage a previous benchmark selection recorded (its steps are past the built
    history): one commit per run removing those files and marking their shards withdrawn (an even
    application transaction version, as `recpipe doctor --repair` does), so select() chooses again."""
    from deltalake.transaction import RemoveAction

    from recpipe.select import lineage_shard
    from recpipe.store import Store

    store = Store(root)
    bench = {lineage_shard(step) for step in STEP.values()}
    by_run: dict[str, list[Any]] = {}
    for f in store.snapshot("batches").files:
        if f.shard_id in bench:
            by_run.setdefault(f.values["run"], []).append(f)
    now = int(time.time() * 1000)
    for run, files in sorted(by_run.items()):
        keys = sorted({store.shard_key("batches", f.values, f.shard_id) for f in files})
        withdraw = [(key, store.shard_state("batches", key) + 1) for key in keys]
        withdraw = [(key, v) for key, v in withdraw if v % 2 == 0]
        removes = [RemoveAction(f.relative, True, now, f.size, {"run": run}) for f in files]
        if withdraw:
            store.add_files("batches", [], app_id=withdraw[0][0], app_version=withdraw[0][1], removes=removes,
                            also=withdraw[1:], operation="bench: withdraw benchmark lineage", data_change=True)


# ---- the engines ---------------------------------------------------------------------------------
def bench_runs(query: str, args: argparse.Namespace) -> list[str]:
    """Disjoint runs per query, so one query's recorded lineage cannot change another's answer."""
    offset = QUERIES.index(query) * args.repeat
    return [run_name((offset + i) % args.runs) for i in range(args.repeat)]


def _select(store, query: str, run: str, groups: int) -> dict[str, Any]:  # noqa: ANN001
    from recpipe.algorithms import preset
    from recpipe.select import select

    batch = select(store, query, PARAMS[query], run=run, step=STEP[query], groups=groups,
                   loss_config=preset("grpo"))
    return _summary(batch.rollouts.select(["source_run", "group_id", "policy_version", "rollout_id", "advantage"]))


def duckdb_open_select(root: str, query: str, run: str, groups: int) -> dict[str, Any]:
    from recpipe.store import Store

    return _select(Store(root), query, run, groups)


class LoopSelect:
    """select() on one open Store, after a generation shard was committed (the loop's steady state)."""

    def __init__(self, root: str):
        from recpipe.store import Store

        self.store = Store(root)

    def before(self) -> None:
        """Commit one 8-group shard to the writer run; its groups all failed their reward (never eligible)."""
        from tests.select.synthetic import synthetic_shard

        shard = f"w{os.getpid()}-{time.time_ns()}"
        self.store.append_rollouts(synthetic_shard(run=WRITER_RUN, policy_version=0, shard_id=shard, groups=8,
                                                   prompt_length=4, max_tokens=8,
                                                   reward_errors=[(g, 0) for g in range(8)]), shard_id=shard)

    def __call__(self, root: str, query: str, run: str, groups: int) -> dict[str, Any]:
        return _select(self.store, query, run, groups)


def _summary(table) -> dict[str, Any]:  # noqa: ANN001
    rows = table.to_pylist()
    versions = {(r["source_run"], r["group_id"]): r["policy_version"] for r in rows}
    return {"groups": sorted(versions), "versions": sorted(versions.values()),
            "advantage_sum_abs": round(sum(abs(r["advantage"]) for r in rows), 6), "responses": len(rows)}


PAYLOAD = ["run", "group_id", "rollout_id", "sample_index", "policy_version", "reward", "generator",
           "prompt_token_ids", "response_token_ids", "behaviour_logprobs"]


def _version_range(query: str) -> tuple[int, int] | None:
    """Policy versions a run-scoped query can choose from (replay: every version of every run)."""
    if query == "replay":
        return None
    return (VERSION - PARAMS["fresh"]["max_staleness"] if query == "fresh" else VERSION), VERSION


def _polars_groups(root: str, query: str, run: str, summary: bool):  # noqa: ANN202
    """Per-group rows (run, group_id, policy_version, shard_id, n_errors, created_at): recpipe's groups table, or
    (summary=False) computed from the rollouts themselves, as one would without that table."""
    import polars as pl

    if summary:
        return pl.scan_delta(f"{root}/groups")
    rollouts = pl.scan_delta(f"{root}/rollouts")
    versions = _version_range(query)
    if versions is not None:
        rollouts = rollouts.filter((pl.col("run") == run) & pl.col("policy_version").is_between(*versions))
    return rollouts.group_by(["run", "policy_version", "group_id", "shard_id"]).agg(
        pl.col("reward_error").is_not_null().sum().alias("n_errors"), pl.col("created_at").max())


def polars_select(root: str, query: str, run: str, groups: int, summary: bool = True) -> dict[str, Any]:
    import polars as pl
    from deltalake import DeltaTable

    groups_lf = _polars_groups(root, query, run, summary)
    used_lf = (pl.scan_delta(f"{root}/batches")
               .filter(pl.col("run") == run)
               .select(pl.col("source_run").alias("run"), "group_id", "step"))
    eligible = groups_lf.filter(pl.col("n_errors") == 0)
    if query == "schedule":
        chosen = (eligible.filter((pl.col("run") == run) & (pl.col("policy_version") == VERSION))
                  .join(used_lf, on=["run", "group_id"], how="anti")
                  .sort(["shard_id", "group_id"]).head(groups))  # schedule.sql: id order, not commit order
    elif query == "fresh":
        chosen = (eligible.filter((pl.col("run") == run) & pl.col("policy_version").is_between(*_version_range(query)))
                  .join(used_lf, on=["run", "group_id"], how="anti")
                  .sort(["policy_version", "created_at", "group_id"], descending=[True, True, False]).head(groups))
    else:
        uses = used_lf.group_by(["run", "group_id"]).agg(pl.col("step").n_unique().alias("uses"))
        chosen = (eligible.join(uses, on=["run", "group_id"], how="left")
                  .with_columns(pl.col("uses").fill_null(0),
                                (pl.col("policy_version") - pl.col("policy_version").max().over("run")).alias("recency"))
                  .with_columns((pl.col("recency") - 1.0 * pl.col("uses")).alias("priority"))
                  .sort(["priority", "run", "group_id"], descending=[True, False, False]).head(groups))
    chosen = chosen.select("run", "group_id", "policy_version").collect()
    # The chosen partitions' active files, from the Delta log; their partition values go back in as columns.
    rollouts = DeltaTable(f"{root}/rollouts")
    parts = []
    for r, v in sorted(set(chosen.select("run", "policy_version").iter_rows())):
        files = rollouts.file_uris(file_pruning_predicate=[("run", "=", r), ("policy_version", "=", str(v))])
        parts.append(pl.scan_parquet(files).with_columns(pl.lit(r).alias("run"),
                                                         pl.lit(v, pl.Int32).alias("policy_version")))
    rows = (pl.concat(parts)
            .select(PAYLOAD)
            .join(chosen.lazy().select("run", "group_id"), on=["run", "group_id"], how="semi")
            .with_columns(((pl.col("reward") - pl.col("reward").mean().over("run", "group_id"))
                           / (pl.col("reward").std(ddof=0).over("run", "group_id") + 1e-6)).alias("advantage"),
                          pl.col("generator").struct.field("temperature").alias("temperature"))
            .rename({"run": "source_run"})
            .collect())
    return _summary(rows.select("source_run", "group_id", "policy_version", "rollout_id", "advantage").to_arrow())


def _delta_pandas(uri: str, columns: list[str], where: list[tuple[str, str, Any]] | None = None, filter=None):  # noqa: ANN001, ANN202, A002
    """A Delta table's rows as pandas: deltalake's pyarrow dataset over the log's files (pruned by the
    partition values ``where``), ``filter`` pushed into the scan."""
    from deltalake import DeltaTable

    dataset = DeltaTable(uri).to_pyarrow_dataset(file_pruning_predicate=where)
    return dataset.to_table(columns=columns, filter=filter).to_pandas()


def _pandas_groups(root: str, query: str, run: str, summary: bool):  # noqa: ANN202
    """As _polars_groups, with pandas."""
    where, versions = None, _version_range(query)
    if versions is not None:
        where = [("run", "=", run), ("policy_version", "in", [str(v) for v in range(versions[0], versions[1] + 1)])]
    if summary:
        return _delta_pandas(f"{root}/groups", ["run", "group_id", "policy_version", "shard_id", "n_errors",
                                                "created_at"], where)
    rows = _delta_pandas(f"{root}/rollouts", ["run", "group_id", "policy_version", "shard_id", "reward_error",
                                              "created_at"], where)
    rows["error"] = rows["reward_error"].notna()
    g = rows.groupby(["run", "policy_version", "group_id", "shard_id"], observed=True, as_index=False).agg(
        n_errors=("error", "sum"), created_at=("created_at", "max"))
    g["run"] = g["run"].astype(str)
    return g


def pandas_select(root: str, query: str, run: str, groups: int, summary: bool = True) -> dict[str, Any]:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    batches = _delta_pandas(f"{root}/batches", ["source_run", "group_id", "step"], [("run", "=", run)])
    batches = batches.rename(columns={"source_run": "run"})
    batches["run"] = batches["run"].astype(str)
    g = _pandas_groups(root, query, run, summary)
    g = g[g["n_errors"] == 0]
    if query in ("schedule", "fresh"):
        used = g.merge(batches[["run", "group_id"]].drop_duplicates(), on=["run", "group_id"], how="left",
                       indicator=True)
        g = used[used["_merge"] == "left_only"].drop(columns="_merge")
        if query == "schedule":
            chosen = g.sort_values(["shard_id", "group_id"]).head(groups)
        else:
            chosen = g.sort_values(["policy_version", "created_at", "group_id"],
                                   ascending=[False, False, True]).head(groups)
    else:
        uses = batches.groupby(["run", "group_id"])["step"].nunique().rename("uses").reset_index()
        g = g.merge(uses, on=["run", "group_id"], how="left")
        g["uses"] = g["uses"].fillna(0)
        g["priority"] = g["policy_version"] - g.groupby("run")["policy_version"].transform("max") - 1.0 * g["uses"]
        chosen = g.sort_values(["priority", "run", "group_id"], ascending=[False, True, True]).head(groups)
    parts = []
    for (r, v), sub in chosen.groupby(["run", "policy_version"]):
        wanted = pc.field("group_id").isin(pa.array(list(sub["group_id"]), pa.string()))
        parts.append(_delta_pandas(f"{root}/rollouts", PAYLOAD, [("run", "=", r), ("policy_version", "=", str(v))],
                                   wanted))
    rows = pd.concat(parts, ignore_index=True)
    grouped = rows.groupby(["run", "group_id"])["reward"]
    rows["advantage"] = (rows["reward"] - grouped.transform("mean")) / (grouped.transform(lambda x: x.std(ddof=0)) + 1e-6)
    rows["temperature"] = rows["generator"].map(lambda g: g["temperature"])
    rows = rows.rename(columns={"run": "source_run"})
    return _summary(pa.Table.from_pandas(rows[["source_run", "group_id", "policy_version", "rollout_id", "advantage"]]))


ENGINES = {"duckdb": LoopSelect, "duckdb-open": lambda root: duckdb_open_select,
           "polars": lambda root: polars_select, "pandas": lambda root: pandas_select,
           # the same selections without recpipe's groups summary: per-group facts from the rollouts
           "polars-rollouts": lambda root: functools.partial(polars_select, summary=False),
           "pandas-rollouts": lambda root: functools.partial(pandas_select, summary=False)}


def child(args: argparse.Namespace) -> None:
    """One engine, all queries, in this process; prints JSON (timings, answers, peak RSS)."""
    import duckdb  # noqa: F401 - import costs out of the timings
    import pandas  # noqa: F401
    import polars  # noqa: F401

    import recpipe.select  # noqa: F401

    fn = ENGINES[args.child](args.store)
    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out: dict[str, Any] = {"engine": args.child, "rss_after_imports_mb": round(rss_imports), "queries": {}}
    for query in args.queries:
        times, answers = [], []
        for run in bench_runs(query, args):
            if hasattr(fn, "before"):
                fn.before()
            start = time.perf_counter()
            answers.append(fn(args.store, query, run, args.groups))
            times.append(time.perf_counter() - start)
        out["queries"][query] = {"times": times, "answers": answers}
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(out))


def run_engine(root: Path, engine: str, args: argparse.Namespace) -> dict[str, Any]:
    forget_bench_lineage(root)
    cmd = [sys.executable, __file__, "--child", engine, "--store", str(root), "--runs", str(args.runs),
           "--repeat", str(args.repeat), "--groups", str(args.groups), "--queries", ",".join(args.queries)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    forget_bench_lineage(root)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the old code, side by side ------------------------------------------------------------------
def old_worktree(path: Path, commit: str) -> Path:
    """A detached worktree of ``commit`` at ``path`` (reused when it is there at that commit)."""
    want = subprocess.run(["git", "-C", str(ROOT), "rev-parse", f"{commit}^{{commit}}"], check=True,
                          capture_output=True, text=True).stdout.strip()
    if (path / ".git").exists():
        have = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], check=True, capture_output=True,
                              text=True).stdout.strip()
        if have != want:
            raise SystemExit(f"{path} is a worktree at {have[:12]}, not {commit}; remove it "
                             f"(git worktree remove {path}) or pass --old-worktree")
        return path
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), want], check=True,
                   capture_output=True, text=True)
    return path


class OldCode:
    """The old code's own benchmark (bench/bench_select.py of --old-commit) in subprocesses whose
    PYTHONPATH is its worktree: its build() on an archive of the same size, its engines' children."""

    DRIVER = ("import argparse, json, sys; from pathlib import Path; import bench_select as old; "
              "a = json.loads(sys.argv[1]); root = Path(sys.argv[2]); "
              "info = old.build(root, argparse.Namespace(**a)) if a else None; "
              "old.forget_bench_lineage(root); print(json.dumps(info))")

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tree = old_worktree(args.old_worktree, args.old_commit)
        self.env = {**os.environ, "PYTHONPATH": f"{self.tree}{os.pathsep}{self.tree / 'bench'}"}
        self.root = archive_dir(args, old=True) / "store"

    def _driver(self, build_args: dict[str, Any]) -> Any:
        done = subprocess.run([sys.executable, "-c", self.DRIVER, json.dumps(build_args), str(self.root)],
                              check=True, capture_output=True, text=True, env=self.env, cwd=self.tree)
        return json.loads(done.stdout.strip().splitlines()[-1])

    def build(self) -> dict[str, Any]:
        self.root.parent.mkdir(parents=True, exist_ok=True)
        a = self.args
        return self._driver({"rows": a.rows, "runs": a.runs, "versions": a.versions, "group_size": a.group_size,
                             "history": a.history, "rebuild": a.rebuild})

    def engine(self, engine: str) -> dict[str, Any]:
        a = self.args
        cmd = [sys.executable, str(self.tree / "bench" / "bench_select.py"), "--child", engine, "--store",
               str(self.root), "--rows", str(a.rows), "--runs", str(a.runs), "--repeat", str(a.repeat),
               "--groups", str(a.groups)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=self.env, cwd=self.tree)
        self._driver({})  # its lineage files removed again
        return json.loads(done.stdout.strip().splitlines()[-1])


# ---- archive size per token ----------------------------------------------------------------------
def bytes_per_token(responses: int = 4096, length: int = 200) -> dict[str, float]:
    """Response-token payload bytes on disk, for realistic lengths, as the store writes them (zstd;
    recpipe.store.files.write_parquet: log-probs byte-stream-split, token ids dictionary-encoded)."""
    from recpipe.store import Store
    from tests.select.synthetic import synthetic_shard

    with tempfile.TemporaryDirectory() as tmp:
        store = Store.create(Path(tmp) / "store")
        table = synthetic_shard(run="size", policy_version=0, shard_id="size", groups=responses // 8,
                                group_size=8, prompt_length=64, max_tokens=length, truncated_fraction=1.0)
        store.append_rollouts(table, shard_id="size")
        (file,) = store.snapshot("rollouts").files
        sizes = _column_sizes(file.path)
        tokens = int(table.column("response_length").to_numpy().sum())
        return {
            "tokens": tokens,
            "response_token_ids": sizes["response_token_ids"] / tokens,
            "behaviour_logprobs": sizes["behaviour_logprobs"] / tokens,
            "per_response_token": (sizes["response_token_ids"] + sizes["behaviour_logprobs"]) / tokens,
            "whole_file_per_response_token": file.size / tokens,
        }


def _column_sizes(path: str) -> dict[str, int]:
    """Compressed bytes per top-level column of a Parquet file."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    sizes: dict[str, int] = {}
    for rg in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(rg).column(c)
            top = col.path_in_schema.split(".")[0]
            sizes[top] = sizes.get(top, 0) + col.total_compressed_size
    return sizes


# ---- main ----------------------------------------------------------------------------------------
def _median(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


def print_engines(results: dict[str, Any], args: argparse.Namespace) -> None:
    engines = [e for e in ENGINE_ORDER if e in results]
    ref = engines[0]
    print(f"\nselect a {args.groups}-group batch ({args.repeat} runs each; first call | median of the rest; "
          f"seconds; x = engine's median / {ref}'s)")
    print(f"{'query':10s} " + " ".join(f"{e:>17s}" for e in engines) + "  agree")
    for query in args.queries:
        cells, medians = [], {}
        for engine in engines:
            t = results[engine]["queries"][query]["times"]
            medians[engine] = _median(t)
            ratio = "" if engine == ref else f" {medians[engine] / medians[ref]:4.1f}x"
            cells.append(f"{t[0]:.3f}|{medians[engine]:.3f}{ratio}")
        agree = all(_agree(query, results[ref]["queries"][query]["answers"], results[e]["queries"][query]["answers"])
                    for e in engines)
        print(f"{query:10s} " + " ".join(f"{c:>17s}" for c in cells) + f"  {'yes' if agree else 'NO'}")
    print("\npeak RSS per engine process (MB): " + ", ".join(
        f"{e} {results[e]['peak_rss_mb']} (after imports {results[e]['rss_after_imports_mb']})" for e in engines))


def print_old_new(old: dict[str, Any], new: dict[str, Any], old_info: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\nold ({args.old_commit}: Parquet folders, {old_info['bytes'] / 1e6:.0f} MB) vs new (Delta Lake), archives "
          "of the same size, engines interleaved; first call | median of the rest, seconds")
    columns = [("old", "duckdb"), ("new", "duckdb-open"), ("new", "duckdb")]
    for engine in (e for e in ENGINE_ORDER if e != "duckdb"):
        if engine in old:
            columns += [("old", engine), ("new", engine)]
    columns = [(side, e) for side, e in columns if e in (old if side == "old" else new)]
    compare = "duckdb" in old and "duckdb-open" in new
    print(f"{'query':10s} " + " ".join(f"{side + ' ' + e:>19s}" for side, e in columns)
          + ("  new/old duckdb" if compare else "") + "  same groups")
    for query in args.queries:
        cells = []
        for side, engine in columns:
            t = (old if side == "old" else new)[engine]["queries"][query]["times"]
            cells.append(f"{t[0]:.3f}|{_median(t):.3f}")
        ratio = ""
        if compare:
            factor = _median(new["duckdb-open"]["queries"][query]["times"]) / _median(old["duckdb"]["queries"][query]["times"])
            ratio = f"  {factor:14.1f}x"
        same = all(_agree(query, old[e]["queries"][query]["answers"], new[e]["queries"][query]["answers"])
                   for e in old if e in new)
        print(f"{query:10s} " + " ".join(f"{c:>19s}" for c in cells) + ratio + f"  {'yes' if same else 'NO':>11s}")
    if compare:
        print("(new/old duckdb: new duckdb-open - the old benchmark's protocol, a Store opened per selection - "
              "over old duckdb; same groups: each old engine chose what the same new engine chose)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000, help="rollouts in the archive")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--versions", type=int, default=8, help="policy versions per run")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--history", type=int, default=7, help="steps of recorded lineage per run")
    parser.add_argument("--groups", type=int, default=96, help="groups per selected batch")
    parser.add_argument("--repeat", type=int, default=5, help="selections per query and engine (different runs)")
    parser.add_argument("--queries", default=",".join(QUERIES), help="comma-separated, of " + ", ".join(QUERIES))
    parser.add_argument("--shard-groups", type=int, default=None,
                        help="groups per generation shard (default: one shard per partition)")
    parser.add_argument("--payload", choices=("all", "selected"), default="all",
                        help="rollouts rows for every partition, or only those the queries choose from")
    parser.add_argument("--engines", default=None, help=f"comma-separated, of {', '.join(ENGINE_ORDER)} "
                        "(default: all; without the -rollouts ones for --payload selected)")
    parser.add_argument("--jobs", type=int, default=None, help="build processes (default: one per CPU)")
    parser.add_argument("--compare-old", action="store_true", help=f"also run the old code ({OLD_COMMIT}) "
                        "on an archive of the same size built by it")
    parser.add_argument("--old-commit", default=OLD_COMMIT)
    parser.add_argument("--old-engines", default="duckdb,polars,pandas", help="engines of the old code to run")
    parser.add_argument("--old-worktree", type=Path, default=Path(tempfile.gettempdir()) / "recpipe-old")
    parser.add_argument("--no-size", action="store_true", help="skip the bytes-per-token measurement")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--child", choices=sorted(ENGINES), help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.queries = [q.strip() for q in args.queries.split(",") if q.strip()]
    if not args.queries or set(args.queries) - set(QUERIES):
        parser.error(f"--queries: choose from {', '.join(QUERIES)}")
    args.queries = [q for q in QUERIES if q in args.queries]
    if args.child:
        child(args)
        return
    if args.repeat * len(QUERIES) > args.runs:
        parser.error(f"--repeat {args.repeat} x {len(QUERIES)} queries needs at least as many runs (--runs {args.runs})")
    if args.versions <= VERSION:
        parser.error(f"--versions must be > {VERSION} (the queries select from version {VERSION})")
    default = [e for e in ENGINE_ORDER if args.payload == "all" or not e.endswith("-rollouts")]
    engines = default if args.engines is None else [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engine(s) {unknown}; choose from {', '.join(ENGINE_ORDER)}")
    if args.payload == "selected" and any(e.endswith("-rollouts") for e in engines):
        parser.error("the -rollouts engines need every rollout row (--payload all)")
    if args.compare_old and args.queries != list(QUERIES):
        parser.error("--compare-old runs every query (the old code's benchmark does)")
    if args.compare_old and (args.shard_groups or args.payload != "all"):
        parser.error("--compare-old: the old code builds the default layout only (no --shard-groups, --payload all)")

    root = archive_dir(args) / "store"
    info = build(root, args)
    groups_per_shard = info["groups"] // max(1, info["shards"])
    print(f"archive: {info['rollouts']:,} rollout rows ({args.payload} payload), {info['groups']:,} groups in "
          f"{info['shards']:,} shards (~{groups_per_shard} groups each), {info['partitions']} partitions; files: "
          + ", ".join(f"{t} {n:,}" for t, n in info["files"].items())
          + f"; {info['bytes'] / 1e6:.0f} MB data + {info['log_bytes'] / 1e6:.1f} MB Delta logs, built in "
          f"{info['build_s']} s")
    old = old_info = None
    old_engines = []
    if args.compare_old:
        old = OldCode(args)
        old_info = old.build()
        old_engines = [e.strip() for e in args.old_engines.split(",") if e.strip()]
        print(f"old archive ({args.old_commit}): {old_info['rollouts']:,} rollouts, {old_info['bytes'] / 1e6:.0f} MB, "
              f"built in {old_info['build_s']} s")
    order = [e for e in ENGINE_ORDER if e in engines]
    results, old_results = {}, {}
    # duckdb engines last: select() records lineage (withdrawn again after each engine); with
    # --compare-old each engine of the old code runs right after the same engine of the new one
    for engine in [e for e in order if not e.startswith("duckdb")] + [e for e in order if e.startswith("duckdb")]:
        results[engine] = run_engine(root, engine, args)
        if engine in old_engines:
            old_results[engine] = old.engine(engine)
    for engine in (e for e in old_engines if e not in old_results):
        old_results[engine] = old.engine(engine)
    print_engines(results, args)
    if old is not None:
        print_old_new(old_results, results, old_info, args)
    if not args.no_size:
        size = bytes_per_token()
        print(f"\nbytes per response token ({size['tokens']:,} tokens, 200-token responses, zstd), as the store "
              f"writes them: ids {size['response_token_ids']:.2f} + float32 log-probs {size['behaviour_logprobs']:.2f} = "
              f"{size['per_response_token']:.2f} (target <= 5.6; whole file incl. 64-token prompts: "
              f"{size['whole_file_per_response_token']:.2f})")


def _agree(query: str, reference: list[dict], other: list[dict]) -> bool:
    """Same groups and advantages; replay ties (equal priority) break by a hash in DuckDB and by id
    elsewhere, so there the chosen groups' versions (hence priorities here) and sizes must match."""
    for a, b in zip(reference, other, strict=True):
        if query == "replay":
            if (a["versions"], a["responses"]) != (b["versions"], b["responses"]):
                return False
        elif a["groups"] != b["groups"] or not math.isclose(a["advantage_sum_abs"], b["advantage_sum_abs"],
                                                              rel_tol=1e-6):
            return False
    return True


if __name__ == "__main__":
    main()
