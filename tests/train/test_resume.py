"""Versions, resume and retention: kill -9 mid-run, crashes between commits, one trainer per run."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from recpipe.algorithms import preset
from recpipe.config import TrainConfig
from recpipe.store import RunLocked, Store
from recpipe.train import Trainer, resolve_checkpoint, version_dirs, versions_to_keep
from tests import ROOT
from tests.train.kill_worker import CONFIG, run_steps
from tests.train.train_batches import random_batch

STEPS = 14


def _weights(store: Store, run: str, version: int) -> dict[str, torch.Tensor]:
    return load_file(store.checkpoint_dir(run, version) / "model.safetensors")


def _keys(store: Store, table: str, column: str) -> list[int]:
    return sorted(r[column] for r in store.read(table).to_pylist())


def test_kill_9_mid_run_then_resume_gives_the_uninterrupted_result(tmp_path, tiny_model):
    reference = Store.create(tmp_path / "reference")
    assert run_steps(reference, tiny_model, "r", STEPS) == STEPS

    store = Store.create(tmp_path / "killed")
    worker = subprocess.Popen([sys.executable, "-m", "tests.train.kill_worker", str(store.root), str(tiny_model), "r",
                               str(STEPS)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    part = store.root / "steps" / "run=r"
    deadline = time.monotonic() + 600  # generous: the kill waits for step 3, however loaded
    while not any(part.glob("step-000003~*.parquet")) and worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    worker.send_signal(signal.SIGKILL)
    _, err = worker.communicate(timeout=30)
    assert worker.returncode == -signal.SIGKILL, f"worker ended by itself before the kill: {err.decode()[-2000:]}"
    assert _keys(store, "steps", "step")[-1] < STEPS - 1  # it really was cut off mid-run

    assert run_steps(store, tiny_model, "r", STEPS) == STEPS
    final, expected = _weights(store, "r", STEPS), _weights(reference, "r", STEPS)
    assert final.keys() == expected.keys()
    for name in expected:
        assert torch.equal(final[name], expected[name]), name
    assert _keys(store, "steps", "step") == list(range(STEPS))  # none missing, none twice
    assert _keys(store, "policies", "version") == list(range(STEPS + 1))
    steps = {r["step"]: r for r in store.read("steps").to_pylist()}
    for r in reference.read("steps").to_pylist():
        assert steps[r["step"]]["loss"] == r["loss"] and steps[r["step"]]["policy_version"] == r["policy_version"]


def test_a_crash_between_commits_is_healed_from_trainer_state(store, tiny_model):
    cfg = preset("reinforce")
    real_append = store.append

    def append(table, rows, *, shard_id):  # the process dies after v3's dir, before its rows are committed
        if (table, shard_id) == ("policies", "v000003"):
            raise SystemExit("killed between commits")
        return real_append(table, rows, shard_id=shard_id)

    store.append = append
    with pytest.raises(SystemExit), Trainer(store, "r", tiny_model, TrainConfig(), cfg, "reinforce") as trainer:
        for step in range(3):
            trainer.step(step, random_batch(step, cfg))
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    store = Store(store.root)
    assert _keys(store, "policies", "version") == [0, 1, 2] and _keys(store, "steps", "step") == [0, 1]
    # ... and during v4's dir write.
    shutil.copytree(store.checkpoint_dir("r", 3), store.checkpoint_dir("r", 4).with_name(".v000004.99999999-0badf00d.tmp"))

    with Trainer(store, "r", tiny_model, TrainConfig(), cfg, "reinforce") as trainer:
        assert (trainer.current_version, trainer.next_step) == (3, 3)
        assert all(torch.equal(p, weights[n]) for n, p in trainer.model.named_parameters())
        replay = trainer.step(2, random_batch(2, cfg))  # a loop that re-asks a finished step
        assert replay.replayed and replay.policy_version == 3
        assert trainer.step(3, random_batch(3, cfg)).policy_version == 4
    assert _keys(store, "steps", "step") == [0, 1, 2, 3]
    assert _keys(store, "policies", "version") == [0, 1, 2, 3, 4]


def test_version_0_is_the_base_model_without_a_copy(store, tiny_model):
    with Trainer(store, "r", tiny_model, TrainConfig(), preset("grpo"), "grpo") as trainer:
        assert trainer.current_version == 0 and trainer.checkpoint_path() == tiny_model.resolve()
    (row,) = store.read("policies").to_pylist()
    assert (row["version"], row["step"], row["parent_version"]) == (0, None, None)
    assert resolve_checkpoint(store, row["checkpoint"]) == tiny_model.resolve()
    assert not (store.root / "checkpoints").exists()


def test_retention_keeps_latest_needed_and_every_nth(store, tiny_model):
    cfg = preset("reinforce")
    with Trainer(store, "r", tiny_model, TrainConfig(keep_every=3), cfg, "reinforce",
                 needed_versions=lambda: {1}) as trainer:
        for step in range(5):
            trainer.step(step, random_batch(step, cfg))
    dirs = version_dirs(store, "r")
    # 1 (needed), 3 (every 3rd), 5 (latest) and 4: the latest two always stay, so one damaged dir
    # leaves the previous weights (issue 19, item 4).
    assert sorted(dirs) == [1, 3, 4, 5]
    assert [v for v, d in sorted(dirs.items()) if (d / "optimizer.pt").exists()] == [5]
    assert _keys(store, "policies", "version") == [0, 1, 2, 3, 4, 5]  # history stays
    assert versions_to_keep(range(1, 10), latest=9, keep_every=4, needed=[2, 99]) == {2, 4, 8, 9}


def test_one_trainer_per_run(store, tiny_model):
    first = Trainer(store, "r", tiny_model, CONFIG).setup()
    try:
        with pytest.raises(RunLocked):
            Trainer(store, "r", tiny_model, CONFIG).setup()
        Trainer(store, "other-run", tiny_model, CONFIG).setup().close()
    finally:
        first.close()
    with pytest.raises(ValueError, match="setup"):  # a closed trainer holds no lock: it must not write
        first.step(0, random_batch(0, preset("rec-oneside-nois")))
    Trainer(store, "r", tiny_model, CONFIG).setup().close()


def test_a_run_keeps_its_base_model(store, tiny_model, tmp_path):
    Trainer(store, "r", tiny_model, CONFIG).setup().close()
    other = shutil.copytree(tiny_model, tmp_path / "other-model")
    with pytest.raises(ValueError, match="was started from"):
        Trainer(store, "r", other, CONFIG).setup()


def test_steps_must_be_consecutive(store, tiny_model):
    cfg = preset("reinforce")
    with Trainer(store, "r", tiny_model, CONFIG, cfg) as trainer, pytest.raises(ValueError, match="next step"):
        trainer.step(1, random_batch(0, cfg))
