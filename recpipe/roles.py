"""Generators and the trainer as separate workers that meet only in the archive.

    with LoopRecipe(cfg, lease=None) as recipe:   # any number of these, on any machines
        run_generator(recipe)
    with LoopRecipe(cfg) as recipe:               # one per run (the loop lease)
        run_trainer(recipe)
    launch_local(cfg, generators=2)                # both on this machine: `recpipe loop --generators 2`

The off-policy schedule (docs/algorithms.md) is what makes this safe: step s trains on rollouts of
version v(s) <= s, so while the trainer works on step s, generators can already sample the shards of
any later step whose version is committed. Shard ids and seeds are the single-process loop's
(recpipe.generate.plan), so the archive holds the same rollouts whichever worker made them.

- A **generator** repeatedly picks the next shard the schedule needs: of the steps not trained yet,
  those whose version v(s) is committed, oldest version first - never a version that is not
  committed, never a step past ``loop.steps``. It claims the shard (a lease named after it, so no two
  workers generate the same shard; a claim of a killed worker is free at once on its host, or after
  its ttl elsewhere), loads that version's weights into its engine in place, generates, commits.
- The **trainer**, for each step, waits (with a progress line, up to ``wait_timeout_s``) until every
  shard of v(s) is committed, then selects and trains as the loop does, committing version s + 1.

Each role is a short loop over the recipe's verbs (recpipe.recipe) and restarts where the archive says:
the trainer from its latest version, a generator by planning again. The single-process ``recpipe loop``
stays the default.
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

from recpipe.config import RecpipeConfig
from recpipe.errors import OptionError, RecpipeError
from recpipe.generate.plan import ShardPlan, generation_version
from recpipe.recipe import LoopRecipe, Progress
from recpipe.store.lease import Lease, RunLocked
from recpipe.subprocesses import die_with_parent

CLAIM_TTL_S = 60.0


class WaitTimeout(RecpipeError, TimeoutError):
    """The trainer waited longer than its timeout for the rollouts a step needs."""


class GeneratorFailed(RecpipeError):
    """A generator worker the launcher started ended with an error while the trainer waited for it."""


def pending_shards(recipe: LoopRecipe, next_step: int, committed: int) -> Iterator[tuple[int, ShardPlan]]:
    """(version, shard plan) of every uncommitted shard that a step from ``next_step`` on will train on and
    whose version is committed (<= ``committed``), oldest version first."""
    loop = recipe.cfg.loop
    for version in sorted({generation_version(loop, s) for s in range(next_step, loop.steps)}):
        if version > committed:
            return
        for plan in recipe.plan(version):
            if not recipe.shard_committed(version, plan):
                yield version, plan


def run_generator(recipe: LoopRecipe, *, poll_s: float = 1.0, exit_when_idle: bool = False,
                  claim_ttl_s: float = CLAIM_TTL_S, should_stop: Callable[[], bool] = lambda: False) -> int:
    """Generate shards for the run until it has trained ``loop.steps`` steps; returns rollouts written.

    exit_when_idle: stop as soon as no shard can be generated now (instead of waiting for new versions).
    """
    written = 0
    while not should_stop():
        next_step = recipe.trained_steps()
        if next_step >= recipe.cfg.loop.steps:
            break
        work = False
        for version, plan in pending_shards(recipe, next_step, recipe.latest_version()):
            claim = Lease(recipe.store, recipe.cfg.run, f"shard-{plan.shard_id}", ttl_s=claim_ttl_s)
            try:
                claim.acquire()
            except RunLocked:  # another worker has it
                continue
            try:
                written += recipe.stage(recipe.generate_shard)(version, plan)
            finally:
                claim.release()
            work = True
            break  # plan again: the trainer may have moved on, or a newer version appeared
        if not work:
            if exit_when_idle:
                break
            time.sleep(poll_s)
    return written


def wait_for_rollouts(recipe: LoopRecipe, step: int, *, timeout_s: float, poll_s: float = 0.5,
                      check: Callable[[], None] = lambda: None) -> None:
    """Block until every shard of the version step ``step`` trains on is committed (WaitTimeout after
    ``timeout_s``), reporting how many are still missing; ``check`` is called at each poll (a launcher's
    test that its generators are still alive: it raises if not)."""
    version = generation_version(recipe.cfg.loop, step)
    plans = recipe.plan(version)
    deadline = time.monotonic() + timeout_s
    shown = None
    while True:
        missing = [p for p in plans if not recipe.shard_committed(version, p)]
        if not missing:
            return
        check()
        if len(missing) != shown:  # a line when the count changes, not every poll
            shown = len(missing)
            recipe.progress("wait", {"step": step, "version": version, "missing": shown, "shards": len(plans)})
        if time.monotonic() > deadline:
            raise WaitTimeout(f"run {recipe.cfg.run!r} step {step}: {len(missing)} of {len(plans)} shards of "
                              f"v{version:06d} still missing after {timeout_s:g} s; are generators running "
                              "(`recpipe generator`)?")
        time.sleep(poll_s)


def run_trainer(recipe: LoopRecipe, *, wait_timeout_s: float = 3600.0,
                check: Callable[[], None] = lambda: None) -> list[Any]:
    """Train the run to ``loop.steps`` steps on rollouts generators commit; returns the step results."""
    results = []
    for step in range(recipe.trainer.next_step, recipe.cfg.loop.steps):
        wait_for_rollouts(recipe, step, timeout_s=wait_timeout_s, check=check)
        batch = recipe.stage(recipe.select)(step)
        results.append(recipe.stage(recipe.train_step)(step, batch))
    recipe.compact()
    return results


# ---- one machine, several processes ---------------------------------------------------------------
def split_devices(devices: list[int], parts: int) -> list[list[int]]:
    """``devices`` dealt into ``parts`` contiguous, near-equal groups (every part gets at least one)."""
    if parts < 1:
        raise ValueError(f"need at least one part, got {parts}")
    if not devices:
        return [[] for _ in range(parts)]
    if len(devices) < parts:
        raise OptionError(f"{parts} generator(s) need at least {parts} devices; got {devices}")
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


def _pin_trainer(devices: list[int] | None) -> None:
    """Pin this process (the trainer) to the CPU cores ``devices`` names; on a CUDA machine they are GPUs
    and nothing is pinned."""
    pin_to_cpus(_placement(list(devices or [])).get("RECPIPE_CPUS", ""))


def launch_local(cfg: RecpipeConfig, generators: int, *, generator_devices: list[int] | None = None,
                 trainer_devices: list[int] | None = None, progress: Progress | None = None,
                 wait_timeout_s: float = 3600.0) -> list[Any]:
    """Run ``generators`` generator processes and the trainer (this process) for one run on this machine."""
    if generators < 1:
        raise OptionError(f"--generators must be >= 1 (got {generators})")
    parts = split_devices(list(generator_devices or []), generators)
    with tempfile.TemporaryDirectory(prefix="recpipe-roles-") as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        with LoopRecipe(cfg, progress=progress) as recipe:  # the loop lease: one launcher per run
            workers = [subprocess.Popen([sys.executable, "-m", "recpipe.cli", "generator", "--config", str(config)],
                                        env={**os.environ, **_placement(part)}, start_new_session=True,
                                        preexec_fn=die_with_parent(signal.SIGTERM))
                       for part in parts]
            def check() -> None:
                failed = [(i, w.returncode) for i, w in enumerate(workers) if w.poll() not in (None, 0)]
                if failed:
                    raise GeneratorFailed(f"generator process(es) {', '.join(f'#{i} (exit {rc})' for i, rc in failed)} "
                                          "ended with an error; their output is above")

            try:
                _pin_trainer(trainer_devices)
                return run_trainer(recipe, wait_timeout_s=wait_timeout_s, check=check)
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


# ---- a Ray cluster ---------------------------------------------------------------------------------
# What a generator actor needs from the driver's environment on another machine (S3 keys, caches).
FORWARDED_ENV = ("AWS_", "RECPIPE_", "HF_", "VLLM_", "OMP_NUM_THREADS")


class GeneratorActor:
    """A generator worker as a Ray actor: one recipe (and so one loaded engine) for the actor's life, so
    an engine is started once and only swaps weights between shards and versions."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.recipe = LoopRecipe(RecpipeConfig.model_validate(config), lease=None).setup()

    def run(self, exit_when_idle: bool = False) -> int:
        try:
            return run_generator(self.recipe, exit_when_idle=exit_when_idle)
        finally:
            self.recipe.cleanup()


