"""Generation throughput: vLLM vs the transformers backend on the same model, prompts and settings.

    .venv/bin/python bench/bench_generate.py                      # SmolLM2 and tiny, 16 prompts x 8 x 64 tokens
    .venv/bin/python bench/bench_generate.py --models tiny --prompts 4 --n 4 --max-tokens 16

Each (model, backend) runs in its own subprocess (vLLM binds the process's CPU
threads, which would skew a transformers run after it): engine start time, one
warm-up call, then the timed call (arithmetic prompts through the chat template, temperature 1.0, top_p 1.0,
top_k off); tokens/s counts generated response tokens (EOS included). Then the
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
    start = time.perf_counter()
    engine = make_engine(checkpoint, backend=backend, seed=0, max_model_len=512, model_name=model)
    start_s = time.perf_counter() - start
    prompts = get_task("arithmetic").prompts("train", limit=args.prompts, seed=0)
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
    parser.add_argument("--models", default="smollm2,tiny", help="Comma-separated model specs.")
    parser.add_argument("--backends", default="vllm,hf", help="Comma-separated backends.")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8, help="Samples per prompt.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # child process: one measurement, as JSON on the last stdout line
        print(json.dumps(bench_one(*args.one, args)))
        return
    backends = [b for b in args.backends.split(",") if b != "vllm" or vllm_available()]
    rows = []
    for model in args.models.split(","):
        for backend in backends:
            child = [
                sys.executable,
                __file__,
                "--one",
                model,
                backend,
                "--prompts",
                str(args.prompts),
                "--n",
                str(args.n),
                "--max-tokens",
                str(args.max_tokens),
                "--temperature",
                str(args.temperature),
            ]
            out = subprocess.run(child, check=True, stdout=subprocess.PIPE, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    print(
        f"\n{args.prompts} prompts x {args.n} samples x <= {args.max_tokens} tokens, T={args.temperature}\n"
    )
    print(
        "| model | backend | engine start (s) | generate (s) | tokens | tokens/s | stopped | weight swap (s) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['backend']} | {r['start_s']:.1f} | {r['gen_s']:.2f} | {r['tokens']} | "
            f"{r['tok_per_s']:.0f} | {r['stopped']:.0%} | {r['swap_s']:.3f} |"
        )


if __name__ == "__main__":  # vLLM may spawn processes: keep the guard
    main()
