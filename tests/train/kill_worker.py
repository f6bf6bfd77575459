"""A trainer loop for the kill -9 test: ``python kill_worker.py STORE MODEL RUN STEPS``.

``run_steps`` is also called in-process by the test, for the uninterrupted reference run and to
finish after the kill; batches depend only on the step, so every run sees the same data.
"""

from __future__ import annotations

import sys
from pathlib import Path

from train_batches import random_batch

from recpipe.algorithms import preset
from recpipe.config import TrainConfig
from recpipe.store import Store
from recpipe.train import Trainer

CONFIG = TrainConfig(lr=1e-3, micro_batch_tokens=48, seed=7, keep_every=4, threads=1)
PRESET = "rec-oneside-is"


def run_steps(store: Store, model: Path, run: str, steps: int) -> int:
    """Train until ``steps`` steps are recorded, starting wherever the run stands; returns the version."""
    cfg = preset(PRESET, epsilon_low=0.6, epsilon_high=2.0)
    with Trainer(store, run, model, CONFIG, cfg, PRESET) as trainer:
        for step in range(trainer.next_step, steps):
            trainer.step(step, random_batch(step, cfg, response_len=(1, 10), policy_version=max(0, step - 2)))
        return trainer.current_version


if __name__ == "__main__":
    root, model, run, steps = sys.argv[1:5]
    run_steps(Store(root), Path(model), run, int(steps))
