"""Shared fixtures. Keep this file small: stage-specific fixtures live in their test folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Offline, in-process vLLM with a small KV cache, caches out of the home directory. Set before any test
# module imports vllm or transformers; a value exported by the user wins.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(tempfile.gettempdir(), "recpipe-test-vllm-cache"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint (seed 0) with a ChatML tokenizer, built once per session."""
    from recpipe.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)
