"""Turn a model spec into a checkpoint directory.

>>> resolve_model("tiny")                         # doctest: +SKIP
PosixPath('/root/.cache/recpipe/tiny-seed0')
"""

from __future__ import annotations

from pathlib import Path

from recpipe.models.cache import build_once, cache_root
from recpipe.models.smollm2 import ModelNotFound, smollm2_checkpoint
from recpipe.models.tiny import build_tiny_model

BUILTIN_MODELS = ("tiny", "smollm2")


def resolve_model(spec: str, cache_dir: str | Path | None = None) -> Path:
    """Checkpoint directory for ``spec``: "tiny", "smollm2" or a local HF checkpoint directory.

    Raises:
        ModelNotFound: ``spec`` is neither built in nor a directory holding config.json (a ValueError).
    """
    if spec == "tiny":
        return build_once(cache_root(cache_dir) / "tiny-seed0", lambda tmp: build_tiny_model(tmp, seed=0))
    if spec == "smollm2":
        return smollm2_checkpoint(cache_dir)
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        reason = "does not exist" if not path.exists() else "has no config.json"
        raise ModelNotFound(
            f"model={spec!r}: {path} {reason}; use one of {list(BUILTIN_MODELS)} or a local Hugging Face "
            f"checkpoint directory (config.json, weights, tokenizer)"
        )
    return path.resolve()

