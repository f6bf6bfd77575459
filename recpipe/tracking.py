"""Experiment tracking like TRL's ``report_to``: each step's metrics to TensorBoard, MLflow and/or W&B.

    recpipe loop --set 'report_to=[tensorboard,mlflow]' --store store
    tensorboard --logdir store/tracking/tensorboard        # or: mlflow ui --backend-store-uri store/tracking/mlruns

The recipe's progress events (recpipe.recipe) are the source: each trained step logs ``train/<column>`` for
the numeric columns of its `steps` row (train/loss, train/reward_mean, train/clip_fraction, train/grad_norm,
...) at x = the step; each evaluation logs ``eval/accuracy`` and ``eval/n`` at x = the policy version (the
number of steps behind it). Every tracker gets the same names and values.

Where: ``tracking_dir`` (default ``<store>/tracking``): ``tensorboard/<run>/`` event files, ``mlruns/``
an MLflow file store (experiment "recpipe", one MLflow run per recpipe run, resumed by tag), ``wandb/``
W&B's offline runs (``wandb sync`` uploads them later). A package is imported only when its tracker is
asked for; a missing one is a one-line error naming what to install.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recpipe.errors import RecpipeError

Progress = Callable[[str, dict[str, Any]], None]

# Columns of the `steps` row that are identifiers or bookkeeping, not metrics.
NOT_METRICS = {"step", "policy_version", "batch_policy_version_min", "batch_policy_version_max", "schema_version",
               "applied"}
PACKAGES = {"tensorboard": "tensorboard==2.21.0", "mlflow": "mlflow-skinny==3.17.2", "wandb": "wandb==0.31.0"}


class TrackerMissing(RecpipeError):
    """A tracker in ``report_to`` whose package is not installed."""


def step_metrics(row: dict[str, Any]) -> dict[str, float]:
    """``train/<column>`` for each numeric column of a `steps` row."""
    return {f"train/{k}": float(v) for k, v in row.items()
            if k not in NOT_METRICS and isinstance(v, int | float) and not isinstance(v, bool)}


def metrics_of(event: str, info: dict[str, Any]) -> tuple[int, dict[str, float]] | None:
    """(x, metrics) that ``event`` gives the trackers, or None (shards, waits: no metrics of their own)."""
    if event == "step" and info.get("row"):
        return info["step"], step_metrics(info["row"])
    if event == "eval":
        return info["version"], {"eval/accuracy": float(info["accuracy"]), "eval/n": float(info["n"])}
    return None


def _require(name: str, module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise TrackerMissing(f"report_to: {name} needs its package, which is not installed: "
                             f"pip install {PACKAGES[name]} (or remove {name} from report_to)") from None


class _TensorBoard:
    def __init__(self, folder: Path, run: str, config: dict[str, Any]):
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder / "tensorboard" / run))

    def log(self, x: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=x)
        self.writer.flush()  # a reader (or a killed loop) sees every step written so far

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, folder: Path, run: str, config: dict[str, Any]):
        # MLflow 3 refuses its file store (maintenance mode) unless told; a database backend would need
        # alembic and a server-side schema for what is a folder of numbers here.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        _require("mlflow", "mlflow")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=(folder / "mlruns").resolve().as_uri())
        experiment = self.client.get_experiment_by_name("recpipe")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("recpipe")
        # A resumed loop logs into the MLflow run of its recpipe run (found by tag), not a new one.
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`recpipe.run` = '{run}'", max_results=1)
        if found:
            self.run_id = found[0].info.run_id
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=run, tags={"recpipe.run": run}).info.run_id
            from mlflow.entities import Param

            params = [Param(key, str(value)[:6000]) for key, value in _flat(config).items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log(self, x: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, x) for k, v in metrics.items()])

    def close(self) -> None:
        pass  # the run stays open (RUNNING -> FINISHED would hide a resume); every batch is on disk already


class _WandB:
    def __init__(self, folder: Path, run: str, config: dict[str, Any]):
        wandb = _require("wandb", "wandb")
        os.environ.setdefault("WANDB_MODE", "offline")  # no account, no network: `wandb sync` uploads later
        os.environ.setdefault("WANDB_SILENT", "true")
        (folder / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project="recpipe", name=run, dir=str(folder), config=config, reinit="create_new")

    def log(self, x: int, metrics: dict[str, float]) -> None:
        self.run.log({**metrics, "step": x})  # "step" as the x axis: a resumed run's steps restart the counter

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def tracking_dir(cfg: Any, store_root: Path) -> Path:
    return Path(cfg.tracking_dir) if cfg.tracking_dir else Path(store_root) / "tracking"


class Tracking:
    """The trackers of ``cfg.report_to`` as a progress-like callable; ``close()`` when the run's command ends."""

    def __init__(self, cfg: Any, store_root: Path):
        folder = tracking_dir(cfg, store_root)
        folder.mkdir(parents=True, exist_ok=True)
        config = cfg.model_dump(mode="json")
        self.trackers = []
        try:
            for name in dict.fromkeys(cfg.report_to):  # each once, in the order given
                self.trackers.append(TRACKERS[name](folder, cfg.run, config))
        except BaseException:
            self.close()
            raise

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        found = metrics_of(event, info)
        if found is not None:
            for tracker in self.trackers:
                tracker.log(*found)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def tracked(progress: Progress, cfg: Any, store_root: Path) -> tuple[Progress, Tracking]:
    """``progress`` followed by the trackers: what the recipe calls for each event."""
    tracking = Tracking(cfg, store_root)

    def both(event: str, info: dict[str, Any]) -> None:
        progress(event, info)
        tracking(event, info)

    return both, tracking
