"""Generators and the trainer as separate workers that meet only in the archive.

    with pipeline.open_run(cfg, lease=None) as ctx:   # any number of these, on any machines
        run_generator(ctx)
    with pipeline.open_run(cfg) as ctx:               # one per run (the loop lease)
        run_trainer(ctx)
    launch_local(cfg, generators=2)                    # both on this machine: `recpipe loop --generators 2`

The off-policy schedule (docs/algorithms.md) is what makes this safe: step s trains on rollouts of
version v(s) <= s, so while the trainer works on step s, generators can already sample the shards of
any later step whose version is committed. Shard ids and seeds are the single-process loop's
(recpipe.pipeline.plan_generation), so the archive holds the same rollouts whichever worker made them.

- A **generator** repeatedly picks the next shard the schedule needs: of the steps not trained yet,
  those whose version v(s) is committed, oldest version first - never a version that is not
  committed, never a step past ``loop.steps``. It claims the shard (a lease named after it, so no two
  workers generate the same shard; a claim of a killed worker is free at once on its host, or after
  its ttl elsewhere), loads that version's weights into its engine in place, generates, commits.
- The **trainer**, for each step, waits (with a progress line, up to ``wait_timeout_s``) until every
  shard of v(s) is committed, then selects and trains as the loop does, committing version s + 1.

Each role restarts where the archive says: the trainer from its latest version, a generator by
planning again. The single-process ``recpipe loop`` stays the default.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from recpipe import pipeline
from recpipe.config import RecpipeConfig
from recpipe.store.lease import Lease, RunLocked
from recpipe.subprocesses import die_with_parent

CLAIM_TTL_S = 60.0


class WaitTimeout(TimeoutError):
    """The trainer waited longer than its timeout for the rollouts a step needs."""


def trained_steps(ctx: pipeline.RunContext) -> int:
    """The number of steps the run has recorded (the trainer's next step)."""
    steps = ctx.store.read("steps", "run = $run", {"run": ctx.cfg.run}).column("step").to_pylist()
    return max([-1, *steps]) + 1


def pending_shards(ctx: pipeline.RunContext, next_step: int, committed: int) -> Iterator[tuple[int, Any]]:
    """(version, shard plan) of every uncommitted shard that a step from ``next_step`` on will train on and
    whose version is committed (<= ``committed``), oldest version first."""
    versions = sorted({pipeline.schedule_version(ctx, s) for s in range(next_step, ctx.cfg.loop.steps)})
    for version in versions:
        if version > committed:
            return
        for plan in pipeline.plan_generation(ctx, version, pipeline.prompts_needed(ctx, version)):
            if not pipeline.shard_committed(ctx, version, plan):
                yield version, plan


def run_generator(ctx: pipeline.RunContext, *, poll_s: float = 1.0, exit_when_idle: bool = False,
                  claim_ttl_s: float = CLAIM_TTL_S, should_stop: Callable[[], bool] = lambda: False) -> int:
    """Generate shards for the run until it has trained ``loop.steps`` steps; returns rollouts written.

    exit_when_idle: stop as soon as no shard can be generated now (instead of waiting for new versions).
    """
    written = 0
    while not should_stop():
        next_step = trained_steps(ctx)
        if next_step >= ctx.cfg.loop.steps:
            break
        work = False
        for version, plan in pending_shards(ctx, next_step, ctx.latest_version()):
            claim = Lease(ctx.store, ctx.cfg.run, f"shard-{plan.shard_id}", ttl_s=claim_ttl_s)
            try:
                claim.acquire()
            except RunLocked:  # another worker has it
                continue
            try:
                written += pipeline.generate_shard(ctx, version, plan)
            finally:
                claim.release()
            work = True
            break  # plan again: the trainer may have moved on, or a newer version appeared
        if not work:
            if exit_when_idle:
                break
            time.sleep(poll_s)
    return written


def wait_for_rollouts(ctx: pipeline.RunContext, step: int, *, timeout_s: float, poll_s: float = 0.5) -> None:
    """Block until every shard of the version step ``step`` trains on is committed (WaitTimeout after
    ``timeout_s``), reporting how many are still missing."""
    version = pipeline.schedule_version(ctx, step)
    plans = pipeline.plan_generation(ctx, version, pipeline.prompts_needed(ctx, version))
    deadline = time.monotonic() + timeout_s
    shown = None
    while True:
        missing = [p for p in plans if not pipeline.shard_committed(ctx, version, p)]
        if not missing:
            return
        if len(missing) != shown:  # a line when the count changes, not every poll
            shown = len(missing)
            ctx.progress("wait", {"step": step, "version": version, "missing": shown, "shards": len(plans)})
        if time.monotonic() > deadline:
            raise WaitTimeout(f"run {ctx.cfg.run!r} step {step}: {len(missing)} of {len(plans)} shards of "
                              f"v{version:06d} still missing after {timeout_s:g} s; are generators running "
                              "(`recpipe generator`)?")
        time.sleep(poll_s)


def run_trainer(ctx: pipeline.RunContext, *, wait_timeout_s: float = 3600.0) -> list[Any]:
    """Train the run to ``loop.steps`` steps on rollouts generators commit; returns the step results."""
    results = []
    for step in range(ctx.trainer.next_step, ctx.cfg.loop.steps):
        wait_for_rollouts(ctx, step, timeout_s=wait_timeout_s)
        batch = pipeline.select_batch(ctx, step)
        result = pipeline.train_step(ctx, step, batch)
        ctx.progress("step", {"step": step, "loss": result.row.get("loss"), "policy_version": result.policy_version,
                              "applied": result.applied, "skip_reason": result.skip_reason,
                              "reward": result.row.get("reward_mean"),
                              "tokens_per_s": result.row.get("tokens_per_second")})
        results.append(result)
    pipeline.compact_run(ctx)
    return results


# ---- one machine, several processes ---------------------------------------------------------------
def split_devices(devices: list[int], parts: int) -> list[list[int]]:
    """``devices`` dealt into ``parts`` contiguous, near-equal groups (every part gets at least one)."""
    if parts < 1:
        raise ValueError(f"need at least one part, got {parts}")
    if not devices:
        return [[] for _ in range(parts)]
    if len(devices) < parts:
        raise ValueError(f"{parts} generator(s) need at least {parts} devices; got {devices}")
    size, extra = divmod(len(devices), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(devices[start:end])
        start = end
    return out


def _placement(devices: list[int]) -> dict[str, str]:
    """Environment that puts a worker on ``devices``: CUDA devices on a CUDA machine, else CPU cores."""
    if not devices:
        return {}
    import torch

    if torch.cuda.is_available():
        return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, devices))}
    return {"RECPIPE_CPUS": ",".join(map(str, devices)), "OMP_NUM_THREADS": str(len(devices))}


