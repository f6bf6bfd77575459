"""Check an archive for damage and repair what can be repaired without loss.

    recpipe doctor --store store            # list problems, exit 1 if any
    recpipe doctor --store store --repair   # quarantine bad files, drop stale temp files
    recpipe doctor --store store --migrate  # rewrite files of older schema versions

Damaged files are never deleted: ``--repair`` moves them to
``<store>/quarantine/<original path>`` so nothing is lost and every good row
stays readable.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from recpipe.schema import SCHEMA_VERSION, conform, migrations, table_names, table_schema
from recpipe.store import Store
from recpipe.store.files import commit_parquet, stale_temps


@dataclass
class Problem:
    path: Path
    kind: str  # corrupt | schema | old-schema | stale-temp | missing-checkpoint
    detail: str


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    files_checked: int = 0
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _file_version(schema: pa.Schema) -> int:
    meta = schema.metadata or {}
    return int(meta.get(b"schema_version", str(SCHEMA_VERSION).encode()))


def check_file(table: str, path: Path) -> Problem | None:
    """Read the whole file; compare its columns with the table schema."""
    try:
        data = pq.read_table(path)
    except Exception as exc:  # any read failure means the file is damaged
        return Problem(path, "corrupt", f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
    version = _file_version(data.schema)
    expected = table_schema(table)
    missing = [n for n in expected.names if n not in data.column_names]
    extra = [n for n in data.column_names if n not in expected.names]
    if version < SCHEMA_VERSION:
        added = {c["name"] for v, tables in migrations().items() if v >= version for c in tables.get(table, [])}
        if set(missing) <= added and not extra:
            return Problem(path, "old-schema", f"schema_version {version} < {SCHEMA_VERSION}: lacks {missing}")
    if missing or extra:
        return Problem(path, "schema", f"columns missing {missing}, unexpected {extra}")
    try:
        conform(table, data)
    except ValueError as exc:
        return Problem(path, "schema", str(exc))
    return None


def diagnose(store: Store) -> Report:
    report = Report()
    for table in table_names():
        for path in store.files(table):
            report.files_checked += 1
            problem = check_file(table, path)
            if problem:
                report.problems.append(problem)
    for temp in stale_temps(store.root):
        report.problems.append(Problem(temp, "stale-temp", "left by a killed writer; never visible to readers"))
    # Retention deletes old checkpoints on purpose; the latest version of a run must be loadable.
    bad = {p.path for p in report.problems}
    latest: dict[str, dict] = {}
    for path in store.files("policies"):
        if path not in bad:
            for row in pq.read_table(path, columns=["run", "version", "checkpoint"]).to_pylist():
                if row["version"] >= latest.get(row["run"], {"version": -1})["version"]:
                    latest[row["run"]] = row
    for run, row in sorted(latest.items()):
        ckpt = Path(row["checkpoint"])
        ckpt = ckpt if ckpt.is_absolute() else store.root / ckpt
        if not (ckpt / "config.json").is_file():
            report.problems.append(Problem(ckpt, "missing-checkpoint",
                                           f"run {run}: latest version {row['version']} has no checkpoint"))
    return report


def quarantine(store: Store, path: Path) -> Path:
    target = store.root / "quarantine" / path.relative_to(store.root)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(path, target)
    return target


def migrate_file(table: str, path: Path) -> None:
    """Rewrite an old-schema file with the current schema (new columns get their defaults)."""
    data = pq.read_table(path)
    version = _file_version(data.schema)
    schema = table_schema(table)
    defaults = {c["name"]: c.get("default") for v, tables in migrations().items() if v >= version
                for c in tables.get(table, [])}
    for name in schema.names:
        if name not in data.column_names:
            value = defaults.get(name)
            column = pa.array([value] * data.num_rows, type=schema.field(name).type)
            data = data.append_column(name, column)
    meta = dict(pq.read_schema(path).metadata or {})
    meta.pop(b"schema_version", None)
    migrated = conform(table, data)
    extra = {k.decode(): v.decode() for k, v in meta.items() if k.startswith(b"recpipe.")}
    commit_parquet(path, migrated, metadata=extra, overwrite=True)


def repair(store: Store, report: Report, *, migrate: bool = False) -> Report:
    for problem in report.problems:
        if problem.kind in ("corrupt", "schema") and problem.path.exists():
            moved = [problem.path]
            rel = problem.path.relative_to(store.root)
            if rel.parts[0] == "rollouts":  # its group summary would point at rows that are gone
                twin = store.root / "groups" / Path(*rel.parts[1:])
                if twin.exists():
                    moved.append(twin)
            for path in moved:
                target = quarantine(store, path)
                report.repaired.append(f"quarantined {path.relative_to(store.root)} -> "
                                       f"{target.relative_to(store.root)}")
        elif problem.kind == "stale-temp" and problem.path.exists():
            if problem.path.is_dir():
                shutil.rmtree(problem.path)
            else:
                problem.path.unlink()
            report.repaired.append(f"removed {problem.path.relative_to(store.root)}")
        elif problem.kind == "old-schema" and migrate:
            table = problem.path.relative_to(store.root).parts[0]
            migrate_file(table, problem.path)
            report.repaired.append(f"migrated {problem.path.relative_to(store.root)} to schema {SCHEMA_VERSION}")
    return report
