"""The train stage: one optimizer step per selected batch, one policy version per applied step.

    from recpipe.algorithms import preset
    from recpipe.config import TrainConfig
    from recpipe.models import resolve_model
    from recpipe.train import Trainer

    with Trainer(store, "run1", resolve_model("tiny"), TrainConfig(lr=1e-5), preset("grpo"), "grpo") as trainer:
        result = trainer.step(trainer.next_step, batch)   # batch: recpipe.select Batch or its rollouts table
        print(result.applied, trainer.current_version, result.row["loss"])

A step: recompute the response log-probs with the current weights at the temperature the
generator sampled with, take ``policy_loss`` (token mean over the whole batch, accumulated over
length-bucketed micro-batches), clip the gradient, take one AdamW step, write version v + 1
(checkpoint dir, ``policies`` row, ``steps`` row). A step whose inputs, loss or gradient are
not finite is not applied: no checkpoint, a ``steps`` row with applied=false and the reason;
``max_bad_steps`` of them in a row raise ``TrainingDiverged``.

Resume: ``setup()`` heals rows lost between commits, checks the latest committed version against
its manifest (sizes and sha256, ``checkpoint.check_checkpoint``), loads it with its optimizer state,
and continues at the step after the last recorded one. Every step draws its
randomness from (seed, step), so a killed and resumed run ends with the same weights as one
that never stopped. Same code on CUDA (bf16 compute, float32 master weights, fused AdamW) and CPU (float32).

Several ranks (torchrun; ``recpipe train --nproc N``): this process is rank 0 and alone touches the store;
the others run ``follow()``. The step's compute (recpipe.train.compute) shards the model with FSDP2 and
keeps the one-rank math; a version is still one consolidated Hugging Face checkpoint, its optimizer state
sharded (torch.distributed.checkpoint) and resumable on any number of ranks. docs/gpu.md.
"""

from __future__ import annotations

import math
import pickle
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError

from recpipe.algorithms import LossConfig
from recpipe.config import LossSection, TrainConfig
from recpipe.errors import ConfigError, RecpipeError
from recpipe.schema import SCHEMA_VERSION, table_spec
from recpipe.store import Store
from recpipe.store.files import remove_stale_temps
from recpipe.train import checkpoint as ckpt
from recpipe.train import compute
from recpipe.train.batching import MicroBatch, Sample, plan_micro_batches, samples_from_table

# Length bucketing: what one more micro-batch costs, in padded tokens (TrainConfig.micro_batch_overhead_tokens).
# CPU, measured with SmolLM2-135M on one thread: forward+backward costs ~5 ms per token plus ~0.25 s per
# micro-batch (dense grads of the 49k x 576 tied embedding, kernel setup), i.e. ~50 tokens.
# CUDA: thousands of tokens run in the time of one micro-batch's kernel launches (not measured here).
DEFAULT_OVERHEAD_TOKENS = {"cpu": 64, "cuda": 1024}


class TrainingDiverged(RecpipeError, RuntimeError):
    """``max_bad_steps`` consecutive steps had a non-finite input, loss or gradient."""


@dataclass
class StepResult:
    """What one ``Trainer.step`` did.

    row: the ``steps`` table row (flat names, see schemas/tables.yaml).
    metrics: the row's numbers plus extras (policy_loss, regularizer_loss, seq_ratio_*, input_tokens,
        save_seconds) and "/" names for loggers (loss/total, is_ratio/max, ...).
    replayed: the step was already recorded (a resumed loop asked again); nothing was computed.
    """

    step: int
    applied: bool
    policy_version: int
    skip_reason: str | None
    row: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    replayed: bool = False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"train.device={name!r}; allowed: auto, cpu, cuda")
    return torch.device(name)


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63 - 1)


