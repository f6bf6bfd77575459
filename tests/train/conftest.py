"""Fixtures of the trainer tests: one tiny random Llama per session, a fresh store per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from recpipe.models import build_tiny_model
from recpipe.store import Store

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.create(tmp_path / "store")
