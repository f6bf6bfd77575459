"""The tiny test model: deterministic, loadable, with a working chat template."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recpipe.models import build_tiny_model


def test_tiny_model_is_deterministic_per_seed(tiny_model, tmp_path):
    same = build_tiny_model(tmp_path / "same", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    weights = (tiny_model / "model.safetensors").read_bytes()
    assert (same / "model.safetensors").read_bytes() == weights
    assert (other / "model.safetensors").read_bytes() != weights


def test_tiny_model_loads_and_runs_in_transformers(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    config = model.config
    assert config.head_dim >= 64  # vLLM's CPU attention needs it
    assert model.dtype == torch.float32
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert config.vocab_size == len(tokenizer)
    ids = torch.tensor([tokenizer.encode("What is 3 + 4?")])
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()


def test_tiny_tokenizer_chat_template_and_special_tokens(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    messages = [{"role": "user", "content": "What is 3 + 4? Answer with just the number."}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>user\nWhat is 3 + 4? Answer with just the number.<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert tokenizer.decode(ids) == text
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 2  # special tokens stay single ids
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id


def test_tiny_tokenizer_encodes_any_text(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for text in ["12 + 30 = 42", "naïve café, 漢字 🙂", "\t\n  trailing  "]:
        ids = tokenizer.encode(text)
        assert tokenizer.unk_token_id not in ids  # byte fallback, never <unk>
        assert tokenizer.decode(ids) == text
