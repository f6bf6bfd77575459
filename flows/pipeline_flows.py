"""The recpipe flows. Each is a few lines: the logic lives in recpipe.pipeline.

    python -m flows.pipeline_flows          # runs `loop` with the default config

Stage functions become Prefect tasks through ``as_task``; generation shards get
retries (a flaky engine or disk is retried; a committed shard is skipped, so a
retry never writes twice). Engines and trainers are passed between tasks in
process, so tasks use ``NO_CACHE``: the archive, not Prefect's result store,
is where results persist.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from recpipe import pipeline
from recpipe.config import RecpipeConfig

RETRIES = {"generate_shard": 2}


def as_task(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a pipeline stage function as a Prefect task named after it."""
    retries = RETRIES.get(fn.__name__, 0)
    return task(fn, name=fn.__name__, cache_policy=NO_CACHE, retries=retries, retry_delay_seconds=2,
                log_prints=False, retry_condition_fn=_not_stopping)


def _not_stopping(*_: Any) -> bool:
    """No retry once the user asked the process to stop (the failure may be the stop itself, disguised)."""
    return not pipeline.STOP.is_set()


def _config(config: RecpipeConfig | dict[str, Any]) -> RecpipeConfig:
    return config if isinstance(config, RecpipeConfig) else RecpipeConfig.model_validate(config)


@flow(name="loop", validate_parameters=False)
def loop(config: dict[str, Any], progress: Any = None) -> int:
    """generate -> select -> train for loop.steps steps (resumes from the archive)."""
    with pipeline.open_run(_config(config), progress=progress) as ctx:
        return len(pipeline.run_loop(ctx, stage=as_task))


@flow(name="generate", validate_parameters=False)
def generate(config: dict[str, Any], version: int | None = None, prompts: int | None = None,
             progress: Any = None) -> int:
    """Generate rollouts with a policy version (default: the latest) into the archive."""
    if prompts is not None and prompts < 1:  # 0 is not "the default": refuse it before the store is touched
        raise ValueError(f"prompts must be an integer >= 1 (got {prompts})")
    with pipeline.open_run(_config(config), progress=progress) as ctx:
        return pipeline.generate_stage(ctx, version, prompts, stage=as_task)


@flow(name="select", validate_parameters=False)
def select(config: dict[str, Any], step: int, progress: Any = None) -> dict[str, Any]:
    """Select (and record) the batch of one training step."""
    with pipeline.open_run(_config(config), progress=progress) as ctx:
        return pipeline.batch_summary(as_task(pipeline.select_batch)(ctx, step))


@flow(name="train", validate_parameters=False)
def train(config: dict[str, Any], steps: int = 1, progress: Any = None) -> int:
    """Train the next ``steps`` steps on batches selected from the archive (no generation)."""
    with pipeline.open_run(_config(config), progress=progress) as ctx:
        return len(pipeline.run_training(ctx, steps=steps, stage=as_task))


@flow(name="evaluate", validate_parameters=False)
def evaluate(config: dict[str, Any], version: int | None = None, progress: Any = None) -> dict[str, Any]:
    """Greedy held-out accuracy of a policy version into `evals`."""
    with pipeline.open_run(_config(config), progress=progress) as ctx:
        return as_task(pipeline.evaluate)(ctx, ctx.trainer.current_version if version is None else version)


@flow(name="retrain", validate_parameters=False)
def retrain(config: dict[str, Any], source_run: str | None = None, progress: Any = None) -> int:
    """Train a new run from archived rollouts only: replay ``source_run``'s batches, or select with the query."""
    with pipeline.open_run(_config(config), progress=progress) as ctx:
        return len(pipeline.run_retrain(ctx, source_run=source_run, stage=as_task))


FLOWS = {"loop": loop, "generate": generate, "select": select, "train": train, "evaluate": evaluate,
         "retrain": retrain}


if __name__ == "__main__":
    loop(RecpipeConfig().model_dump(mode="json"))
