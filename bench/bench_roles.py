"""Generators beside the trainer: does the overlap pay? (issue 14's benchmark)

    .venv/bin/python bench/bench_roles.py                          # SmolLM2, k=1 o=1, 5 steps
    .venv/bin/python bench/bench_roles.py --model tiny --steps 4   # a quick check of the script itself

Every run is the real CLI in a subprocess, on a fresh store:

- overlap:    `loop --generators 1 --generator-devices 0 --trainer-devices 1` (one core each, one thread each)
- sequential: `loop` (one process, both cores: the default loop)
- gen alone:  `generator --exit-when-idle` pinned to core 0, one thread, every step's groups from v0
- train alone: `train` pinned to core 1, one thread, on the gen-alone store's rollouts
- gen x2:     two `generator --exit-when-idle` processes, cores 0 and 1, same work as gen alone

Per-step wall time is read from the archive (`steps.created_at` of the first and the last step), so
process start, engine start and the evaluations before and after the loop are not counted. Generation
time per step is the gen-alone run's generate seconds (`timings`) over its steps. Target: overlap wall
per step <= 1.1 x max(gen alone, train alone). Prints a markdown table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def recpipe(args: list[str], env: dict[str, str], cpus: str | None = None) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "recpipe.cli", *args]
    if cpus is not None:
        cmd = ["taskset", "-c", cpus, *cmd]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def finish(*procs: subprocess.Popen[str]) -> None:
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"{proc.args}: exit {proc.returncode}\n{err[-3000:]}")


def query(store: Path, sql: str) -> list[tuple[Any, ...]]:
    from recpipe.store import Store

    con = Store(store).connect(read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def step_wall(store: Path) -> float:
    """Seconds per step between the first and the last committed step."""
    (first, last, n), = query(store, "SELECT epoch(min(created_at)), epoch(max(created_at)), count(*) FROM steps")
    return (last - first) / max(1, n - 1)


def generated(store: Path) -> tuple[float, float]:
    """(generate seconds summed over shards, response tokens per second of wall time from the first shard's
    start to the last one's end, over every generator process) of a store."""
    (seconds, tokens, span), = query(store, "SELECT sum(seconds), sum(tokens), epoch(max(created_at)) - "
                                            "min(epoch(created_at) - seconds) FROM timings WHERE stage = 'generate'")
    return seconds, tokens / span


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], help="extra config overrides (section.field=value)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "roles.json"))
    args = parser.parse_args()
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs two cores")

    tmp = Path(tempfile.mkdtemp(prefix="bench-roles-"))
    # The user's model cache (SmolLM2 converted once), a throw-away Prefect home.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_HOME": str(tmp / "prefect"), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    one_thread = {**env, "OMP_NUM_THREADS": "1"}
    sets = [x for s in args.set for x in ("--set", s)]
    common = ["--model", args.model, "--steps", str(args.steps), "--preset", "rec-oneside-nois", *sets,
              "--set", "loop.eval_every=0", "--set", "task.eval_prompts=4"]
    schedule = ["--sync-interval", "1", "--sync-offset", "1"]
    all_v0 = ["--sync-interval", str(args.steps + 1), "--sync-offset", "0"]  # every step's groups from v0
    results: dict[str, Any] = {"model": args.model, "steps": args.steps, "overrides": args.set,
                               "machine": f"{cpu_model()}, {os.cpu_count()} cores"}
    timed: dict[str, float] = {}

    def run(name: str, *procs: subprocess.Popen[str]) -> None:
        start = time.perf_counter()
        finish(*procs)
        timed[name] = time.perf_counter() - start
        print(f"{name}: {timed[name]:.1f} s", file=sys.stderr)

    s = tmp / "overlap"
    run("overlap", recpipe(["loop", "--store", str(s), *common, *schedule, "--generators", "1", "--generator-devices",
                            "0", "--trainer-devices", "1", "--set", "train.threads=1", "--no-summary"], one_thread))
    results["overlap_step_s"] = step_wall(s)

    s = tmp / "sequential"
    run("sequential", recpipe(["loop", "--store", str(s), *common, *schedule, "--no-summary"], env))
    results["sequential_step_s"] = step_wall(s)

    s = tmp / "gen1"
    run("gen1", recpipe(["generator", "--store", str(s), *common, *all_v0, "--exit-when-idle"], one_thread, "0"))
    seconds, results["gen_tokens_per_s_1"] = generated(s)
    results["gen_alone_step_s"] = seconds / args.steps

    run("train1", recpipe(["train", "--store", str(s), "--model", args.model, "--steps", str(args.steps), *sets,
                           "--preset", "rec-oneside-nois", "--set", "train.threads=1", "--set",
                           f"loop.sync_interval={args.steps + 1}", "--set", "loop.sync_offset=0"], one_thread, "1"))
    results["train_alone_step_s"] = step_wall(s)

    s = tmp / "gen2"
    gen = ["generator", "--store", str(s), *common, *all_v0, "--exit-when-idle"]
    run("gen2", recpipe(gen, one_thread, "0"), recpipe(gen, one_thread, "1"))
    results["gen_tokens_per_s_2"] = generated(s)[1]

    bound = max(results["gen_alone_step_s"], results["train_alone_step_s"])
    results["overlap_vs_bound"] = results["overlap_step_s"] / bound
    results["overlap_vs_sequential"] = results["overlap_step_s"] / results["sequential_step_s"]
    results["process_wall_s"] = timed
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))

    print("| machine | model | steps | gen alone s/step | train alone s/step | overlap s/step | overlap / max | "
          "sequential s/step | overlap / sequential | gen tok/s x1 | gen tok/s x2 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    r = results
    print(f"| {r['machine']} | {args.model} | {args.steps} | {r['gen_alone_step_s']:.2f} | {r['train_alone_step_s']:.2f} "
          f"| {r['overlap_step_s']:.2f} | {r['overlap_vs_bound']:.2f}x | {r['sequential_step_s']:.2f} | "
          f"{r['overlap_vs_sequential']:.2f}x | {r['gen_tokens_per_s_1']:.0f} | {r['gen_tokens_per_s_2']:.0f} |")


if __name__ == "__main__":
    main()
