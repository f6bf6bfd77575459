"""The archive's tables as pyarrow datasets over Delta snapshots: the only way SQL reaches the files.

    con.register("rollouts", TableDataset(store, "rollouts"))               # latest version, every run
    con.register("groups", TableDataset(store, "groups", run="a"))          # only run a's files
    con.register("groups", TableDataset(store, "groups", version=41))       # time travel

DuckDB connections that run user SQL have no file system access at all (recpipe.store.sql); the
tables reach them as Python objects instead. DuckDB scans a registered pyarrow dataset by calling
its ``scanner(columns=, filter=)``, pushing down the columns and the filters it can translate, so:

* a TableDataset reads the table's Delta snapshot when a query scans it (the latest version then, or
  the pinned ``version``), not when it is registered: an unpinned connection sees new commits at each
  query, and registering a table the query never reads costs nothing;
* files are pruned by the pushed filter against their partition values from the log (run,
  policy_version) before any file is touched. A snapshot's files never change: Delta files are
  written once under unique names, and a file that compaction replaced stays in place until vacuum
  (whose retention outlasts any query: recpipe.store.compact), so a scan reads one consistent version;
* parsed footers are kept per process (``_fragments``) by path: pyarrow's per-file cost dominates
  scans of many small files;
* Parquet page checksums are verified on every read (files.write_parquet writes them), and a damaged
  file fails the scan with an error naming it and pointing to ``recpipe doctor``; other tables of the
  same connection still query.
"""

from __future__ import annotations

import functools
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from recpipe.errors import RecpipeError
from recpipe.schema import table_spec

if TYPE_CHECKING:
    from recpipe.store import Store

FORMAT = ds.ParquetFileFormat(
    default_fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True))


class DamagedFile(RecpipeError, OSError):
    """A file of the archive cannot be read; the message names it and what to run (``damaged``)."""


def damaged(path: str, exc: BaseException, store: str | None = None) -> str:
    """The message for a file that cannot be read: which file, why, and what to run."""
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    where = f" --store {store}" if store is not None else ""
    return (f"cannot read {path}: {reason}; run `recpipe doctor{where}` to list damaged files "
            "and `--repair` to quarantine them")


@dataclass(frozen=True)
class DataFile:
    path: str          # on the store's filesystem
    relative: str      # as the Delta log names it, relative to the table
    size: int
    values: dict[str, Any]  # partition values, typed as the schema says

    @property
    def shard_id(self) -> str | None:
        """The shard a file of ``Store.append`` holds (``<shard>~<uuid>.parquet``); None for merged files."""
        name = self.relative.rsplit("/", 1)[-1]
        return name.split("~", 1)[0] if "~" in name else None


class Snapshot:
    """The data files of one version of a table: its Delta log's add actions as an Arrow table (one row per
    file: path, size_bytes, partition.<column>). DataFile objects are built only for what is asked - every
    file (``files``), or one run's (``files_of``) - since an archive of 100M rollouts has ~200k groups files
    and a selection needs one run's."""

    def __init__(self, store: Store, table: str, version: int, actions: pa.Table):
        self.table, self.version, self.actions = table, version, actions
        self.nbytes = actions.nbytes  # summed over the cache at every new version: computed once
        # The store's location, not the store: a cached snapshot must not keep a Store (and the Delta
        # tables it holds, ~0.5 GB each at 100M rollouts) alive.
        self._uri, self._location, self._spec = store.uri, store.location, table_spec(table)

    @functools.cached_property
    def files(self) -> tuple[DataFile, ...]:
        """Every data file, in path order."""
        key = (self._uri, self.table)
        with _snapshots_lock:
            known = _parsed.get(key, {})
        files = tuple(self._data_files(self.actions, known))
        with _snapshots_lock:
            _parsed[key] = {f.relative: f for f in files}  # what the newest version read lists
        return files

    def files_of(self, run: str) -> list[DataFile]:
        """The data files of one run, in path order."""
        return self._data_files(self._actions_of(run))

    def partitions(self, run: str | None = None) -> list[dict[str, Any]]:
        """The partition values of every partition holding a file (of ``run`` only, if given), sorted."""
        by, actions = self._spec.partition_by, self._actions_of(run)
        if not by:
            return [{}] if actions.num_rows else []
        columns = [f"partition.{c}" for c in by]
        distinct = actions.select(columns).group_by(columns).aggregate([])
        rows = zip(*(distinct.column(c).to_pylist() for c in columns), strict=True)
        values = [{c: _typed(self._spec.schema, c, v) for c, v in zip(by, row, strict=True)} for row in rows]
        return sorted(values, key=lambda v: tuple(v.values()))

    def _actions_of(self, run: str | None) -> pa.Table:
        """The add actions of every file, or of one run's (none, in a table not partitioned by run)."""
        if run is None:
            return self.actions
        if "run" not in self._spec.partition_by:
            return self.actions.slice(0, 0)
        return self.actions.filter(pc.equal(self.actions.column("partition.run"), run))

    def files_in(self, partitions: set[tuple[Any, ...]]) -> dict[tuple[Any, ...], list[DataFile]]:
        """The files of each of ``partitions`` (values in partition_by order), in path order. The log's
        actions are filtered in Arrow on the first partition column, so DataFiles are built only for the
        partitions' runs (a selection's one or few), not for every file of a new version."""
        found: dict[tuple[Any, ...], list[DataFile]] = {key: [] for key in partitions}
        if not partitions or not self._spec.partition_by:
            return found
        first = self.actions.column(f"partition.{self._spec.partition_by[0]}")
        wanted = pa.array(sorted({str(key[0]) for key in partitions}), pa.string()).cast(first.type)
        for file in self._data_files(self.actions.filter(pc.is_in(first, value_set=wanted))):
            key = tuple(file.values.values())
            if key in found:
                found[key].append(file)
        return found

    def _data_files(self, actions: pa.Table, known: dict[str, DataFile] | None = None) -> list[DataFile]:
        actions = actions.sort_by("path")
        paths = actions.column("path").to_pylist()
        sizes = actions.column("size_bytes").to_pylist()
        columns = {c: actions.column(f"partition.{c}").to_pylist() for c in self._spec.partition_by}
        location, schema, known = self._location, self._spec.schema, known or {}
        files = []
        for i, relative in enumerate(paths):
            file = known.get(relative)
            if file is None:
                values = {c: _typed(schema, c, columns[c][i]) for c in self._spec.partition_by}
                file = DataFile(location.path(self.table, relative), relative, sizes[i], values)
            files.append(file)
        return files


