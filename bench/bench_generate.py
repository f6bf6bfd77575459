"""Generation throughput: vLLM vs the transformers backend on the same model, prompts and settings.

    .venv/bin/python bench/bench_generate.py          # SmolLM2; arithmetic <= 64 and GSM8K <= 256 tokens
    .venv/bin/python bench/bench_generate.py --models tiny --prompts 4 --n 4 --workloads arithmetic:16

Each (model, backend) runs in its own subprocess (vLLM binds the process's CPU
threads, which would skew a transformers run after it): engine start time, one
warm-up call, then the timed call (the task's train prompts through the chat template, temperature 1.0,
top_p 1.0, top_k off); tokens/s counts generated response tokens (EOS included). Then the
time to swap a checkpoint into the running engine (`engine.load_weights`,
median of 3). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from recpipe.generate import make_engine, tokenize_prompts, vllm_available
from recpipe.models import resolve_model
from recpipe.tasks import get_task


def bench_one(model: str, backend: str, args: argparse.Namespace) -> dict[str, object]:
    checkpoint = resolve_model(model)
    context = json.loads((checkpoint / "config.json").read_text())["max_position_embeddings"]
    start = time.perf_counter()
    engine = make_engine(checkpoint, backend=backend.removesuffix("-compiled"), seed=0,
                         max_model_len=min(1024, context),
                         model_name=model, enforce_eager=not backend.endswith("-compiled"))
    start_s = time.perf_counter() - start
    prompts = get_task(args.task).prompts("train", limit=args.prompts, seed=0)
    ids = tokenize_prompts(engine.tokenizer, prompts)
    settings = dict(n=args.n, temperature=args.temperature, top_p=1.0, max_tokens=args.max_tokens)
    engine.sample(ids[:2], **(settings | {"n": 2, "max_tokens": 8}), seed=123)  # warm-up
    start = time.perf_counter()
    groups = engine.sample(ids, **settings, seed=0)
    gen_s = time.perf_counter() - start
    tokens = sum(len(s.token_ids) for g in groups for s in g)
    swaps = []
    for _ in range(3):
        engine.load_weights(checkpoint)
        swaps.append(engine.last_load_seconds)
    engine.close()
    return {
        "workload": f"{args.task} x{args.n} <={args.max_tokens}",
        "prompt_tokens": sum(len(i) for i in ids) / len(ids),
        "model": model,
        "backend": backend,
        "start_s": start_s,
        "gen_s": gen_s,
        "tokens": tokens,
        "tok_per_s": tokens / gen_s,
        "swap_s": statistics.median(swaps),
        "stopped": sum(s.finish_reason == "stop" for g in groups for s in g) / sum(len(g) for g in groups),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="smollm2", help="Comma-separated model specs (tiny: the test model).")
    parser.add_argument("--backends", default="vllm,vllm-compiled,hf",
                        help="Comma-separated: vllm (enforce_eager), vllm-compiled, hf.")
    parser.add_argument("--workloads", default="arithmetic:64,gsm8k:256",
                        help="Comma-separated TASK:MAX_TOKENS (every model and backend runs each).")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8, help="Samples per prompt.")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "BACKEND"), help=argparse.SUPPRESS)
    parser.add_argument("--task", default="arithmetic", help=argparse.SUPPRESS)
    parser.add_argument("--max-tokens", type=int, default=64, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # child process: one measurement, as JSON on the last stdout line
        print(json.dumps(bench_one(*args.one, args)))
        return
    backends = [b for b in args.backends.split(",") if not b.startswith("vllm") or vllm_available()]
    rows = []
    for model in args.models.split(","):
        for workload in args.workloads.split(","):
            task, max_tokens = workload.split(":")
            for backend in backends:
                child = [sys.executable, __file__, "--one", model, backend, "--task", task,
                         "--max-tokens", max_tokens, "--prompts", str(args.prompts), "--n", str(args.n),
                         "--temperature", str(args.temperature)]
                out = subprocess.run(child, check=True, stdout=subprocess.PIPE, text=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"\n{args.prompts} prompts x {args.n} samples, T={args.temperature}, top_p 1, float32\n")
    print("| model | workload | prompt tokens | backend | engine start (s) | generate (s) | tokens | tokens/s "
          "| vs hf | stopped | weight swap (s) |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    hf = {(r["model"], r["workload"]): r["tok_per_s"] for r in rows if r["backend"] == "hf"}
    for r in rows:
        ratio = r["tok_per_s"] / hf[(r["model"], r["workload"])] if (r["model"], r["workload"]) in hf else None
        print(
            f"| {r['model']} | {r['workload']} | {r['prompt_tokens']:.0f} | {r['backend']} | {r['start_s']:.1f} | "
            f"{r['gen_s']:.2f} | {r['tokens']} | {r['tok_per_s']:.0f} | "
            f"{'' if ratio is None else f'{ratio:.1f}x'} | {r['stopped']:.0%} | {r['swap_s']:.3f} |"
        )


if __name__ == "__main__":  # vLLM may spawn processes: keep the guard
    main()
