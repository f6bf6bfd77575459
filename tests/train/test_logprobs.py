"""The trainer's log-prob recomputation against independent implementations and the sampler."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from recpipe.algorithms import preset
from recpipe.train import collate, plan_micro_batches, response_logprobs, samples_from_table
from tests.models.reference_logprobs import recompute_logprobs
from tests.train.train_batches import random_batch, sampled_batch


@pytest.fixture(scope="module")
def model(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_a_full_forward_pass_per_sequence(model, temperature):
    table = random_batch(3, preset("reinforce"), groups=3, group_size=4, temperature=temperature)
    samples = samples_from_table(table)
    with torch.no_grad():
        for mb in plan_micro_batches(samples, token_budget=64):
            logp, _ = response_logprobs(model, collate(mb, pad_id=0, device="cpu"))
            for b, s in enumerate(mb.samples):
                # One unpadded sequence at a time, full logits, then the response positions.
                ids = torch.tensor([s.prompt + s.response])
                logits = model(input_ids=ids).logits[0, len(s.prompt) - 1: -1].float() / temperature
                expected = logits.log_softmax(-1).gather(-1, torch.tensor(s.response)[:, None])[:, 0]
                torch.testing.assert_close(logp[b, : len(s.response)], expected, atol=1e-5, rtol=1e-5)
                assert (logp[b, len(s.response):] == 0).all()


def test_matches_recpipe_models_recompute_logprobs(model):
    samples = samples_from_table(random_batch(5, preset("reinforce"), groups=2, group_size=3, temperature=0.8))
    (mb,) = plan_micro_batches(samples, token_budget=10_000, overhead_tokens=10**9)  # one micro-batch
    with torch.no_grad():
        ours, _ = response_logprobs(model, collate(mb, pad_id=0, device="cpu"))
        theirs, mask = recompute_logprobs(model, [s.prompt for s in mb.samples], [s.response for s in mb.samples],
                                          temperature=0.8)
    torch.testing.assert_close(ours, theirs * mask, atol=1e-5, rtol=1e-5)


def test_reproduces_the_samplers_behaviour_logprobs(model):
    table = sampled_batch(model, [[5, 6, 7], [40, 41]], preset("reinforce"), group_size=4, max_new_tokens=6,
                          temperature=0.6, seed=0, eos_id=2, reward=lambda t: 0.0)
    samples = samples_from_table(table)
    with torch.no_grad():
        for mb in plan_micro_batches(samples, token_budget=32):
            t = collate(mb, pad_id=2, device="cpu")
            logp, entropy_sum = response_logprobs(model, t)
            torch.testing.assert_close(logp[t["response_mask"]], t["old_logprobs"][t["response_mask"]],
                                       atol=1e-5, rtol=1e-5)
            assert 0 < entropy_sum.item() / t["response_mask"].sum().item() < torch.log(torch.tensor(512.0)).item()


def test_gradient_flows_only_to_response_tokens(model):
    samples = samples_from_table(random_batch(1, preset("reinforce"), groups=1, group_size=2))
    (mb,) = plan_micro_batches(samples, token_budget=10_000, overhead_tokens=10**9)  # one micro-batch
    logp, _ = response_logprobs(model, collate(mb, pad_id=0, device="cpu"))
    assert logp.requires_grad
    logp.sum().backward()
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
