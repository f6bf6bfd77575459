"""Merge the small files of a partition into one, atomically.

The merged file is written into a fresh sibling folder, and that folder is
swapped with the partition folder in one ``renameat2(RENAME_EXCHANGE)`` call:
a reader globbing the partition sees either all old files or the one merged
file, never both or neither. The merged file's footer lists every shard id
it holds, so re-running an old shard still writes nothing twice.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from recpipe.schema import conform, table_spec
from recpipe.store.datasets import damaged
from recpipe.store.files import TMP_SUFFIX, StoreWriteError, commit_parquet, fsync_dir

if TYPE_CHECKING:
    from recpipe.store import Store

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def exchange_dirs(a: Path, b: Path) -> None:
    """Atomically swap two directory entries (Linux renameat2)."""
    rc = _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"renameat2 exchange of {a} and {b} failed: {os.strerror(err)}")


def _partitions(store: Store, table: str, run: str | None) -> list[Path]:
    return sorted({f.parent for f in store.files(table, run=run)})


def compact_partition(store: Store, table: str, partition: Path, min_files: int = 2) -> int:
    """Merge the Parquet files of one partition folder; returns the number of files merged."""
    from recpipe.store import SHARDS_KEY, StoreError, file_shards

    files = sorted(p for p in partition.glob("*.parquet") if not p.name.startswith("."))
    if len(files) < min_files:
        return 0
    shards: list[str] = []
    parts = []
    for f in files:
        try:
            shards.extend(file_shards(f))
            parts.append(conform(table, pq.read_table(f, page_checksum_verification=True)))
        except (OSError, pa.ArrowException) as exc:  # never merge a damaged file into a good one
            raise StoreError(damaged(f, exc, store.root)) from None
    merged = pa.concat_tables(parts)
    key = [c for c in table_spec(table).key if c in merged.column_names]
    if key:
        merged = merged.sort_by([(c, "ascending") for c in key])
    digest = hashlib.sha256("\n".join(sorted(shards)).encode()).hexdigest()[:16]
    staging = partition.with_name(f".{partition.name}.compact.{os.getpid()}-{digest[:8]}{TMP_SUFFIX}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        commit_parquet(staging / f"compact-{digest}.parquet", merged,
                       metadata={SHARDS_KEY: json.dumps(sorted(shards))})
        try:
            exchange_dirs(staging, partition)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            raise StoreWriteError(exc.errno, f"this filesystem cannot swap folders atomically ({exc}); "
                                             "compaction skipped, nothing changed") from exc
        fsync_dir(partition.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after the swap it holds the old files
    return len(files)


def compact_table(store: Store, table: str, run: str | None = None, min_files: int = 2) -> dict[str, int]:
    """Compact every partition of ``table`` (of one run, or all); returns counts."""
    partitions = files_before = files_after = 0
    for partition in _partitions(store, table, run):
        merged = compact_partition(store, table, partition, min_files=min_files)
        if merged:
            partitions += 1
            files_before += merged
            files_after += 1
    return {"partitions": partitions, "files_merged": files_before, "files_written": files_after}
