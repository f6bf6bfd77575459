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


def _torch_process_state() -> dict[str, object]:
    import torch

    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    return {"torch.set_num_threads": torch.set_num_threads, "torch.get_num_threads()": torch.get_num_threads(),
            "torch.get_default_dtype()": torch.get_default_dtype(), "torch.is_grad_enabled()": torch.is_grad_enabled(),
            "mkldnn.matmul.fp32_precision": getattr(matmul, "fp32_precision", None)}


@pytest.fixture(autouse=True)
def no_leaked_torch_state(request):
    """A test (or an engine it starts, even a session-scoped one) must leave torch's process-wide settings as
    it found them: a later test's numerics would otherwise depend on the test order (vLLM's CPU worker, for
    one, turns torch.set_num_threads into a no-op)."""
    before = _torch_process_state()
    yield
    after = _torch_process_state()
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert not changed, f"{request.node.nodeid} changed process-wide torch state: {changed}"
