"""The step's compute: batch tensors -> log-probs -> loss -> gradient -> optimizer, on one rank or N.

    module = prepare_policy(policy, device, sharded=world > 1, bf16=cuda, activation_checkpointing=False,
                            chunk_tokens=256)
    optimizer = build_optimizer(module, lr=1e-5, betas=(0.9, 0.999), weight_decay=0.0, device=device)
    sums, reason = accumulate_gradients(module, plan, loss_cfg, pad_id=0, device=device)
    grad_norm = clip_and_step(module, optimizer, grad_clip=1.0)      # when reason is None

No store, no config, no pydantic: this module, ``batching``'s planner/collate and ``recpipe.models.logprobs``
import only torch (``loss_cfg`` is any object with LossConfig's fields), so ``bench/bench_gpu.py`` runs the
trainer's exact step where only torch and transformers are installed.

Several ranks (torchrun, ``recpipe train --nproc N``): the model is sharded with FSDP2 (each decoder
layer one unit, the rest, i.e. embeddings, final norm and LM head, in the root unit). The math is the
one-rank math: every rank plans the same micro-batches from the whole batch, takes a share balanced by
padded tokens (``assign_micro_batches``), and scales its losses by the *whole* batch's token count, so the
summed (not averaged: divide factor 1) reduce-scattered gradients are the one-rank gradient; clipping
sees the global norm. A rank with fewer micro-batches runs zero-loss ones so every rank makes the same
collective calls.

Precision: float32 master weights, gradients, reductions and optimizer state everywhere. With bf16 on
CUDA the decoder layers compute in bfloat16 (FSDP2: ``MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=float32)`` on the layers; one rank: autocast); the LM head and the softmax stay float32.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from recpipe.algorithms.losses import policy_loss
from recpipe.errors import ConfigError
from recpipe.models.logprobs import response_logprobs
from recpipe.train.batching import MicroBatch, collate

_SUM_KEYS = ("loss", "policy_loss", "regularizer_loss", "entropy", "clip_fraction", "ratio_mean", "mismatch",
             "seq_ratio_mean", "on_policy_mismatch", "on_policy_tokens", "non_finite_loss")
_MAX_KEYS = ("ratio_max", "seq_ratio_max")


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_world_size() -> int:
    """Ranks torchrun started (WORLD_SIZE), 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device_type: str) -> torch.device | None:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA) unless already joined.

    Returns this rank's CUDA device (LOCAL_RANK) on CUDA, else None.
    """
    cuda = device_type == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else None
    if device is not None:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device)
    return device


class PolicyLogprobs(torch.nn.Module):
    """The policy with its log-prob head as one module: the root FSDP unit, whose forward gathers the
    embeddings, final norm and LM head once per micro-batch (the LM head is then used chunk by chunk)."""

    def __init__(self, policy: torch.nn.Module, chunk_tokens: int | None = None):
        super().__init__()
        self.policy = policy
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
                temperature: torch.Tensor, top_p: torch.Tensor, response_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = {"input_ids": input_ids, "positions": positions, "targets": targets, "temperature": temperature,
                   "top_p": top_p, "response_mask": response_mask}
        return response_logprobs(self.policy, tensors, self.chunk_tokens)


def prepare_policy(policy: torch.nn.Module, device: torch.device, *, sharded: bool, bf16: bool,
                   activation_checkpointing: bool, chunk_tokens: int | None = None) -> PolicyLogprobs:
    """Wrap a float32 transformers causal LM for training: activation checkpointing, FSDP2 when sharded.

    activation_checkpointing: keep only each decoder layer's input for backward and recompute the layer
    there (transformers' gradient checkpointing, non-reentrant): ~1/3 more compute, activation memory of
    one layer instead of all of them.
    """
    if bf16 and device.type != "cuda":
        raise ConfigError("bf16 needs CUDA (on CPU bfloat16 matmuls are slower than float32)")
    if activation_checkpointing:
        policy.config.use_cache = False  # a KV cache is of no use in training, and transformers warns
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    module = PolicyLogprobs(policy, chunk_tokens)
    if sharded:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        layers = policy.get_decoder().layers
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        for layer in layers:
            fully_shard(layer, **({"mp_policy": mp} if mp else {}))
        fully_shard(module)  # root: float32 compute for embeddings, final norm and LM head
        for unit in module.modules():
            if isinstance(unit, FSDPModule):
                # Sum over ranks, not mean: each rank's loss is already scaled to the whole batch. A plain
                # SUM (no pre-multiplied sum), which gloo has too.
                unit.set_gradient_divide_factor(1.0)
                unit.set_force_sum_reduction_for_comms(True)
    return module


def build_optimizer(module: torch.nn.Module, *, lr: float, betas: Sequence[float], weight_decay: float,
                    device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (nanoGPT: decaying norms and biases only hurts)."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = True if device.type == "cuda" else None
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused)


def assign_micro_batches(plan: list[MicroBatch], ranks: int) -> list[list[MicroBatch]]:
    """Each rank's share of the plan: longest-processing-time first, by padded tokens (the compute)."""
    shares: list[list[MicroBatch]] = [[] for _ in range(ranks)]
    load = [0] * ranks
    for mb in sorted(plan, key=lambda m: -m.padded_tokens):  # stable: the same on every rank
        r = min(range(ranks), key=lambda i: (load[i], i))
        shares[r].append(mb)
        load[r] += mb.padded_tokens
    return shares


def _forward(module: PolicyLogprobs, tensors: dict[str, torch.Tensor], autocast_bf16: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    context = torch.autocast("cuda", dtype=torch.bfloat16) if autocast_bf16 else nullcontext()
    with context:
        return module(tensors["input_ids"], tensors["positions"], tensors["targets"], tensors["temperature"],
                      tensors["top_p"], tensors["response_mask"])


def accumulate_gradients(module: PolicyLogprobs, plan: list[MicroBatch], loss_cfg: Any, *, pad_id: int,
                         device: torch.device, autocast_bf16: bool = False,
                         on_policy_version: int | None = None,
                         token_logprobs: dict[str, np.ndarray] | None = None) -> tuple[dict[str, float], str | None]:
    """Forward/backward over this rank's share of ``plan`` (the whole batch's micro-batches).

    Every micro-batch's loss is scaled to the whole batch (token mean over all of its response tokens),
    so the gradients add up to the batch gradient, on one rank or summed over ranks. Returns the batch's
    metrics (reduced over ranks; means token- or response-weighted, maxima maxima) and the reason the
    step cannot be applied (a non-finite loss), or None. on_policy_mismatch: mean |l - l_old| over the
    tokens of rollouts sampled by ``on_policy_version`` (the weights being trained), where sampler and
    trainer compute the same distribution and it should be ~0; None when the batch holds none.
    token_logprobs: when a dict, filled with every response's per-token log-probs under the weights being
    trained (rollout_id -> float32 array, the l of the loss's ratio exp(l - l_old)), gathered from every
    rank onto each.
    """
    samples = [s for mb in plan for s in mb.samples]
    total_tokens = sum(len(s.response_ids) for s in samples)
    total_responses = len(samples)
    if total_tokens == 0:
        raise ValueError("batch has no response tokens; nothing to train on")
    rank, ranks = world()
    shares = assign_micro_batches(plan, ranks)
    mine, rounds = shares[rank], max(len(s) for s in shares)
    sums = dict.fromkeys(_SUM_KEYS, 0.0)
    maxima = dict.fromkeys(_MAX_KEYS, 0.0)
    for i in range(rounds):
        if i >= len(mine):
            # Same number of forward/backward passes (and so of collectives) on every rank: a zero loss.
            shortest = min(samples, key=lambda s: s.length)
            tensors = collate(MicroBatch([shortest], shortest.length), pad_id, device)
            logp, _ = _forward(module, tensors, autocast_bf16)
            (logp.sum() * 0.0).backward()
            continue
        mb = mine[i]
        tensors = collate(mb, pad_id, device)
        logp, entropy = _forward(module, tensors, autocast_bf16)
        loss, m = policy_loss(logp, tensors["old_logprobs"], tensors["advantages"], tensors["response_mask"],
                              loss_cfg, tensors["weights"], total_tokens=total_tokens,
                              total_responses=total_responses)
        if not math.isfinite(m["loss"]):
            sums["non_finite_loss"] += 1.0
            sums["loss"] = m["loss"]
            if ranks == 1:
                break  # no other rank waits for this one's collectives
        loss.backward()
        if token_logprobs is not None:
            values = logp.detach().float().cpu().numpy()
            mask = tensors["response_mask"].cpu().numpy()
            for row, sample in enumerate(mb.samples):
                token_logprobs[sample.rollout_id] = values[row][mask[row]]
        n_tok, n_resp = m["tokens"], len(mb.samples)
        for key in ("loss", "policy_loss", "regularizer_loss"):
            sums[key] += m[key]
        for key in ("clip_fraction", "ratio_mean", "mismatch"):
            sums[key] += m[key] * n_tok
        sums["seq_ratio_mean"] += m["seq_ratio_mean"] * n_resp
        sums["entropy"] += float(entropy)
        maxima["ratio_max"] = max(maxima["ratio_max"], m["ratio_max"])
        maxima["seq_ratio_max"] = max(maxima["seq_ratio_max"], m["seq_ratio_max"])
        if on_policy_version is not None:
            fresh = torch.tensor([s.policy_version == on_policy_version for s in mb.samples], device=device)
            on = tensors["response_mask"] & fresh[:, None]
            with torch.no_grad():
                gap = (logp.detach() - tensors["old_logprobs"]).abs()
                sums["on_policy_mismatch"] += float(torch.where(on, gap, 0.0).sum())
            sums["on_policy_tokens"] += float(on.sum())
    if ranks > 1:
        packed = torch.tensor([sums[k] for k in _SUM_KEYS], dtype=torch.float64)
        peaks = torch.tensor([maxima[k] for k in _MAX_KEYS], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            packed, peaks = packed.to(device), peaks.to(device)
        dist.all_reduce(packed)
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        sums = dict(zip(_SUM_KEYS, packed.tolist(), strict=True))
        maxima = dict(zip(_MAX_KEYS, peaks.tolist(), strict=True))
        if token_logprobs is not None:
            shards: list[dict[str, np.ndarray] | None] = [None] * ranks
            dist.all_gather_object(shards, token_logprobs)
            for shard in shards:
                token_logprobs.update(shard or {})
    if sums.pop("non_finite_loss"):
        return {"loss": sums["loss"]}, f"non-finite loss {sums['loss']}"
    for key in ("clip_fraction", "ratio_mean", "mismatch", "entropy"):
        sums[key] /= total_tokens
    sums["seq_ratio_mean"] /= total_responses
    fresh_tokens = sums.pop("on_policy_tokens")
    sums["on_policy_mismatch"] = sums["on_policy_mismatch"] / fresh_tokens if fresh_tokens else math.nan
    if not fresh_tokens:
        sums.pop("on_policy_mismatch")
    return {**sums, **maxima}, None


def clip_and_step(module: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float) -> float:
    """Clip to the global gradient norm (over every rank's shards) and step unless it is not finite."""
    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2: the norm over all shards
        norm = norm.full_tensor()
    grad_norm = float(norm)
    if math.isfinite(grad_norm):
        optimizer.step()
    return grad_norm


@contextmanager
def seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Randomness of one step depends on (seed, step) only, not on what ran before in this process."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
