"""Selection benchmark: recpipe.select (DuckDB) vs the same selection in polars (lazy) and pandas.

    python bench/bench_select.py                  # 10M rollouts, 100 runs x 8 versions (builds once, ~2-4 min)
    python bench/bench_select.py --rows 200000    # small and quick
    python bench/bench_select.py --rebuild        # build the archive again

The archive (bench/out/select-<rows>/store, reused while its config matches) has --runs x --versions
partitions of synthetic rollouts (recpipe.select.synthetic; short token payloads so that it builds
fast) written through Store.append_rollouts, and a lineage history: every run has trained steps
0..--history-1 on 96 groups each, so "not yet used" and replay use counts have real work to do.

For each named query (schedule, fresh, replay) a 96-group batch is selected for --repeat different
runs: DuckDB through select() end to end (connection, both SQL stages, validation, lineage write);
polars and pandas do the same selection over the same groups summary ("-rollouts": over per-group
facts computed from the rollout rows, as one would without that table) and fetch the same payload
columns for the chosen groups, with GRPO advantages. Each engine runs in its own process, so its peak
RSS (getrusage) is its own. The chosen groups are checked to agree across engines. Separately, bytes
per response token are measured on a realistic sample (200-token responses, float32 log-probs,
zstd as the store writes it).
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
from pathlib import Path
from typing import Any

QUERIES = ("schedule", "fresh", "replay")
# Bench steps lie past the built history (steps 0..6), so their lineage files can be told apart and
# removed; schedule's sync_offset and fresh's current_version point them back at version 6, whose
# first 96 groups the history has used, so the "not yet used" test has real work to do.
STEP = {"schedule": 1006, "fresh": 1007, "replay": 1008}
PARAMS = {"schedule": {"sync_offset": 1000}, "fresh": {"current_version": 6, "max_staleness": 4},
          "replay": {"use_penalty": 1.0}}
VERSION = 6  # v(1006) with sync_interval 1, sync_offset 1000; fresh's current version
T0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


def run_name(i: int) -> str:
    return f"run{i:03d}"


# ---- the archive ---------------------------------------------------------------------------------
def _build_partition(job: tuple[str, int, int, int, int]) -> int:
    from recpipe.select.synthetic import synthetic_shard
    from recpipe.store import Store

    root, r, v, groups, group_size = job
    shard = f"{run_name(r)}-v{v:06d}-s0"
    table = synthetic_shard(run=run_name(r), policy_version=v, shard_id=shard, groups=groups,
                            group_size=group_size, seed=r, prompt_length=4, max_tokens=8,
                            created_at=T0 + dt.timedelta(hours=v, seconds=r))
    Store(root).append_rollouts(table, shard_id=shard)
    return table.num_rows


def _build_history(job: tuple[str, int, int, int, int]) -> None:
    """Lineage of steps 0..history-1 of one run: step s used the first 96 groups of version s."""
    import pyarrow as pa

    from recpipe.schema import SCHEMA_VERSION
    from recpipe.select import lineage_shard
    from recpipe.store import Store

    root, r, history, groups, group_size = job
    store = Store(root)
    for step in range(history):
        n = groups * group_size
        group_ids = [f"{run_name(r)}-v{step:06d}-s0/p{g}" for g in range(groups) for _ in range(group_size)]
        store.append("batches", pa.table({
            "run": [run_name(r)] * n, "step": pa.array([step] * n, pa.int32()),
            "rollout_id": [f"{g}/{i % group_size}" for i, g in enumerate(group_ids)], "group_id": group_ids,
            "source_run": [run_name(r)] * n, "policy_version": pa.array([step] * n, pa.int32()),
            "query_name": ["schedule"] * n, "query_hash": ["0" * 64] * n, "params": ["{}"] * n,
            "weight": [1.0] * n, "advantage": [0.0] * n, "created_at": [T0] * n,
            "schema_version": pa.array([SCHEMA_VERSION] * n, pa.int32()),
        }), shard_id=lineage_shard(step))


def build(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    from recpipe.store import Store

    config = {"rows": args.rows, "runs": args.runs, "versions": args.versions, "group_size": args.group_size,
              "history": args.history}
    marker = root.parent / "built.json"
    if marker.is_file() and not args.rebuild and json.loads(marker.read_text()).get("config") == config:
        return json.loads(marker.read_text())
    shutil.rmtree(root.parent, ignore_errors=True)
    Store.create(root)
    groups = max(1, args.rows // (args.runs * args.versions * args.group_size))
    jobs = [(str(root), r, v, groups, args.group_size) for r in range(args.runs) for v in range(args.versions)]
    start = time.perf_counter()
    with mp.get_context("spawn").Pool(os.cpu_count() or 1) as pool:
        rows = sum(pool.map(_build_partition, jobs, chunksize=4))
        pool.map(_build_history, [(str(root), r, min(args.history, args.versions), min(96, groups), args.group_size)
                                  for r in range(args.runs)])
    info = {"config": config, "rollouts": rows, "groups": groups * len(jobs), "partitions": len(jobs),
            "build_s": round(time.perf_counter() - start, 1),
            "bytes": sum(f.stat().st_size for f in root.rglob("*.parquet"))}
    marker.write_text(json.dumps(info))
    return info


def forget_bench_lineage(root: Path) -> None:
    """Lineage files a previous benchmark run recorded (its steps are past the built history)."""
    for step in set(STEP.values()):
        for path in (root / "batches").glob(f"run=*/step-{step:06d}.parquet"):
            path.unlink()


# ---- the three engines ---------------------------------------------------------------------------
def bench_runs(query: str, args: argparse.Namespace) -> list[str]:
    """Disjoint runs per query, so one query's recorded lineage cannot change another's answer."""
    offset = QUERIES.index(query) * args.repeat
    return [run_name((offset + i) % args.runs) for i in range(args.repeat)]


def duckdb_select(root: str, query: str, run: str, groups: int) -> dict[str, Any]:
    from recpipe.algorithms import preset
    from recpipe.select import select
    from recpipe.store import Store

    batch = select(Store(root), query, PARAMS[query], run=run, step=STEP[query], groups=groups,
                   loss_config=preset("grpo"))
    return _summary(batch.rollouts.select(["source_run", "group_id", "policy_version", "rollout_id", "advantage"]))


def _summary(table) -> dict[str, Any]:
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


def _polars_groups(root: str, query: str, run: str, summary: bool):
    """Per-group rows (run, group_id, policy_version, n_errors, created_at): recpipe's groups table, or
    (summary=False) computed from the rollouts themselves, as one would without that table."""
    import polars as pl

    if summary:
        return pl.scan_parquet(f"{root}/groups/**/*.parquet", hive_partitioning=True)
    rollouts = pl.scan_parquet(f"{root}/rollouts/**/*.parquet", hive_partitioning=True)
    versions = _version_range(query)
    if versions is not None:
        rollouts = rollouts.filter((pl.col("run") == run) & pl.col("policy_version").is_between(*versions))
    return rollouts.group_by(["run", "policy_version", "group_id"]).agg(
        pl.col("reward_error").is_not_null().sum().alias("n_errors"), pl.col("created_at").max())


def polars_select(root: str, query: str, run: str, groups: int, summary: bool = True) -> dict[str, Any]:
    import polars as pl

    groups_lf = _polars_groups(root, query, run, summary)
    used_lf = (pl.scan_parquet(f"{root}/batches/**/*.parquet", hive_partitioning=True)
               .filter(pl.col("run") == run)
               .select(pl.col("source_run").alias("run"), "group_id", "step"))
    eligible = groups_lf.filter(pl.col("n_errors") == 0)
    if query == "schedule":
        chosen = (eligible.filter((pl.col("run") == run) & (pl.col("policy_version") == VERSION))
                  .join(used_lf, on=["run", "group_id"], how="anti")
                  .sort(["created_at", "group_id"]).head(groups))
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
    files = sorted(str(p) for r, v in set(chosen.select("run", "policy_version").iter_rows())
                   for p in Path(root, "rollouts", f"run={r}", f"policy_version={v}").glob("*.parquet"))
    rows = (pl.scan_parquet(files, hive_partitioning=False)
            .select(PAYLOAD)
            .join(chosen.lazy().select("run", "group_id"), on=["run", "group_id"], how="semi")
            .with_columns(((pl.col("reward") - pl.col("reward").mean().over("run", "group_id"))
                           / (pl.col("reward").std(ddof=0).over("run", "group_id") + 1e-6)).alias("advantage"),
                          pl.col("generator").struct.field("temperature").alias("temperature"))
            .rename({"run": "source_run"})
            .collect())
    return _summary(rows.select("source_run", "group_id", "policy_version", "rollout_id", "advantage").to_arrow())


def _pandas_groups(root: str, query: str, run: str, summary: bool):
    """As _polars_groups, with pandas (pyarrow reader, partition filters pushed down)."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.dataset as ds

    # hive folders typed like the columns the files also hold, so pyarrow can prune partitions
    hive = ds.partitioning(pa.schema([("run", pa.string()), ("policy_version", pa.int32())]), flavor="hive")
    filters, versions = None, _version_range(query)
    if versions is not None:
        filters = [("run", "=", run), ("policy_version", ">=", versions[0]), ("policy_version", "<=", versions[1])]
    if summary:
        return pd.read_parquet(f"{root}/groups", columns=["run", "group_id", "policy_version", "n_errors", "created_at"],
                               partitioning=hive, filters=filters)
    rows = pd.read_parquet(f"{root}/rollouts", columns=["run", "group_id", "policy_version", "reward_error", "created_at"],
                           partitioning=hive, filters=filters)
    rows["error"] = rows["reward_error"].notna()
    g = rows.groupby(["run", "policy_version", "group_id"], observed=True, as_index=False).agg(
        n_errors=("error", "sum"), created_at=("created_at", "max"))
    g["run"] = g["run"].astype(str)
    return g


