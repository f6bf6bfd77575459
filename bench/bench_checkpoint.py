"""What a table's Delta checkpoint interval costs a lineage commit: Store.append of one step's batch rows,
then the "already recorded?" lookup of the next step, on a batches table of realistic size, at several
values of delta.checkpointInterval.

    python bench/bench_checkpoint.py                                   # 700 prior steps, intervals 100,20,10,5
    python bench/bench_checkpoint.py --prior 200 --commits 60 --intervals 100,10

delta-rs (1.6.6) replays the log from the table's last checkpoint in each commit, each refresh after
it and each application-transaction lookup, so their cost grows with the commits since that checkpoint;
a shorter interval keeps the tail short at the price of writing a checkpoint (every live file listed)
more often. The table is built once (--prior steps of --runs runs, one 96 x 8-row file per step, as the
10M selection benchmark's lineage history: 700 files), copied per interval, and --commits more steps are
committed to it, spreading over whole checkpoint cycles; the mean includes the checkpoint writes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from recpipe.schema import SCHEMA_VERSION
from recpipe.select import lineage_shard
from recpipe.store import Store

GROUPS, GROUP_SIZE = 96, 8


def lineage(run: str, step: int) -> pa.Table:
    """One step's batches rows: 96 groups x 8 responses."""
    n = GROUPS * GROUP_SIZE
    groups = [f"{run}-s{step}-g{i // GROUP_SIZE}" for i in range(n)]
    return pa.table({
        "run": [run] * n, "step": pa.array([step] * n, pa.int32()),
        "rollout_id": [f"{g}/{i % GROUP_SIZE}" for i, g in enumerate(groups)], "group_id": groups,
        "source_run": [run] * n, "policy_version": pa.array([step] * n, pa.int32()),
        "query_name": ["schedule"] * n, "query_hash": ["0" * 64] * n, "params": ["{}"] * n,
        "weight": [1.0] * n, "advantage": [0.0] * n, "read_versions": ["{}"] * n,
        "created_at": [dt.datetime(2026, 12, 1, tzinfo=dt.UTC)] * n,
        "schema_version": pa.array([SCHEMA_VERSION] * n, pa.int32()),
    })


def build(root: Path, runs: int, prior: int) -> None:
    store = Store.create(root)
    for step in range(prior):
        run = f"run{step % runs:03d}"
        store.append("batches", lineage(run, step // runs), shard_id=lineage_shard(step // runs))


def measure(root: Path, interval: int, commits: int) -> dict[str, float]:
    store = Store(root)
    store.delta("batches").alter.set_table_properties({"delta.checkpointInterval": str(interval)},
                                                      raise_if_not_exists=False)
    store = Store(root)  # a fresh process's view: the cached table at the new property
    run = "bench"
    times = []
    for step in range(commits):
        rows = lineage(run, step)
        start = time.perf_counter()
        assert store.append("batches", rows, shard_id=lineage_shard(step))
        assert not store.is_committed("batches", {"run": run}, lineage_shard(step + 1))
        times.append(time.perf_counter() - start)
    checkpoints = len(list((root / "batches" / "_delta_log").glob("*.checkpoint.parquet")))
    return {"mean_ms": statistics.mean(times) * 1e3, "median_ms": statistics.median(times) * 1e3,
            "max_ms": max(times) * 1e3, "checkpoints": checkpoints, "version": store.delta("batches").version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--prior", type=int, default=700, help="steps already in the table (one file each)")
    parser.add_argument("--commits", type=int, default=100, help="steps committed and timed per interval")
    parser.add_argument("--intervals", default="100,20,10,5")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as tmp:
        base = Path(tmp) / "base"
        started = time.perf_counter()
        build(base, args.runs, args.prior)
        print(f"batches table: {args.prior} files, built in {time.perf_counter() - started:.0f} s; "
              f"{args.commits} lineage commits + next-step lookups per interval (ms)")
        print(f"{'interval':>8} {'mean':>7} {'median':>7} {'max':>7} {'checkpoints':>11}")
        for interval in (int(i) for i in args.intervals.split(",")):
            copy = Path(tmp) / f"i{interval}"
            shutil.copytree(base, copy)
            r = measure(copy, interval, args.commits)
            print(f"{interval:>8} {r['mean_ms']:7.1f} {r['median_ms']:7.1f} {r['max_ms']:7.1f} {r['checkpoints']:>11}")
            shutil.rmtree(copy)


if __name__ == "__main__":
    main()
