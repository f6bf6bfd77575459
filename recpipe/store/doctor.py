"""Check an archive of Delta tables for damage and disagreement; repair what can be repaired without loss.

    recpipe doctor --store store            # list problems, exit 1 if any
    recpipe doctor --store store --repair   # quarantine damaged files, make the tables agree again

What is checked, in each table's current version:

* ``corrupt``: an active data file that cannot be read in full with its page checksums verified, or whose
  columns are not the table's (minus the partition columns, which Delta keeps in the log). The file is
  read afresh from storage, not through the per-process footer cache of recpipe.store.datasets.
* ``missing-file``: a file the log references that storage no longer holds (delta-rs FSCK, dry run).
* ``missing-groups`` / ``orphan-groups``: generation shards with rollouts but no group summary (invisible
  to selection), and summaries whose rollouts are gone (selection would pick rows that are not there),
  from the distinct (run, policy_version, shard_id) of both tables.
* ``duplicate-rollouts``: rollout ids stored more than once (reported, never repaired automatically).
* ``missing-checkpoint``: the latest policy version of a run without its checkpoint.
* ``stale-temp``: checkpoint temp dirs left by killed writers.
* ``table-settings``: a table whose properties lack recpipe's (recpipe.store.table_configuration: no
  expired-log cleanup, its checkpoint interval), e.g. created by an older recpipe; the repair sets
  them (one metadata commit per table; concurrent appends re-read and commit after it).

Repairs are Delta transactions, safe beside running writers:

* a corrupt file is copied to ``<store>/quarantine/<table>/<relative path>``, then removed from the table
  by one commit (a remove with dataChange=true; the file stays in storage until vacuum). Every commit that
  rewrites or removes files of a partition carries the application transaction ``<partition>/compact`` at
  its next version (taken from the snapshot it read) - the id compaction uses - so a repair and a
  compaction of one partition never both commit: the one that loses re-reads the partition and starts over.
  Appends of new shards never conflict with either.
* group rows are removed by rewriting the files holding them without those rows (adds and removes in one
  commit, copies of the old files in quarantine);
* a missing summary is written from the stored rollouts, under the shard's own application transaction
  at its next version (a shard whose summary was lost is already committed once);
* a missing file is dropped from the log by delta-rs's FSCK (``DeltaTable.repair``).

Order: summary first. A damaged or missing rollouts file loses its group rows before the file leaves the
table, and a quarantine copy is made before the commit that removes a file, so a crash anywhere in a
repair leaves a problem that the next ``diagnose`` finds (the damaged file still listed, or a summary
still missing), never a silent inconsistency. Each repair re-reads what it acts on, so a report that is a
little stale (other processes wrote meanwhile) is repaired correctly.
"""

from __future__ import annotations

import errno
import shutil
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake.transaction import RemoveAction

from recpipe.schema import added_columns, fits_older, table_names, table_spec
from recpipe.store import Store, StoreError, group_summary, table_configuration
from recpipe.store.datasets import DataFile, file_schema, read_table
from recpipe.store.files import StoreWriteError, stale_temps

QUARANTINE = "quarantine"
ATTEMPTS = 5  # re-reads of a partition that another process rewrote first
SHARD_COLUMNS = ("run", "policy_version", "shard_id")
BAD_KINDS = ("corrupt", "missing-file")  # problems of one data file: its rows cannot be read


@dataclass
class Problem:
    path: str | Path  # a data file or partition (on the store's filesystem), or a checkpoint dir
    # corrupt | missing-file | missing-groups | orphan-groups | duplicate-rollouts | missing-checkpoint
    # | stale-temp | table-settings; recpipe.doctor adds damaged-checkpoint | no-manifest | unregistered-checkpoint
    kind: str
    detail: str
    shards: tuple[str, ...] = ()  # missing-groups / orphan-groups: the generation shards concerned
    table: str | None = None      # the table of a data-file or partition problem
    relative: str | None = None   # the file as the table's log names it
    values: dict[str, Any] = field(default_factory=dict)  # its partition values


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    files_checked: int = 0
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def partition_name(table: str, values: dict[str, Any]) -> str:
    return "/".join(f"{c}={values[c]}" for c in table_spec(table).partition_by)


def _log_values(table: str, values: dict[str, Any]) -> dict[str, str]:
    return {c: str(values[c]) for c in table_spec(table).partition_by}


def _now_ms() -> int:
    return int(time.time() * 1000)


# ---- reading what can be read --------------------------------------------------------------------