def pin_to_cpus(cpus: str | None = None) -> None:
    """Pin this process to the cores ``cpus`` names ("0,1"; default RECPIPE_CPUS, set by the launcher)."""
    cpus = cpus if cpus is not None else os.environ.get("RECPIPE_CPUS")
    if cpus:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})


def launch_local(cfg: RecpipeConfig, generators: int, *, generator_devices: list[int] | None = None,
                 trainer_devices: list[int] | None = None, progress: pipeline.Progress | None = None,
                 wait_timeout_s: float = 3600.0) -> list[Any]:
    """Run ``generators`` generator processes and the trainer (this process) for one run on this machine."""
    if generators < 1:
        raise ValueError(f"--generators must be >= 1 (got {generators})")
    parts = split_devices(list(generator_devices or []), generators)
    with tempfile.TemporaryDirectory(prefix="recpipe-roles-") as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        with pipeline.open_run(cfg, progress=progress) as ctx:  # the loop lease: one launcher per run
            workers = [subprocess.Popen([sys.executable, "-m", "recpipe.cli", "generator", "--config", str(config)],
                                        env={**os.environ, **_placement(part)}, start_new_session=True,
                                        preexec_fn=die_with_parent(signal.SIGTERM))
                       for part in parts]
            try:
                pin_to_cpus(_placement(list(trainer_devices or [])).get("RECPIPE_CPUS", ""))
                return run_trainer(ctx, wait_timeout_s=wait_timeout_s)
            finally:
                for worker in workers:
                    if worker.poll() is None:
                        os.killpg(worker.pid, signal.SIGTERM)
                for worker in workers:
                    try:
                        worker.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        os.killpg(worker.pid, signal.SIGKILL)
                        worker.wait()
