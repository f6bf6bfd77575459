"""The transformers sampling backend alone: tokens/s at long responses, with and without stop strings.

    .venv/bin/python bench/bench_hf_engine.py                            # tiny and SmolLM2, <= 256 tokens
    .venv/bin/python bench/bench_hf_engine.py --models tiny --prompts 8 --n 8

In-process HFEngine (float32, CPU unless CUDA is there), one warm-up call, then the timed call per
stop setting: none, and stop strings that a response seldom contains (the check still runs every
token). tokens/s counts generated response tokens; per CPU second is the steadier measure on a
shared machine. "digest" hashes every sample (token ids,
log-probs, text, finish reason): two versions of the backend that sample the same must print the same.
"""

from __future__ import annotations

import argparse
import hashlib
import time

import torch

from recpipe.generate import make_engine, tokenize_prompts
from recpipe.models import resolve_model
from recpipe.tasks import get_task

STOPS = {"none": [], "stop strings": ["\n\n\n\n", "</answer>", "Question:"]}


def digest(groups: list) -> str:
    h = hashlib.sha256()
    for group in groups:
        for s in group:
            h.update(repr((s.token_ids, s.logprobs, s.text, s.finish_reason)).encode())
    return h.hexdigest()[:12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"])
    parser.add_argument("--task", default="gsm8k")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| model | stop | rows | tokens | stopped | generate s | CPU s | tokens/s | tokens per CPU s | digest |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for model in args.models:
        engine = make_engine(resolve_model(model), backend="hf", seed=0, max_model_len=1024, model_name=model,
                             device=args.device)
        ids = tokenize_prompts(engine.tokenizer, get_task(args.task).prompts("train", limit=args.prompts, seed=0))
        engine.sample(ids[:1], n=2, temperature=1.0, top_p=1.0, max_tokens=8, seed=123)  # warm-up
        for name, stop in STOPS.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            groups = engine.sample(ids, n=args.n, temperature=1.0, top_p=1.0, max_tokens=args.max_tokens,
                                   stop=stop, seed=0)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            samples = [s for g in groups for s in g]
            tokens = sum(len(s.token_ids) for s in samples)
            stopped = sum(s.finish_reason == "stop" for s in samples)
            print(f"| {model} | {name} | {len(samples)} | {tokens} | {stopped} | {seconds:.2f} | {cpu_seconds:.2f} "
                  f"| {tokens / seconds:.0f} | {tokens / cpu_seconds:.0f} | {digest(groups)} |", flush=True)
        engine.close()


if __name__ == "__main__":
    main()