def bad_files(report: Report) -> dict[str, set[str]]:
    """{table: relative paths of its corrupt or missing files}, from a report."""
    bad: dict[str, set[str]] = {t: set() for t in table_names()}
    for p in report.problems:
        if p.kind in BAD_KINDS and p.table is not None and p.relative is not None:
            bad[p.table].add(p.relative)
    return bad


def good_files(store: Store, table: str, bad: dict[str, set[str]] | None = None,
               values: dict[str, Any] | None = None) -> list[DataFile]:
    """The files of ``table``'s latest version (of one partition, if ``values``) not known to be bad."""
    skip = (bad or {}).get(table, set())
    return [f for f in store.snapshot(table).files
            if f.relative not in skip and (values is None or f.values == values)]


def read_files(store: Store, table: str, files: Sequence[DataFile], columns: Sequence[str]) -> pa.Table:
    """``columns`` of ``files``, skipping any file that fails to read (a damaged file is its own problem)."""
    spec = table_spec(table)
    if not files:
        return pa.table({c: pa.array([], spec.schema.field(c).type) for c in columns})
    try:
        return read_table(store, table, files=files, columns=columns)
    except OSError:  # one of them is damaged (or went away): read them one by one
        parts = []
        for f in files:
            try:
                parts.append(read_table(store, table, files=[f], columns=columns))
            except OSError:
                continue
        return pa.concat_tables(parts) if parts else read_files(store, table, [], columns)


def _distinct_shards(store: Store, table: str, files: Sequence[DataFile]) -> set[tuple[str, int, str]]:
    rows = read_files(store, table, files, SHARD_COLUMNS)
    distinct = rows.group_by(list(SHARD_COLUMNS)).aggregate([])
    return set(zip(*(distinct.column(c).to_pylist() for c in SHARD_COLUMNS), strict=True))


def _shard_ids(store: Store, table: str, files: Sequence[DataFile]) -> set[str]:
    return set(read_files(store, table, files, ["shard_id"]).column("shard_id").unique().to_pylist())


# ---- checks --------------------------------------------------------------------------------------

def check_file(store: Store, table: str, file: DataFile) -> Problem | None:
    """Read all of ``file`` (checksums verified) and compare its columns with the table's."""
    def problem(kind: str, detail: str) -> Problem:
        return Problem(file.path, kind, detail, table=table, relative=file.relative, values=dict(file.values))

    expected = file_schema(table)
    try:
        with store.location.fs.open_input_file(file.path) as src:
            reader = pq.ParquetFile(src, page_checksum_verification=True)
            schema = reader.schema_arrow
            for _ in reader.iter_batches(batch_size=16 * 1024):
                pass
    except FileNotFoundError:
        return problem("missing-file", "listed in the table's log but gone from storage")
    except Exception as exc:  # any read failure means the file is damaged
        reason = str(exc).splitlines()[0] if str(exc) else ""
        return problem("corrupt", f"{type(exc).__name__}: {reason}")
    added = added_columns(table)  # a file written before a column was added reads it as null: not a problem
    missing = [n for n in expected.names if n not in schema.names and n not in added]
    extra = [n for n in schema.names if n not in expected.names]
    if missing or extra:
        return problem("corrupt", f"columns differ from the table schema: missing {missing}, unexpected {extra}")
    wrong = [f"{n} is {schema.field(n).type}, not {expected.field(n).type}" for n in expected.names
             if n in schema.names and not fits_older(schema.field(n).type, expected.field(n).type, added, n)]
    if wrong:
        return problem("corrupt", "column types differ from the table schema: " + "; ".join(wrong))
    return None


def diagnose(store: Store) -> Report:
    report = Report()
    for table in table_names():
        snap = store.snapshot(table)
        gone = set(store.delta(table).repair(dry_run=True)["files_removed"])
        for file in snap.files:
            report.files_checked += 1
            if file.relative in gone:
                problem = Problem(file.path, "missing-file", "listed in the table's log but gone from storage",
                                  table=table, relative=file.relative, values=dict(file.values))
            else:
                problem = check_file(store, table, file)
            if problem is not None:
                report.problems.append(problem)
    bad = bad_files(report)
    report.problems.extend(shard_problems(store, bad))
    report.problems.extend(duplicate_rollouts(store, bad))
    report.problems.extend(missing_checkpoints(store, bad))
    report.problems.extend(table_settings(store))
    checkpoints = store.root / "checkpoints"
    if checkpoints.is_dir():
        for temp in stale_temps(checkpoints):
            report.problems.append(Problem(temp, "stale-temp", "left by a killed writer; never visible to readers"))
    return report


