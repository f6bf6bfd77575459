"""The train stage: off-policy REINFORCE-family updates from selected batches, one policy version per step.

    from recpipe.train import Trainer
    with Trainer(store, run, model_path, train_cfg, loss_cfg, preset_name) as trainer:
        result = trainer.step(trainer.next_step, batch)

trainer     Trainer, StepResult, TrainingDiverged, train_step, follow (ranks > 0 under torchrun)
compute     the step without a store: prepare_policy (FSDP2, bf16), accumulate_gradients, clip_and_step
batching    samples_from_table, plan_micro_batches (length bucketing), collate
checkpoint  version dirs, crash recovery of rows, retention, resolve_checkpoint
launch      ``python -m recpipe.train.launch`` under torchrun: rank 0 runs the CLI, the others follow
Log-probs (chunked LM head): recpipe.models.logprobs.response_logprobs.

Names load on first use (PEP 562): ``recpipe.train.compute`` and ``recpipe.train.batching`` import with
torch alone, without the store or pydantic (bench/bench_gpu.py).
"""

from __future__ import annotations

import importlib

_WHERE = {
    **dict.fromkeys(("REQUIRED_COLUMNS", "MicroBatch", "Sample", "collate", "plan_micro_batches",
                     "samples_from_table"), "batching"),
    **dict.fromkeys(("apply_retention", "resolve_checkpoint", "version_dirs", "versions_to_keep"), "checkpoint"),
    **dict.fromkeys(("StepResult", "Trainer", "TrainingDiverged", "follow", "resolve_device", "train_step"),
                    "trainer"),
    "response_logprobs": "recpipe.models.logprobs",
}


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    where = _WHERE[name]
    return getattr(importlib.import_module(where if "." in where else f"{__name__}.{where}"), name)


__all__ = sorted(_WHERE)