@contextmanager
def _threads(count: int) -> Iterator[None]:
    """Compute with exactly ``count`` intra-op threads, then put the process's count back (a sampling
    engine in the same process keeps its own)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    if torch.get_num_threads() != count:  # e.g. vLLM's CPU worker turns set_num_threads into a no-op
        raise RuntimeError(f"torch.set_num_threads({count}) had no effect (threads stay {torch.get_num_threads()}): "
                           "something in this process replaced it, and training would not be reproducible")
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _non_finite_inputs(samples: list[Sample]) -> str | None:
    for s in samples:
        for name, value in (("advantage", s.advantage), ("weight", s.weight)):
            if not math.isfinite(value):
                return f"non-finite {name} {value} in rollout {s.rollout_id!r}"
        if not np.isfinite(s.logprob_values).all():
            return f"non-finite behaviour_logprobs in rollout {s.rollout_id!r}"
    return None


class _Policy:
    """The weights being trained on one rank: model, optimizer and the step's compute (rank 0 and followers).

    Under torchrun every rank holds one (FSDP2 shards); rank 0's Trainer also owns the store side.
    """

    def __init__(self, cfg: TrainConfig, loss_cfg: LossConfig, device: torch.device):
        self.cfg, self.loss_cfg, self.device = cfg, loss_cfg, device
        overhead = cfg.micro_batch_overhead_tokens
        self.overhead_tokens = overhead if overhead is not None else DEFAULT_OVERHEAD_TOKENS[device.type]
        self.threads = cfg.threads or torch.get_num_threads()
        self.bf16 = _bf16(cfg, device)
        self.model: torch.nn.Module | None = None  # the transformers model (its parameters sharded under FSDP2)
        self.module: compute.PolicyLogprobs | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def sharded(self) -> bool:
        return compute.world()[1] > 1

    def load(self, path: Path, base: Path, optimizer_dir: Path | None) -> None:
        from transformers import AutoModelForCausalLM

        # Float32 master weights on every device (CUDA computes in bf16): checkpoints reload bit-exactly,
        # which is what makes resume give identical results.
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(self.device)
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # these rarely name the file
            hint = ckpt.what_to_do(path) if path != base else "check the base model directory"
            where = path / ckpt.WEIGHTS_FILE if isinstance(exc, SafetensorError) else path
            raise ckpt.CheckpointError(f"{where}: cannot load the model ({type(exc).__name__}: {exc}). {hint}") from exc
        config = model.config
        pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        self.pad_id = int(pad[0] if isinstance(pad, list) else pad or 0)  # padding is never attended to
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.model = model
        self.module = compute.prepare_policy(model, self.device, sharded=self.sharded, bf16=self.bf16,
                                             activation_checkpointing=self.cfg.activation_checkpointing,
                                             chunk_tokens=self.cfg.logprob_chunk_tokens or None)
        self.optimizer = compute.build_optimizer(self.module, lr=self.cfg.lr, betas=self.cfg.betas,
                                                 weight_decay=self.cfg.weight_decay, device=self.device)
        if optimizer_dir is not None:
            self._load_optimizer(optimizer_dir)

    def _load_optimizer(self, path: Path) -> None:
        file = path / ckpt.OPTIMIZER_FILE
        if not file.is_file():
            raise ckpt.CheckpointError(f"{file} is missing: the latest version must keep its optimizer state to "
                                       f"resume. {ckpt.what_to_do(path)}")
        try:
            saved = torch.load(file, map_location="cpu", weights_only=True)
            if "optimizer" in saved:  # written before sharded optimizer state (one process only)
                self.optimizer.load_state_dict(saved["optimizer"])
            else:
                ckpt.load_optimizer_shards(path, self.module, self.optimizer)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as exc:
            raise ckpt.CheckpointError(f"{file}: cannot load the optimizer state ({type(exc).__name__}: {exc}). "
                                       f"{ckpt.what_to_do(path)}") from exc
        for group in self.optimizer.param_groups:  # the config wins over the saved hyper-parameters
            group["lr"], group["betas"] = self.cfg.lr, tuple(self.cfg.betas)
        torch.set_rng_state(saved["rng"]["cpu"].cpu())
        if self.device.type == "cuda" and saved["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(saved["rng"]["cuda"].cpu(), self.device)

    def plan(self, table: Any) -> tuple[list[Sample], list[MicroBatch]]:
        samples = samples_from_table(table, self.vocab_size)
        return samples, plan_micro_batches(samples, self.cfg.micro_batch_tokens, self.overhead_tokens)

    def train(self, step: int, samples: list[Sample], plan: list[MicroBatch], version: int
              ) -> tuple[dict[str, float], str | None, dict[str, np.ndarray]]:
        """Gradients of the batch, clipped, one optimizer step: (metrics, None, token log-probs), or
        (metrics, why not, ...). The token log-probs (rollout_id -> the trained weights' per-token log-probs,
        before the update) are filled when ``train.record_token_logprobs`` is on, else empty."""
        token_logprobs: dict[str, np.ndarray] = {}
        reason = _non_finite_inputs(samples)  # the same decision on every rank: they all see the batch
        if reason is not None:
            return {}, reason, token_logprobs
        try:
            with _threads(self.threads), compute.seeded(self.device, _step_seed(self.cfg.seed, step)):
                metrics, reason = self.gradients(plan, version,
                                                 token_logprobs if self.cfg.record_token_logprobs else None)
                if reason is None:
                    grad_norm = compute.clip_and_step(self.module, self.optimizer, self.cfg.grad_clip)
                    metrics["grad_norm"] = grad_norm
                    if not math.isfinite(grad_norm):
                        reason = f"non-finite gradient norm {grad_norm}"
        finally:  # a skipped or failed step must not leak its gradient into the next one
            self.optimizer.zero_grad(set_to_none=True)
        return metrics, reason, token_logprobs

    def gradients(self, plan: list[MicroBatch], version: int, token_logprobs: dict[str, np.ndarray] | None = None
                  ) -> tuple[dict[str, float], str | None]:
        return compute.accumulate_gradients(self.module, plan, self.loss_cfg, pad_id=self.pad_id,
                                            device=self.device, autocast_bf16=self.bf16 and not self.sharded,
                                            on_policy_version=version, token_logprobs=token_logprobs)

    def gather(self) -> dict[str, torch.Tensor] | None:
        """Every rank, sharded: the consolidated weights (on rank 0). One process: None (the model's own)."""
        return ckpt.full_state_dict(self.module) if self.sharded else None

    def save_optimizer(self, tmp: Path) -> None:
        """Every rank: its optimizer shard into the version's temp dir ``tmp``."""
        ckpt.save_optimizer_shards(tmp, self.module, self.optimizer)


def _bf16(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.precision == "bf16" and device.type != "cuda":
        raise ConfigError("train.precision='bf16' needs CUDA (bfloat16 matmuls are slower than float32 on CPU); "
                         "use 'auto' or 'float32'")
    return device.type == "cuda" and cfg.precision != "float32"


def _send(message: Any) -> Any:
    """Rank 0 -> every rank (pickled); on other ranks returns what rank 0 sent."""
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Trainer:
    """Owns the policy being trained for one run: its weights, optimizer and versions in the store.

    Args:
        store: The archive (a Store or its directory).
        run: Run name; versions live in ``policies`` / ``checkpoints/<run>``.
        model_path: Base model checkpoint dir (version 0), e.g. ``recpipe.models.resolve_model("tiny")``.
        train_cfg: Optimizer, micro-batching, device, retention (default ``TrainConfig()``).
        loss_cfg: Which member of the REINFORCE family (default: the preset ``preset_name``, else the
            default ``LossSection``).
        preset_name: Written to the ``preset`` column of ``steps`` ("custom" when only loss_cfg is given).
        needed_versions: Retention: versions still in use (e.g. by the generator), or a callable returning
            them at each retention pass. The latest and every ``keep_every``-th version are always kept.

    Under torchrun (WORLD_SIZE > 1) this is rank 0: it alone touches the store; ``setup`` joins the process
    group and starts the other ranks (running ``follow()``) on the same version, ``step`` sends them each
    batch, ``close`` lets them exit.

    Raises (from ``setup``):
        ValueError: the run was started from another base model; a device that is not there.
        CheckpointError (a ValueError): the store holds applied steps whose version dirs are gone, or the
            latest version is damaged (a file missing, truncated or changed since it was written); the
            message names the file and how to continue.
        StoreWriteError (from ``step``): a checkpoint could not be written (disk full); nothing committed.
        RunLocked: another trainer is writing this run.
    """

    def __init__(self, store: Store | str | Path, run: str, model_path: str | Path,
                 train_cfg: TrainConfig | None = None, loss_cfg: LossConfig | None = None,
                 preset_name: str | None = None, *, needed_versions: ckpt.Needed = None):
        self.store = store if isinstance(store, Store) else Store(store)
        self.run = run
        self.model_path = Path(model_path).resolve()
        if not (self.model_path / "config.json").is_file():
            raise ConfigError(f"model_path={str(model_path)!r} holds no config.json; pass a checkpoint directory")
        self.cfg = train_cfg or TrainConfig()
        if loss_cfg is None:
            section = LossSection(preset=preset_name) if preset_name else LossSection()
            loss_cfg, preset_name = section.build(), section.preset
        self.loss_cfg = loss_cfg
        self.preset_name = preset_name or "custom"
        self.needed_versions = needed_versions
        self.device = resolve_device(self.cfg.device)
        self._ranks = compute.launched_world_size()
        self._policy = _Policy(self.cfg, self.loss_cfg, self.device)  # checks train.precision early
        self._version = 0
        self._next_step = 0
        self._bad_streak = 0
        self._lock = None

    @property
    def model(self) -> torch.nn.Module | None:
        """The transformers model being trained (None before ``setup``)."""
        return self._policy.model

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self._policy.optimizer

    # ---- lifecycle ----------------------------------------------------------------------------------
    def setup(self) -> Trainer:
        """Take the run's trainer lock, heal rows lost in a crash, load the latest version (or register v0)."""
        if self._ranks > 1:
            device = compute.init_distributed(self.device.type)
            self.device = self._policy.device = device or self.device
        self._lock = self.store.lock(self.run, purpose="trainer").acquire()  # one trainer per run, across machines
        try:
            self._resume()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self._lock is not None:
            if self._ranks > 1 and self._policy.model is not None:
                _send(("close",))
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Trainer:
        return self if self._lock is not None else self.setup()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def current_version(self) -> int:
        """Version of the weights in memory = number of applied steps."""
        return self._version

    @property
    def next_step(self) -> int:
        """The step ``step()`` expects next (0-based, one past the last recorded step)."""
        return self._next_step

    def checkpoint_path(self, version: int | None = None) -> Path:
        """Directory of a version (default: the current one); version 0 is the base model."""
        version = self._version if version is None else version
        return self.model_path if version == 0 else self.store.checkpoint_dir(self.run, version)

    def _resume(self) -> None:
        # A checkpoint dir whose writer was killed never became visible; under the trainer lock it is garbage.
        remove_stale_temps(self.store.root / "checkpoints" / self.run)
        ckpt.recover_rows(self.store, self.run)
        params = {"run": self.run}
        policies = self.store.read("policies", "run = $run", params).to_pylist()
        steps = self.store.read("steps", "run = $run", params).to_pylist()
        self._register_base(policies)

        committed = ckpt.version_dirs(self.store, self.run)
        latest = max([0] + [r["version"] for r in policies if r["version"] in committed])
        if latest:  # before anything is read from it: damaged weights must not be trained on, or inherited
            committed[latest] = ckpt.local_version(self.store, self.run, latest)
            ckpt.check_checkpoint(committed[latest], latest, optimizer="required")
        state = ckpt.read_state(committed[latest]) if latest else None
        last_applied = state["step"] if state else -1
        later = [r for r in steps if r["step"] > last_applied]
        if any(r["applied"] for r in later):
            lost = sorted(r["step"] for r in later if r["applied"])
            gone = sorted(r["policy_version"] for r in later if r["applied"])
            first_gone = self.store.checkpoint_dir(self.run, gone[0])
            raise ckpt.CheckpointError(
                f"run {self.run!r}: steps {lost} were applied but their versions "
                f"{', '.join(f'v{v:06d}' for v in gone)} are gone or incomplete in {first_gone.parent} "
                f"(the latest complete one is v{latest:06d}). {ckpt.what_to_do(first_gone)}"
            )
        self._version = latest
        self._next_step = max([last_applied] + [r["step"] for r in steps]) + 1
        self._bad_streak = len(later)  # rows after the last applied step are all skipped steps, in a row

        path, optimizer_dir = self.checkpoint_path(latest), committed[latest] if latest else None
        if self._ranks > 1:  # the other ranks load the same files (one machine, or a shared file system)
            _send(("setup", self.cfg, self.loss_cfg, path, self.model_path, optimizer_dir, latest))
        self._policy.load(path, self.model_path, optimizer_dir)

    def _register_base(self, policies: list[dict[str, Any]]) -> None:
        base = [r for r in policies if r["version"] == 0]
        if base and base[0]["base_model"] != str(self.model_path):
            raise ConfigError(
                f"model_path={str(self.model_path)!r}, but run {self.run!r} was started from "
                f"{base[0]['base_model']!r}; use that model or a new run name"
            )
        if not base:
            row = ckpt.policies_row(self.run, 0, None, ckpt.relative_to_store(self.store, self.model_path),
                                    None, str(self.model_path))
            self.store.append("policies", [row], shard_id=ckpt.policies_shard(0))

    # ---- one step -----------------------------------------------------------------------------------
    def step(self, step: int, batch: Any) -> StepResult:
        """Train on ``batch`` (a recpipe.select Batch or an Arrow table of its rollouts) as step ``step``.

        A step below ``next_step`` was already recorded: its row is returned (``replayed``), nothing runs.

        Raises:
            ValueError: step skips ahead of ``next_step``; the batch lacks columns or has bad shapes.
            TrainingDiverged: this was the ``max_bad_steps``-th skipped step in a row.
        """
        if self._lock is None:  # without the lock another trainer could write the same versions
            raise ValueError("call setup() (or use the Trainer as a context manager) before step()")
        if step < self._next_step:
            return self._replay(step)
        if step != self._next_step:
            raise ValueError(f"step={step}: the next step of run {self.run!r} is {self._next_step}; steps are consecutive")
        start = time.perf_counter()
        table = batch.rollouts if hasattr(batch, "rollouts") else batch
        samples, plan = self._policy.plan(table)  # a bad batch raises here, before any other rank is involved
        row = self._batch_stats(step, samples, plan)
        if self._ranks > 1:
            _send(("step", step, table, self._version))
        metrics, reason, token_logprobs = self._policy.train(step, samples, plan, self._version)
        seconds = time.perf_counter() - start
        row.update({k: metrics.get(k) for k in _LOSS_COLUMNS})
        row.update(seconds=seconds, lr=self.optimizer.param_groups[0]["lr"],
                   tokens_per_second=row["tokens"] / seconds if seconds > 0 else None)
        if reason is not None:
            return self._skip(step, row, metrics, reason)
        return self._commit(step, row, metrics, self._token_rows(step, samples, token_logprobs))

    def _token_rows(self, step: int, samples: list[Sample], token_logprobs: dict[str, np.ndarray]
                    ) -> list[dict[str, Any]]:
        """The trained_tokens rows of a step: each response's log-probs under the weights it trained."""
        now = ckpt.now()
        return [{"run": self.run, "step": step, "rollout_id": s.rollout_id, "policy_version": self._version,
                 "logprobs": token_logprobs[s.rollout_id], "created_at": now, "schema_version": SCHEMA_VERSION}
                for s in samples if s.rollout_id in token_logprobs]

    def gradients(self, batch: Any, micro_batch_tokens: int | None = None,
                  overhead_tokens: int | None = None) -> dict[str, torch.Tensor]:
        """The batch's loss gradient per parameter name; nothing is stepped or recorded (for checks).

        micro_batch_tokens / overhead_tokens override the config's bucketing (e.g. to compare plans).
        One process only (under torchrun the gradients are sharded).
        """
        if self._lock is None:
            raise ValueError("call setup() before gradients()")
        if self._ranks > 1:
            raise ValueError("gradients() runs in one process only; the gradients of several ranks are sharded")
        samples = samples_from_table(batch.rollouts if hasattr(batch, "rollouts") else batch, self._policy.vocab_size)
        plan = plan_micro_batches(samples, micro_batch_tokens or self.cfg.micro_batch_tokens,
                                  self._policy.overhead_tokens if overhead_tokens is None else overhead_tokens)
        self.optimizer.zero_grad(set_to_none=True)
        try:
            with _threads(self._policy.threads):
                _, reason = self._policy.gradients(plan, self._version)
            if reason is not None:
                raise ValueError(f"batch gives no gradient: {reason}")
            return {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}
        finally:
            self.optimizer.zero_grad(set_to_none=True)

    def _batch_stats(self, step: int, samples: list[Sample], plan: list[MicroBatch]) -> dict[str, Any]:
        """The steps-row columns that describe the batch itself (known before any compute)."""
        versions = [s.policy_version for s in samples]
        rewards, n = [s.reward for s in samples], len(samples)
        reward_mean = math.fsum(rewards) / n  # not statistics.fmean/pstdev: a NaN reward must not crash the step
        padded = sum(mb.padded_tokens for mb in plan)
        real = sum(mb.real_tokens for mb in plan)
        if any(not s.kept for s in samples) or self.loss_cfg.drop == "none":
            drop_fraction = sum(not s.kept for s in samples) / len(samples)
        else:
            drop_fraction = None  # RED-Drop preset, but the batch does not say which responses were dropped
        return {
            "run": self.run, "step": step, "policy_version": self._version, "preset": self.preset_name,
            "batch_policy_version_min": min(versions), "batch_policy_version_max": max(versions),
            "staleness_mean": statistics.fmean(self._version - v for v in versions),
            "drop_fraction": drop_fraction,
            "reward_mean": reward_mean, "reward_std": math.sqrt(math.fsum((r - reward_mean) ** 2 for r in rewards) / n),
            "tokens": sum(len(s.response_ids) for s in samples), "padded_tokens": padded,
            "padding_fraction": 1 - real / padded if padded else 0.0,
            "applied": False, "skip_reason": None,
        }

    def _finish_row(self, row: dict[str, Any]) -> dict[str, Any]:
        row.update(created_at=ckpt.now(), schema_version=SCHEMA_VERSION)
        return row

    def _skip(self, step: int, row: dict[str, Any], metrics: dict[str, float], reason: str) -> StepResult:
        row = self._finish_row({**row, "applied": False, "skip_reason": reason})
        self.store.append("steps", [row], shard_id=ckpt.steps_shard(step))
        self._next_step = step + 1
        self._bad_streak += 1
        result = StepResult(step, False, self._version, reason, row, _log_metrics(row, metrics))
        if self._bad_streak >= self.cfg.max_bad_steps:
            raise TrainingDiverged(
                f"run {self.run!r}: {self._bad_streak} consecutive steps skipped (max_bad_steps="
                f"{self.cfg.max_bad_steps}), last at step {step}: {reason}. The policy stays at version "
                f"{self._version}; inspect the batches (NaN advantages/weights?) or lower train.lr"
            )
        return result

    def _commit(self, step: int, row: dict[str, Any], metrics: dict[str, float],
                token_rows: list[dict[str, Any]]) -> StepResult:
        """Write version v + 1: checkpoint dir (with the rows inside), then the policies and steps rows."""
        start = time.perf_counter()
        version = self._version + 1
        final = self.store.checkpoint_dir(self.run, version)
        row = self._finish_row({**row, "applied": True, "policy_version": version})
        policy = ckpt.policies_row(self.run, version, step, ckpt.relative_to_store(self.store, final),
                                   self._version, str(self.model_path))
        rng = {"cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        state = {"format": ckpt.STATE_FORMAT, "run": self.run, "version": version, "step": step,
                 "next_step": step + 1, "seed": self.cfg.seed, "base_model": str(self.model_path),
                 "policies_row": policy, "steps_row": row}
        self._lock.check()  # LeaseLost if another trainer took the run over: it owns the next versions

        def gather(tmp: Path) -> dict[str, torch.Tensor] | None:
            if self._ranks > 1:
                _send(("save", tmp))  # every rank writes its optimizer shard into the same temp dir
            return self._policy.gather()

        ckpt.write_checkpoint(final, self.model, self.model_path, {"rng": rng, "world_size": self._ranks},
                              state, gather, self._policy.save_optimizer)
        ckpt.publish_version(self.store, self.run, version)  # beside the tables, before the row that names it
        if not self.store.append("policies", [policy], shard_id=ckpt.policies_shard(version)):
            raise ckpt.CheckpointError(f"run {self.run!r}: version {version} was committed by another trainer; "
                                       "this one stops (one trainer per run)")
        # After the policies row (the one-trainer fence: only the version's owner writes them), before the
        # steps row. A trainer killed in between leaves a step whose rows recover_rows heals from the
        # checkpoint without token log-probs (they are diagnostics; the report then shows plain text).
        if token_rows:
            self.store.append("trained_tokens", token_rows, shard_id=table_spec("trained_tokens").shard_id(step=step))
        self.store.append("steps", [row], shard_id=ckpt.steps_shard(step))
        self._version, self._next_step, self._bad_streak = version, step + 1, 0
        ckpt.apply_retention(self.store, self.run, version, self.cfg.keep_every, self.needed_versions)
        metrics = {**metrics, "save_seconds": time.perf_counter() - start}
        return StepResult(step, True, version, None, row, _log_metrics(row, metrics), final)

    def _replay(self, step: int) -> StepResult:
        rows = self.store.read("steps", "run = $run AND step = $step", {"run": self.run, "step": step}).to_pylist()
        if not rows:
            raise ValueError(f"step={step} of run {self.run!r} is before next_step={self._next_step} but has no row")
        row = rows[0]
        path = self.store.checkpoint_dir(self.run, row["policy_version"]) if row["applied"] else None
        return StepResult(step, row["applied"], row["policy_version"], row["skip_reason"], row,
                          _log_metrics(row, {}), path, replayed=True)


def follow() -> None:
    """Ranks 1..N-1 under torchrun: train with rank 0's Trainer until it closes; no store access.

    Rank 0 sends the config and version to load at ``setup``, then each step's batch; a rank computes its
    share of the micro-batches and, for an applied step, writes its optimizer shard into the version dir
    rank 0 is writing (one machine, or a file system every rank shares).
    """
    rank, ranks = compute.world()
    if ranks == 1 and compute.launched_world_size() > 1:
        compute.init_distributed("cuda" if torch.cuda.is_available() else "cpu")
    message = _send(None)
    if message[0] == "close":  # rank 0 failed before it loaded anything
        return
    _, cfg, loss_cfg, path, base, optimizer_dir, version = message
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    policy = _Policy(cfg, loss_cfg, device)
    policy.load(path, base, optimizer_dir)
    while True:
        message = _send(None)
        if message[0] == "close":
            return
        _, step, table, version = message
        samples, plan = policy.plan(table)
        _, reason, _ = policy.train(step, samples, plan, version)
        if reason is None:
            message = _send(None)
            if message[0] == "close":  # rank 0 could not commit (e.g. it lost the run's lease)
                return
            policy.gather()
            policy.save_optimizer(message[1])


# Columns of the steps row that come from the loss computation (the rest describe the batch).
_LOSS_COLUMNS = ("loss", "clip_fraction", "ratio_mean", "ratio_max", "mismatch", "entropy", "grad_norm")
_SLASH = {"loss": "loss/total", "policy_loss": "loss/policy", "regularizer_loss": "loss/regularizer",
          "clip_fraction": "clip/fraction", "ratio_mean": "is_ratio/mean", "ratio_max": "is_ratio/max",
          "mismatch": "mismatch/abs_mean", "on_policy_mismatch": "mismatch/on_policy", "entropy": "entropy/mean", "grad_norm": "grad/norm",
          "reward_mean": "reward/mean", "reward_std": "reward/std", "drop_fraction": "drop/fraction",
          "staleness_mean": "staleness/mean", "padding_fraction": "tokens/padding_fraction",
          "tokens_per_second": "perf/tokens_per_second", "seconds": "perf/seconds", "lr": "optim/lr"}


def _log_metrics(row: dict[str, Any], extra: dict[str, float]) -> dict[str, float]:
    """One flat dict for loggers: numeric row values and extras, also under "/" names (style rule 9)."""
    out = {k: float(v) for k, v in {**row, **extra}.items()
           if isinstance(v, int | float) and not isinstance(v, bool) and k != "schema_version"}
    out.update({_SLASH[k]: out[k] for k in _SLASH if k in out})
    return out


def train_step(store: Store | str | Path, run: str, model_path: str | Path, batch: Any,
               train_cfg: TrainConfig | None = None, loss_cfg: LossConfig | None = None,
               preset_name: str | None = None, *, needed_versions: ckpt.Needed = None) -> StepResult:
    """Load the run's latest version, train one step on ``batch`` as its next step, write the next version."""
    with Trainer(store, run, model_path, train_cfg, loss_cfg, preset_name, needed_versions=needed_versions) as trainer:
        return trainer.step(trainer.next_step, batch)