def _unset_properties(store: Store, table: str) -> tuple[dict[str, str], dict[str, str]]:
    """recpipe's table properties (recpipe.store.table_configuration) that ``table`` lacks, and its own."""
    configuration = store.delta(table).metadata().configuration
    wanted = table_configuration(table)
    return {key: value for key, value in wanted.items() if configuration.get(key) != value}, configuration


def table_settings(store: Store) -> list[Problem]:
    """Tables whose Delta properties differ from recpipe's."""
    problems = []
    for table in table_names():
        wrong, configuration = _unset_properties(store, table)
        if wrong:
            shown = ", ".join(f"{key}={configuration.get(key, '(unset)')} (recpipe sets {value})"
                              for key, value in wrong.items())
            problems.append(Problem(store.location.path(table), "table-settings", shown, table=table))
    return problems


def set_table_settings(store: Store, table: str) -> list[str]:
    """Set recpipe's table properties on ``table`` (one metadata commit; nothing if they are set already)."""
    wrong, _ = _unset_properties(store, table)
    if not wrong:
        return []
    store.delta(table).alter.set_table_properties(wrong, raise_if_not_exists=False)
    store.delta(table)  # re-read: the cached table is at the new version
    return [f"set {', '.join(f'{k}={v}' for k, v in wrong.items())} on table {table!r}"]


def shard_problems(store: Store, bad: dict[str, set[str]]) -> list[Problem]:
    """Generation shards whose rollouts lack their group summary, and summaries whose rollouts are gone.

    A damaged or missing rollouts file named by its shard still counts as that shard's rollouts: it is
    reported (and repaired, summary first) as a damaged file. Summaries are read before rollouts and
    again after: a shard is committed rollouts first, so one being committed meanwhile is never taken
    for an orphan, and rarely for a shard without its summary (whose repair is then a no-op race).
    """
    groups_before = _distinct_shards(store, "groups", good_files(store, "groups", bad))
    rollouts = store.snapshot("rollouts").files
    stored = _distinct_shards(store, "rollouts", [f for f in rollouts if f.relative not in bad["rollouts"]])
    damaged = {(f.values["run"], f.values["policy_version"], f.shard_id) for f in rollouts
               if f.relative in bad["rollouts"] and f.shard_id is not None}
    groups_after = _distinct_shards(store, "groups", good_files(store, "groups", bad))
    problems = []
    for kind, table, shards, why in (
            ("missing-groups", "rollouts", stored - groups_after, "have rollouts but no group summary "
             "(invisible to selection)"),
            ("orphan-groups", "groups", groups_before - stored - damaged, "have a group summary but their "
             "rollouts are gone (selection would pick missing rows)")):
        by_partition: dict[tuple[str, int], list[str]] = {}
        for run, version, shard in shards:
            by_partition.setdefault((run, version), []).append(shard)
        for (run, version), names in sorted(by_partition.items()):
            values = {"run": run, "policy_version": version}
            names = sorted(names)
            problems.append(Problem(store.location.path(table, partition_name(table, values)), kind,
                                    f"{len(names)} shard(s) {why}: {', '.join(names)}", tuple(names),
                                    table=table, values=values))
    return problems


def duplicate_rollouts(store: Store, bad: dict[str, set[str]]) -> list[Problem]:
    """Rollout ids stored more than once (in one file or across files)."""
    files = good_files(store, "rollouts", bad)
    ids = read_files(store, "rollouts", files, ["rollout_id"]).column("rollout_id")
    if len(ids) == 0:
        return []
    counts = pc.value_counts(ids)
    dupes = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
    if len(dupes) == 0:
        return []
    where = [f.relative for f in files
             if pc.any(pc.is_in(read_files(store, "rollouts", [f], ["rollout_id"]).column("rollout_id"),
                                dupes)).as_py()]
    examples = ", ".join(dupes.to_pylist()[:3])
    return [Problem(store.location.path("rollouts"), "duplicate-rollouts",
                    f"{len(dupes)} rollout id(s) stored more than once (e.g. {examples}) in rollouts/"
                    f"{', rollouts/'.join(where)}; not repaired automatically: inspect them with `recpipe sql` "
                    "(SELECT * FROM rollouts WHERE rollout_id = ...)", table="rollouts")]


def _checkpoint_found(store: Store, checkpoint: str) -> tuple[str | Path, bool]:
    path = Path(checkpoint)
    if path.is_absolute():
        return path, (path / "config.json").is_file()
    info = store.location.fs.get_file_info(store.location.path(checkpoint, "config.json"))
    where = store.root / checkpoint if store.location.is_local else f"{store.uri}/{checkpoint}"
    return where, info.type == pafs.FileType.File


