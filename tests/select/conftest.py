"""Small archives with known answers, built through Store.append_rollouts like the generator does."""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest

from recpipe.store import Store
from tests.select.synthetic import synthetic_shard

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


def add_shard(store: Store, run: str, version: int, shard: str, rewards: Sequence[Sequence[float]], *,
              minute: int = 0, **kwargs) -> list[str]:
    """Commit one shard whose group g has rewards[g]; returns its group ids (f"{shard}/p{g}").

    created_at = T0 + version hours + minute, so "oldest first" orders follow (version, minute).
    """
    table = synthetic_shard(run=run, policy_version=version, shard_id=shard, groups=len(rewards),
                            group_size=len(rewards[0]), rewards=rewards, truncated_fraction=0.0,
                            created_at=T0 + dt.timedelta(hours=version, minutes=minute), **kwargs)
    store.append_rollouts(table, shard_id=shard)
    return [f"{shard}/p{g}" for g in range(len(rewards))]


MIXED = [1.1, -0.1, 0.1, 0.9]  # reward_mean 0.5, std > 0


def build_archive(root: Path) -> Store:
    """Run "a": versions 0..3, each 2 shards x 2 mixed groups of 4 (shard s1 one minute after s0).
    Run "b": versions 0..1, 2 mixed groups each."""
    store = Store.create(root)
    for v in range(4):
        for s in range(2):
            add_shard(store, "a", v, f"a-v{v}-s{s}", [MIXED, MIXED], minute=s)
    for v in range(2):
        add_shard(store, "b", v, f"b-v{v}-s0", [MIXED, MIXED], minute=30)
    return store


@pytest.fixture(scope="session")
def archive_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_archive(tmp_path_factory.mktemp("archive") / "store").root


@pytest.fixture
def archive(archive_template: Path, tmp_path: Path) -> Store:
    """A fresh copy of the standard archive (selection records lineage, so tests get their own)."""
    shutil.copytree(archive_template, tmp_path / "store")
    return Store(tmp_path / "store")


@pytest.fixture
def empty_store(tmp_path: Path) -> Store:
    return Store.create(tmp_path / "fresh-store")


@pytest.fixture(scope="session")
def shard():
    """add_shard, for tests that build their own archive."""
    return add_shard