_snapshots: OrderedDict[tuple[str, str, int], Snapshot] = OrderedDict()
_snapshots_lock = threading.Lock()
CACHED_ACTION_BYTES = 128 << 20
# The DataFile of each path a table's log has listed, per (store, table): a new version of a table adds a
# few files to thousands, so only those are built again when every file is listed.
_parsed: dict[tuple[str, str], dict[str, DataFile]] = {}


def snapshot(store: Store, table: str, version: int | None = None) -> Snapshot:
    """The data files of ``table`` at ``version`` (default: the latest), from the Delta log. A version's
    files never change, so each is read from the log once per process: from an earlier cached version and
    the commits after it when there are few of those (``_advance``), else from delta-rs."""
    if version is None:
        version = store.delta(table).version()
    key = (store.uri, table, version)
    with _snapshots_lock:
        hit = _snapshots.get(key)
        if hit is not None:
            _snapshots.move_to_end(key)
            return hit
        earlier = [s for (uri, name, v), s in _snapshots.items() if uri == store.uri and name == table and v < version]
    base = max(earlier, key=lambda s: s.version, default=None)
    actions = _advance(store, base, version) if base is not None and version - base.version <= MAX_TAIL else None
    if actions is None:
        spec = table_spec(table)
        actions = pa.table(store.delta(table, version).get_add_actions(flatten=True))
        actions = actions.select(["path", "size_bytes", *(f"partition.{c}" for c in spec.partition_by)])
    snap = Snapshot(store, table, version, actions)
    with _snapshots_lock:
        _snapshots[key] = snap
        # At most 64 versions, holding at most CACHED_ACTION_BYTES of file lists (~100 bytes a file).
        while len(_snapshots) > 1 and (len(_snapshots) > 64 or
                                       sum(s.nbytes for s in _snapshots.values()) > CACHED_ACTION_BYTES):
            _snapshots.popitem(last=False)
    return snap


# Commits after a cached version read directly; beyond this many, delta-rs (from a checkpoint) is cheaper.
MAX_TAIL = 100
# Actions of a commit that change nothing about which files are live. Any other (metaData: a schema or
# partitioning change; protocol; cdc) makes _advance hand the version to delta-rs.
_NO_FILE_CHANGE = frozenset({"commitInfo", "txn", "domainMetadata", "checkpointMetadata", "sidecar"})


