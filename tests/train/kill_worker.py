"""A trainer loop for the kill -9 tests: ``python -m tests.train.kill_worker STORE MODEL RUN STEPS``, or under
``torchrun --nproc-per-node N -m tests.train.kill_worker`` (rank 0 trains, the others follow it).

``run_steps`` is also called in-process by the test, for the uninterrupted reference run and to
finish after the kill; batches depend only on the step, so every run sees the same data.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from recpipe.algorithms import preset
from recpipe.config import TrainConfig
from recpipe.store import Store
from recpipe.train import Trainer, follow
from tests.train.train_batches import random_batch

CONFIG = TrainConfig(lr=1e-3, micro_batch_tokens=48, seed=7, keep_every=4, threads=1)
PRESET = "rec-oneside-is"


def run_steps(store: Store, model: Path, run: str, steps: int, lr: float | None = None) -> int:
    """Train until ``steps`` steps are recorded, starting wherever the run stands; returns the version."""
    cfg = preset(PRESET, epsilon_low=0.6, epsilon_high=2.0)
    config = CONFIG if lr is None else CONFIG.model_copy(update={"lr": lr})
    with Trainer(store, run, model, config, cfg, PRESET) as trainer:
        for step in range(trainer.next_step, steps):
            trainer.step(step, random_batch(step, cfg, response_len=(1, 10), policy_version=max(0, step - 2)))
        return trainer.current_version


if __name__ == "__main__":
    root, model, run, steps = sys.argv[1:5]
    if int(os.environ.get("RANK", "0")) > 0:
        (Path(root) / f"rank{os.environ['RANK']}.pid").write_text(str(os.getpid()))  # for the kill -9 test
        follow()
    else:
        run_steps(Store(root), Path(model), run, int(steps), float(sys.argv[5]) if len(sys.argv) > 5 else None)
