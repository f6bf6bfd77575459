"""Directories kept beside the tables on the store's storage (model checkpoints), and their local copies.

    publish_dir(store, local_dir, "checkpoints/a/v000003")   # upload; ``last`` (the manifest) goes last
    fetch_dir(store, "checkpoints/a/v000003", local_dir)     # download into this machine's cache
    remote_dirs(store, "checkpoints/a")                      # names of the complete ones

A local store is its own storage: every function here is then a no-op or a local listing, and
``store.root`` is the store. On S3, ``store.root`` is this machine's cache of the store
(recpipe.store.location): a trainer writes a version there and publishes it; a generator on another
machine fetches the version it samples from. A directory counts as complete on storage once its
``last`` file (checkpoints: manifest.json, which lists every other file with its sha256) is there:
it is uploaded after all the others, so a reader never sees a half-uploaded version as complete.
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from recpipe.store.files import StoreWriteError

if TYPE_CHECKING:
    from recpipe.store import Store


def publish_dir(store: Store, local: Path, relative: str, last: str) -> None:
    """Upload the files of ``local`` to ``<store>/<relative>/``, ``last`` after all others (remote stores only)."""
    if store.location.is_local:
        return
    fs = store.location.fs
    names = sorted(p.name for p in Path(local).iterdir() if p.is_file())
    try:
        for name in [n for n in names if n != last] + ([last] if last in names else []):
            pafs.copy_files(str(Path(local) / name), store.location.path(relative, name),
                            source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    except OSError as exc:
        raise StoreWriteError(5, f"could not upload {local} to {store.uri}/{relative}: {exc}") from exc


def fetch_dir(store: Store, relative: str, local: Path) -> Path:
    """Download ``<store>/<relative>/`` into ``local`` (renamed into place when complete); returns ``local``."""
    local = Path(local)
    if store.location.is_local:
        return local
    fs = store.location.fs
    infos = fs.get_file_info(pafs.FileSelector(store.location.path(relative), allow_not_found=True))
    files = [i for i in infos if i.type == pafs.FileType.File]
    if not files:
        raise FileNotFoundError(f"{store.uri}/{relative} is not on the store's storage")
    tmp = local.with_name(f".{local.name}.fetch-{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    try:
        for info in files:
            pafs.copy_files(info.path, str(tmp / info.base_name), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
        if local.exists():
            shutil.rmtree(local)
        tmp.rename(local)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local


def remote_dirs(store: Store, relative: str, last: str) -> list[str]:
    """Names of the directories under ``<store>/<relative>`` that hold their ``last`` file."""
    fs = store.location.fs
    base = store.location.path(relative)
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=False))
    names = [i.base_name for i in infos if i.type == pafs.FileType.Directory]
    checks = fs.get_file_info([f"{base}/{name}/{last}" for name in names]) if names else []
    return sorted(name for name, info in zip(names, checks, strict=True) if info.type == pafs.FileType.File)


def delete_dir(store: Store, relative: str, last: str) -> None:
    """Delete ``<store>/<relative>/`` from remote storage, ``last`` first (it stops counting as complete)."""
    if store.location.is_local:
        return
    fs = store.location.fs
    path = store.location.path(relative)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(f"{path}/{last}")
    fs.delete_dir(path)
