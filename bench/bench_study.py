"""Sizing the paper-style study (EXPERIMENTS.md): task headroom and the loop's cost per step.

    # Task headroom on SmolLM2: greedy held-out accuracy, share of right samples, share of mixed groups
    nice -n 10 .venv/bin/python bench/bench_study.py calibrate --prompts 64 --eval-prompts 200 \\
        --candidate '{"operation": "add", "low": 1, "high": 50, "n_train": 2200, "n_test": 300}' \\
        --candidate '{"operation": "add-add", "low": 1, "high": 20, "n_train": 4000, "n_test": 400}'

    # Seconds per loop step (generate + select + train, plus evaluations) at the study's scale
    nice -n 10 .venv/bin/python bench/bench_study.py step-cost --steps 3 --set select.groups_per_step=6

calibrate samples ``group_size`` responses per training prompt at the study's temperature with the
library's engine (generate_rollouts, the loop's own stage) and greedy-decodes the held-out prompts
(evaluate_greedy, the loop's evaluation); nothing is written to a store. step-cost runs the loop through
its public library function on a throw-away store and reads the stage times back from `timings`.
Numbers go to EXPERIMENTS.md with the machine they were measured on.

    # Keep a study's finished runs in git, and put them back into a fresh store on another machine
    .venv/bin/python bench/bench_study.py save-results --store runs/study --steps 9 --to docs/study/results
    .venv/bin/python bench/bench_study.py restore-results --store runs/study --from docs/study/results

A study of 30 runs can outlive the machine it started on (this project's machines are replaced
between sessions, and the archive with its ~1 GB checkpoints is not in git). save-results writes the
rows the study's tables and figures read (steps, evals, timings) of every *finished* run to Parquet;
restore-results appends them to a new store, so `recpipe experiment` with the same command skips those
runs and its report covers all of them. Unfinished runs are left out: they start again from version 0.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def calibrate(args: argparse.Namespace) -> list[dict]:
    from recpipe.generate import evaluate_greedy, generate_rollouts, make_engine
    from recpipe.models import resolve_model
    from recpipe.tasks import get_task

    engine = make_engine(resolve_model(args.model), backend=args.backend, max_model_len=512)
    results = []
    for text in args.candidate:
        options = json.loads(text)
        task = get_task("arithmetic", **options)
        prompts = task.prompts("train", limit=args.prompts, seed=0)
        started = time.perf_counter()
        table = generate_rollouts(engine, task, prompts, run="calibrate", policy_version=0, shard_id="calibrate",
                                  n=args.group_size, temperature=args.temperature, top_p=1.0,
                                  max_tokens=args.max_tokens, seed=0)
        sample_s = time.perf_counter() - started
        rows = table.select(["group_id", "reward", "reward_parts", "response_length", "finish_reason",
                             "response_text"]).to_pylist()
        groups: dict[str, list[dict]] = {}
        for row in rows:
            groups.setdefault(row["group_id"], []).append(row)
        correct = [r["reward_parts"]["correctness"] for r in rows]
        started = time.perf_counter()
        accuracy, _, n_eval = evaluate_greedy(engine, task, task.prompts("test", limit=args.eval_prompts, seed=0),
                                              max_tokens=args.max_tokens)
        eval_s = time.perf_counter() - started
        result = {
            "options": options, "group_size": args.group_size, "temperature": args.temperature,
            "max_tokens": args.max_tokens, "prompts": len(prompts),
            "sample_correct": round(statistics.fmean(correct), 3),
            # Mixed: the group's rewards are not all equal (the format term alone can make a group mixed);
            # mixed_correctness: some right and some wrong (the signal the study is about).
            "mixed_reward_groups": round(statistics.fmean(len({r["reward"] for r in g}) > 1 for g in groups.values()), 3),
            "mixed_correct_groups": round(statistics.fmean(
                len({r["reward_parts"]["correctness"] for r in g}) > 1 for g in groups.values()), 3),
            "truncated": round(statistics.fmean(r["finish_reason"] == "length" for r in rows), 3),
            "response_tokens_mean": round(statistics.fmean(r["response_length"] for r in rows), 1),
            "greedy_accuracy": round(accuracy, 3), "eval_prompts": n_eval,
            "sample_seconds": round(sample_s, 1), "eval_seconds": round(eval_s, 1),
            "examples": [r["response_text"] for r in rows[: args.examples * args.group_size : args.group_size]],
        }
        print(json.dumps(result), flush=True)
        results.append(result)
    engine.close()
    return results


def step_cost(args: argparse.Namespace) -> dict:
    import duckdb  # noqa: F401 - imported before the loop so its import time is not a stage's

    from recpipe.config import load_config
    from recpipe.recipe import LoopRecipe
    from recpipe.store import Store

    with tempfile.TemporaryDirectory(prefix="bench-study-") as tmp:
        cfg = load_config(args.config, [f"store={tmp}/store", f"loop.steps={args.steps}", *args.set])
        started = time.perf_counter()
        with LoopRecipe(cfg) as recipe:
            recipe.run()
        wall = time.perf_counter() - started
        con = Store(cfg.store).connect(read_only=True)
        stages = dict(con.execute("SELECT stage, sum(seconds) FROM timings GROUP BY stage").fetchall())
        per_step = con.execute("SELECT stage, item, seconds, tokens FROM timings ORDER BY created_at").fetchall()
        evals = con.execute("SELECT policy_version, accuracy, n FROM evals ORDER BY policy_version").fetchall()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # On a shared machine wall time counts other people's work; the process's CPU time (one thread per
    # core) is what the same work costs on a core of its own.
    result = {"steps": args.steps, "set": args.set, "wall_seconds": round(wall, 1),
              "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
              "stage_seconds": {k: round(v, 1) for k, v in stages.items()},
              "timings": [(s, i, round(t, 2), n) for s, i, t, n in per_step], "evals": evals}
    print(json.dumps(result), flush=True)
    return result


def save_results(args: argparse.Namespace) -> None:
    from recpipe.store import Store
    from recpipe.study import save_results as save

    store = Store(args.store)
    con = store.connect(read_only=True)
    try:  # recpipe.experiment.finished_runs' condition, for runs of --steps steps
        runs = [r for (r,) in con.execute(
            "WITH s AS (SELECT run, count(DISTINCT step) AS n, max_by(policy_version, step) AS final "
            "           FROM steps GROUP BY run) "
            "SELECT s.run FROM s JOIN evals e ON e.run = s.run AND e.policy_version = s.final WHERE s.n >= $steps",
            {"steps": args.steps}).fetchall()]
    finally:
        con.close()
    print(json.dumps({"finished_runs": len(runs), "to": str(save(store, runs, args.to))}))


def restore_results(args: argparse.Namespace) -> None:
    from recpipe.store import Store
    from recpipe.study import restore_results as restore

    added = restore(Store.create(args.store), getattr(args, "from"))
    print(json.dumps({"restored_commits": added, "store": args.store}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    cal = sub.add_parser("calibrate", help="task headroom on a model (no store)")
    cal.add_argument("--candidate", action="append", required=True, help="arithmetic task options as JSON")
    cal.add_argument("--model", default="smollm2")
    cal.add_argument("--backend", default="auto")
    cal.add_argument("--prompts", type=int, default=64)
    cal.add_argument("--eval-prompts", type=int, default=200)
    cal.add_argument("--group-size", type=int, default=8)
    cal.add_argument("--temperature", type=float, default=1.0)
    cal.add_argument("--max-tokens", type=int, default=32)
    cal.add_argument("--examples", type=int, default=4, help="sample responses to print per candidate")
    cost = sub.add_parser("step-cost", help="seconds per loop step at the study's scale")
    cost.add_argument("--config", type=Path, default=None)
    cost.add_argument("--steps", type=int, default=3)
    cost.add_argument("--set", action="append", default=[], help="config override section.field=value")
    save = sub.add_parser("save-results", help="the finished runs' rows of a study, as Parquet")
    save.add_argument("--store", required=True)
    save.add_argument("--steps", type=int, required=True, help="the study's --steps (a run with fewer is unfinished)")
    save.add_argument("--to", required=True)
    restore = sub.add_parser("restore-results", help="append saved rows to a (new) store")
    restore.add_argument("--store", required=True)
    restore.add_argument("--from", required=True)
    args = parser.parse_args()
    commands = {"calibrate": calibrate, "step-cost": step_cost, "save-results": save_results,
                "restore-results": restore_results}
    commands[args.command](args)


if __name__ == "__main__":
    main()
