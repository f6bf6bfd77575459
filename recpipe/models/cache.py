"""Where built and converted models live, and how they are written there once.

Models are cached under ``$RECPIPE_CACHE`` (default ``~/.cache/recpipe``). A model
directory is built in a temporary sibling and renamed into place, so a crash or
a concurrent builder never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir`` if given, else ``$RECPIPE_CACHE``, else ``~/.cache/recpipe``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("RECPIPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "recpipe"


def build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """Return ``final``, first calling ``build(tmp_dir)`` and renaming tmp_dir to it if absent."""
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        build(tmp)
        try:
            os.rename(tmp, final)  # atomic on one filesystem
        except OSError:
            # Another process renamed its copy first (the target now exists): keep theirs.
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
