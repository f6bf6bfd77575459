"""The loop (vLLM and the trainer in one process) and retrain (the trainer alone) compute the same
weights for the same batches: starting a sampling engine in a process must not change how it trains."""

import torch
from safetensors.torch import load_file

from tests.flows.flowtools import SMALL, sql_rows

STEPS = 3


def test_loop_with_vllm_and_retrain_alone_give_identical_weights(tmp_path, tiny_model, run_recpipe):
    store = tmp_path / "store"
    # One training thread, not the process default of one per core: a count the trainer must really set.
    common = ["--store", str(store), "--preset", "rec-oneside-is", "--set", "train.threads=1", *SMALL]
    loop = run_recpipe("loop", "--model", str(tiny_model), "--steps", str(STEPS), "--set", "generate.backend=vllm",
                       *common)
    assert loop.returncode == 0, loop.stderr[-3000:]
    assert sql_rows(store, "SELECT DISTINCT generator.backend FROM rollouts") == [("vllm",)]

    again = run_recpipe("retrain", "--from-run", "default", "--run", "alone", *common)
    assert again.returncode == 0, again.stderr[-3000:]

    steps = "SELECT step, loss, grad_norm FROM steps WHERE run = '{}' ORDER BY step"
    assert sql_rows(store, steps.format("alone")) == sql_rows(store, steps.format("default"))
    assert len(sql_rows(store, steps.format("alone"))) == STEPS
    final = f"v{STEPS:06d}/model.safetensors"  # retention keeps the latest version of each run
    looped, alone = (load_file(store / "checkpoints" / run / final) for run in ("default", "alone"))
    assert looped.keys() == alone.keys()
    for name, tensor in looped.items():
        assert torch.equal(alone[name], tensor), name