def _advance(store: Store, base: Snapshot, version: int) -> pa.Table | None:
    """The add actions of ``version``: ``base``'s, then the adds and removes of commits base+1..version, read
    from their ``_delta_log/<version>.json`` (newline-delimited actions; paths URI-encoded, partition values
    as strings). delta-rs's get_add_actions rebuilds every file's statistics for each new version (~8 ms for
    a rollouts table of 800 files, ~40 ms for a groups table of 200k); this costs the new commits only.
    None when a commit is missing or holds an action this does not follow (the caller asks delta-rs)."""
    added: dict[str, tuple[int, dict[str, str | None]]] = {}
    gone: set[str] = set()  # base files removed (or re-added: the re-add is in ``added``)
    fs = store.location.fs
    for number in range(base.version + 1, version + 1):
        try:
            with fs.open_input_stream(store.location.commit_file(base.table, number)) as f:
                lines = f.read().decode().splitlines()
        except OSError:
            return None
        for line in lines:
            if not line.strip():
                continue
            action = json.loads(line)
            if "add" in action:
                add = action["add"]
                if add.get("deletionVector"):
                    return None
                path = unquote(add["path"])
                gone.add(path)
                added[path] = (int(add["size"]), add.get("partitionValues") or {})
            elif "remove" in action:
                path = unquote(action["remove"]["path"])
                gone.add(path)
                added.pop(path, None)
            elif not _NO_FILE_CHANGE.issuperset(action):
                return None
    actions = base.actions
    if gone:  # filtering copies the whole list (~17 ms for 200k files): only when a base file is gone
        hit = pc.is_in(actions.column("path"), value_set=pa.array(sorted(gone), pa.string()))
        if pc.any(hit).as_py():
            actions = actions.filter(pc.invert(hit))
    if added:
        paths = list(added)
        columns = {"path": pa.array(paths, pa.string()),
                   "size_bytes": pa.array([added[p][0] for p in paths], pa.int64())}
        for name in base.actions.column_names[2:]:  # partition.<column>, typed as delta-rs types them
            column = name.removeprefix("partition.")
            columns[name] = pa.array([added[p][1].get(column) for p in paths], pa.string()).cast(
                base.actions.schema.field(name).type)
        actions = pa.concat_tables([actions, pa.table(columns, schema=base.actions.schema)])
    return actions.combine_chunks() if actions.column(0).num_chunks > 16 else actions


def _typed(schema: pa.Schema, column: str, value: Any) -> Any:
    if value is None:
        return None
    return int(value) if pa.types.is_integer(schema.field(column).type) else str(value)


@functools.lru_cache(maxsize=1 << 16)
def _partition_expression(table: str, values: tuple[tuple[str, Any], ...]) -> ds.Expression:
    schema = table_spec(table).schema
    expr = ds.scalar(True)
    for column, value in values:
        expr = expr & (ds.field(column) == pa.scalar(value, schema.field(column).type))
    return expr


# Fragments with their footers parsed, by path: a Delta data file never changes once written, and
# parsing a footer costs as much as reading a small file. An entry holds no open file.
_fragments: OrderedDict[str, ds.Fragment] = OrderedDict()
_fragments_lock = threading.Lock()
CACHED_FILES = 8192


def _fragment(fs: pafs.FileSystem, file: DataFile, table: str, store: str) -> ds.Fragment:
    with _fragments_lock:
        hit = _fragments.get(file.path)
        if hit is not None:
            _fragments.move_to_end(file.path)
            return hit
    expr = _partition_expression(table, tuple(file.values.items()))
    fragment = FORMAT.make_fragment(file.path, filesystem=fs, partition_expression=expr)
    try:
        fragment.ensure_complete_metadata()  # the footer, parsed once
    except (OSError, pa.ArrowException) as exc:
        raise DamagedFile(damaged(file.path, exc, store)) from None
    with _fragments_lock:
        _fragments[file.path] = fragment
        while len(_fragments) > CACHED_FILES:
            _fragments.popitem(last=False)
    return fragment


class _Scan:
    """What DuckDB reads from: ``to_reader()`` over a pyarrow scanner, naming a damaged file on failure.

    The partition columns (run, policy_version) are not in the files (Delta keeps them in the log):
    each batch gets them from its file's partition values.
    """

    def __init__(self, dataset: ds.FileSystemDataset, files: list[tuple[DataFile, ds.Fragment]], store: str,
                 table: str, columns: Sequence[str] | None, filter: ds.Expression | None,  # noqa: A002
                 **kwargs: Any):
        self.files, self.store, self.table = files, store, table
        spec = table_spec(table)
        self.columns = list(columns) if columns is not None else spec.schema.names
        self.partition = [c for c in self.columns if c in spec.partition_by]
        self.physical = [c for c in self.columns if c not in spec.partition_by]
        self.scanner = dataset.scanner(columns=self.physical, filter=filter, **kwargs)
        self.projected_schema = pa.schema([spec.schema.field(c) for c in self.columns])

    def to_reader(self) -> pa.RecordBatchReader:
        return pa.RecordBatchReader.from_batches(self.projected_schema, self._batches())

    def to_table(self) -> pa.Table:
        return pa.Table.from_batches(self._batches(), schema=self.projected_schema)

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
            raise DamagedFile(self._diagnose(exc)) from None

    def _diagnose(self, exc: BaseException) -> str:
        """Find which file failed: read each of the scan's files alone (only on the error path)."""
        for file, fragment in self.files:
            try:
                fragment.to_table(columns=self.physical, schema=self.scanner.dataset_schema)
            except (OSError, pa.ArrowException) as file_exc:
                return f"table {self.table!r}: " + damaged(file.path, file_exc, self.store)
        return f"table {self.table!r}: " + damaged(self.table, exc, self.store)


