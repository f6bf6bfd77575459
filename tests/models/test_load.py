"""resolve_model: specs to checkpoint directories."""

from __future__ import annotations

import pytest

from recpipe.models import ModelNotFound, resolve_model


def test_resolve_model_rejects_missing_directory(tmp_path):
    with pytest.raises(ModelNotFound, match="does not exist"):
        resolve_model(str(tmp_path / "nowhere"))


def test_resolve_model_rejects_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFound, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_resolve_model_accepts_a_checkpoint_directory(tiny_model):
    assert resolve_model(str(tiny_model)) == tiny_model.resolve()


def test_resolve_tiny_builds_once_into_the_cache(tmp_path):
    path = resolve_model("tiny", cache_dir=tmp_path)
    assert (path / "config.json").is_file()
    assert path.parent == tmp_path
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("tiny", cache_dir=tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary build directory left

