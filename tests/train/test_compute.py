"""recpipe.train.compute: activation checkpointing changes no gradient; ranks get balanced shares."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from recpipe.algorithms import preset
from recpipe.config import TrainConfig
from recpipe.train import Trainer, plan_micro_batches, samples_from_table
from recpipe.train.compute import accumulate_gradients, assign_micro_batches, prepare_policy
from tests.train.train_batches import random_batch

CPU = torch.device("cpu")


def _gradients(tiny_model, plan, cfg, activation_checkpointing: bool) -> tuple[dict, dict]:
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    module = prepare_policy(model, CPU, sharded=False, bf16=False,
                            activation_checkpointing=activation_checkpointing, chunk_tokens=16)
    metrics, reason = accumulate_gradients(module, plan, cfg, pad_id=0, device=CPU, on_policy_version=0)
    assert reason is None
    return metrics, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_changes_no_gradient(tiny_model):
    cfg = preset("rec-oneside-is")
    plan = plan_micro_batches(samples_from_table(random_batch(3, cfg, groups=3)), token_budget=64)
    assert len(plan) > 1
    plain_metrics, plain = _gradients(tiny_model, plan, cfg, False)
    ac_metrics, ac = _gradients(tiny_model, plan, cfg, True)
    assert plain.keys() == ac.keys() and len(plain) > 10
    for name, grad in plain.items():
        torch.testing.assert_close(ac[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    assert ac_metrics == pytest.approx(plain_metrics, rel=1e-6)
    assert plain_metrics["on_policy_mismatch"] > 0  # random behaviour log-probs, all from version 0


def test_ranks_get_shares_balanced_by_padded_tokens():
    samples = samples_from_table(random_batch(5, preset("grpo"), groups=6, group_size=4, response_len=(1, 30)))
    plan = plan_micro_batches(samples, token_budget=40, overhead_tokens=0)
    for ranks in (1, 2, 3):
        shares = assign_micro_batches(plan, ranks)
        assert sorted(id(mb) for s in shares for mb in s) == sorted(id(mb) for mb in plan)  # each once
        loads = [sum(mb.padded_tokens for mb in s) for s in shares]
        assert max(loads) - min(loads) <= max(mb.padded_tokens for mb in plan)
        assert assign_micro_batches(plan, ranks) == shares  # every rank computes the same split


def test_bf16_needs_cuda(store, tiny_model):
    with pytest.raises(ValueError, match="precision='bf16' needs CUDA"):
        Trainer(store, "r", tiny_model, TrainConfig(precision="bf16", device="cpu"))
