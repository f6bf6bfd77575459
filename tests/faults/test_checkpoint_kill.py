"""Fault 2: kill -9 while a checkpoint is being written, then resume."""

import signal
import subprocess
import sys

import torch
from safetensors.torch import load_file

from recpipe.store import Store
from tests import ROOT
from tests.train.kill_worker import run_steps

STEPS = 4


def weights(store, run, version):
    return load_file(store.checkpoint_dir(run, version) / "model.safetensors")


def test_kill_during_checkpoint_write_then_resume(tmp_path, tiny_model):
    store = Store.create(tmp_path / "store")
    worker = subprocess.Popen([sys.executable, "-m", "tests.faults.slow_checkpoint_worker", str(store.root),
                               str(tiny_model), "r", str(STEPS)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT)
    # Kill inside the second checkpoint write (version 2): its temp dir exists, the final one does not.
    writes = 0
    for line in worker.stdout:
        if line.startswith("writing") and ".tmp" in line:
            writes += 1
            if writes == 2:
                break
    temp_dirs = list((store.root / "checkpoints" / "r").glob(".v000002*.tmp"))
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)
    assert worker.returncode == -signal.SIGKILL
    assert temp_dirs, "the kill should land while version 2's checkpoint was being written"
    assert not store.checkpoint_dir("r", 2).exists()

    # Readers see version 1 as the latest, complete and loadable; no row of the interrupted step.
    policies = sorted(store.read("policies").column("version").to_pylist())
    assert policies == [0, 1]
    assert sorted(store.read("steps").column("step").to_pylist()) == [0]
    assert weights(store, "r", 1)  # loads

    # Resume: same final weights as an uninterrupted run, steps neither lost nor repeated.
    assert run_steps(store, tiny_model, "r", STEPS) == STEPS
    reference = Store.create(tmp_path / "reference")
    run_steps(reference, tiny_model, "r", STEPS)
    final, expected = weights(store, "r", STEPS), weights(reference, "r", STEPS)
    for name, tensor in expected.items():
        assert torch.equal(final[name], tensor), name
    assert sorted(store.read("steps").column("step").to_pylist()) == list(range(STEPS))
    assert sorted(store.read("policies").column("version").to_pylist()) == list(range(STEPS + 1))
    assert not list((store.root / "checkpoints").rglob("*.tmp"))  # the next commit cleared the leftover
