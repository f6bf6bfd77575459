"""Writing files: Parquet data files for the tables, and local checkpoint directories.

Data files become visible only through a Delta commit (recpipe.store), so they need no atomic name.
Checkpoint directories are filled under a temporary name and renamed into place (``commit_dir``);
a temporary name ends in ``.tmp`` and carries its writer's pid, so one left by a killed writer is
recognised (``stale_temps``) and removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from recpipe.errors import RecpipeError

TMP_SUFFIX = ".tmp"
COMPRESSION = "zstd"


class StoreWriteError(RecpipeError, OSError):
    """A write to the store failed; nothing was committed."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def write_parquet(fs: pafs.FileSystem, path: str, table: pa.Table) -> int:
    """Write ``table`` as zstd Parquet at ``path`` on ``fs``; returns the file's size in bytes.

    The file is not part of any table until a Delta commit adds it (recpipe.store.Store.append), so a
    writer killed here leaves only an unreferenced file, which vacuum removes.
    """
    # Float log-probs compress far better split into byte planes than dictionary-encoded
    # (4.4 -> 3.4 bytes per token with zstd); nested columns go by their leaf path.
    def leaf(field: pa.Field) -> str:
        return f"{field.name}.list.element" if pa.types.is_list(field.type) else field.name

    def float_list(field: pa.Field) -> bool:
        return pa.types.is_list(field.type) and pa.types.is_floating(field.type.value_type)

    split = [leaf(f) for f in table.schema if float_list(f)]
    dictionary = [leaf(f) for f in table.schema if not float_list(f)]
    # Page checksums (CRC32 per page, checked by every reader: recpipe.store.datasets): a flipped bit in a
    # data page becomes an error naming the file instead of different numbers. delta-rs's own writer writes
    # none (measured: a flipped byte in a file it wrote reads back without error), hence pyarrow here.
    try:
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)  # local disks need the folder; S3 ignores it
        with fs.open_output_stream(path) as out:
            pq.write_table(table, out, compression=COMPRESSION, row_group_size=64 * 1024,
                           use_byte_stream_split=split or False, use_dictionary=dictionary,
                           write_page_checksum=True)
        return fs.get_file_info(path).size
    except OSError as exc:
        reason = "no space left on device" if getattr(exc, "errno", None) == errno.ENOSPC else str(exc)
        with contextlib.suppress(OSError):
            fs.delete_file(path)
        raise StoreWriteError(getattr(exc, "errno", None) or errno.EIO,
                              f"could not write {path}: {reason}; nothing was committed") from exc


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
