"""Real mounts for the fault tests: a tiny tmpfs (a disk that fills up) or a read-only bind mount."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def mounted(path: Path, *options: str) -> Iterator[Path]:
    """``mount OPTIONS... path``, unmounted afterwards; skips the test where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", *options, str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount here ({result.stderr.strip()}); needs root like CI")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def small_disk(path: Path, size: int | str) -> contextlib.AbstractContextManager[Path]:
    """A real disk of ``size`` bytes (a tmpfs) at ``path``."""
    return mounted(path, "-t", "tmpfs", "-o", f"size={size}", "tmpfs")


def read_only(path: Path) -> contextlib.AbstractContextManager[Path]:
    """``path`` bind-mounted read-only onto itself."""
    return mounted(path, "--bind", "-o", "ro", str(path))