def pandas_select(root: str, query: str, run: str, groups: int, summary: bool = True) -> dict[str, Any]:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.dataset as ds

    batches = pd.read_parquet(f"{root}/batches", columns=["source_run", "group_id", "step"],
                              filters=[("run", "=", run)],
                              partitioning=ds.partitioning(pa.schema([("run", pa.string())]), flavor="hive"))
    batches = batches.rename(columns={"source_run": "run"})
    batches["run"] = batches["run"].astype(str)
    g = _pandas_groups(root, query, run, summary)
    g = g[g["n_errors"] == 0]
    if query in ("schedule", "fresh"):
        used = g.merge(batches[["run", "group_id"]].drop_duplicates(), on=["run", "group_id"], how="left",
                       indicator=True)
        g = used[used["_merge"] == "left_only"].drop(columns="_merge")
        if query == "schedule":
            chosen = g.sort_values(["created_at", "group_id"]).head(groups)
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
        folder = Path(root, "rollouts", f"run={r}", f"policy_version={v}")
        for f in sorted(folder.glob("*.parquet")):
            frame = pd.read_parquet(f, columns=PAYLOAD, filters=[("group_id", "in", list(sub["group_id"]))])
            parts.append(frame)
    rows = pd.concat(parts, ignore_index=True)
    grouped = rows.groupby(["run", "group_id"])["reward"]
    rows["advantage"] = (rows["reward"] - grouped.transform("mean")) / (grouped.transform(lambda x: x.std(ddof=0)) + 1e-6)
    rows["temperature"] = rows["generator"].map(lambda g: g["temperature"])
    rows = rows.rename(columns={"run": "source_run"})
    return _summary(pa.Table.from_pandas(rows[["source_run", "group_id", "policy_version", "rollout_id", "advantage"]]))


