"""Atomic file commits: readers never see a half-written file.

A file is written under a temporary name in its final directory, flushed and
fsynced, then hard-linked to its final name (``os.link`` fails if the name
exists, so two writers of the same shard cannot both win) and the temporary
name removed; the directory is fsynced so the new name survives a crash.
Temporary names end in ``.tmp`` so the ``*.parquet`` globs of readers skip them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TMP_SUFFIX = ".tmp"
COMPRESSION = "zstd"


class StoreWriteError(OSError):
    """A write to the store failed; nothing was committed."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


@contextlib.contextmanager
def _cleanup_on_error(path: Path, final: Path) -> Iterator[None]:
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(OSError):  # absent, or the file system refuses even that
            path.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, StoreWriteError):
            reason = "no space left on device" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
            raise StoreWriteError(exc.errno, f"could not write {final}: {reason}; nothing was committed") from exc
        raise


def commit_file(final: Path, write: Callable[[Path], None], *, overwrite: bool = False) -> bool:
    """Write ``final`` atomically with ``write(tmp_path)``.

    Returns False (and writes nothing) if ``final`` already exists and
    ``overwrite`` is False: a committed shard is never written twice.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreWriteError(exc.errno, f"cannot create {final.parent}: {exc.strerror}") from exc
    if final.exists() and not overwrite:
        return False
    tmp = _temp_name(final)
    with _cleanup_on_error(tmp, final):
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, final)
        else:
            try:
                os.link(tmp, final)
            except FileExistsError:
                tmp.unlink()
                return False
            tmp.unlink()
        fsync_dir(final.parent)
    return True


def commit_parquet(final: Path, table: pa.Table, *, metadata: dict[str, str] | None = None,
                   overwrite: bool = False) -> bool:
    """Write ``table`` as zstd Parquet at ``final`` atomically (see ``commit_file``)."""
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)

    # Float log-probs compress far better split into byte planes than dictionary-encoded
    # (4.4 -> 3.4 bytes per token with zstd); nested columns go by their leaf path.
    def leaf(field: pa.Field) -> str:
        return f"{field.name}.list.element" if pa.types.is_list(field.type) else field.name

    def float_list(field: pa.Field) -> bool:
        return pa.types.is_list(field.type) and pa.types.is_floating(field.type.value_type)

    split = [leaf(f) for f in table.schema if float_list(f)]
    dictionary = [leaf(f) for f in table.schema if not float_list(f)]

    # Page checksums (CRC32 per page, checked by every reader: recpipe.store.datasets): a flipped
    # bit in a data page becomes an error naming the file instead of different numbers.
    def write(tmp: Path) -> None:
        pq.write_table(table, tmp, compression=COMPRESSION, row_group_size=64 * 1024,
                       use_byte_stream_split=split or False, use_dictionary=dictionary,
                       write_page_checksum=True)

    return commit_file(final, write, overwrite=overwrite)


def commit_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Fill a directory atomically: write into a sibling temp dir, then rename it into place."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(final)
    try:
        tmp.mkdir()
        write(tmp)
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
        if final.exists():  # a leftover from an earlier crash after rename is complete by construction
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(final.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, StoreWriteError):
            raise StoreWriteError(exc.errno, f"could not write {final}: {exc.strerror or exc}; nothing was committed") from exc
        raise


def _writer_alive(temp: Path) -> bool:
    match = re.search(r"\.(\d+)-[0-9a-f]{8}\.tmp$", temp.name)
    if not match:
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temps(root: Path) -> list[Path]:
    """Temporary files/dirs whose writer process is gone (never visible to readers)."""
    return [p for p in sorted(Path(root).rglob(f".*{TMP_SUFFIX}")) if not _writer_alive(p)]


def remove_stale_temps(root: Path) -> list[Path]:
    """Delete temporary files/dirs left by killed writers."""
    removed = []
    for path in stale_temps(root):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
