"""The archive's tables as pyarrow datasets, the only way SQL reaches the store's files.

    con.register("rollouts", TableDataset(store.root, "rollouts"))       # every run
    con.register("groups", TableDataset(store.root, "groups", run="a"))  # only run a's folders

DuckDB connections that run user SQL have no file system access at all (recpipe.store.sql); the
tables reach them as Python objects instead. DuckDB scans a registered pyarrow dataset by calling
its ``scanner(columns=, filter=)``, pushing down the columns and the filters it can translate, so:

* a TableDataset lists its files when a query scans it, not when it is registered: a connection
  sees the store as it is at each query (new shards included), and registering a table that the
  query never reads costs nothing;
* partitions are pruned by the pushed filter on the folder names (``run=a/policy_version=3``)
  before any file is touched, and only then are the kept files opened. The open files pin the data:
  compaction swaps a partition folder (recpipe.store.compact), but a file opened before the swap
  stays readable until closed, so every scan reads one consistent listing of each partition; a file
  that vanishes between listing and opening makes that partition be listed again;
* Parquet page checksums are verified on every read (files.commit_parquet writes them), and a damaged
  file fails the scan with an error naming it and pointing to ``recpipe doctor``; other tables of the
  same connection still query.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from recpipe.schema import table_spec

LOCAL = pafs.LocalFileSystem()
FORMAT = ds.ParquetFileFormat(
    default_fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True))
LISTING_ATTEMPTS = 3  # a partition is re-listed when a file vanishes (compaction swapped it meanwhile)


def damaged(path: Path | str, exc: BaseException, root: Path | str | None = None) -> str:
    """The message for a file that cannot be read: which file, why, and what to run."""
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    store = f" --store {root}" if root is not None else ""
    return (f"cannot read {path}: {reason}; run `recpipe doctor{store}` to list damaged files "
            "and `--repair` to quarantine them")


def partition_folders(root: Path, table: str, run: str | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """(folder, partition values) of every partition folder of ``table`` (of ``run`` only, if given).

    Hidden names (compaction's staging folders, temp files) are skipped; values are typed as the schema says.
    """
    spec = table_spec(table)
    levels: list[tuple[Path, dict[str, Any]]] = [(root / table, {})]
    for depth, column in enumerate(spec.partition_by):
        kind = spec.schema.field(column).type
        deeper = []
        for folder, values in levels:
            if depth == 0 and run is not None:
                names = [f"{column}={run}"]
            else:
                try:
                    names = [e.name for e in os.scandir(folder) if e.is_dir() and e.name.startswith(f"{column}=")]
                except FileNotFoundError:
                    names = []
            for name in sorted(names):
                text = name[len(column) + 1:]
                value = int(text) if pa.types.is_integer(kind) else text
                deeper.append((folder / name, {**values, column: value}))
        levels = deeper
    return levels


def parquet_files(folder: Path) -> list[Path]:
    """The committed Parquet files of one partition folder (temp and hidden names skipped)."""
    try:
        return sorted(Path(e.path) for e in os.scandir(folder)
                      if e.name.endswith(".parquet") and not e.name.startswith(".") and e.is_file())
    except FileNotFoundError:
        return []


def _partition_expression(values: dict[str, Any], schema: pa.Schema) -> ds.Expression:
    expr = ds.scalar(True)
    for column, value in values.items():
        expr = expr & (ds.field(column) == pa.scalar(value, schema.field(column).type))
    return expr


def _room_for_files(n: int) -> None:
    """Raise the soft open-files limit (up to the hard one) when a scan pins many files at once."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if n + 256 > soft and soft != hard:
        want = hard if hard == resource.RLIM_INFINITY else min(hard, max(n + 1024, soft))
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def open_partition(folder: Path) -> list[tuple[Path, pa.NativeFile]]:
    """Open every file of one partition folder from one listing; re-list if a file vanished meanwhile."""
    for attempt in range(LISTING_ATTEMPTS):
        opened = []
        try:
            for path in parquet_files(folder):
                opened.append((path, LOCAL.open_input_file(str(path))))
            return opened
        except FileNotFoundError:
            for _, f in opened:
                f.close()
            if attempt == LISTING_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


class _Scan:
    """What DuckDB reads from: ``to_reader()`` over a pyarrow scanner, naming a damaged file on failure."""

    def __init__(self, scanner: ds.Scanner, files: list[tuple[Path, pa.NativeFile]], root: Path, table: str,
                 columns: Sequence[str] | None):
        self.scanner, self.files, self.root, self.table, self.columns = scanner, files, root, table, columns
        self.projected_schema = scanner.projected_schema

    def to_reader(self) -> pa.RecordBatchReader:
        return pa.RecordBatchReader.from_batches(self.projected_schema, self._batches())

    def _batches(self) -> Iterator[pa.RecordBatch]:
        try:
            yield from self.scanner.to_batches()
        except (OSError, pa.ArrowException) as exc:
            raise OSError(self._diagnose(exc)) from None
        finally:
            for _, f in self.files:  # the scan is over: let compaction's old files go
                f.close()

    def _diagnose(self, exc: BaseException) -> str:
        """Find which file failed: read each of the scan's files alone (only on the error path)."""
        physical = [c for c in self.columns or [] if c not in table_spec(self.table).partition_by] or None
        for path, _ in self.files:
            try:
                f = pq.ParquetFile(str(path), page_checksum_verification=True)
                f.read(columns=[c for c in physical if c in f.schema_arrow.names] if physical else None)
            except FileNotFoundError:
                continue
            except (OSError, pa.ArrowException) as file_exc:
                return f"table {self.table!r}: " + damaged(path, file_exc, self.root)
        return f"table {self.table!r}: " + damaged(self.root / self.table, exc, self.root)


class TableDataset(ds.FileSystemDataset):
    """One table of the store as a dataset whose scans list, prune and open its files afresh."""

    def __init__(self, root: str | Path, table: str, run: str | None = None):
        self.root, self.table, self.run = Path(root), table, run
        self.spec = table_spec(table)
        super().__init__([], self.spec.schema, FORMAT, LOCAL)

    def scanner(self, columns: Sequence[str] | None = None, filter: ds.Expression | None = None,  # noqa: A002
                **kwargs: Any) -> _Scan:
        folders = partition_folders(self.root, self.table, self.run)
        if filter is not None and folders:
            # Prune on the folder names alone: pyarrow simplifies the filter against each folder's
            # partition expression without touching the file system.
            exprs = [_partition_expression(v, self.spec.schema) for _, v in folders]
            by_name = {str(f): f for f, _ in folders}
            probe = ds.FileSystemDataset.from_paths(list(by_name), self.spec.schema, FORMAT, LOCAL, partitions=exprs)
            kept = {frag.path for frag in probe.get_fragments(filter=filter)}
            folders = [(f, v) for f, v in folders if str(f) in kept]
        _room_for_files(sum(len(parquet_files(f)) for f, _ in folders) if len(folders) > 64 else 0)
        files, fragments = [], []
        try:
            for folder, values in folders:
                expr = _partition_expression(values, self.spec.schema)
                for path, handle in open_partition(folder):
                    files.append((path, handle))
                    fragments.append(FORMAT.make_fragment(handle, partition_expression=expr))
        except BaseException:
            for _, f in files:
                f.close()
            raise
        dataset = ds.FileSystemDataset(fragments, self.spec.schema, FORMAT, LOCAL)
        scanner = dataset.scanner(columns=list(columns) if columns is not None else None, filter=filter, **kwargs)
        return _Scan(scanner, files, self.root, self.table, columns)


def read_files(paths: Sequence[Path | str], table: str, *, columns: Sequence[str] | None = None,
               filter: ds.Expression | None = None, root: Path | None = None) -> pa.Table:  # noqa: A002
    """Rows of the given files of ``table`` (checksums verified), as one Arrow table of its schema.

    Raises FileNotFoundError if a file vanished (the caller lists again) and OSError naming a damaged file.
    """
    spec = table_spec(table)
    dataset = ds.FileSystemDataset.from_paths([str(p) for p in paths], spec.schema, FORMAT, LOCAL)
    try:
        return dataset.to_table(columns=list(columns) if columns is not None else None, filter=filter)
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException) as exc:
        for path in paths:
            try:
                pq.read_table(path, columns=None, page_checksum_verification=True)
            except (OSError, pa.ArrowException) as file_exc:
                raise OSError(damaged(path, file_exc, root)) from None
        raise OSError(damaged(paths[0] if len(paths) == 1 else f"{len(paths)} files of {table}", exc, root)) from None