def missing_checkpoints(store: Store, bad: dict[str, set[str]]) -> list[Problem]:
    """Retention deletes old checkpoints on purpose; the latest version of each run must be loadable."""
    latest: dict[str, dict[str, Any]] = {}
    for row in read_files(store, "policies", good_files(store, "policies", bad),
                          ["run", "version", "checkpoint"]).to_pylist():
        if row["version"] >= latest.get(row["run"], {"version": -1})["version"]:
            latest[row["run"]] = row
    problems = []
    for run, row in sorted(latest.items()):
        where, found = _checkpoint_found(store, row["checkpoint"])
        if not found:
            problems.append(Problem(where, "missing-checkpoint",
                                    f"run {run}: latest version {row['version']} has no checkpoint"))
    return problems


# ---- repairs -------------------------------------------------------------------------------------

def copy_to_quarantine(store: Store, table: str, file: DataFile) -> str:
    """Copy ``file`` to ``<store>/quarantine/<table>/<relative path>`` as it is (local disk or S3)."""
    fs = store.location.fs
    target = store.location.path(QUARANTINE, table, file.relative)
    try:
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        fs.copy_file(file.path, target)
    except OSError as exc:  # a read-only mount, a full disk: nothing was changed yet
        raise StoreWriteError(getattr(exc, "errno", None) or errno.EIO,
                              f"cannot copy {file.path} to quarantine ({str(exc).splitlines()[0]}); "
                              "nothing was changed") from None
    return target


def _partition_commit(store: Store, table: str, values: dict[str, Any], snapshot_version: int) -> tuple[str, int]:
    """The partition's rewrite id and the version the next rewrite must carry, as of the snapshot read."""
    app_id = store.shard_key(table, values, "compact")
    return app_id, (store.delta(table, snapshot_version).transaction_version(app_id) or 0) + 1


def _withdrawn(store: Store, table: str, values: dict[str, Any], shards: Iterable[str | None]) -> list[tuple[str, int]]:
    """Application transactions marking ``shards`` withdrawn (the next even version: see Store.shard_state),
    so that re-running a shard whose rows a repair removed commits it again."""
    out = []
    for shard in sorted(s for s in shards if s):
        key = store.shard_key(table, values, shard)
        state = store.shard_state(table, key)
        if state % 2 == 1:
            out.append((key, state + 1))
    return out


def quarantine_file(store: Store, table: str, relative: str) -> list[str]:
    """Summary first (a rollouts file's group rows), then a copy in quarantine, then one commit removing it."""
    done: list[str] = []
    for _ in range(ATTEMPTS):
        snap = store.snapshot(table)
        file = next((f for f in snap.files if f.relative == relative), None)
        if file is None:
            return [*done, f"{table}/{relative}: no longer in the table (removed meanwhile)"]
        if table == "rollouts":
            done += drop_orphan_groups(store, file.values, leaving={relative})
        target = copy_to_quarantine(store, table, file)
        app_id, version = _partition_commit(store, table, file.values, snap.version)
        removes = [RemoveAction(relative, True, _now_ms(), file.size, _log_values(table, file.values))]
        if store.add_files(table, [], app_id=app_id, app_version=version, removes=removes,
                           operation=f"quarantine {relative}", also=_withdrawn(store, table, file.values,
                                                                               [file.shard_id])):
            return [*done, f"quarantined {table}/{relative} -> {target} (removed from the table)"]
    raise StoreError(f"{table}/{relative}: other processes kept rewriting its partition; run the repair again")


def drop_orphan_groups(store: Store, values: dict[str, Any], leaving: Iterable[str] = ()) -> list[str]:
    """Remove the group rows of the partition's shards that have no readable rollouts (besides the rollouts
    files ``leaving`` the table): the files holding them are rewritten without them in one commit."""
    leaving = set(leaving)
    app_id = ""
    for _ in range(ATTEMPTS):
        snap = store.snapshot("groups")  # summaries before rollouts: see shard_problems
        files = [f for f in snap.files if f.values == values]
        held = {f.relative: _shard_ids(store, "groups", [f]) for f in files}  # a damaged one holds nothing
        rollouts = [f for f in store.snapshot("rollouts").files if f.values == values and f.relative not in leaving]
        drop = set().union(*held.values()) - _shard_ids(store, "rollouts", rollouts)
        if not drop:
            return []
        affected = [f for f in files if held[f.relative] & drop]
        rows = read_table(store, "groups", files=affected)
        kept = rows.filter(pc.invert(pc.is_in(rows.column("shard_id"), pa.array(sorted(drop)))))
        for f in affected:
            copy_to_quarantine(store, "groups", f)
        name = partition_name("groups", values)
        adds = [(f"{name}/compact-{uuid.uuid4().hex[:16]}.parquet",
                 kept.drop_columns(list(table_spec("groups").partition_by)), values)] if kept.num_rows else []
        removes = [RemoveAction(f.relative, True, _now_ms(), f.size, _log_values("groups", values)) for f in affected]
        app_id, version = _partition_commit(store, "groups", values, snap.version)
        if store.add_files("groups", adds, app_id=app_id, app_version=version, removes=removes,
                           operation=f"drop group rows of {len(drop)} shard(s) without rollouts",
                           also=_withdrawn(store, "groups", values, drop), data_change=True):
            return [f"removed the group summary of shard(s) {', '.join(sorted(drop))} from groups/{name} (their "
                    f"rollouts are gone; the files it was in are kept in {QUARANTINE}/groups/{name})"]
    raise StoreError(f"groups {values}: other processes kept rewriting the partition ({app_id}); run the repair again")


