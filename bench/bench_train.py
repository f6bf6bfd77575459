"""Trainer throughput and padding share on a realistic batch (default: SmolLM2-135M on CPU).

    .venv/bin/python bench/bench_train.py                       # 8 groups x 8 responses, <= 48 tokens
    .venv/bin/python bench/bench_train.py --model tiny --steps 5
    .venv/bin/python bench/bench_train.py --budgets 4096 1024 --device cuda
    .venv/bin/python bench/bench_train.py --overheads 64 1000000   # bucketing vs. fill-to-budget

Each budget (TrainConfig.micro_batch_tokens) and micro-batch overhead (micro_batch_overhead_tokens;
a huge one means "fill each micro-batch to the budget") runs one warm-up step and then --steps measured steps
of the real Trainer (recompute log-probs, loss, backward, AdamW, checkpoint write) in a throw-away
store. With --memory: the peak memory of one training step (forward, backward, clip, AdamW; above the
weights and AdamW state) with log-probs computed in LM-head chunks (train.logprob_chunk_tokens=1024) and
all at once (0), from recpipe.train.compute directly (the checkpoint write is not part of it). "step s" is wall time of the compute (steps.seconds), "CPU s" the process CPU time per step
including the checkpoint write: on a shared machine the second is the steadier measure of work. Prompts are the arithmetic task's chat-templated prompts; response lengths are uniform in
[--min-response, --max-response] with random tokens (the cost does not depend on which tokens).
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch

from recpipe.algorithms import preset
from recpipe.config import TrainConfig
from recpipe.models import resolve_model
from recpipe.store import Store
from recpipe.train import Trainer, plan_micro_batches, samples_from_table

PROMPT = "What is {a} + {b}? Answer with just the number."


def make_batch(model_dir: Path, groups: int, group_size: int, lengths: tuple[int, int], seed: int) -> pa.Table:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(seed)
    rows = []
    for g in range(groups):
        messages = [{"role": "user", "content": PROMPT.format(a=rng.randint(1, 10), b=rng.randint(1, 10))}]
        prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False))
        rewards = [float(rng.random() < 0.25) for _ in range(group_size)]
        mean = statistics.fmean(rewards)
        for i in range(group_size):
            n = rng.randint(*lengths)
            rows.append({
                "rollout_id": f"g{g}/{i}", "policy_version": 0, "advantage": rewards[i] - mean, "weight": 1.0,
                "prompt_token_ids": prompt, "response_token_ids": [rng.randrange(3, len(tokenizer)) for _ in range(n)],
                "behaviour_logprobs": [-rng.uniform(0.1, 4.0) for _ in range(n)], "reward": rewards[i],
                "temperature": 1.0,
            })
    return pa.Table.from_pylist(rows)


def naive_padding(batch: pa.Table) -> float:
    """Padding share if the whole batch were one tensor padded to its longest row (no bucketing)."""
    samples = samples_from_table(batch)
    return 1 - sum(s.length for s in samples) / (len(samples) * max(s.length for s in samples))


def bench(model_dir: Path, batch: pa.Table, budget: int, overhead: int, steps: int, device: str
          ) -> dict[str, float]:
    cfg = preset("rec-oneside-nois")
    with tempfile.TemporaryDirectory() as tmp, Trainer(
        Store.create(Path(tmp) / "store"), "bench", model_dir,
        TrainConfig(micro_batch_tokens=budget, micro_batch_overhead_tokens=overhead, device=device), cfg, "rec-oneside-nois",
    ) as trainer:
        trainer.step(0, batch)  # warm-up: allocator, kernels, first checkpoint dir
        cpu_start = time.process_time()
        results = [trainer.step(step, batch) for step in range(1, steps + 1)]
        cpu_seconds = (time.process_time() - cpu_start) / steps
        dev = trainer.device.type
    rows = [r.row for r in results]
    seconds = statistics.fmean(r["seconds"] for r in rows)
    return {
        "device": dev,
        "budget": budget,
        "overhead": overhead,
        "micro_batches": len(plan_micro_batches(samples_from_table(batch), budget, overhead)),
        "step_s": seconds,
        "cpu_s": cpu_seconds,
        "save_s": statistics.fmean(r.metrics["save_seconds"] for r in results),
        "response_tok_s": rows[0]["tokens"] / seconds,
        "input_tok_s": rows[0]["padded_tokens"] * (1 - rows[0]["padding_fraction"]) / seconds,
        "padded_tokens": rows[0]["padded_tokens"],
        "padding": rows[0]["padding_fraction"],
    }


def _memory_step(module: torch.nn.Module, optimizer: torch.optim.Optimizer, plan: list, cfg: object,
                 device: torch.device) -> object:
    from recpipe.train import compute

    def step() -> None:
        _, reason = compute.accumulate_gradients(module, plan, cfg, pad_id=2, device=device)
        assert reason is None, reason
        compute.clip_and_step(module, optimizer, 1.0)
        optimizer.zero_grad(set_to_none=True)

    return step


def memory(model_dir: Path, batch: pa.Table, budget: int, chunks: list[int]) -> None:
    """Peak memory of a step above the resident weights and optimizer state, per log-prob chunk size."""
    from bench_gpu import PeakMemory
    from transformers import AutoModelForCausalLM

    from recpipe.train import compute

    cfg = preset("rec-oneside-nois")
    samples = samples_from_table(batch)
    plan = plan_micro_batches(samples, budget, 64)
    print("| logprob_chunk_tokens | micro-batches | largest micro-batch (rows x width, response tokens) "
          "| step s | peak above weights + AdamW state |")
    print("|---|---|---|---|---|")
    for chunk in chunks:
        device = torch.device("cpu")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        module = compute.prepare_policy(model, device, sharded=False, bf16=False, activation_checkpointing=False,
                                        chunk_tokens=chunk or None)
        optimizer = compute.build_optimizer(module, lr=1e-6, betas=(0.9, 0.999), weight_decay=0.0, device=device)

        shortest = min(samples, key=lambda s: s.length)
        _memory_step(module, optimizer, plan_micro_batches([shortest], budget, 64), cfg, device)()  # AdamW state
        step = _memory_step(module, optimizer, plan, cfg, device)
        with PeakMemory(device) as peak:
            start = time.perf_counter()
            step()
            seconds = time.perf_counter() - start
        big = max(plan, key=lambda mb: mb.padded_tokens)
        print(f"| {chunk} | {len(plan)} | {len(big.samples)} x {big.width}, "
              f"{sum(len(s.response) for s in big.samples)} | {seconds:.1f} | {peak.peak / 2**30:.2f} GiB |", flush=True)
        module = model = optimizer = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="tiny, smollm2 or a checkpoint dir")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--min-response", type=int, default=8)
    parser.add_argument("--max-response", type=int, default=48)
    parser.add_argument("--budgets", type=int, nargs="+", default=[4096, 1024])
    parser.add_argument("--overheads", type=int, nargs="+", default=[64])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--memory", action="store_true", help="peak memory of a step, log-probs chunked vs not")
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 1024], help="with --memory: chunk sizes")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model_dir = resolve_model(args.model)
    batch = make_batch(model_dir, args.groups, args.group_size, (args.min_response, args.max_response), seed=0)
    samples = samples_from_table(batch)
    print(f"model {model_dir.name}, {len(samples)} responses, {sum(len(s.response) for s in samples)} response "
          f"tokens, prompts {len(samples[0].prompt)} tokens, torch threads {torch.get_num_threads()}; "
          f"padding without bucketing (one padded tensor): {naive_padding(batch):.1%}\n")
    if args.memory:
        memory(model_dir, batch, args.budgets[0], args.chunks)
        return
    print("| device | micro_batch_tokens | overhead tokens | micro-batches | step s | CPU s | checkpoint s "
          "| response tok/s | input tok/s | padded tokens | padding |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for budget in args.budgets:
        for overhead in args.overheads:
            r = bench(model_dir, batch, budget, overhead, args.steps, args.device)
            print(f"| {r['device']} | {r['budget']} | {r['overhead']} | {r['micro_batches']} | {r['step_s']:.2f} "
                  f"| {r['cpu_s']:.1f} "
                  f"| {r['save_s']:.2f} | {r['response_tok_s']:.1f} | {r['input_tok_s']:.1f} | {r['padded_tokens']} "
                  f"| {r['padding']:.1%} |", flush=True)
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")


if __name__ == "__main__":
    main()
