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
  that vanishes between listing and opening makes that partition be listed again. Open files and
  their parsed footers are kept per process (``_fragments``) while a file is unchanged: committed
  files never change in place, and pyarrow's per-file cost dominates scans of many small files;
* Parquet page checksums are verified on every read (files.commit_parquet writes them), and a damaged
  file fails the scan with an error naming it and pointing to ``recpipe doctor``; other tables of the
  same connection still query.
"""

from __future__ import annotations

import functools
import os
import resource
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

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
                deeper.append((folder / name, {**values, column: _typed(spec.schema, column, name)}))
        levels = deeper
    return levels


def _typed(schema: pa.Schema, column: str, folder_name: str) -> Any:
    """The value a ``column=value`` folder name stands for, typed as the schema says."""
    text = folder_name[len(column) + 1:]
    return int(text) if pa.types.is_integer(schema.field(column).type) else text


def partition_values(table: str, folder: Path) -> dict[str, Any]:
    """The partition values of one partition folder of ``table`` (``.../run=a/policy_version=3``)."""
    spec = table_spec(table)
    names = [f.name for f in [folder, *folder.parents][:len(spec.partition_by)]][::-1]
    return {c: _typed(spec.schema, c, name) for c, name in zip(spec.partition_by, names, strict=True)}


def parquet_files(folder: Path) -> list[Path]:
    """The committed Parquet files of one partition folder (temp and hidden names skipped)."""
    try:
        return sorted(Path(e.path) for e in os.scandir(folder)
                      if e.name.endswith(".parquet") and not e.name.startswith(".") and e.is_file())
    except FileNotFoundError:
        return []


@functools.lru_cache(maxsize=1 << 16)
def _partition_expression(table: str, values: tuple[tuple[str, Any], ...]) -> ds.Expression:
    schema = table_spec(table).schema
    expr = ds.scalar(True)
    for column, value in values:
        expr = expr & (ds.field(column) == pa.scalar(value, schema.field(column).type))
    return expr


# Open files with their footers parsed, by path, reused while the file is the same (inode, size, mtime):
# committed files never change in place, and parsing a footer costs as much as reading a small file.
# An entry holds the file open; dropping it lets the file close once no scan uses it.
_fragments: OrderedDict[str, tuple[tuple[int, int, int], ds.Fragment]] = OrderedDict()
_fragments_lock = threading.Lock()
CACHED_FILES = 4096


@functools.cache  # the open-files limit is raised once; later calls only read the result
def _cache_size() -> int:
    """CACHED_FILES, or fewer if the open-files limit cannot be raised to hold them beside the scans."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * CACHED_FILES
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(hard, want)
        if new > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
    return CACHED_FILES if soft == resource.RLIM_INFINITY else min(CACHED_FILES, soft // 4)


def _fragment(path: Path, stat: os.stat_result, expr: ds.Expression, root: Path) -> ds.Fragment:
    """The file as a dataset fragment reading an open handle (FileNotFoundError if it is gone)."""
    key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    with _fragments_lock:
        hit = _fragments.get(str(path))
        if hit is not None and hit[0] == key:
            _fragments.move_to_end(str(path))
            return hit[1]
    handle = LOCAL.open_input_file(str(path))
    fragment = FORMAT.make_fragment(handle, partition_expression=expr)
    try:
        fragment.ensure_complete_metadata()  # the footer, parsed once
    except (OSError, pa.ArrowException) as exc:
        raise OSError(damaged(path, exc, root)) from None
    with _fragments_lock:
        _fragments[str(path)] = (key, fragment)
        limit = _cache_size()
        while len(_fragments) > limit:
            _fragments.popitem(last=False)
    return fragment


def open_partition(folder: Path, expr: ds.Expression, root: Path) -> list[tuple[Path, ds.Fragment]]:
    """Every file of one partition folder, from one listing, opened; re-listed if a file vanished
    between listing and opening (compaction swapped the folder: the new listing has the merged file)."""
    for attempt in range(LISTING_ATTEMPTS):
        try:
            return [(path, _fragment(path, path.stat(), expr, root)) for path in parquet_files(folder)]
        except FileNotFoundError:
            if attempt == LISTING_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


class _Scan:
    """What DuckDB reads from: ``to_reader()`` over a pyarrow scanner, naming a damaged file on failure.

    The partition columns (run, policy_version) are not decoded from the files, which hold them too:
    each batch gets them from its file's folder names (pyarrow's per-column cost dominates small files,
    and ``count(*)`` then reads no column at all).
    """

    def __init__(self, dataset: ds.FileSystemDataset, files: list[tuple[Path, ds.Fragment]], root: Path,
                 table: str, columns: Sequence[str] | None, filter: ds.Expression | None,  # noqa: A002
                 **kwargs: Any):
        self.files, self.root, self.table = files, root, table
        spec = table_spec(table)
        self.columns = list(columns) if columns is not None else spec.schema.names
        self.partition = [c for c in self.columns if c in spec.partition_by]
        self.physical = [c for c in self.columns if c not in spec.partition_by]
        self.scanner = dataset.scanner(columns=self.physical, filter=filter, **kwargs)
        self.projected_schema = pa.schema([spec.schema.field(c) for c in self.columns])

    def to_reader(self) -> pa.RecordBatchReader:
        return pa.RecordBatchReader.from_batches(self.projected_schema, self._batches())

    def _batches(self) -> Iterator[pa.RecordBatch]:
        try:
            for tagged in self.scanner.scan_batches():
                batch = tagged.record_batch
                if not self.partition:
                    yield batch
                    continue
                keys = ds.get_partition_keys(tagged.fragment.partition_expression)
                arrays = [batch.column(c) if c in self.physical else
                          pa.repeat(pa.scalar(keys[c], self.projected_schema.field(c).type), batch.num_rows)
                          for c in self.columns]
                yield pa.RecordBatch.from_arrays(arrays, schema=self.projected_schema)
        except (OSError, pa.ArrowException) as exc:
            raise OSError(self._diagnose(exc)) from None

    def _diagnose(self, exc: BaseException) -> str:
        """Find which file failed: read each of the scan's files alone (only on the error path)."""
        for path, fragment in self.files:
            try:
                fragment.to_table(columns=self.physical, schema=self.scanner.dataset_schema)
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
        folders = [(f, _partition_expression(self.table, tuple(v.items())))
                   for f, v in partition_folders(self.root, self.table, self.run)]
        if filter is not None and folders:
            # Prune on the folder names alone: pyarrow simplifies the filter against each folder's
            # partition expression without touching the file system.
            probe = ds.FileSystemDataset.from_paths([str(f) for f, _ in folders], self.spec.schema, FORMAT, LOCAL,
                                                    partitions=[e for _, e in folders])
            kept = {fragment.path for fragment in probe.get_fragments(filter=filter)}
            folders = [(f, e) for f, e in folders if str(f) in kept]
        files = [item for folder, expr in folders for item in open_partition(folder, expr, self.root)]
        dataset = ds.FileSystemDataset([f for _, f in files], self.spec.schema, FORMAT, LOCAL)
        return _Scan(dataset, files, self.root, self.table, columns, filter, **kwargs)


def read_files(paths: Sequence[Path], table: str, *, columns: Sequence[str] | None = None,
               filter: ds.Expression | None = None, root: Path | None = None) -> pa.Table:  # noqa: A002
    """Rows of the given files of ``table`` (checksums verified), as one Arrow table of its schema.

    Raises FileNotFoundError if a file vanished (the caller lists again) and OSError naming a damaged file.
    """
    spec = table_spec(table)
    files = []
    for path in paths:
        values = tuple(partition_values(table, path.parent).items())
        files.append((path, _fragment(path, path.stat(), _partition_expression(table, values), root or path.parent)))
    dataset = ds.FileSystemDataset([f for _, f in files], spec.schema, FORMAT, LOCAL)
    scan = _Scan(dataset, files, root or Path(table), table, columns, filter)
    return pa.Table.from_batches(scan._batches(), schema=scan.projected_schema)
