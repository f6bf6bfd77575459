"""Train like tests/train/kill_worker.py, but with checkpoint writes slowed down so that a kill -9
lands inside one: ``torch.save`` of the optimizer state (written after the weights, before the
trainer state) sleeps first. Usage: ``python -m tests.faults.slow_checkpoint_worker STORE MODEL RUN STEPS``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from recpipe.store import Store
from tests.train.kill_worker import run_steps

_save = torch.save


def slow_save(obj, f, *args, **kwargs):  # noqa: ANN001 - torch.save's own signature
    print(f"writing {f}", flush=True)
    time.sleep(0.5)
    return _save(obj, f, *args, **kwargs)


if __name__ == "__main__":
    torch.save = slow_save
    root, model, run, steps = sys.argv[1:5]
    run_steps(Store(root), Path(model), run, int(steps))
