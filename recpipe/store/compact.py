"""Table maintenance: merge small files (optimize) and delete files no version still needs (vacuum).

    compact_table(store, "steps", run="a")      # one file per partition, in one transaction each
    vacuum_table(store, "rollouts")             # files removed long enough ago, and not in lineage
    maintain(store, ["steps"], run="a")         # both, table by table (`recpipe compact`)

Optimize: the files of a partition are read (checksums verified: a damaged file is never merged into
a good one), sorted by the table's key (so a reader looking for a few groups skips row groups by
their statistics - the ordering that helps selection; z-ordering several columns would not, since
every selection filter is on a partition column or the key) and written as one file; one Delta
commit adds it and removes the old files (dataChange=false), so readers see either the old files or
the merged one. The commit carries the application transaction ``<partition>/compact``, one version
per rewrite: two processes compacting one partition at once cannot both commit (the second gets a
conflict and skips), while writers appending new shards to it never conflict. The file is written by
pyarrow, not delta-rs's optimize, to keep the page checksums that delta-rs's writer does not write.

Vacuum: Delta keeps removed files until vacuum deletes them. The retention is the larger of
``retention_hours`` (in-flight readers: default 7 days, never under the query time limit) and the age
of the oldest table version any recorded selection read (``batches.read_versions``), so a selection
re-run as of its recorded versions always finds its files.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from deltalake.transaction import RemoveAction

from recpipe.schema import table_spec
from recpipe.store.datasets import DataFile, read_table, snapshot

if TYPE_CHECKING:
    from recpipe.store import Store

DEFAULT_RETENTION_HOURS = 168.0
MIN_RETENTION_HOURS = 1.0  # longer than any query may run (recpipe.store.sql's time limit)


def _partition_name(table: str, values: dict[str, Any]) -> str:
    return "/".join(f"{c}={values[c]}" for c in table_spec(table).partition_by)


def compact_partition(store: Store, table: str, values: dict[str, Any], files: list[DataFile],
                      version: int) -> bool:
    """Merge ``files`` (one partition's, at table ``version``) into one file; False if another process
    rewrote the partition first."""
    from recpipe.store import StoreError

    spec = table_spec(table)
    app_id = f"{_partition_name(table, values)}/compact"
    done = store.transaction_version(store.delta(table, version), table, app_id)
    try:
        merged = read_table(store, table, files=files)
    except OSError as exc:  # never merge a damaged file into a good one
        raise StoreError(f"compaction of {table} {values} stopped: {exc}") from None
    key = [c for c in spec.key if c in merged.column_names and c not in spec.partition_by]
    if key:
        merged = merged.sort_by([(c, "ascending") for c in key])
    relative = "/".join([*(f"{c}={values[c]}" for c in spec.partition_by),
                         f"compact-{uuid.uuid4().hex[:16]}.parquet"]).lstrip("/")
    now = int(time.time() * 1000)
    partition = {c: str(values[c]) for c in spec.partition_by}
    removes = [RemoveAction(f.relative, False, now, f.size, partition) for f in files]
    return store.add_files(table, [(relative, merged.drop_columns(list(spec.partition_by)), values)],
                           app_id=app_id, app_version=done + 1, removes=removes,
                           operation=f"compact {len(files)} files")


def compact_table(store: Store, table: str, run: str | None = None, min_files: int = 2) -> dict[str, int]:
    """Compact every partition of ``table`` (of one run, or all) holding at least ``min_files`` files."""
    counts: dict[tuple, int] = {}
    for f in snapshot(store, table).files:
        if run is None or f.values.get("run") == run:
            key = tuple(f.values.values())
            counts[key] = counts.get(key, 0) + 1
    partitions = files_merged = 0
    for key in sorted(k for k, n in counts.items() if n >= min_files):
        # Each partition from the latest version (our own commits and others' since): the version the
        # store's table is at, so the rewrite count is read there without loading an older version.
        snap = snapshot(store, table)
        files = snap.files_in({key})[key]
        values = dict(zip(table_spec(table).partition_by, key, strict=True))
        if len(files) >= min_files and compact_partition(store, table, values, files, snap.version):
            partitions += 1
            files_merged += len(files)
    return {"partitions": partitions, "files_merged": files_merged, "files_written": partitions}


def lineage_versions(store: Store) -> dict[str, int]:
    """The oldest version of each table that a recorded selection read (``batches.read_versions``)."""
    rows = store.read("batches", None).column("read_versions").unique().to_pylist() if \
        store.delta("batches").version() > 0 else []
    oldest: dict[str, int] = {}
    for text in rows:
        for table, version in json.loads(text or "{}").items():
            oldest[table] = min(version, oldest.get(table, version))
    return oldest


def vacuum_table(store: Store, table: str, retention_hours: float = DEFAULT_RETENTION_HOURS,
                 *, dry_run: bool = False, keep_lineage: bool = True) -> dict[str, Any]:
    """Delete the files of ``table`` removed more than the retention ago; returns what was (or would be) deleted.

    keep_lineage: extend the retention to the oldest version a recorded selection read (see module doc).
    """
    retention = float(retention_hours)
    needed = lineage_versions(store).get(table) if keep_lineage else None
    delta = store.delta(table)
    if needed is not None:
        commits = {h["version"]: h["timestamp"] for h in delta.history()}
        # A file a version needs was removed by a later commit: keep every removal newer than that version.
        stamp = commits.get(needed)
        if stamp is None:  # history cleaned up past it: keep everything removed since the oldest known commit
            stamp = min(commits.values())
        age = (time.time() * 1000 - stamp) / 3.6e6
        retention = max(retention, math.ceil(age + 1))
    # full: also files no commit ever referenced (a writer killed between writing a file and committing it);
    # the retention spares those of writers still at work.
    deleted = delta.vacuum(retention_hours=math.ceil(retention), dry_run=dry_run, enforce_retention_duration=False,
                           full=True)
    return {"table": table, "retention_hours": math.ceil(retention), "lineage_version": needed,
            "files_deleted": len(deleted), "dry_run": dry_run,
            "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "files": list(deleted)}


def maintain(store: Store, tables: Sequence[str], *, run: str | None = None, vacuum: bool = True,
             retention_hours: float = DEFAULT_RETENTION_HOURS) -> Iterator[tuple[str, dict[str, int], dict[str, Any] | None]]:
    """``recpipe compact``: optimize each table (only ``run``'s partitions if given), then vacuum it; yields
    (table, compaction stats, vacuum result or None) as each table is done. Safe while others write."""
    for table in tables:
        merged = compact_table(store, table, run=run)
        yield table, merged, vacuum_table(store, table, retention_hours) if vacuum else None
