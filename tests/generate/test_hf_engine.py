"""The transformers backend's decoding loop against the loop it replaced (the oracle below).

The old loop re-decoded each row's whole prefix at every step to look for stop strings and read the
EOS flags row by row; the engine now decodes only the tail and keeps the EOS bookkeeping on the device.
Same seeds must give the same samples: token ids, log-probs, text and finish reason, bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from recpipe.generate import tokenize_prompts
from recpipe.generate.engine import Sample
from recpipe.tasks import get_task


@torch.no_grad()
def _reference_decode(engine, prompts, temperature, top_p, max_tokens, stop, generator):
    batch = len(prompts)
    input_ids, attention_mask, position_ids = engine._left_padded(prompts)  # the forward pass and sampler are
    tokens = torch.zeros(batch, max_tokens, dtype=torch.long)  # shared: the bookkeeping below is what changed
    logprobs = torch.zeros(batch, max_tokens)
    lengths, reasons, texts = [0] * batch, [None] * batch, [None] * batch
    past = None
    for step in range(max_tokens):
        next_ids, next_logp, past = engine._next_token(input_ids, attention_mask, position_ids, past, temperature,
                                                       top_p, generator)
        tokens[:, step] = next_ids
        logprobs[:, step] = next_logp
        is_eos = torch.isin(next_ids, engine.eos_ids).tolist()
        for b in range(batch):
            if reasons[b] is not None:
                continue
            lengths[b] = step + 1
            if is_eos[b]:
                reasons[b] = "stop"
            elif stop:
                text = engine.tokenizer.decode(tokens[b, : step + 1].tolist(), skip_special_tokens=True)
                cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
                if cut >= 0:
                    reasons[b], texts[b] = "stop", text[:cut]
            if reasons[b] is None and step + 1 == max_tokens:
                reasons[b] = "length"
        if all(r is not None for r in reasons):
            break
        input_ids = next_ids[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        position_ids = position_ids[:, -1:] + 1
    samples = []
    for b in range(batch):
        ids = tokens[b, : lengths[b]].tolist()
        text = texts[b] if texts[b] is not None else engine.tokenizer.decode(ids, skip_special_tokens=True)
        samples.append(Sample(ids, logprobs[b, : lengths[b]].tolist(), text, reasons[b]))
    return samples


def _reference_sample(engine, prompts_token_ids, n, temperature, top_p, max_tokens, stop, seed):
    generator = torch.Generator().manual_seed(seed)
    rows = [list(ids) for ids in prompts_token_ids for _ in range(n)]
    samples = []
    for start in range(0, len(rows), engine.max_batch_size):
        samples += _reference_decode(engine, rows[start:start + engine.max_batch_size], temperature, top_p,
                                     max_tokens, list(stop or ()), generator)
    return [samples[i * n:(i + 1) * n] for i in range(len(prompts_token_ids))]


@pytest.fixture(scope="module")
def prompt_ids(hf_engine):
    return [ids[:64] for ids in tokenize_prompts(hf_engine.tokenizer, get_task("arithmetic").prompts("train", limit=3))]


@pytest.mark.parametrize(
    ("stop", "temperature", "top_p", "max_tokens"),
    [
        (None, 1.0, 1.0, 48),
        ([" "], 1.0, 1.0, 48),  # a character the tiny model emits often: most rows stop early
        (["e", "a"], 1.0, 0.9, 48),
        (["the", "\n", "ing "], 1.0, 1.0, 120),  # several tokens long; most rows run to max_tokens
        (["zzzzzzzzzzzzzzzzzzzz"], 1.0, 1.0, 64),  # longer than the tail window's default margin
        (["é", "<|im_end|>"], 1.0, 1.0, 48),  # a multi-byte character; a special token's text (skipped)
        ([""], 1.0, 1.0, 8),  # the empty string is in every text: stops at the first token
        ([" "], 0.0, 1.0, 32),
        (None, 0.0, 1.0, 32),
    ],
)
def test_decoding_matches_the_full_prefix_reference(hf_engine, prompt_ids, monkeypatch, stop, temperature, top_p,
                                                    max_tokens):
    monkeypatch.setattr(hf_engine, "max_batch_size", 5)  # 3 prompts x 4 samples: three chunks, one generator
    for seed in (0, 1):
        got = hf_engine.sample(prompt_ids, n=4, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                               stop=stop, seed=seed)
        expected = _reference_sample(hf_engine, prompt_ids, 4, temperature, top_p, max_tokens, stop, seed)
        assert got == expected
    reasons = {s.finish_reason for g in got for s in g}
    assert reasons <= {"stop", "length"}


def test_stop_strings_end_rows_at_different_steps(hf_engine, prompt_ids):
    # The oracle comparison above is only as good as its cases: make sure they mix early and late stops.
    groups = hf_engine.sample(prompt_ids, n=4, temperature=1.0, top_p=1.0, max_tokens=48, stop=[" "], seed=0)
    lengths = {len(s.token_ids) for g in groups for s in g if s.finish_reason == "stop"}
    assert len(lengths) > 3