def file_schema(table: str) -> pa.Schema:
    """The columns a data file of ``table`` holds: the schema without its partition columns."""
    spec = table_spec(table)
    return pa.schema([f for f in spec.schema if f.name not in spec.partition_by])


class TableDataset(ds.FileSystemDataset):
    """One table of the store as a dataset whose scans read its Delta snapshot and open its files."""

    def __init__(self, store: Store, table: str, run: str | None = None,
                 version: int | Callable[[], int] | None = None, files: Sequence[DataFile] | None = None):
        """version: a table version, None for the latest at each scan, or a callable giving the version
        when the first scan needs it (a selection pins only the tables it reads)."""
        self.store, self.table, self.run, self.version = store, table, run, version
        self.pinned_files = None if files is None else list(files)
        self.spec = table_spec(table)
        super().__init__([], self.spec.schema, FORMAT, pafs.LocalFileSystem())

    def data_files(self) -> list[DataFile]:
        if self.pinned_files is not None:
            return self.pinned_files
        version = self.version() if callable(self.version) else self.version
        snap = snapshot(self.store, self.table, version)
        return list(snap.files) if self.run is None else snap.files_of(self.run)

    def scanner(self, columns: Sequence[str] | None = None, filter: ds.Expression | None = None,  # noqa: A002
                **kwargs: Any) -> _Scan:
        files = self.data_files()
        if filter is not None and files:
            # Prune on the partition values alone: pyarrow simplifies the filter against each file's
            # partition expression without touching the file system (the paths are never opened).
            exprs = [_partition_expression(self.table, tuple(f.values.items())) for f in files]
            probe = ds.FileSystemDataset.from_paths([f"/{i}" for i in range(len(files))], self.spec.schema, FORMAT,
                                                    pafs.LocalFileSystem(), partitions=exprs)
            kept = {int(fragment.path[1:]) for fragment in probe.get_fragments(filter=filter)}
            files = [f for i, f in enumerate(files) if i in kept]
        fs, uri = self.store.location.fs, self.store.uri
        opened = [(f, _fragment(fs, f, self.table, uri)) for f in files]
        dataset = ds.FileSystemDataset([fr for _, fr in opened], self.spec.schema, FORMAT, fs)
        return _Scan(dataset, opened, uri, self.table, columns, filter, **kwargs)


def read_table(store: Store, table: str, *, columns: Sequence[str] | None = None,
               filter: ds.Expression | None = None, version: int | None = None,  # noqa: A002
               files: Sequence[DataFile] | None = None) -> pa.Table:
    """Rows of ``table`` (of ``files`` only, if given), checksums verified, as one Arrow table of its schema.

    Raises OSError naming a damaged file.
    """
    return TableDataset(store, table, version=version, files=files).scanner(columns=columns, filter=filter).to_table()


def file_stats(rows: pa.Table) -> str:
    """The Delta ``stats`` of a data file: row count, null counts, and min / max of its numeric and short
    string columns (what other Delta readers use to skip files). Long strings (response text) and
    timestamps (the log keeps milliseconds; a truncated max would wrongly skip a file) get no bounds."""
    nulls, low, high = {}, {}, {}
    for name in rows.column_names:
        column = rows.column(name)
        nulls[name] = _null_counts(column)
        kind = column.type
        if column.null_count == len(column) or not (pa.types.is_integer(kind) or pa.types.is_floating(kind)
                                                    or pa.types.is_string(kind)):
            continue
        if pa.types.is_string(kind) and pc.max(pc.utf8_length(column)).as_py() > 64:
            continue
        bounds = pc.min_max(column)
        lo, hi = bounds["min"].as_py(), bounds["max"].as_py()
        if isinstance(lo, float) and not (math.isfinite(lo) and math.isfinite(hi)):
            continue
        low[name], high[name] = lo, hi
    return json.dumps({"numRecords": rows.num_rows, "nullCount": nulls, "minValues": low, "maxValues": high})


def _null_counts(column: pa.ChunkedArray) -> int | dict[str, Any]:
    """A column's null count; for a struct, its fields' counts nested (else delta-rs drops all the stats)."""
    if not pa.types.is_struct(column.type):
        return column.null_count
    return {field.name: _null_counts(pc.struct_field(column, [i])) for i, field in enumerate(column.type)}