ENGINES = {"duckdb": duckdb_select, "polars": polars_select, "pandas": pandas_select,
           # the same selections without recpipe's groups summary: per-group facts from the rollouts
           "polars-rollouts": functools.partial(polars_select, summary=False),
           "pandas-rollouts": functools.partial(pandas_select, summary=False)}
ALTERNATIVES = ("polars", "pandas", "polars-rollouts", "pandas-rollouts")


def child(args: argparse.Namespace) -> None:
    """One engine, all queries, in this process; prints JSON (timings, answers, peak RSS)."""
    import duckdb  # noqa: F401 - import costs out of the timings
    import pandas  # noqa: F401
    import polars  # noqa: F401

    import recpipe.select  # noqa: F401

    fn = ENGINES[args.child]
    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out: dict[str, Any] = {"engine": args.child, "rss_after_imports_mb": round(rss_imports), "queries": {}}
    for query in QUERIES:
        times, answers = [], []
        for run in bench_runs(query, args):
            start = time.perf_counter()
            answers.append(fn(args.store, query, run, args.groups))
            times.append(time.perf_counter() - start)
        out["queries"][query] = {"times": times, "answers": answers}
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(out))


# ---- archive size per token ----------------------------------------------------------------------
def bytes_per_token(responses: int = 4096, length: int = 200) -> dict[str, float]:
    """Response-token payload bytes on disk, for realistic lengths, as the store writes it (zstd)."""
    import pyarrow.parquet as pq

    from recpipe.select.synthetic import synthetic_shard
    from recpipe.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        store = Store.create(Path(tmp) / "store")
        table = synthetic_shard(run="size", policy_version=0, shard_id="size", groups=responses // 8,
                                group_size=8, prompt_length=64, max_tokens=length, truncated_fraction=1.0)
        store.append_rollouts(table, shard_id="size")
        path = store.files("rollouts")[0]
        sizes = _column_sizes(path)
        tokens = int(table.column("response_length").to_numpy().sum())
        # What a writer change could gain: log-probs without dictionary encoding (every value is
        # unique; the failed dictionary attempt costs bytes) and with BYTE_STREAM_SPLIT (zstd then sees
        # the float32 sign/exponent bytes apart from the random mantissa bytes).
        split = Path(tmp) / "split.parquet"
        pq.write_table(table.select(["response_token_ids", "behaviour_logprobs"]), split, compression="zstd",
                       use_dictionary=["response_token_ids.list.element"],  # nested columns go by leaf path
                       use_byte_stream_split=["behaviour_logprobs.list.element"],
                       row_group_size=64 * 1024)
        split_sizes = _column_sizes(split)
        return {
            "tokens": tokens,
            "response_token_ids": sizes["response_token_ids"] / tokens,
            "behaviour_logprobs": sizes["behaviour_logprobs"] / tokens,
            "per_response_token": (sizes["response_token_ids"] + sizes["behaviour_logprobs"]) / tokens,
            "whole_file_per_response_token": path.stat().st_size / tokens,
            "split_response_token_ids": split_sizes["response_token_ids"] / tokens,
            "split_behaviour_logprobs": split_sizes["behaviour_logprobs"] / tokens,
        }