def restore_shard(store: Store, table: str, rows: pa.Table, values: dict[str, Any], shard_id: str) -> bool:
    """Add rows of a shard whose rows were lost (or never committed), under the shard's application
    transaction at its next version; False if another process restored it first."""
    key = store.shard_key(table, values, shard_id)
    state = store.shard_state(table, key)
    version = state + 1 if state % 2 == 0 else state + 2  # the next "committed" (odd) version
    relative = f"{partition_name(table, values)}/{shard_id}~{uuid.uuid4().hex[:12]}.parquet".lstrip("/")
    return store.add_files(table, [(relative, rows.drop_columns(list(table_spec(table).partition_by)), values)],
                           app_id=key, app_version=version, operation=f"restore shard {shard_id} (doctor)")


def summarise_missing(store: Store, values: dict[str, Any], shards: Iterable[str]) -> list[str]:
    """Write the group summaries of rollouts shards that lack them, from the stored rollouts."""
    done = []
    name = partition_name("rollouts", values)
    present = _shard_ids(store, "groups", good_files(store, "groups", values=values))
    for shard in sorted(set(shards) - present):
        try:
            rollouts = store.read_shard("rollouts", values, shard)
        except (OSError, StoreError) as exc:  # gone or damaged meanwhile: the next diagnose says which
            done.append(f"rollouts/{name}: shard {shard} has no readable rollouts now ({exc}); not summarised")
            continue
        if restore_shard(store, "groups", group_summary(rollouts), values, shard):
            done.append(f"wrote the group summary of shard {shard} from rollouts/{name}")
    return done


def drop_missing_files(store: Store, table: str, relatives: Iterable[str]) -> list[str]:
    """A rollouts file's group rows first, then delta-rs's FSCK removes every missing file from the log."""
    done = []
    if table == "rollouts":
        partitions = {tuple(f.values.items()) for f in store.snapshot(table).files if f.relative in set(relatives)}
        for values in sorted(partitions):
            done += drop_orphan_groups(store, dict(values), leaving=relatives)
    removed = store.delta(table).repair()["files_removed"]
    return [*done, *(f"removed {table}/{r} from the table (gone from storage)" for r in removed)]


def repair(store: Store, report: Report, *, migrate: bool = False) -> Report:
    """Repair what ``report`` lists (summary first; see the module doc). ``migrate`` has nothing to do at
    this level: an archive in the old Parquet-folder format is converted by
    ``recpipe.store.migrate.migrate_legacy`` before a Store can open it."""
    del migrate
    problems = report.problems
    for problem in [p for p in problems if p.kind == "corrupt"]:
        report.repaired.extend(quarantine_file(store, problem.table, problem.relative))
    missing: dict[str, list[str]] = {}
    for problem in [p for p in problems if p.kind == "missing-file"]:
        missing.setdefault(problem.table, []).append(problem.relative)
    for table, relatives in missing.items():
        report.repaired.extend(drop_missing_files(store, table, relatives))
    for problem in [p for p in problems if p.kind == "orphan-groups"]:
        report.repaired.extend(drop_orphan_groups(store, problem.values))
    for problem in [p for p in problems if p.kind == "missing-groups"]:
        report.repaired.extend(summarise_missing(store, problem.values, problem.shards))
    for problem in [p for p in problems if p.kind == "table-settings"]:
        report.repaired.extend(set_table_settings(store, problem.table))
    for problem in [p for p in problems if p.kind == "stale-temp"]:
        path = Path(problem.path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        report.repaired.append(f"removed {path}")
    return report
