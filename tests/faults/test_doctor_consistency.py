"""A crash inside doctor's own repair is found and finished by the next run; checkpoints are checked too:
damaged versions named, legacy dirs get manifests with --migrate, versions whose rows were never
committed (or were lost) get them back from their trainer_state.json."""

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from recpipe.store import Store
from recpipe.store.doctor import diagnose, repair
from tests import ROOT
from tests.store.test_doctor import consistent, file_of, filled_store, flip_page_bytes


@pytest.mark.parametrize("point", ["first-commit", "rollouts-copy"])
def test_a_crash_inside_repair_is_found_and_finished_by_the_next_run(tmp_path, point):
    store = filled_store(tmp_path / "store")
    bad = file_of(store, "rollouts", "s1")
    flip_page_bytes(bad.path)
    killed = subprocess.run([sys.executable, "-m", "tests.faults.doctor_kill_worker", str(store.root), point],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # the summary went first: the damaged file is still listed, so the store cannot look healthy
    assert bad.relative in {f.relative for f in store.snapshot("rollouts").files}
    assert "s1" not in set(store.read("groups").column("shard_id").to_pylist())

    found = diagnose(store)
    assert [(p.kind, p.relative) for p in found.problems] == [("corrupt", bad.relative)]
    repair(store, found)
    assert diagnose(store).ok
    assert consistent(store) == (16, 4)  # the two good shards, rows and summaries alike
    assert (store.root / "quarantine" / "rollouts" / bad.relative).is_file()


def _train(store: Store, tiny_model: Path, steps: int) -> None:
    from recpipe.algorithms import preset
    from recpipe.config import TrainConfig
    from recpipe.train import Trainer
    from tests.train.train_batches import random_batch

    cfg = preset("reinforce")
    with Trainer(store, "r", tiny_model, TrainConfig(keep_every=1, threads=1), cfg, "reinforce") as trainer:
        for step in range(steps):
            trainer.step(step, random_batch(step, cfg))


def test_doctor_names_a_damaged_checkpoint_and_migrates_a_legacy_one(tmp_path, tiny_model):
    from recpipe.doctor import diagnose as diagnose_all
    from recpipe.doctor import repair as repair_all
    from recpipe.train.checkpoint import MANIFEST_FILE

    store = filled_store(tmp_path / "store")
    _train(store, tiny_model, 2)
    assert diagnose_all(store).ok
    v1, v2 = store.checkpoint_dir("r", 1), store.checkpoint_dir("r", 2)
    with open(v2 / "model.safetensors", "r+b") as f:  # one flipped byte in the weights
        f.seek(-100, 2)
        byte = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([byte[0] ^ 0x10]))
    (v1 / MANIFEST_FILE).unlink()  # as a version written before manifests existed
    report = diagnose_all(store)
    assert sorted((p.kind, p.path.name) for p in report.problems) == [("damaged-checkpoint", "v000002"),
                                                                       ("no-manifest", "v000001")]
    assert "model.safetensors" in next(p.detail for p in report.problems if p.kind == "damaged-checkpoint")
    repair_all(store, report, migrate=True)
    after = diagnose_all(store)
    assert [(p.kind, p.path.name) for p in after.problems] == [("damaged-checkpoint", "v000002")]  # never "fixed"


def test_versions_without_rows_are_registered_from_their_trainer_state(tmp_path, tiny_model):
    from recpipe.doctor import diagnose as diagnose_all
    from recpipe.doctor import repair as repair_all

    trained = filled_store(tmp_path / "trained", shards=1)
    _train(trained, tiny_model, 2)
    expected = trained.read("policies", "version > 0").sort_by("version")

    # 1. Rows never committed: the version dirs of a trainer that died before its commits.
    store = filled_store(tmp_path / "store", shards=1)
    shutil.copytree(trained.root / "checkpoints", store.root / "checkpoints")
    report = diagnose_all(store)
    assert [(p.kind, p.path.name) for p in report.problems] == [("unregistered-checkpoint", "v000001"),
                                                                 ("unregistered-checkpoint", "v000002")]
    repair_all(store, report)
    assert diagnose_all(store).ok
    assert store.read("policies").sort_by("version").equals(expected)
    assert store.read("steps").column("step").to_pylist() == [0, 1]

    # 2. Rows lost: the policies file of v000002 was damaged, and doctor quarantined it.
    policies = next(f for f in trained.snapshot("policies").files if f.shard_id == "v000002")
    flip_page_bytes(policies.path)
    report = diagnose_all(trained)
    assert sorted((p.kind, Path(p.path).name) for p in report.problems) == [
        ("corrupt", Path(policies.path).name), ("unregistered-checkpoint", "v000002")]
    repair_all(trained, report)
    assert diagnose_all(trained).ok
    assert trained.read("policies", "version > 0").sort_by("version").equals(expected)