def _column_sizes(path: Path) -> dict[str, int]:
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
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000, help="rollouts in the archive")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--versions", type=int, default=8, help="policy versions per run")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--history", type=int, default=7, help="steps of recorded lineage per run")
    parser.add_argument("--groups", type=int, default=96, help="groups per selected batch")
    parser.add_argument("--repeat", type=int, default=5, help="selections per query and engine (different runs)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--child", choices=sorted(ENGINES), help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.repeat * len(QUERIES) > args.runs:
        parser.error(f"--repeat {args.repeat} x {len(QUERIES)} queries needs at least as many runs (--runs {args.runs})")

    root = args.out / f"select-{args.rows}" / "store"
    info = build(root, args)
    print(f"archive: {info['rollouts']:,} rollouts, {info['groups']:,} groups, {info['partitions']} partitions, "
          f"{info['bytes'] / 1e6:.0f} MB, built in {info['build_s']} s")
    results = {}
    for engine in (*ALTERNATIVES, "duckdb"):  # duckdb last: select() records lineage
        forget_bench_lineage(root)
        cmd = [sys.executable, __file__, "--child", engine, "--store", str(root), "--rows", str(args.rows),
               "--runs", str(args.runs), "--repeat", str(args.repeat), "--groups", str(args.groups)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        results[engine] = json.loads(done.stdout.strip().splitlines()[-1])
    forget_bench_lineage(root)

    print(f"\nselect a {args.groups}-group batch ({args.repeat} runs each; first call | median of the rest; "
          "seconds; x = alternative's median / DuckDB's)")
    print(f"{'query':10s} " + " ".join(f"{e:>17s}" for e in ("duckdb", *ALTERNATIVES)) + "  agree")
    for query in QUERIES:
        cells, medians = [], {}
        for engine in ("duckdb", *ALTERNATIVES):
            t = results[engine]["queries"][query]["times"]
            medians[engine] = statistics.median(t[1:] if len(t) > 1 else t)
            ratio = "" if engine == "duckdb" else f" {medians[engine] / medians['duckdb']:4.1f}x"
            cells.append(f"{t[0]:.3f}|{medians[engine]:.3f}{ratio}")
        agree = all(_agree(query, results["duckdb"]["queries"][query]["answers"],
                           results[e]["queries"][query]["answers"]) for e in ALTERNATIVES)
        print(f"{query:10s} " + " ".join(f"{c:>17s}" for c in cells) + f"  {'yes' if agree else 'NO'}")
    print("\npeak RSS per engine process (MB): " + ", ".join(
        f"{e} {results[e]['peak_rss_mb']} (after imports {results[e]['rss_after_imports_mb']})" for e in results))
    size = bytes_per_token()
    print(f"\nbytes per response token ({size['tokens']:,} tokens, 200-token responses, zstd), as the store "
          f"writes them: ids {size['response_token_ids']:.2f} + float32 log-probs {size['behaviour_logprobs']:.2f} = "
          f"{size['per_response_token']:.2f} (whole file incl. 64-token prompts: "
          f"{size['whole_file_per_response_token']:.2f})")
    print(f"  with log-probs BYTE_STREAM_SPLIT, no dictionary: ids {size['split_response_token_ids']:.2f} + "
          f"log-probs {size['split_behaviour_logprobs']:.2f} = "
          f"{size['split_response_token_ids'] + size['split_behaviour_logprobs']:.2f}")


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
