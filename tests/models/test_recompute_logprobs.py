"""recompute_logprobs and apply_top_p on the tiny model and on hand-made logits."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from recpipe.models import apply_top_p, sampled_token_logprobs
from tests.models.reference_logprobs import recompute_logprobs


@pytest.fixture(scope="module")
def policy(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def test_apply_top_p_keeps_the_nucleus_like_vllm():
    # probs 0.5, 0.3, 0.15, 0.05: ascending cumsum 0.05, 0.2, 0.5, 1.0; drop where cumsum <= 1 - 0.8 = 0.2.
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = apply_top_p(logits, 0.8)
    assert torch.isfinite(kept).tolist() == [True, True, False, False]
    assert torch.equal(kept[:2], logits[:2])
    assert torch.isfinite(apply_top_p(logits, 0.01)).tolist() == [True, False, False, False]  # at least one
    assert apply_top_p(logits, 1.0) is logits


def _one_by_one(model, prompt, response, temperature):
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_batched_right_padded_matches_one_sequence_at_a_time(policy, temperature):
    prompts = [[1, 40, 41, 42, 2], [1, 50, 51], [1, 60, 61, 62, 63, 64, 65, 2]]
    responses = [[70, 71, 72], [80, 81, 82, 83, 84, 85], [90]]
    with torch.no_grad():
        logp, mask = recompute_logprobs(policy, prompts, responses, temperature)
        assert logp.shape == mask.shape == (3, 6)
        assert mask.sum(-1).tolist() == [3, 6, 1]
        for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            expected = _one_by_one(policy, p, r, temperature)
            torch.testing.assert_close(logp[b, : len(r)], expected, atol=1e-5, rtol=0)
            assert (logp[b, len(r) :] == 0).all()


def test_temperature_changes_the_logprobs(policy):
    with torch.no_grad():
        hot, _ = recompute_logprobs(policy, [[1, 40, 41]], [[70, 71, 72]], temperature=1.0)
        cold, _ = recompute_logprobs(policy, [[1, 40, 41]], [[70, 71, 72]], temperature=0.5)
    assert (hot - cold).abs().max() > 1e-3


def test_recompute_logprobs_is_differentiable(policy):
    logp, mask = recompute_logprobs(policy, [[1, 40, 41], [1, 50]], [[70, 71], [80]], temperature=0.7)
    (logp * mask).sum().backward()
    grad = policy.get_input_embeddings().weight.grad
    assert grad is not None and grad.abs().sum() > 0
    policy.zero_grad(set_to_none=True)


def test_recompute_logprobs_top_p_renormalizes(policy):
    with torch.no_grad():
        full, _ = recompute_logprobs(policy, [[1, 40, 41]], [[70]], temperature=1.0)
        nucleus, _ = recompute_logprobs(policy, [[1, 40, 41]], [[70]], temperature=1.0, top_p=0.5)
    # Either the token left the nucleus (-inf) or its probability grew by the renormalization.
    value = nucleus.item()
    assert value == -math.inf or value > full.item()


def test_recompute_logprobs_rejects_bad_input(policy):
    with pytest.raises(ValueError, match="temperature"):
        recompute_logprobs(policy, [[1]], [[2]], temperature=0.0)
    with pytest.raises(ValueError, match="rows"):
        recompute_logprobs(policy, [[1], [2]], [[2]], temperature=1.0)
    with pytest.raises(ValueError, match="at least one token"):
        recompute_logprobs(policy, [[]], [[2]], temperature=1.0)


def test_recompute_logprobs_with_empty_responses(policy):
    logp, mask = recompute_logprobs(policy, [[1, 2], [1]], [[], []], temperature=1.0)
    assert logp.shape == mask.shape == (2, 0)


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_chunked_lm_head_equals_unchunked_in_value_and_gradient(top_p):
    # A direct tensor test: 37 rows, chunks of 8 (the last one short), per-row temperatures.
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    temperature, nucleus = torch.rand(37) + 0.5, torch.full((37,), top_p)
    results = {}
    for chunk in (None, 8):
        logp, entropy = sampled_token_logprobs(head, hidden, targets, temperature, nucleus, chunk)
        (logp * torch.linspace(-1, 1, 37)).sum().backward()
        results[chunk] = (logp.detach(), entropy, _grads(head)["weight"], hidden.grad.clone())
        hidden.grad = None
    for full, chunked in zip(results[None], results[8], strict=True):
        torch.testing.assert_close(chunked, full, atol=1e-6, rtol=1e-6)
    assert not results[8][1].requires_grad and results[8][1] > 0


def test_chunked_logprobs_equal_unchunked_on_the_tiny_model(policy):
    prompts = [[1, 40, 41, 42, 2], [1, 50, 51], [1, 60, 61, 62, 63, 64, 65, 2]]
    responses = [[70, 71, 72], [80, 81, 82, 83, 84, 85], [90]]
    seen = {}
    for chunk in (None, 3):
        logp, mask = recompute_logprobs(policy, prompts, responses, 0.7, top_p=0.95, chunk_tokens=chunk)
        (logp * mask).sum().backward()
        seen[chunk] = logp.detach(), _grads(policy)
    torch.testing.assert_close(seen[3][0], seen[None][0], atol=1e-6, rtol=1e-6)
    assert seen[3][1].keys() == seen[None][1].keys() and len(seen[3][1]) > 10
    for name, grad in seen[None][1].items():  # float32 sums in another order: ~1e-6 of the largest entry
        torch.testing.assert_close(seen[3][1][name], grad, atol=1e-5 * grad.abs().max().item(), rtol=1e-5,
                                   msg=name)
    with torch.no_grad():  # and a chunk size that divides nothing evenly, without a graph
        torch.testing.assert_close(recompute_logprobs(policy, prompts, responses, 0.7, chunk_tokens=4)[0],
                                   recompute_logprobs(policy, prompts, responses, 0.7)[0], atol=1e-6, rtol=1e-6)
