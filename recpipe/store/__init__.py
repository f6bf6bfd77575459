"""The rollout archive: hive-partitioned Parquet tables in a directory.

    store = Store.create("store")
    store.append("rollouts", rows, shard_id="abc123")   # atomic, idempotent per shard
    con = store.connect()                                # DuckDB with every table registered
    con.sql("SELECT policy_version, avg(reward) FROM rollouts GROUP BY 1").show()

Layout: ``<root>/<table>/<col>=<value>/.../<shard_id>.parquet`` (zstd), one
folder level per partition column of the table (schemas/tables.yaml).
Checkpoints live in ``<root>/checkpoints/<run>/v<version>``; run locks in
``<root>/locks``; bad files found by ``recpipe doctor`` go to ``<root>/quarantine``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recpipe.schema import SCHEMA_VERSION, conform, table_names, table_spec
from recpipe.store.datasets import TableDataset, damaged
from recpipe.store.files import StoreWriteError, commit_parquet, fsync_dir
from recpipe.store.lock import RunLock, RunLocked

__all__ = ["Store", "StoreError", "StoreWriteError", "RunLocked", "connect", "SHARDS_KEY"]

SHARDS_KEY = "recpipe.shards"  # Parquet footer key: shard ids a file holds (several after compaction)
MARKER = ".recpipe-store"


class StoreError(ValueError):
    """The store is missing, not a recpipe store, or asked for something it cannot do."""


class Store:
    """A directory of partitioned Parquet tables plus checkpoints."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        if not (self.root / MARKER).is_file():
            raise StoreError(f"{self.root} is not a recpipe store (run `recpipe init --store {root}`)")

    @classmethod
    def create(cls, root: str | Path) -> Store:
        """Open the store at ``root``, creating it if needed."""
        root = Path(root)
        marker = root / MARKER
        if not marker.is_file():
            if root.exists() and not root.is_dir():
                raise StoreError(f"{root} is a file, not a directory; choose another --store")
            if root.exists() and any(root.iterdir()):
                raise StoreError(f"{root} exists and is not empty; refusing to turn it into a store")
            try:
                root.mkdir(parents=True, exist_ok=True)
                marker.write_text(json.dumps({"schema_version": SCHEMA_VERSION}) + "\n")
                fsync_dir(root)
            except OSError as exc:
                raise StoreWriteError(exc.errno, f"cannot create store at {root}: {exc.strerror}") from exc
        return cls(root)

    # ---- paths -------------------------------------------------------------------------------
    def table_dir(self, table: str) -> Path:
        table_spec(table)  # unknown table -> KeyError listing the tables
        return self.root / table

    def partition_dir(self, table: str, values: dict[str, Any]) -> Path:
        path = self.table_dir(table)
        for column in table_spec(table).partition_by:
            if column not in values:
                raise StoreError(f"{table}: partition column {column!r} missing")
            path = path / f"{column}={values[column]}"
        return path

    def glob(self, table: str) -> str:
        levels = "/".join(f"{c}=*" for c in table_spec(table).partition_by)
        return str(self.table_dir(table) / levels / "*.parquet")

    def files(self, table: str, run: str | None = None) -> list[Path]:
        base = self.table_dir(table)
        if run is not None:
            base = base / f"run={run}"
            depth = len(table_spec(table).partition_by) - 1
        else:
            depth = len(table_spec(table).partition_by)
        pattern = "/".join(["*"] * depth + ["*.parquet"])
        return sorted(p for p in base.glob(pattern) if not p.name.startswith("."))

    def checkpoint_dir(self, run: str, version: int) -> Path:
        return self.root / "checkpoints" / run / f"v{version:06d}"

    def lock(self, run: str, purpose: str = "writer") -> RunLock:
        return RunLock(self.root / "locks" / f"{run}.lock", run=run, purpose=purpose)

    # ---- writes ------------------------------------------------------------------------------
    def is_committed(self, table: str, values: dict[str, Any], shard_id: str) -> bool:
        part = self.partition_dir(table, values)
        if (part / f"{shard_id}.parquet").exists():
            return True
        return any(shard_id in file_shards(f) for f in part.glob("compact-*.parquet"))

    def append(self, table: str, rows: pa.Table | list[dict[str, Any]], *, shard_id: str) -> bool:
        """Commit ``rows`` as one file named by ``shard_id``; False if that shard is already committed.

        All rows must belong to one partition. Rows are checked against the
        table's schema first, so a bad batch raises before anything is written.
        """
        if not shard_id or "/" in shard_id or shard_id.startswith("."):
            raise StoreError(f"bad shard id {shard_id!r}")
        data = conform(table, rows)
        if data.num_rows == 0:
            raise StoreError(f"{table}: refusing to commit an empty shard {shard_id!r}")
        values = {}
        for column in table_spec(table).partition_by:
            distinct = data.column(column).unique().to_pylist()
            if len(distinct) != 1:
                raise StoreError(f"{table}: shard {shard_id!r} spans {len(distinct)} values of {column!r}; one expected")
            values[column] = distinct[0]
        if self.is_committed(table, values, shard_id):
            return False
        final = self.partition_dir(table, values) / f"{shard_id}.parquet"
        return commit_parquet(final, data, metadata={SHARDS_KEY: json.dumps([shard_id])})

    def append_rollouts(self, rows: pa.Table, *, shard_id: str) -> bool:
        """Commit a generation shard: its rollouts, then its one-row-per-group summary.

        The summary is derived from the rollouts; if a crash fell between the two
        commits, a rerun of the shard completes the summary and writes no rollout twice.
        """
        data = conform("rollouts", rows)
        wrote = self.append("rollouts", data, shard_id=shard_id)
        values = {"run": data.column("run")[0].as_py(), "policy_version": data.column("policy_version")[0].as_py()}
        if not self.is_committed("groups", values, shard_id):
            if not wrote:  # summarise what is stored, not what this rerun produced
                data = self.read_shard("rollouts", values, shard_id)
            self.append("groups", group_summary(data), shard_id=shard_id)
        return wrote

    def read_shard(self, table: str, values: dict[str, Any], shard_id: str) -> pa.Table:
        part = self.partition_dir(table, values)
        single = part / f"{shard_id}.parquet"
        if single.exists():
            return self._read_file(single)
        for f in part.glob("compact-*.parquet"):
            if shard_id in file_shards(f):
                return self._read_file(f).filter(self._shard_rows(table, shard_id))
        raise StoreError(f"{table}: shard {shard_id!r} not found in {part}")

    @staticmethod
    def _shard_rows(table: str, shard_id: str) -> pc.Expression:
        """Which rows of a compacted file are one shard's: its shard_id column, else the columns the
        table's shard template names (a ``batches`` shard "step-000003" is the rows of step 3)."""
        spec = table_spec(table)
        if "shard_id" in spec.schema.names:
            return pc.field("shard_id") == shard_id
        values = spec.shard_filter(shard_id)
        if not values:
            raise StoreError(f"{table}: cannot find shard {shard_id!r} inside a compacted file (the table has "
                             "no shard_id column and no shard template in schemas/tables.yaml)")
        expr = None
        for column, value in values.items():
            term = pc.field(column) == value
            expr = term if expr is None else expr & term
        return expr

    def _read_file(self, path: Path) -> pa.Table:
        try:
            return pq.read_table(path, page_checksum_verification=True)
        except (OSError, pa.ArrowException) as exc:
            raise StoreError(damaged(path, exc, self.root)) from None

    # ---- reads -------------------------------------------------------------------------------
    def connect(self, *, read_only: bool = False, tables: list[str] | None = None,
                check_files: bool | None = None) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB connection with every table (or only ``tables``) registered by name.

        Tables are pyarrow datasets over the table's files (recpipe.store.datasets.TableDataset), listed
        afresh by each query that reads them, with page checksums verified. read_only: the connection is
        locked down (recpipe.store.sql: no file access, no settings changes) - for user SQL.
        check_files (default: not read_only): read every file's footer now and raise StoreError naming
        a damaged one. Off for read-only SQL, so one damaged file fails only the queries on its table.
        """
        from recpipe.store.sql import locked_connection

        names = table_names() if tables is None else tables
        if check_files if check_files is not None else not read_only:
            for table in names:
                for path in self.files(table):
                    try:
                        pq.read_metadata(path)
                    except (OSError, pa.ArrowException) as exc:
                        raise StoreError(f"table {table!r}: " + damaged(path, exc, self.root)) from None
        con = locked_connection() if read_only else duckdb.connect()
        for table in names:
            con.register(table, TableDataset(self.root, table))
        return con

    def read(self, table: str, where: str | None = None, params: dict[str, Any] | None = None) -> pa.Table:
        """Rows of ``table`` (optionally filtered by a SQL ``where`` with $params) as Arrow."""
        sql = f"SELECT * FROM {table}" + (f" WHERE {where}" if where else "")
        con = self.connect(tables=[table], check_files=False)
        try:
            return con.sql(sql, params=params or None).to_arrow_table()
        except duckdb.Error as exc:
            from recpipe.store.sql import scan_failure

            text = scan_failure(exc)
            if text is not None and "recpipe doctor" in text:
                raise StoreError(text) from None
            raise
        finally:
            con.close()

    def compact(self, table: str, run: str | None = None, min_files: int = 2) -> dict[str, int]:
        from recpipe.store.compact import compact_table

        return compact_table(self, table, run=run, min_files=min_files)


def file_shards(path: Path) -> list[str]:
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(SHARDS_KEY.encode())
    return json.loads(raw) if raw else [path.stem]


def group_summary(rollouts: pa.Table) -> pa.Table:
    """One row per group: the columns selection queries scan instead of the token payloads."""
    frame = pl.from_arrow(
        rollouts.select(
            ["run", "group_id", "policy_version", "task", "prompt_id", "reward", "reward_error",
             "response_length", "shard_id", "created_at"]
        )
    )
    summary = frame.group_by(["run", "group_id", "policy_version", "task", "prompt_id", "shard_id"]).agg(
        pl.len().cast(pl.Int32).alias("n"),
        pl.col("reward").mean().alias("reward_mean"),
        pl.col("reward").std(ddof=0).fill_null(0.0).alias("reward_std"),
        pl.col("reward_error").is_not_null().sum().cast(pl.Int32).alias("n_errors"),
        pl.col("response_length").max().cast(pl.Int32).alias("max_response_length"),
        pl.col("created_at").max().alias("created_at"),
    ).with_columns(pl.lit(SCHEMA_VERSION, dtype=pl.Int32).alias("schema_version"))
    return conform("groups", summary.sort("group_id").to_arrow())


def connect(store: str | Path | Store, *, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """``recpipe.connect(store)``: DuckDB with every table as a view (read-only by default)."""
    return (store if isinstance(store, Store) else Store(store)).connect(read_only=read_only)
