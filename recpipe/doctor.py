"""``recpipe doctor``: the archive's checks (recpipe.store.doctor) plus the trainer's checkpoints.

Checkpoints are checked here, above both the store and the trainer, because what makes a version dir
whole (its files, their manifest, the optimizer state a resume needs, the rows its trainer_state.json
keeps) is the trainer's format.

An archive in the old Parquet-folder format cannot be opened as a Store at all; ``migrate_archive``
converts it (recpipe.store.migrate) and must run before the Store is opened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from recpipe.schema import conform
from recpipe.store import RunLocked, Store
from recpipe.store.doctor import Problem, Report, bad_files, good_files, read_files, restore_shard
from recpipe.store.doctor import diagnose as diagnose_archive
from recpipe.store.doctor import repair as repair_archive
from recpipe.train.checkpoint import (
    MANIFEST_FILE,
    STATE_FILE,
    CheckpointError,
    local_version,
    policies_shard,
    read_state,
    recover_rows,
    steps_shard,
    verify_checkpoints,
    version_dirs,
    write_manifest,
)

__all__ = ["Checkup", "Problem", "Report", "check", "checkpoint_problems", "diagnose", "migrate_archive", "repair",
           "unregistered_checkpoints"]


@dataclass
class Checkup:
    """What ``recpipe doctor`` did: the migration (if any), the problems found, the repairs, and the state after."""

    found: Report                                  # before any repair
    final: Report                                  # after the repairs (``found`` when nothing was repaired)
    migrated: dict[str, Any] | None = None         # migrate_archive's result: message, quarantined files
    repaired: list[str] = field(default_factory=list)


def check(uri: str | Path, storage_options: dict[str, str] | None = None, *, fix: bool = False,
          migrate: bool = False) -> Checkup:
    """``recpipe doctor``: migrate an old-format archive (``migrate``), diagnose, repair (``fix`` or
    ``migrate``; Delta transactions, safe beside running writers), and diagnose again."""
    migrated = migrate_archive(uri, storage_options) if migrate else None  # before the Store: it refuses an old one
    store = Store(uri, storage_options)
    found = diagnose(store)
    if not (fix or migrate):
        return Checkup(found, found, migrated)
    repair(store, found, migrate=migrate)
    return Checkup(found, diagnose(store), migrated, list(found.repaired))


def migrate_archive(uri: str | Path, storage_options: dict[str, str] | None = None) -> dict[str, Any] | None:
    """Convert an archive in the old Parquet-folder format to Delta tables (every row kept and verified);
    None if it is not in the old format (already Delta, or no store at all)."""
    from recpipe.store.migrate import migrate_legacy, needs_migration

    if not needs_migration(uri, storage_options):
        return None
    return migrate_legacy(uri, storage_options)


def checkpoint_problems(store: Store) -> list[Problem]:
    """Version dirs whose files are missing, truncated or changed since they were written (their manifest's
    sha256), or whose newest version lacks the optimizer state a resume needs. A dir written before
    manifests existed is ``no-manifest``: ``--migrate`` records its files as they are now."""
    problems = []
    for path, found in verify_checkpoints(store).items():
        legacy = len(found) == 1 and found[0].startswith(f"{path / MANIFEST_FILE}: missing")
        problems.append(Problem(path, "no-manifest" if legacy else "damaged-checkpoint", "; ".join(found)))
    return problems


def _checkpoint_runs(store: Store) -> list[str]:
    """Runs with a checkpoints folder on the store's storage (a remote store's, not this machine's cache)."""
    infos = store.location.fs.get_file_info(
        pafs.FileSelector(store.location.path("checkpoints"), allow_not_found=True, recursive=False))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def _registered(store: Store, table: str, column: str, bad: dict[str, set[str]] | None = None) -> set[tuple[str, int]]:
    rows = read_files(store, table, good_files(store, table, bad), ["run", column])
    return set(zip(rows.column("run").to_pylist(), rows.column(column).to_pylist(), strict=True))


def unregistered_checkpoints(store: Store, bad: dict[str, set[str]] | None = None) -> list[Problem]:
    """Committed version dirs whose version has no ``policies`` row: a trainer died between writing the
    checkpoint and committing its rows (or the row was lost). Their trainer_state.json keeps the rows."""
    registered = _registered(store, "policies", "version", bad)
    problems = []
    for run in _checkpoint_runs(store):
        for version, path in sorted(version_dirs(store, run).items()):
            if (run, version) not in registered:
                problems.append(Problem(path, "unregistered-checkpoint",
                                        f"run {run}: version v{version:06d} was written but has no policies row "
                                        f"(invisible to the trainer and generators); --repair appends the rows "
                                        f"its {STATE_FILE} keeps"))
    return problems


def diagnose(store: Store) -> Report:
    report = diagnose_archive(store)
    report.problems.extend(checkpoint_problems(store))
    report.problems.extend(unregistered_checkpoints(store, bad_files(report)))
    return report


def register_checkpoints(store: Store, run: str) -> list[str]:
    """Append the policies/steps rows of the run's committed versions that lack them, under the run's
    trainer lease (a running trainer registers its own versions: the run is then left alone)."""
    try:
        with store.lock(run, "trainer"):
            healed = recover_rows(store, run)
            done = [f"run {run}: registered version v{v:06d} from its {STATE_FILE}" for v in healed]
            # A version whose shard is committed but whose row was lost (its file quarantined): recover_rows
            # cannot append it again (the shard is committed), so restore it under the shard's next version.
            policies, steps = _registered(store, "policies", "version"), _registered(store, "steps", "step")
            for version in sorted(version_dirs(store, run)):
                if (run, version) in policies:
                    continue
                state = read_state(local_version(store, run, version))
                values = {"run": run}
                restore_shard(store, "policies", conform("policies", [state["policies_row"]]), values,
                              policies_shard(version))
                if (run, state["step"]) not in steps:
                    restore_shard(store, "steps", conform("steps", [state["steps_row"]]), values,
                                  steps_shard(state["step"]))
                done.append(f"run {run}: restored the lost rows of version v{version:06d} from its {STATE_FILE}")
            return done
    except RunLocked as exc:
        return [f"run {run}: not registered now ({exc}); its trainer registers its versions itself"]
    except CheckpointError as exc:
        return [f"run {run}: cannot register its versions: {exc}"]


def repair(store: Store, report: Report, *, migrate: bool = False) -> Report:
    """The archive's repairs; unregistered versions get their rows from their trainer_state.json; with
    ``migrate``, also manifests for version dirs written before them. A damaged checkpoint is never
    repaired: only a backup or a new run (the message says which command) can."""
    repair_archive(store, report, migrate=migrate)
    runs = {p.path.parent.name for p in report.problems if p.kind == "unregistered-checkpoint"}
    # the archive repair may have quarantined a policies file: look again for versions that lost their rows
    runs |= {p.path.parent.name for p in unregistered_checkpoints(store)}
    for run in sorted(runs):
        report.repaired.extend(register_checkpoints(store, run))
    for problem in report.problems:
        if problem.kind == "no-manifest" and migrate and problem.path.is_dir():
            write_manifest(problem.path)
            report.repaired.append(f"recorded the sha256 of {problem.path.relative_to(store.root)}'s files as "
                                   "they are now (written before checkpoints had manifests)")
    return report
