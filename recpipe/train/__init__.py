"""The train stage: off-policy REINFORCE-family updates from selected batches, one policy version per step.

    from recpipe.train import Trainer
    with Trainer(store, run, model_path, train_cfg, loss_cfg, preset_name) as trainer:
        result = trainer.step(trainer.next_step, batch)

trainer     Trainer, StepResult, TrainingDiverged, train_step
batching    samples_from_table, plan_micro_batches (length bucketing), collate
logprobs    response_logprobs (temperature-scaled, LM head on response positions only)
checkpoint  version dirs, crash recovery of rows, retention, resolve_checkpoint
"""

from recpipe.train.batching import (
    REQUIRED_COLUMNS,
    MicroBatch,
    Sample,
    collate,
    plan_micro_batches,
    samples_from_table,
)
from recpipe.train.checkpoint import apply_retention, resolve_checkpoint, version_dirs, versions_to_keep
from recpipe.train.logprobs import response_logprobs
from recpipe.train.trainer import StepResult, Trainer, TrainingDiverged, resolve_device, train_step

__all__ = [
    "REQUIRED_COLUMNS",
    "MicroBatch",
    "Sample",
    "StepResult",
    "Trainer",
    "TrainingDiverged",
    "apply_retention",
    "collate",
    "plan_micro_batches",
    "resolve_checkpoint",
    "resolve_device",
    "response_logprobs",
    "samples_from_table",
    "train_step",
    "version_dirs",
    "versions_to_keep",
]
