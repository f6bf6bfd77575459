"""New weights go into a running engine in place; samples and log-probs follow them."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recpipe.generate import tokenize_prompts
from recpipe.tasks import get_task
from tests.models.reference_logprobs import recompute_logprobs


@pytest.fixture(scope="module")
def perturbed(tiny_model, tmp_path_factory):
    """The tiny model with noise added to every weight, saved as a new checkpoint (a "policy version 1")."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    out = tmp_path_factory.mktemp("models") / "tiny-v1"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, model.eval()


def _greedy(engine):
    # GSM8K prompts are longer than a KV block (32 tokens on CPU): the second call after a reload would
    # reuse the old weights' cached prompt blocks if the engine did not drop them.
    prompts = get_task("gsm8k").prompts("train", limit=3, seed=0)
    ids = [i[:96] for i in tokenize_prompts(engine.tokenizer, prompts)]  # fits the tiny engine's 256
    assert min(len(i) for i in ids) > 64
    return ids, engine.sample(ids, n=1, temperature=0.0, top_p=1.0, max_tokens=16, seed=0)


def test_load_weights_swaps_the_policy_in_place(engine, tiny_model, perturbed):
    path, model = perturbed
    _, before = _greedy(engine)
    try:
        engine.load_weights(path)
        assert engine.last_load_seconds is not None
        ids, after = _greedy(engine)
        assert [g[0].token_ids for g in after] != [g[0].token_ids for g in before]
        samples = [g[0] for g in after]
        with torch.no_grad():
            # Greedy log-probs are the raw (T=1) ones.
            logp, mask = recompute_logprobs(model, ids, [s.token_ids for s in samples], temperature=1.0)
        recorded = torch.zeros_like(logp)
        for b, s in enumerate(samples):
            recorded[b, : len(s.logprobs)] = torch.tensor(s.logprobs)
        assert (logp - recorded).abs()[mask.bool()].max() < 1e-3
    finally:
        engine.load_weights(tiny_model)  # the engine is shared by the session: restore version 0
    _, restored = _greedy(engine)
    assert restored == before
