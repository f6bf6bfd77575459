"""The GPU check: the trainer's exact step and the transformers sampler on random-init Qwen2.5 shapes.

    python bench/bench_gpu.py                   # one H200: 0.5B and 1.5B shapes, < 8 minutes
    python bench/bench_gpu.py --smoke           # tiny shapes, CPU or GPU, ~1 minute on 2 cores
    python bench/bench_gpu.py --out gpu.json    # also write every measurement as JSON

Needs only torch and transformers (no pydantic, no vLLM, no network, no store): the step is
``recpipe.train.compute`` (prepare_policy, accumulate_gradients, clip_and_step) on micro-batches from
``recpipe.train.batching``, with the log-probs of ``recpipe.models.logprobs``; sampling is
``recpipe.generate.hf_engine.HFEngine``. Models are built from config with random weights (Qwen2.5-0.5B
and -1.5B shapes, a 151,936-token vocabulary); the tokenizer is recpipe's tiny byte-level BPE (token
ids past its 512 decode to nothing, which only the sampler's text would show).

Measured per shape:
- train: tokens/s (response tokens per second of a whole step: forward, backward, clip, AdamW), MFU
  against 790 TFLOP/s (an H200's measured dense bf16 matmul rate), peak memory of the step above the
  weights, gradients and optimizer state; for log-probs chunked (train.logprob_chunk_tokens=256, the
  default, and 1024) and unchunked (0), activation checkpointing off and on, and FSDP2 on one rank (the torchrun path).
- logprobs: the LM head + log-softmax alone, forward and backward, chunked vs unchunked.
- sample: tokens/s of the transformers backend (bf16 on CUDA, float32 on CPU).

Model FLOPs of a step (MFU counts these, not the recomputation of activation checkpointing):
6 x (decoder parameters) per input token + 6 x layers x hidden x width per input token (causal
attention, fwd + bwd) + 6 x vocab x hidden per response token (the LM head runs on those only).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a copy of the tree without installing recpipe

import torch  # noqa: E402

from recpipe.train import compute  # noqa: E402
from recpipe.train.batching import Sample, plan_micro_batches  # noqa: E402

H200_BF16_FLOPS = 790e12

SHAPES = {
    # Qwen2.5-0.5B / -1.5B (config.json of the released checkpoints): tied embeddings, GQA with 2 KV heads.
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    # --smoke: a vocabulary larger than the tokenizer's, like the real shapes.
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True),
}

# rec-oneside-nois, as recpipe.algorithms.PRESETS has it (LossConfig itself needs pydantic, which the GPU
# machine lacks; tests/train/test_bench_gpu.py checks these fields against the preset).
LOSS = SimpleNamespace(clip_mode="one-side", epsilon_low=0.2, epsilon_high=0.2, epsilon_low_prime=0.6,
                       epsilon_high_prime=2.0, weight="none", temp=1.0, regularizer="none", regularizer_coef=0.0,
                       std_normalize=False, drop="none")


def build_model(shape: str, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=4096, rope_theta=1_000_000.0,
                         rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: a 1.5B model's init on one CPU core takes a minute
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def synthetic_batch(groups: int, group_size: int, prompt_len: int, response_len: tuple[int, int],
                    vocab: int, seed: int = 0) -> list[Sample]:
    """A GRPO-shaped batch: groups x group_size responses of random length, rewards 0/1, advantages +-1."""
    rng = random.Random(seed)
    samples = []
    for g in range(groups):
        prompt = [rng.randrange(3, vocab) for _ in range(prompt_len)]
        for i in range(group_size):
            n = rng.randint(*response_len)
            samples.append(Sample(index=len(samples), rollout_id=f"g{g}/{i}", policy_version=0, prompt=prompt,
                                  response=[rng.randrange(3, vocab) for _ in range(n)],
                                  old_logprobs=[-rng.uniform(9.0, 13.0) for _ in range(n)],
                                  advantage=1.0 if i % 2 else -1.0, weight=1.0, reward=float(i % 2),
                                  temperature=1.0, top_p=1.0, kept=True))
    return samples


def model_flops(model: torch.nn.Module, samples: list[Sample], width_of: dict[int, int]) -> float:
    cfg = model.config
    embed = model.get_input_embeddings().weight.numel()
    decoder = sum(p.numel() for p in model.get_decoder().parameters()) - embed
    flops = 0.0
    for s in samples:
        tokens = s.length
        # causal attention: QK^T and AV over ~width/2 positions each, 2 x 2 x (width/2) x hidden fwd, x3 with bwd
        flops += 6 * decoder * tokens + 6 * cfg.num_hidden_layers * cfg.hidden_size * tokens * width_of[s.index]
        flops += 6 * cfg.vocab_size * cfg.hidden_size * len(s.response)
    return flops


class PeakMemory:
    """Peak bytes above the level at entry: CUDA allocator statistics, or on CPU the process's resident
    set sampled every millisecond (big tensors are mmap'ed and unmapped when freed, so RSS follows them)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base, self._max, self._stop = self._rss(), 0, threading.Event()

            def watch() -> None:
                while not self._stop.is_set():
                    self._max = max(self._max, self._rss())
                    time.sleep(0.001)

            self._thread = threading.Thread(target=watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, self._rss()) - self._base


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def train_case(shape: str, device: torch.device, samples: list[Sample], *, micro_batch_tokens: int,
               chunk_tokens: int, activation_checkpointing: bool, fsdp: bool, steps: int) -> dict[str, Any]:
    """Steps of the trainer's compute on one device; tokens/s, MFU and peak memory of the measured steps."""
    bf16 = device.type == "cuda"
    model = build_model(shape, device)
    module = compute.prepare_policy(model, device, sharded=fsdp, bf16=bf16,
                                    activation_checkpointing=activation_checkpointing, chunk_tokens=chunk_tokens)
    optimizer = compute.build_optimizer(module, lr=1e-6, betas=(0.9, 0.999), weight_decay=0.0, device=device)
    plan = plan_micro_batches(samples, micro_batch_tokens, overhead_tokens=1024 if bf16 else 64)
    width_of = {s.index: mb.width for mb in plan for s in mb.samples}
    flops = model_flops(model, samples, width_of)
    tokens = sum(len(s.response) for s in samples)

    def step() -> dict[str, float]:
        metrics, reason = compute.accumulate_gradients(module, plan, LOSS, pad_id=2, device=device,
                                                       autocast_bf16=bf16 and not fsdp, on_policy_version=0)
        if reason is not None:
            raise RuntimeError(reason)
        metrics["grad_norm"] = compute.clip_and_step(module, optimizer, 1.0)
        optimizer.zero_grad(set_to_none=True)
        return metrics

    step()  # warm-up: kernels, the optimizer state, allocator pools
    _sync(device)
    times, peaks = [], []
    for _ in range(steps):
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            metrics = step()
            _sync(device)
            times.append(time.perf_counter() - start)
        peaks.append(memory.peak)
    seconds = min(times)
    result = {
        "case": "train", "shape": shape, "device": str(device), "dtype": "bf16" if bf16 else "float32",
        "chunk_tokens": chunk_tokens, "activation_checkpointing": activation_checkpointing, "fsdp": fsdp,
        "micro_batches": len(plan), "responses": len(samples), "response_tokens": tokens,
        "padded_tokens": sum(mb.padded_tokens for mb in plan), "step_seconds": seconds,
        "tokens_per_second": tokens / seconds, "tflops": flops / seconds / 1e12,
        "mfu": flops / seconds / H200_BF16_FLOPS if device.type == "cuda" else None,
        "peak_step_gib": max(peaks) / 2**30, "loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
        "on_policy_mismatch": metrics.get("on_policy_mismatch"),
    }
    module = model = optimizer = None  # free the device memory before the next case
    _release(device)
    return result


def logprobs_case(device: torch.device, tokens: int, hidden: int, vocab: int, chunk_tokens: int
                  ) -> dict[str, Any]:
    """LM head + log-softmax + gather, forward and backward, on ``tokens`` hidden states."""
    from recpipe.models.logprobs import sampled_token_logprobs

    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False, device=device)
    h = torch.randn(tokens, hidden, device=device, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,), device=device)
    temperature, top_p = torch.ones(tokens, device=device), torch.ones(tokens, device=device)

    def run() -> None:
        logp, _ = sampled_token_logprobs(head, h, targets, temperature, top_p, chunk_tokens)
        logp.sum().backward()
        h.grad, head.weight.grad = None, None

    run()
    _sync(device)
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        run()
        _sync(device)
        seconds = time.perf_counter() - start
    head = h = None
    _release(device)
    return {"case": "logprobs", "device": str(device), "tokens": tokens, "hidden": hidden, "vocab": vocab,
            "chunk_tokens": chunk_tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
            "peak_gib": memory.peak / 2**30}


