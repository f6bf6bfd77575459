"""The generate -> select -> train loop as one recipe with fixed verbs (torchtune's recipe shape).

    with LoopRecipe(cfg) as recipe:       # setup(): task, model, store, the run's lease
        recipe.run()                      # evaluate v0; per step generate -> select -> train_step; evaluate

The verbs are ``setup``, ``generate`` (one version's missing shards, each a ``generate_shard``),
``select``, ``train_step``, ``evaluate`` and ``cleanup``. The loops over them are short: ``run`` (the
loop), ``train`` (no generation), ``retrain`` (from another run's lineage); the roles (recpipe.roles) are
loops over the same verbs in separate processes. Flows wrap each verb call as a Prefect task through
``stage`` (identity by default), so a task's arguments are plain values - a step, a version, a shard
plan, a batch - never the engine or the trainer, which the recipe holds.

What is generated for step s is fixed by the run's config (recpipe.generate.plan), so a killed loop
that resumes skips the committed shards, the trainer resumes at its last complete version, and a step
whose batch was already recorded trains on that same batch.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from recpipe.config import RecpipeConfig
from recpipe.errors import OptionError, RecpipeError
from recpipe.generate.plan import ShardPlan, generation_version, plan_shards, prompts_needed
from recpipe.generate.pool import EnginePool
from recpipe.schema import SCHEMA_VERSION, table_spec
from recpipe.store import Store
from recpipe.store.lease import Lease
from recpipe.tasks import Task, get_task

log = logging.getLogger("recpipe")

Progress = Callable[[str, dict[str, Any]], None]
# How the recipe calls one of its verbs: plainly, or wrapped as a Prefect task (flows/).
Stage = Callable[[Callable[..., Any]], Callable[..., Any]]

# Set when the user asks the process to stop (SIGINT / SIGTERM, recpipe.cli). Each verb checks it before
# it starts: a library that turned the stop into an ordinary error (a callback run from Rust or DuckDB)
# must not let a retry or the next verb carry on.
STOP = threading.Event()

SMALL_TABLES = ("steps", "trained_tokens", "batches", "policies", "timings", "evals")


class TokenizerMismatch(RecpipeError):
    """A run would learn from token ids of a tokenizer its model does not use."""


def check_stop() -> None:
    if STOP.is_set():
        raise KeyboardInterrupt("stop requested")


def plain(fn: Callable[..., Any]) -> Callable[..., Any]:
    return fn


def _log_progress(event: str, info: dict[str, Any]) -> None:
    log.info("%s %s", event, info)


# ---- before a recipe: the run's model, read-only selections ------------------------------------------
def recorded_base_model(store: str | Path, run: str, storage_options: dict[str, str] | None = None) -> Path | None:
    """The base model an existing run was started from (its version-0 `policies` row), if any."""
    if not Store.exists(store, storage_options):
        return None
    rows = Store(store, storage_options).read("policies", "run = $run AND version = 0", {"run": run}).to_pylist()
    return Path(rows[0]["base_model"]) if rows else None


def retrain_plan(cfg: RecpipeConfig, source_run: str, *, steps_given: bool,
                 model_given: bool) -> tuple[dict[str, Any], list[int]]:
    """A retrain from ``source_run``'s recorded batches: the config overrides it implies, and the steps it
    replays. Without ``steps_given`` it replays every recorded step; a new run starts from the source run's
    base model (its rollouts are token ids of that model's tokenizer) unless a model is given."""
    from recpipe.select import recorded_steps

    options = cfg.storage_options or None
    recorded = recorded_steps(Store(cfg.store, options), source_run) if Store.exists(cfg.store, options) else []
    if not recorded:
        raise OptionError(f"--from-run {source_run!r}: that run has no recorded batches in {cfg.store}")
    overrides: dict[str, Any] = {} if steps_given else {"loop.steps": recorded[-1] + 1}
    source_base = recorded_base_model(cfg.store, source_run, options)
    if not model_given and source_base and not recorded_base_model(cfg.store, cfg.run, options):
        overrides["model.name"] = str(source_base)
    return overrides, recorded


def preflight(cfg: RecpipeConfig) -> tuple[Task, Path]:
    """Resolve the task and the model before anything starts: bad names fail here, store untouched.

    A run that exists keeps its base model unless ``model.name`` is given explicitly, so commands on
    an existing run (select, train, evaluate, generate) need no --model."""
    from recpipe.models import resolve_model

    task = get_task(cfg.task.name, **cfg.task.options)
    if "name" not in cfg.model.model_fields_set:
        recorded = recorded_base_model(cfg.store, cfg.run, cfg.storage_options or None)
        if recorded is not None and (recorded / "config.json").is_file():
            return task, recorded
    return task, resolve_model(cfg.model.name, cfg.model.cache_dir)


def query_params(cfg: RecpipeConfig, query: str, current_version: int) -> dict[str, Any]:
    """The loop's settings for the parameters ``query`` declares, then the user's select.params."""
    from recpipe.select import load_query

    loop = cfg.loop
    declared = load_query(query).params
    offered = {"sync_interval": loop.sync_interval, "sync_offset": loop.sync_offset,
               "current_version": current_version}
    params = {k: v for k, v in offered.items() if k in declared}
    params.update(cfg.select.params)
    return params


def select_as_of(store: Store, cfg: RecpipeConfig, step: int, as_of: Any) -> Any:
    """Step ``step``'s selection on the archive as it was at ``as_of``; nothing is recorded (a read)."""
    from recpipe.select import select

    query = cfg.select.query
    policies = store.read("policies", "run = $run", {"run": cfg.run}, as_of=as_of).column("version").to_pylist()
    return select(store, query, query_params(cfg, query, max([0, *policies])), step=step, run=cfg.run,
                  groups=cfg.select.groups_per_step, loss_config=cfg.loss.build(), seed=cfg.train.seed,
                  as_of=as_of)


def batch_summary(batch: Any) -> dict[str, Any]:
    table = batch.rollouts
    versions = table.column("policy_version").to_pylist()
    return {"step": batch.step, "query": batch.query_name, "groups": len(set(table.column("group_id").to_pylist())),
            "rollouts": table.num_rows, "policy_versions": sorted(set(versions)),
            "reward_mean": sum(table.column("reward").to_pylist()) / max(1, table.num_rows)}


def needed_versions(cfg: RecpipeConfig, from_step: int, current_version: int) -> set[int]:
    """Versions a generator may still sample from at step ``from_step`` or later (kept by retention).

    Not bounded by loop.steps: the same loop called again with more steps continues the schedule and
    samples from versions this call's own steps never used (3 steps with k=2, o=1 end at v3; step 3 uses v2).
    """
    from recpipe.train.checkpoint import future_versions

    loop = cfg.loop
    return future_versions(lambda s: generation_version(loop, s), from_step, current_version,
                           max_lag=loop.sync_interval + loop.sync_offset)


# ---- the recipe ------------------------------------------------------------------------------------
class LoopRecipe:
    """One run's loop: holds the store, the run's lease, the task, the sampling engines and the trainer.

    Args:
        cfg: The resolved config (recpipe.config).
        progress: Called with (event, info) as shards, steps and evals finish (recpipe.progress).
        lease: The run lease this recipe takes ("loop": one per run; None for a generator worker, of
            which a run may have many).
        engines: Sampling engines to reuse (an experiment shares one pool across its runs); by default
            the recipe starts its own and closes them in ``cleanup``.
        stage: How each verb is called (flows pass one that makes it a Prefect task).
    """

    def __init__(self, cfg: RecpipeConfig, *, progress: Progress | None = None, lease: str | None = "loop",
                 engines: EnginePool | None = None, stage: Stage = plain) -> None:
        self.cfg = cfg
        self.progress = progress or _log_progress
        self.stage = stage
        self._lease_name = lease
        self._own_engines = engines is None
        self.engines = engines if engines is not None else EnginePool()
        self.lock: Lease | None = None
        self._trainer: Any = None
        self._tracking: Any = None

    # ---- setup / cleanup ---------------------------------------------------------------------------
    def setup(self) -> LoopRecipe:
        """Resolve task and model, open (creating if needed) the store, take the run's lease."""
        self.task, self.model_path = preflight(self.cfg)
        self.store = Store.create(self.cfg.store, self.cfg.storage_options or None)
        if self._lease_name:
            self.lock = self.store.lock(self.cfg.run, self._lease_name).acquire()
            if self.cfg.report_to:  # the run's holder reports its steps and evals (recpipe.tracking)
                from recpipe.tracking import tracked

                try:
                    self.progress, self._tracking = tracked(self.progress, self.cfg, self.store.root)
                except BaseException:  # a missing package: release the lease, the run never started
                    self.cleanup()
                    raise
        return self

    def cleanup(self) -> None:
        """Close the trainer and (if the recipe started them) the engines; release the lease."""
        try:
            if self._trainer is not None:
                self._trainer.close()
                self._trainer = None
            if self._own_engines:
                self.engines.close()
            if self._tracking is not None:
                self._tracking.close()
                self._tracking = None
        finally:
            if self.lock is not None:
                self.lock.release()
                self.lock = None

    def __enter__(self) -> LoopRecipe:
        return self.setup()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # ---- what the verbs share ----------------------------------------------------------------------
    @property
    def trainer(self) -> Any:
        """The run's trainer, set up on first use (a generator worker never needs one)."""
        if self._trainer is None:
            from recpipe.train import Trainer

            trainer = Trainer(self.store, self.cfg.run, self.model_path, self.cfg.train, self.cfg.loss.build(),
                              preset_name=self.cfg.loss.preset,
                              needed_versions=lambda: needed_versions(self.cfg, trainer.next_step,
                                                                      trainer.current_version))
            self._trainer = trainer.setup()
        return self._trainer

    def record_time(self, stage: str, item: str, seconds: float, tokens: int | None = None,
                    version: int | None = None) -> None:
        """Commit a `timings` row (the report plots tokens/s per stage)."""
        row = {"run": self.cfg.run, "stage": stage, "item": item, "policy_version": version, "seconds": seconds,
               "tokens": tokens, "created_at": dt.datetime.now(dt.UTC), "schema_version": SCHEMA_VERSION}
        self.store.append("timings", [row], shard_id=f"{stage}-{item}-{time.time_ns()}")

    def latest_version(self) -> int:
        """The newest policy version of the run committed to the archive (0: only the base model)."""
        versions = self.store.read("policies", "run = $run", {"run": self.cfg.run}).column("version").to_pylist()
        return max([0, *versions])

    def trained_steps(self) -> int:
        """The number of steps the run has recorded (the trainer's next step)."""
        steps = self.store.read("steps", "run = $run", {"run": self.cfg.run}).column("step").to_pylist()
        return max([-1, *steps]) + 1

    def checkpoint(self, version: int) -> Path:
        """The directory of ``version`` (0: the base model); CheckpointError saying what to do if it is gone."""
        if version == 0:
            return self.model_path
        from recpipe.train import checkpoint as ckpt

        path = self.store.checkpoint_dir(self.cfg.run, version)
        if not self.store.location.is_local and version in ckpt.version_dirs(self.store, self.cfg.run):
            path = ckpt.local_version(self.store, self.cfg.run, version)  # fetched into this machine's cache
        if not ckpt.is_complete(path):
            on_disk = sorted(ckpt.version_dirs(self.store, self.cfg.run))
            current = self.latest_version()
            why = (f"not trained yet, the run is at v{current:06d}" if version > current else
                   "removed by retention (train.keep_every keeps every k-th version and the latest two) or by hand"
                   if not path.exists() else "incomplete, a file of it was deleted")
            raise ckpt.CheckpointError(
                f"run {self.cfg.run!r}: version v{version:06d} is needed to sample from but is gone from "
                f"{path.parent} ({why}; versions on disk: {', '.join(f'v{v:06d}' for v in on_disk) or 'none'}). "
                f"{ckpt.what_to_do(path)}")
        return path

    def engine_for(self, version: int) -> Any:
        """A sampling engine holding ``version``'s weights (swapped in place, no restart).

        A store version's files are checked against its manifest each time they are loaded into the engine
        (~0.6 s for SmolLM2); version 0 is the user's base model, which has no manifest.
        """
        weights = self.checkpoint(version)
        if version and not self.engines.holds(self.cfg, self.model_path, weights):
            from recpipe.train import checkpoint as ckpt

            ckpt.check_checkpoint(weights, version, optimizer="skip")  # the engine never reads optimizer state
        return self.engines.get(self.cfg, self.model_path, weights)

    def plan(self, version: int, prompts: int | None = None) -> list[ShardPlan]:
        """``version``'s shards: by default every group the run's steps train on (generate.plan)."""
        if prompts is None:
            prompts = prompts_needed(self.cfg.loop, self.cfg.select, version)
        return plan_shards(self.task, self.cfg, version, prompts)

    def shard_committed(self, version: int, plan: ShardPlan) -> bool:
        values = {"run": self.cfg.run, "policy_version": version}
        return self.store.is_committed("rollouts", values, plan.shard_id) and self.store.is_committed(
            "groups", values, plan.shard_id)

    # ---- verbs -------------------------------------------------------------------------------------
    def generate(self, version: int, prompts: int | None = None) -> int:
        """Generate every not-yet-committed shard of ``version``; returns rows written."""
        return sum(self.stage(self.generate_shard)(version, plan) for plan in self.plan(version, prompts)
                   if not self.shard_committed(version, plan))

    def generate_shard(self, version: int, plan: ShardPlan) -> int:
        """Generate and commit one shard; returns rows written (0 if it was committed already)."""
        check_stop()
        from recpipe.generate import generate_rollouts

        if self.shard_committed(version, plan):
            return 0
        g = self.cfg.generate
        started = time.perf_counter()
        table = generate_rollouts(
            self.engine_for(version), self.task, plan.prompts, run=self.cfg.run, policy_version=version,
            shard_id=plan.shard_id, n=g.group_size, temperature=g.temperature, top_p=g.top_p,
            max_tokens=g.max_tokens, stop=g.stop, seed=plan.seed, reward_timeout_s=self.cfg.task.reward_timeout_s)
        self.store.append_rollouts(table, shard_id=plan.shard_id)
        seconds = time.perf_counter() - started
        tokens = pc.sum(table.column("response_length")).as_py() or 0
        self.record_time("generate", plan.shard_id, seconds, tokens, version)
        self.progress("shard", {"version": version, "shard": plan.index, "rows": table.num_rows,
                                "reward": pc.mean(table.column("reward")).as_py() or 0.0,
                                "tokens_per_s": tokens / max(seconds, 1e-9)})
        return table.num_rows

    def select(self, step: int, query: str | None = None, params: dict[str, Any] | None = None,
               groups: int | None = None) -> Any:
        """Select (and record) step ``step``'s batch; a recorded step returns its recorded batch."""
        check_stop()
        from recpipe.select import select

        query = query or self.cfg.select.query
        if params is None:
            params = query_params(self.cfg, query, self.trainer.current_version)
        started = time.perf_counter()
        batch = select(self.store, query, params, step=step, run=self.cfg.run,
                       groups=groups or self.cfg.select.groups_per_step, loss_config=self.cfg.loss.build(),
                       seed=self.cfg.train.seed)
        tokens = pc.sum(pc.list_value_length(batch.rollouts.column("response_token_ids"))).as_py() or 0
        self.record_time("select", table_spec("steps").shard_id(step=step), time.perf_counter() - started, tokens)
        return batch

    def train_step(self, step: int, batch: Any) -> Any:
        """One optimizer step on ``batch``; commits version step + 1 (or records why it was skipped)."""
        check_stop()
        started = time.perf_counter()
        result = self.trainer.step(step, batch)
        self.record_time("train", table_spec("steps").shard_id(step=step), time.perf_counter() - started, result.row.get("tokens"),
                         self.trainer.current_version)
        row = result.row
        self.progress("step", {"step": step, "loss": row.get("loss"), "policy_version": result.policy_version,
                               "applied": result.applied, "skip_reason": result.skip_reason,
                               "reward": row.get("reward_mean"), "tokens_per_s": row.get("tokens_per_second"),
                               "row": row})  # the whole `steps` row: the console's and trackers' metrics
        return result

    def evaluate(self, version: int) -> dict[str, Any]:
        """Greedy accuracy of ``version`` on held-out prompts; one `evals` row (idempotent per version)."""
        check_stop()
        from recpipe.generate import evaluate_greedy

        shard = table_spec("evals").shard_id(policy_version=version, task=self.task.name, split="test")
        if self.store.is_committed("evals", {"run": self.cfg.run}, shard):
            rows = self.store.read("evals", "run = $run AND policy_version = $v", {"run": self.cfg.run, "v": version})
            return rows.to_pylist()[0]
        started = time.perf_counter()
        prompts = self.task.prompts("test", limit=self.cfg.task.eval_prompts, seed=0)
        accuracy, reward_mean, n = evaluate_greedy(self.engine_for(version), self.task, prompts,
                                                   max_tokens=self.cfg.generate.max_tokens,
                                                   reward_timeout_s=self.cfg.task.reward_timeout_s)
        row = {"run": self.cfg.run, "policy_version": version, "task": self.task.name, "split": "test",
               "accuracy": accuracy, "reward_mean": reward_mean, "n": n, "created_at": dt.datetime.now(dt.UTC),
               "schema_version": SCHEMA_VERSION}
        self.store.append("evals", [row], shard_id=shard)
        self.record_time("evaluate", shard, time.perf_counter() - started, None, version)
        self.progress("eval", {"version": version, "accuracy": accuracy, "n": n})
        return row

    def compact(self, min_files: int = 8) -> None:
        """At the run's end: merge the run's one-file-per-step tables (partitions of ``min_files`` files or
        more) and the rollouts and group summaries of each of its versions (2 or more files: no version of
        a finished run gets another shard), one transaction per partition. A selection opens every file
        of the partitions it reads, so an archive of finished runs stays fast to select from."""
        for table in SMALL_TABLES:
            self.store.compact(table, run=self.cfg.run, min_files=min_files)
        for table in ("rollouts", "groups"):
            self.store.compact(table, run=self.cfg.run, min_files=2)

    def check_tokenizer(self, source_run: str) -> None:
        """Refuse to train on ``source_run``'s token ids with a model whose tokenizer differs from the one
        that produced them: the fingerprint recorded with the rollouts its batches hold
        (``generator.tokenizer``), else, for rollouts written before it was recorded, its base model's."""
        from transformers import AutoTokenizer

        from recpipe.generate.rollouts import tokenizer_fingerprint

        con = self.store.connect(tables=["rollouts", "batches"])
        try:
            runs = {source_run} | {r for (r,) in con.execute("SELECT DISTINCT source_run FROM batches WHERE run = $run",
                                                             {"run": source_run}).fetchall()}
            recorded = {}  # fingerprint -> the models that sampled with it
            for run in sorted(runs):
                for fingerprint, model in con.execute(
                        "SELECT DISTINCT generator.tokenizer, generator.model FROM rollouts WHERE run = $run",
                        {"run": run}).fetchall():
                    recorded.setdefault(fingerprint, set()).add(f"{run}: {model}")
        finally:
            con.close()
        source = recorded_base_model(self.cfg.store, source_run, self.cfg.storage_options or None)
        have_source = source is not None and (source / "config.json").is_file()
        unrecorded = recorded.pop(None, None)  # rollouts from before schema_version 4 (or none yet)
        if unrecorded is not None or not recorded:  # then the tokenizer of the run's base model, if still here
            if have_source:
                recorded.setdefault(tokenizer_fingerprint(AutoTokenizer.from_pretrained(source)), set()).update(
                    unrecorded or {f"{source_run}: base model {source}"})
            else:
                log.warning("retrain: rollouts of run %r carry no tokenizer fingerprint and its base model (%s) is "
                            "not on this machine; their tokenizer cannot be compared with %s",
                            source_run, source, self.model_path)
        if not recorded:
            return
        ours = tokenizer_fingerprint(AutoTokenizer.from_pretrained(self.model_path))
        theirs = sorted(f for f in recorded if f != ours)
        if theirs:
            described = "; ".join(f"{f} ({', '.join(sorted(recorded[f]))})" for f in theirs)
            hint = (f"train from {source} (leave out --model) or from a model with the same tokenizer" if have_source
                    else "train from a model with the same tokenizer")
            raise TokenizerMismatch(
                f"retrain: run {source_run!r}'s rollouts are token ids of tokenizer {described}, and the model of "
                f"run {self.cfg.run!r} ({self.model_path}) has another tokenizer, {ours}; {hint}")

    # ---- loops over the verbs ----------------------------------------------------------------------
    def step(self, step: int) -> Any:
        """One iteration: make sure version v(step)'s rollouts exist, select a batch, train on it."""
        self.generate(generation_version(self.cfg.loop, step))
        batch = self.stage(self.select)(step)
        return self.stage(self.train_step)(step, batch)

    def run(self) -> list[Any]:
        """Run (or resume) the loop to ``loop.steps`` steps; evaluates at start, every N steps and at the end."""
        loop, stage = self.cfg.loop, self.stage
        start = self.trainer.next_step
        if start == 0:
            stage(self.evaluate)(0)
        results = []
        for step in range(start, loop.steps):
            results.append(self.step(step))
            if loop.eval_every and (step + 1) % loop.eval_every == 0:
                stage(self.evaluate)(self.trainer.current_version)
        stage(self.evaluate)(self.trainer.current_version)  # idempotent per version
        self.compact()
        return results

    def train(self, steps: int) -> list[Any]:
        """Train ``steps`` more steps on batches the configured query selects (no generation)."""
        start = self.trainer.next_step
        return [self.stage(self.train_step)(step, self.stage(self.select)(step)) for step in range(start, start + steps)]

    def retrain(self, source_run: str | None = None) -> list[Any]:
        """A new run from archived rollouts only: replay ``source_run``'s recorded batches step by step
        (its lineage, advantages recomputed under this run's loss; behaviour log-probs from the archive),
        or select with the configured query."""
        if source_run is None:
            return self.train(self.cfg.loop.steps - self.trainer.next_step)
        if source_run == self.cfg.run:
            raise OptionError("retrain: source_run must differ from the new run's name")
        self.check_tokenizer(source_run)
        recorded = self.store.read("batches", "run = $run", {"run": source_run})
        if recorded.num_rows == 0:
            raise OptionError(f"retrain: run {source_run!r} has no recorded batches to replay")
        groups_per_step: dict[int, set[str]] = {}
        for step, group in zip(recorded.column("step").to_pylist(), recorded.column("group_id").to_pylist(),
                               strict=True):
            groups_per_step.setdefault(step, set()).add(group)
        results = []
        for step in sorted(groups_per_step):
            if step < self.trainer.next_step or step >= self.cfg.loop.steps:
                continue
            batch = self.stage(self.select)(step, "lineage", {"source_run": source_run}, len(groups_per_step[step]))
            results.append(self.stage(self.train_step)(step, batch))
        self.stage(self.evaluate)(self.trainer.current_version)
        return results