def portable_config(cfg: RecpipeConfig) -> dict[str, Any]:
    """``cfg`` as plain data with local paths made absolute: a Ray worker does not start in this directory."""
    data = cfg.model_dump(mode="json")
    if "://" not in data["store"]:
        data["store"] = str(Path(data["store"]).resolve())
    if Path(data["model"]["name"]).exists():
        data["model"]["name"] = str(Path(data["model"]["name"]).resolve())
    return data


def launch_ray(cfg: RecpipeConfig, generators: int, *, address: str = "local",
               progress: Progress | None = None, wait_timeout_s: float = 3600.0,
               trainer_devices: list[int] | None = None) -> list[Any]:
    """Run ``generators`` generator actors on a Ray cluster and the trainer in this process.

    address: "local" starts a Ray instance on this machine for the run (and stops it after); "auto" joins
    the cluster this machine belongs to (`ray start`); anything else is a cluster address. Each actor asks
    for one GPU when the cluster has GPUs, else one CPU core.
    """
    import ray

    if generators < 1:
        raise OptionError(f"--generators must be >= 1 with --ray (got {generators})")
    started_here = not ray.is_initialized()
    if started_here:
        if address == "local":
            ray.init(num_cpus=max(generators, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                     object_store_memory=256 * 2**20)
        else:
            ray.init(address=address, log_to_driver=False)
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
        actor_class = ray.remote(num_cpus=0 if gpus else 1, num_gpus=gpus, max_restarts=0)(GeneratorActor)
        with LoopRecipe(cfg, progress=progress) as recipe:  # the loop lease: one launcher per run
            config = portable_config(cfg)
            actors = [actor_class.options(runtime_env={"env_vars": env}).remote(config) for _ in range(generators)]
            runs = [actor.run.remote() for actor in actors]

            def check() -> None:  # a failed actor's error, raised here, instead of waiting for its shards
                ready, _ = ray.wait(runs, num_returns=len(runs), timeout=0)
                ray.get(ready)

            try:
                _pin_trainer(trainer_devices)
                results = run_trainer(recipe, wait_timeout_s=wait_timeout_s, check=check)
                ray.get(runs)  # each ends by itself once the run has all its steps; raises what one raised
                return results
            finally:
                for actor in actors:
                    ray.kill(actor)
    finally:
        if started_here:
            ray.shutdown()