def sample_case(shape: str, device: torch.device, prompts: int, n: int, prompt_len: int, max_tokens: int
                ) -> dict[str, Any]:
    """Tokens/s of the transformers sampling backend on a random-init checkpoint written to a temp dir."""
    from recpipe.generate.hf_engine import HFEngine
    from recpipe.models.tiny import build_tokenizer

    dtype = "bfloat16" if device.type == "cuda" else "float32"
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(shape, device)
        model.to(getattr(torch, dtype)).save_pretrained(tmp)
        build_tokenizer(0).save_pretrained(tmp)
        del model
        _release(device)
        engine = HFEngine(tmp, model_name=shape, max_model_len=prompt_len + max_tokens, dtype=dtype,
                          device=device.type, max_batch_size=prompts * n)
        rng = random.Random(0)
        ids = [[rng.randrange(3, 500) for _ in range(prompt_len)] for _ in range(prompts)]
        engine.sample(ids[:1], n=1, temperature=1.0, top_p=1.0, max_tokens=4, seed=0)  # warm-up
        _sync(device)
        start = time.perf_counter()
        out = engine.sample(ids, n=n, temperature=1.0, top_p=1.0, max_tokens=max_tokens, seed=0)
        _sync(device)
        seconds = time.perf_counter() - start
        engine.close()
    generated = sum(len(s.token_ids) for group in out for s in group)
    finite = all(math.isfinite(x) for group in out for s in group for x in s.logprobs)
    _release(device)
    return {"case": "sample", "shape": shape, "device": str(device), "dtype": dtype, "rows": prompts * n,
            "prompt_len": prompt_len, "generated_tokens": generated, "seconds": seconds,
            "tokens_per_second": generated / seconds, "logprobs_finite": finite}


