"""Scheduled deployments: ``recpipe serve`` registers the flows and serves them.

    prefect server start                                    # terminal 1 (UI at http://127.0.0.1:4200)
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    recpipe serve --flow generate --interval 3600 --store store       # hourly generation
    recpipe serve --flow retrain --cron "0 3 * * *" --set select.query=replay --store store
    recpipe serve --flow generator --interval 60 --store s3://bucket/runs   # a generator role per machine

Each deployment carries the whole validated config as its parameter, so a
scheduled run is exactly the command line that registered it.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from prefect import serve

from flows import require_server
from flows.pipeline_flows import FLOWS
from recpipe.config import RecpipeConfig, to_params
from recpipe.errors import OptionError

# The roles too: served on separate machines sharing an S3 archive, a schedule restarts a role that ended
# (limit=1 below: never two of one deployment at once; a generator's deployment per machine).
SCHEDULABLE = ("loop", "generate", "train", "evaluate", "retrain", "generator", "trainer")


def build_deployments(cfg: RecpipeConfig, names: list[str], *, cron: str | None = None,
                      interval: float | None = None) -> list[Any]:
    if (cron is None) == (interval is None):
        raise OptionError("give exactly one schedule: --cron EXPR or --interval SECONDS")
    if interval is not None and interval <= 0:
        raise OptionError(f"--interval must be > 0 seconds (got {interval})")
    deployments = []
    for name in names:
        if name not in SCHEDULABLE:
            raise OptionError(f"--flow {name!r}: expected one of {', '.join(SCHEDULABLE)}")
        schedule = {"cron": cron} if cron else {"interval": dt.timedelta(seconds=interval)}
        deployments.append(FLOWS[name].to_deployment(
            name=f"{cfg.run}-{name}", parameters={"config": to_params(cfg)},
            tags=["recpipe", cfg.run], **schedule))
    return deployments


def serve_deployments(cfg: RecpipeConfig, names: list[str], *, cron: str | None = None,
                      interval: float | None = None) -> None:
    """Register the deployments with the Prefect API and run their schedules until interrupted."""
    require_server("recpipe serve")
    # limit=1: runs of one store queue up instead of racing for the run lock.
    serve(*build_deployments(cfg, names, cron=cron, interval=interval), limit=1)
