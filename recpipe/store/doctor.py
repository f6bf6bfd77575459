"""Check an archive for damage and repair what can be repaired without loss.

    recpipe doctor --store store            # list problems, exit 1 if any
    recpipe doctor --store store --repair   # quarantine bad files, drop stale temp files
    recpipe doctor --store store --migrate  # rewrite files of older schema versions

Damaged files are never deleted: ``--repair`` moves them to
``<store>/quarantine/<original path>`` so nothing is lost and every good row
stays readable.

Besides each file on its own, doctor checks that the tables agree: every
generation shard has both its rollouts and its group summary (a summary
without rollouts would let selection pick groups whose rows are gone; rollouts
without a summary are invisible to selection), and no rollout id is stored
twice. Repairs run in an order that a crash cannot turn into a silent
inconsistency: a bad rollouts file's summary is moved before the file itself,
so an interrupted repair leaves a damaged file that the next run finds again.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recpipe.schema import SCHEMA_VERSION, conform, migrations, table_names, table_schema
from recpipe.store import SHARDS_KEY, Store, file_shards, group_summary
from recpipe.store.datasets import partition_values
from recpipe.store.files import commit_parquet, stale_temps


@dataclass
class Problem:
    path: Path
    # corrupt | schema | old-schema | stale-temp | missing-checkpoint | missing-groups | orphan-groups
    # | duplicate-rollouts; recpipe.doctor adds damaged-checkpoint | no-manifest
    kind: str
    detail: str
    shards: tuple[str, ...] = ()  # missing-groups / orphan-groups: the generation shards concerned


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
        data = pq.read_table(path, page_checksum_verification=True)
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
    damaged = {p.path for p in report.problems if p.kind in ("corrupt", "schema")}
    report.problems.extend(shard_problems(store, damaged))
    report.problems.extend(duplicate_rollouts(store, damaged))
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


def _shards_by_partition(store: Store, table: str, skip: set[Path]) -> dict[Path, dict[str, Path]]:
    """{partition folder relative to the table: {shard id: file holding it}} (compacted files hold several)."""
    found: dict[Path, dict[str, Path]] = {}
    base = store.table_dir(table)
    for path in store.files(table):
        if path not in skip:
            try:
                shards = file_shards(path)
            except Exception:  # an unreadable footer: a damaged file, reported as such; its name is its shard
                shards = [path.stem]
            found.setdefault(path.parent.relative_to(base), {}).update(dict.fromkeys(shards, path))
    return found


def shard_problems(store: Store, damaged: set[Path]) -> list[Problem]:
    """Generation shards whose rollouts lack their group summary, and summaries whose rollouts are gone.

    A damaged rollouts file still counts as present here: it is reported (and repaired) as damaged."""
    problems = []
    rollouts = _shards_by_partition(store, "rollouts", set())
    groups = _shards_by_partition(store, "groups", damaged)
    for part in sorted(set(rollouts) | set(groups)):
        have, summaries = rollouts.get(part, {}), groups.get(part, {})
        for path, shards in _by_file({s: f for s, f in have.items() if s not in summaries}).items():
            if path not in damaged:
                problems.append(Problem(path, "missing-groups", f"{len(shards)} shard(s) have rollouts but no "
                                        f"group summary (invisible to selection): {', '.join(shards)}", shards))
        for path, shards in _by_file({s: f for s, f in summaries.items() if s not in have}).items():
            problems.append(Problem(path, "orphan-groups", f"group summary of {len(shards)} shard(s) whose rollouts "
                                    f"are gone (selection would pick missing rows): {', '.join(shards)}", shards))
    return problems


def _by_file(shard_files: dict[str, Path]) -> dict[Path, tuple[str, ...]]:
    files: dict[Path, list[str]] = {}
    for shard, path in sorted(shard_files.items()):
        files.setdefault(path, []).append(shard)
    return {path: tuple(shards) for path, shards in files.items()}


def duplicate_rollouts(store: Store, damaged: set[Path]) -> list[Problem]:
    """Rollout ids stored more than once (in one file or across files)."""
    paths = [p for p in store.files("rollouts") if p not in damaged]
    ids, files = [], []
    for i, path in enumerate(paths):
        column = pq.read_table(path, columns=["rollout_id"], page_checksum_verification=True).column("rollout_id")
        ids.append(column)
        files.append(pa.array([i] * len(column), pa.int32()))
    if not ids:
        return []
    table = pa.table({"rollout_id": pa.chunked_array(ids), "file": pa.chunked_array(files)})
    counts = table.group_by("rollout_id").aggregate([("file", "count"), ("file", "distinct")])
    dupes = counts.filter(pc.greater(counts.column("file_count"), 1))
    if dupes.num_rows == 0:
        return []
    where = sorted({paths[f] for group in dupes.column("file_distinct").to_pylist() for f in group})
    examples = ", ".join(dupes.column("rollout_id").to_pylist()[:3])
    return [Problem(where[0], "duplicate-rollouts",
                    f"{dupes.num_rows} rollout id(s) stored more than once (e.g. {examples}) in "
                    f"{', '.join(str(p.relative_to(store.root)) for p in where)}; not repaired automatically: "
                    "inspect with `recpipe sql` and quarantine the extra copy by hand")]


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


def _drop_shards(store: Store, path: Path, shards: tuple[str, ...]) -> str:
    """Remove ``shards``' rows from a groups file: quarantine it whole, or (a compacted file also holding
    good shards) keep a copy in quarantine and rewrite it atomically without them."""
    held = file_shards(path)
    keep = [s for s in held if s not in shards]
    if not keep:
        return f"quarantined {path.relative_to(store.root)} -> {quarantine(store, path).relative_to(store.root)}"
    target = store.root / "quarantine" / path.relative_to(store.root)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, target)
    data = pq.read_table(path, page_checksum_verification=True)
    kept = data.filter(pc.is_in(data.column("shard_id"), pa.array(keep)))
    commit_parquet(path, kept, metadata={SHARDS_KEY: json.dumps(keep)}, overwrite=True)
    return f"removed shard(s) {', '.join(shards)} from {path.relative_to(store.root)} (copy in quarantine)"


def _summarise_missing(store: Store, path: Path, shards: tuple[str, ...]) -> str:
    """Write the group summaries of rollouts shards that lack them, from the stored rollouts."""
    values = partition_values("rollouts", path.parent)
    for shard in shards:
        store.append("groups", group_summary(store.read_shard("rollouts", values, shard)), shard_id=shard)
    return f"wrote the group summary of {', '.join(shards)} from {path.relative_to(store.root)}"


def repair(store: Store, report: Report, *, migrate: bool = False) -> Report:
    for problem in report.problems:
        if problem.kind in ("corrupt", "schema") and problem.path.exists():
            moved = [problem.path]
            rel = problem.path.relative_to(store.root)
            if rel.parts[0] == "rollouts":  # its group summary would point at rows that are gone
                twin = store.root / "groups" / Path(*rel.parts[1:])
                if twin.exists():
                    # Summary first: a crash between the two moves then leaves the damaged rollouts file,
                    # which the next doctor run finds; the other order would leave a summary of nothing.
                    moved.insert(0, twin)
            for path in moved:
                target = quarantine(store, path)
                report.repaired.append(f"quarantined {path.relative_to(store.root)} -> "
                                       f"{target.relative_to(store.root)}")
        elif problem.kind == "orphan-groups" and problem.path.exists():
            report.repaired.append(_drop_shards(store, problem.path, problem.shards))
        elif problem.kind == "missing-groups" and problem.path.exists():
            report.repaired.append(_summarise_missing(store, problem.path, problem.shards))
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