def _guarded(run: Callable[[], dict[str, Any]], label: dict[str, Any]) -> dict[str, Any]:
    """A case that runs out of memory is a result ("oom"), not the end of the benchmark."""
    try:
        return run()
    except torch.OutOfMemoryError as exc:
        _release(torch.device("cuda"))
        return {**label, "oom": str(exc).splitlines()[0]}


def plan_cases(smoke: bool, device: torch.device) -> list[tuple[dict[str, Any], Callable[[], dict[str, Any]]]]:
    cases: list[tuple[dict[str, Any], Callable[[], dict[str, Any]]]] = []
    if smoke:
        shapes = {"smoke": dict(groups=2, group_size=4, prompt_len=24, response=(8, 40), mb=256, steps=1)}
        head = dict(tokens=512, hidden=64, vocab=8192)
        sampling = dict(prompts=2, n=2, prompt_len=8, max_tokens=8)
    else:
        # 96 prompts x 8 responses of up to 1024 tokens is the paper's step; 16 x 8 of up to 1024 here (the
        # same micro-batches, fewer of them), so every case fits the 8-minute budget.
        common = dict(groups=16, group_size=8, prompt_len=128, response=(256, 1024), mb=16384, steps=2)
        shapes = {"qwen2.5-0.5b": common, "qwen2.5-1.5b": common}
        head = dict(tokens=16384, hidden=1536, vocab=151936)
        sampling = dict(prompts=32, n=8, prompt_len=128, max_tokens=256)
    for shape, s in shapes.items():
        samples = synthetic_batch(s["groups"], s["group_size"], s["prompt_len"], s["response"],
                                  SHAPES[shape]["vocab_size"])
        variants = [(256, False, False), (1024, False, False), (0, False, False), (256, True, False),
                    (256, False, True)]
        for chunk, ac, fsdp in variants:
            label = {"case": "train", "shape": shape, "chunk_tokens": chunk, "activation_checkpointing": ac,
                     "fsdp": fsdp}
            cases.append((label, lambda shape=shape, samples=samples, s=s, chunk=chunk, ac=ac, fsdp=fsdp: train_case(
                shape, device, samples, micro_batch_tokens=s["mb"], chunk_tokens=chunk, activation_checkpointing=ac,
                fsdp=fsdp, steps=s["steps"])))
    for chunk in (256, 1024, 0):
        label = {"case": "logprobs", "chunk_tokens": chunk}
        cases.append((label, lambda chunk=chunk: logprobs_case(device, chunk_tokens=chunk, **head)))
    for shape in shapes:
        cases.append(({"case": "sample", "shape": shape}, lambda shape=shape: sample_case(shape, device, **sampling)))
    return cases


