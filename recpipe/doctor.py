"""``recpipe doctor``: the archive's checks (recpipe.store.doctor) plus the trainer's checkpoints.

Checkpoints are checked here, above both the store and the trainer, because what makes a version dir
whole (its files, their manifest, the optimizer state a resume needs) is the trainer's format.
"""

from __future__ import annotations

from recpipe.store import Store
from recpipe.store.doctor import Problem, Report
from recpipe.store.doctor import diagnose as diagnose_archive
from recpipe.store.doctor import repair as repair_archive
from recpipe.train.checkpoint import MANIFEST_FILE, verify_checkpoints, write_manifest

__all__ = ["Problem", "Report", "checkpoint_problems", "diagnose", "repair"]


def checkpoint_problems(store: Store) -> list[Problem]:
    """Version dirs whose files are missing, truncated or changed since they were written (their manifest's
    sha256), or whose newest version lacks the optimizer state a resume needs. A dir written before
    manifests existed is ``no-manifest``: ``--migrate`` records its files as they are now."""
    problems = []
    for path, found in verify_checkpoints(store).items():
        legacy = len(found) == 1 and found[0].startswith(f"{path / MANIFEST_FILE}: missing")
        problems.append(Problem(path, "no-manifest" if legacy else "damaged-checkpoint", "; ".join(found)))
    return problems


def diagnose(store: Store) -> Report:
    report = diagnose_archive(store)
    report.problems.extend(checkpoint_problems(store))
    return report


def repair(store: Store, report: Report, *, migrate: bool = False) -> Report:
    """The archive's repairs; with ``migrate``, also manifests for version dirs written before them. A damaged
    checkpoint is never repaired: only a backup or a new run (the message says which command) can."""
    repair_archive(store, report, migrate=migrate)
    for problem in report.problems:
        if problem.kind == "no-manifest" and migrate and problem.path.is_dir():
            write_manifest(problem.path)
            report.repaired.append(f"recorded the sha256 of {problem.path.relative_to(store.root)}'s files as "
                                   "they are now (written before checkpoints had manifests)")
    return report
