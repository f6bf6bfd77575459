"""Fixtures of the trainer tests: one tiny random Llama per session, a fresh store per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from recpipe.models import build_tiny_model
from recpipe.store import Store

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny-model steps take milliseconds; with 2 OpenMP threads on a busy 2-core machine each parallel
    region waits for a descheduled thread and runs 10-30x slower. One thread is fast and stable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.create(tmp_path / "store")
