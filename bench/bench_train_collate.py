"""Batch preparation alone: Arrow batch -> validated samples -> micro-batch plan -> padded tensors (no model).

    .venv/bin/python bench/bench_train_collate.py                  # 64 x 256 and 512 x 1024 response tokens
    .venv/bin/python bench/bench_train_collate.py --shapes 64x256 --repeats 5

The batch is shaped like recpipe.select's Batch.rollouts (list<int32> tokens, list<float32> log-probs),
prompts of 40-80 tokens, response lengths uniform in [n/2, n]. Times are the median over --repeats of
samples_from_table (with the vocabulary check, as the trainer calls it), plan_micro_batches and collate
of every micro-batch to CPU tensors (micro_batch_tokens 4096, the default), as process CPU time (steadier
than wall time on a shared machine; all of it runs on one thread).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pyarrow as pa
import torch

from recpipe.train import collate, plan_micro_batches, samples_from_table

VOCAB = 49152


def make_table(rows: int, max_response: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    prompt_len = rng.integers(40, 81, rows)
    response_len = rng.integers(max_response // 2, max_response + 1, rows)

    def ragged(lengths: np.ndarray, values: np.ndarray) -> pa.ListArray:
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))

    return pa.table({
        "rollout_id": pa.array([f"r{i}" for i in range(rows)]),
        "policy_version": pa.array(np.zeros(rows, np.int32)),
        "advantage": pa.array(rng.normal(size=rows)),
        "weight": pa.array(np.ones(rows)),
        "prompt_token_ids": ragged(prompt_len, rng.integers(3, VOCAB, prompt_len.sum(), dtype=np.int32)),
        "response_token_ids": ragged(response_len, rng.integers(3, VOCAB, response_len.sum(), dtype=np.int32)),
        "behaviour_logprobs": ragged(response_len, -rng.uniform(0.1, 4.0, response_len.sum()).astype(np.float32)),
        "reward": pa.array(rng.integers(0, 2, rows).astype(np.float64)),
        "temperature": pa.array(np.ones(rows)),
    })


def bench(table: pa.Table, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {"samples_from_table": [], "plan_micro_batches": [], "collate": []}
    for _ in range(repeats):
        t0 = time.process_time()
        samples = samples_from_table(table, VOCAB)
        t1 = time.process_time()
        plan = plan_micro_batches(samples, 4096, 64)
        t2 = time.process_time()
        for mb in plan:
            collate(mb, pad_id=0, device="cpu")
        t3 = time.process_time()
        for key, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            times[key].append(seconds)
    return {key: statistics.median(v) for key, v in times.items()} | {"micro_batches": len(plan)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["64x256", "512x1024"], help="ROWSxMAX_RESPONSE")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| responses x max tokens | response tokens | micro-batches | samples_from_table CPU ms "
          "| plan CPU ms | collate (all) CPU ms | total CPU ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for shape in args.shapes:
        rows, max_response = (int(x) for x in shape.split("x"))
        table = make_table(rows, max_response)
        r = bench(table, args.repeats)
        tokens = pa.compute.sum(pa.compute.list_value_length(table["response_token_ids"])).as_py()
        total = r["samples_from_table"] + r["plan_micro_batches"] + r["collate"]
        print(f"| {shape} | {tokens} | {r['micro_batches']} | {r['samples_from_table'] * 1e3:.1f} "
              f"| {r['plan_micro_batches'] * 1e3:.1f} | {r['collate'] * 1e3:.1f} | {total * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    main()
