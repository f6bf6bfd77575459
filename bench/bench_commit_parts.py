"""Where a lineage commit's time goes in delta-rs on a local disk, and what does not make it cheaper.

    python bench/bench_commit_parts.py                        # logs of 100, 1000 and 3000 prior commits
    python bench/bench_commit_parts.py --prior 100,2000 --commits 30

A selection records its batch as one commit to the batches table (Store.append: a Parquet file, then
delta-rs's create_write_transaction, then update_incremental so that the open table is at the new
version). The old archive's lineage write was a temp file, an fsync and a hard link (3-4 ms). This
measures, on a batches-like table whose log holds --prior one-file commits (delta.checkpointInterval 10,
as schemas/tables.yaml gives the per-step tables), the median of --commits commits of one add action
each, by part and by alternative:

  commit       create_write_transaction alone
  refresh      update_incremental right after it
  stale k=N    N commits from the same handle, one refresh after them (ms per commit): delta-rs retries a
               commit whose version exists, so the refresh is saved but every retry costs about as much
  write path   write_deltalake on the open table (writes its own Parquet, keeps the handle current):
               one refresh less, but delta-rs's writer writes no page checksums, which the archive's
               corruption checks need (recpipe.store.files.write_parquet), so the archive cannot use it
  junk N       copies of the first --prior table (after the commits measured on it) with N extra
               entries in _delta_log that are not log files, against a copy with none: the part of a
               commit's growth that is listing the folder

The cost that grows with the log is the listing: delta-rs (1.6.6, object_store's LocalFileSystem) lists
the whole _delta_log folder to find the entries after the last checkpoint, three times per commit and
refresh; on S3 the listing starts after an offset on the server (bench_commit.py: flat on SeaweedFS).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake
from deltalake.transaction import AddAction, CommitProperties, Transaction

from recpipe.store import COMMIT_HOOKS, table_configuration

SCHEMA = pa.schema([("run", pa.string()), ("step", pa.int32()), ("rollout_id", pa.string())])


def add(table: DeltaTable, name: str) -> None:
    """Commit one add action (a file that need not exist: only the log is measured) with its own app id."""
    action = AddAction(f"run=r/{name}.parquet", 1000, {"run": "r"}, int(time.time() * 1000), True,
                       '{"numRecords": 8}')
    table.create_write_transaction([action], mode="append", schema=table.schema(), partition_by=["run"],
                                   commit_properties=CommitProperties(app_transactions=[Transaction(name, 1)]),
                                   post_commithook_properties=COMMIT_HOOKS)


def build(path: Path, prior: int) -> None:
    table = DeltaTable.create(str(path), schema=SCHEMA, partition_by=["run"],
                              configuration=table_configuration("batches"))
    for i in range(prior - 1):
        add(table, f"prior{i}")
        table.update_incremental()


def median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1e3, 1)


def measure(path: Path, commits: int) -> dict[str, float]:
    table = DeltaTable(str(path))
    parts: dict[str, list[float]] = {"commit": [], "refresh": []}
    for _ in range(commits):
        t0 = time.perf_counter()
        add(table, uuid.uuid4().hex)
        t1 = time.perf_counter()
        table.update_incremental()
        parts["commit"].append(t1 - t0)
        parts["refresh"].append(time.perf_counter() - t1)
    out = {k: median_ms(v) for k, v in parts.items()}
    out["commit + refresh"] = round(out["commit"] + out["refresh"], 1)
    for k in (2, 3):
        per_commit = []
        for _ in range(max(3, commits // k)):
            t0 = time.perf_counter()
            for _ in range(k):
                add(table, uuid.uuid4().hex)
            table.update_incremental()
            per_commit.append((time.perf_counter() - t0) / k)
        out[f"stale k={k}"] = median_ms(per_commit)
    rows = pa.table({"run": ["r"] * 8, "step": pa.array([0] * 8, pa.int32()), "rollout_id": [str(i) for i in range(8)]})
    writes = []
    for _ in range(commits):
        props = CommitProperties(app_transactions=[Transaction(uuid.uuid4().hex, 1)])
        t0 = time.perf_counter()
        write_deltalake(table, rows, mode="append", partition_by=["run"], commit_properties=props,
                        post_commithook_properties=COMMIT_HOOKS)
        writes.append(time.perf_counter() - t0)
    out["write path"] = median_ms(writes)
    return out


def with_junk(path: Path, junk: int, commits: int) -> float:
    copy = path.with_name(f"{path.name}-junk{junk}")
    shutil.copytree(path, copy)
    for i in range(junk):
        (copy / "_delta_log" / f".not-a-log-entry-{i:06d}").touch()
    table = DeltaTable(str(copy))
    timed = []
    for _ in range(commits):
        t0 = time.perf_counter()
        add(table, uuid.uuid4().hex)
        table.update_incremental()
        timed.append(time.perf_counter() - t0)
    return median_ms(timed)


def timed(label: str, fn: Callable[[], object]) -> object:
    t0 = time.perf_counter()
    result = fn()
    print(f"  ({label}: {time.perf_counter() - t0:.0f} s)", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prior", default="100,1000,3000", help="log lengths (prior commits), comma-separated")
    parser.add_argument("--commits", type=int, default=40, help="measured commits per point")
    parser.add_argument("--junk", default="2000,10000", help="extra non-log entries added to the first table")
    args = parser.parse_args()
    priors = [int(x) for x in args.prior.split(",")]
    with tempfile.TemporaryDirectory(prefix="recpipe-commit-parts-") as tmp:
        rows = []
        for prior in priors:
            path = Path(tmp) / f"batches-{prior}"
            timed(f"built a {prior}-commit log", lambda path=path, prior=prior: build(path, prior))
            rows.append((prior, measure(path, args.commits)))
        keys = list(rows[0][1])
        print("\nmedian ms per commit, by log length (prior commits):")
        print("| prior commits | " + " | ".join(keys) + " |")
        print("|---:|" + "---:|" * len(keys))
        for prior, out in rows:
            print(f"| {prior} | " + " | ".join(str(out[k]) for k in keys) + " |")
        first = Path(tmp) / f"batches-{priors[0]}"
        print(f"\ncommit + refresh on copies of the {priors[0]}-commit table (after its measured commits) "
              "with extra non-log entries in _delta_log:")
        for junk in [0, *(int(x) for x in args.junk.split(",") if x)]:
            print(f"  {junk:>6} extra entries: {with_junk(first, junk, args.commits)} ms", flush=True)


if __name__ == "__main__":
    main()
