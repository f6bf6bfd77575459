"""Prefect's overhead per loop iteration, as a share of wall time.

    .venv/bin/python bench/bench_prefect_overhead.py --model tiny --steps 6
    .venv/bin/python bench/bench_prefect_overhead.py --model smollm2 --steps 3

Runs the same loop twice in one process on one store (two runs, same config
and seeds): once calling the stage functions directly, once through the
Prefect `loop` flow with every stage as a task. The engine is shared (started
before either timing), so the difference per iteration is what Prefect adds:
task bookkeeping, state transitions and logging. The ephemeral server's start
is reported separately (paid once per process).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--store", default=None)
    args = parser.parse_args()
    store = Path(args.store or tempfile.mkdtemp(prefix="recpipe-bench-")) / "store"

    import flows  # noqa: F401  (sets PREFECT_HOME etc. before prefect imports)
    from recpipe.config import build_config
    from recpipe.generate.pool import EnginePool
    from recpipe.recipe import LoopRecipe

    small = ["select.groups_per_step=2", "generate.group_size=4", "generate.max_tokens=16", "task.eval_prompts=4",
             "generate.shard_size=2"] if args.model == "tiny" else ["select.groups_per_step=4", "task.eval_prompts=8"]
    base = [f"store={store}", f"model.name={args.model}", f"loop.steps={args.steps}", *small]

    def cfg(run: str):
        return build_config(overrides=[*base, f"run={run}"])

    engines = EnginePool()  # one engine for all three runs, as an experiment's runs share one
    # Warm everything that is paid once per process: model build/convert, engine start, imports.
    with LoopRecipe(cfg("warmup"), engines=engines) as recipe:
        recipe.evaluate(0)

    started = time.perf_counter()
    with LoopRecipe(cfg("plain"), engines=engines) as recipe:
        recipe.run()
    plain = time.perf_counter() - started

    from flows.pipeline_flows import loop

    t0 = time.perf_counter()
    from prefect import flow

    @flow
    def noop() -> None:
        return None

    noop()  # starts the ephemeral server once
    server_start = time.perf_counter() - t0

    started = time.perf_counter()
    loop(cfg("prefect").model_dump(mode="json"), engines=engines)
    prefect = time.perf_counter() - started
    engines.close()

    per_plain, per_prefect = plain / args.steps, prefect / args.steps
    share = (prefect - plain) / prefect
    print("| machine | model | steps | plain s/iter | Prefect s/iter | overhead/iter | share | ephemeral server start |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {platform.machine()} {os.cpu_count()} cores | {args.model} | {args.steps} | {per_plain:.2f} | "
          f"{per_prefect:.2f} | {per_prefect - per_plain:.3f} s | {share:.1%} | {server_start:.1f} s |")


if __name__ == "__main__":
    main()
