"""Engines on the tiny model, one per backend per session (vLLM starts in ~5-10 s with enforce_eager)."""

from __future__ import annotations

import pytest

from recpipe.generate import make_engine, vllm_available


@pytest.fixture(scope="session")
def hf_engine(tiny_model):
    engine = make_engine(tiny_model, backend="hf", seed=0, max_model_len=256, model_name="tiny")
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def vllm_engine(tiny_model):
    if not vllm_available():
        pytest.skip("vllm does not import here")
    engine = make_engine(tiny_model, backend="vllm", seed=0, max_model_len=256, model_name="tiny")
    yield engine
    engine.close()


@pytest.fixture(params=["hf", "vllm"])
def engine(request):
    """Each backend in turn: tests using it must pass for both."""
    return request.getfixturevalue(f"{request.param}_engine")