def _line(r: dict[str, Any]) -> str:
    if "oom" in r:
        return f"{r['case']:8s} {json.dumps({k: v for k, v in r.items() if k != 'oom'})}: OUT OF MEMORY"
    if r["case"] == "train":
        mfu = f"  MFU {r['mfu']:.1%}" if r["mfu"] is not None else ""
        return (f"train    {r['shape']:13s} chunk={r['chunk_tokens']:<5d} ac={r['activation_checkpointing']!s:5s} "
                f"fsdp={r['fsdp']!s:5s} {r['tokens_per_second']:9.0f} tok/s  {r['tflops']:7.2f} TFLOP/s{mfu}  "
                f"peak {r['peak_step_gib']:.2f} GiB  ({r['micro_batches']} micro-batches, {r['response_tokens']} tokens)")
    if r["case"] == "logprobs":
        return (f"logprobs chunk={r['chunk_tokens']:<5d} {r['tokens']} x {r['vocab']}: {r['seconds'] * 1e3:8.1f} ms "
                f"fwd+bwd, peak {r['peak_gib']:.2f} GiB")
    return (f"sample   {r['shape']:13s} {r['dtype']} {r['rows']} rows: {r['tokens_per_second']:.0f} tok/s "
            f"({r['generated_tokens']} tokens in {r['seconds']:.1f} s)")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script on any machine")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--only", choices=["train", "logprobs", "sample"], help="run one kind of case")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    # FSDP2 on one rank: the torchrun path's sharding and mixed-precision policy, without torchrun.
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1, **({"device_id": device} if device.type == "cuda" else {}))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
    print(f"bench_gpu: torch {torch.__version__}, {name}{' (smoke)' if args.smoke else ''}", flush=True)
    results = []
    start = time.perf_counter()
    for label, run in plan_cases(args.smoke, device):
        if args.only and label["case"] != args.only:
            continue
        result = _guarded(run, label)
        results.append(result)
        print(_line(result), flush=True)
    print(f"bench_gpu: {time.perf_counter() - start:.0f} s", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"device": name, "torch": torch.__version__, "results": results}, indent=1))
    dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
