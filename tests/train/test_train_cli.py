"""`recpipe train --nproc 2`: the command on two FSDP2 ranks (torchrun, gloo) trains like `recpipe train`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.flows.flowtools import recpipe_cmd, recpipe_env

SMALL = ["--set", "select.groups_per_step=2", "--set", "generate.group_size=4", "--set", "generate.max_tokens=8",
         "--set", "generate.shard_size=2", "--set", "task.eval_prompts=4", "--set", "generate.max_model_len=128",
         "--set", "generate.backend=hf", "--set", "train.lr=1e-4", "--set", "train.micro_batch_tokens=48",
         "--set", "train.threads=1",
         # The tiny random model earns no reward (all advantages 0): AsymRE's -beta * log-prob term still
         # gives every step a gradient, so the weights move and the comparison means something.
         "--preset", "asymre"]


def _recpipe(tmp_path: Path, api_url: str, *args: str) -> subprocess.CompletedProcess:
    # Flows report to the session's Prefect server: an ephemeral one per command costs ~37 s here.
    env = {**recpipe_env(tmp_path, api_url), "OMP_NUM_THREADS": "1"}
    return subprocess.run(recpipe_cmd(*args), env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # a loop and two train commands (one on two ranks): minutes on the loaded 2-core machine
def test_train_on_two_ranks_gives_the_weights_of_one(tmp_path, tiny_model, prefect_api):
    one = tmp_path / "one"
    loop = _recpipe(tmp_path, prefect_api, "loop", "--store", str(one), "--model", str(tiny_model), "--steps", "1", *SMALL)
    assert loop.returncode == 0, loop.stderr[-3000:]
    two = tmp_path / "two"
    shutil.copytree(one, two)
    train = ["train", "--steps", "2", "--set", "select.query=replay", *SMALL]
    for store, extra in ((one, []), (two, ["--nproc", "2"])):
        done = _recpipe(tmp_path, prefect_api, *train, "--store", str(store), *extra)
        assert done.returncode == 0, done.stderr[-3000:]
    final = "checkpoints/default/v000003/model.safetensors"
    ours, expected = load_file(two / final), load_file(one / final)
    assert ours.keys() == expected.keys()
    assert max((ours[k] - expected[k]).abs().max().item() for k in expected) < 1e-6
    assert list((two / "checkpoints/default/v000003").glob("__1_*.distcp"))  # rank 1 wrote its shard
    assert not list((one / "checkpoints/default/v000003").glob("__1_*.distcp"))
    assert any(not torch.equal(ours[k], load_file(two / "checkpoints/default/v000002/model.safetensors")[k])
               for k in ours)
