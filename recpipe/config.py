"""Typed configuration: one pydantic model per stage, loaded from YAML.

    cfg = load_config("configs/default.yaml", overrides=["train.lr=1e-5", "loss.preset=grpo"])

Every field has a description and a default that runs on a 2-core CPU laptop.
Unknown fields and bad values raise ``ConfigError`` naming the field, the
value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from recpipe.algorithms import PRESETS, LossConfig, preset
from recpipe.errors import ConfigError  # raised here; importable from recpipe.config too


def _no_bool(kind: str) -> BeforeValidator:
    """Pydantic reads a YAML `true` as 1 for an int field (1.0 for a float), so `--set loop.steps=true`
    ran one step. Strict mode would refuse it, but also the string "1e-3" that YAML 1.1 leaves a 1e-3
    unquoted as: refuse only booleans."""

    def check(value: Any) -> Any:
        if isinstance(value, bool):
            raise PydanticCustomError(f"{kind}_type", f"Input should be a valid {kind}, not a boolean")
        return value

    return BeforeValidator(check)


RUN_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # also what select() accepts: safe in paths and globs
Int = Annotated[int, _no_bool("integer")]
Float = Annotated[float, _no_bool("number")]
Beta = Annotated[float, _no_bool("number"), Field(ge=0, lt=1)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = Field("smollm2", description="tiny (random test model), smollm2 (embedded default) or a local HF checkpoint dir.")
    cache_dir: str | None = Field(None, description="Where converted/built models are cached (default $RECPIPE_CACHE or ~/.cache/recpipe).")


class TaskConfig(_Section):
    name: str = Field("arithmetic", description="Registered task name (arithmetic, gsm8k, or a plugin's).")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword options passed to the task factory.")
    train_prompts: Int = Field(256, ge=1, description="Size of the training prompt pool.")
    eval_prompts: Int = Field(50, ge=1, description="Held-out prompts per evaluation.")
    reward_timeout_s: Float = Field(2.0, gt=0, description="Per-response time limit of the reward function (seconds).")


class GenerateConfig(_Section):
    backend: Literal["auto", "vllm", "hf"] = Field("auto", description="auto = vLLM when importable, else transformers.")
    group_size: Int = Field(8, ge=1, description="K responses sampled per prompt.")
    temperature: Float = Field(1.0, gt=0, description="Sampling temperature (the trainer recomputes log-probs with it).")
    top_p: Float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_tokens: Int = Field(48, ge=1, description="Max response tokens.")
    stop: list[str] = Field(default_factory=list, description="Extra stop strings.")
    shard_size: Int = Field(8, ge=1, description="Prompts per generation shard (one Parquet file, one Prefect task).")
    max_model_len: Int = Field(512, ge=16, description="vLLM context length.")
    enforce_eager: bool = Field(True, description="vLLM: skip graph compilation (CPU: starts in ~5 s; compiled: ~50 s the first time, ~17 s with its cache, ~14% more tokens/s).")
    seed: Int = Field(0, description="Base seed; each shard derives its own.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Weights/compute dtype of the sampler. auto = bfloat16 on CUDA, float32 on CPU "
        "(bfloat16 is ~6x slower there). The recorded behaviour log-probs are those of the distribution "
        "sampled from (vLLM processed log-probs), whatever the dtype; the trainer reports the difference "
        "to its own float32-head log-probs as mismatch/on_policy.")
    gpu_memory_utilization: Float = Field(
        0.9, gt=0, le=1, description="vLLM on CUDA: share of each of its GPUs it takes (weights + KV cache). "
        "On a GPU shared with the trainer (sleep_mode) leave the trainer room: its weights, gradients and "
        "AdamW state (16 bytes per parameter) stay on the GPU while vLLM samples.")
    tensor_parallel_size: Int = Field(1, ge=1, description="vLLM on CUDA: GPUs one engine spans (generate.devices "
                                      "lists that many).")
    devices: list[Int] | None = Field(
        None, description="CUDA devices of the sampler (CUDA_VISIBLE_DEVICES of its process), "
        "tensor_parallel_size of them. Apart from train.devices when there are GPUs enough; the same device "
        "only with sleep_mode.")
    sleep_mode: bool = Field(
        False, description="vLLM on CUDA: sleep while the trainer trains (weights offloaded to CPU memory, KV "
        "cache freed) and wake to sample, so sampler and trainer fit on one GPU.")


class SelectConfig(_Section):
    query: str = Field("schedule", description="Named query in schemas/queries or a path to a .sql file.")
    groups_per_step: Int = Field(8, ge=1, description="Groups per training batch.")
    params: dict[str, Any] = Field(default_factory=dict, description="Extra query parameters (see the query header).")


class TrainConfig(_Section):
    lr: Float = Field(1e-5, gt=0, description="AdamW learning rate.")
    weight_decay: Float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")
    grad_clip: Float = Field(1.0, gt=0, description="Max global grad norm.")
    micro_batch_tokens: Int = Field(4096, ge=16, description="Padded tokens per micro-batch (gradient accumulation beyond).")
    micro_batch_overhead_tokens: Int | None = Field(
        None, ge=0, description="Length bucketing: the cost of one more micro-batch, in padded tokens; the "
        "planner splits only where that saves more padding. None = by device: 64 on CPU (SmolLM2: ~5 ms per "
        "token, ~0.25 s per micro-batch), 1024 on CUDA (a small micro-batch wastes the GPU).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when available.")
    threads: Int | None = Field(
        None, ge=1, description="CPU threads of a training step. None = torch's count when the trainer starts "
        "(one per core, or OMP_NUM_THREADS). Pinned for every step: float sums depend on how the work is split, "
        "so the same count gives the same weights in `loop`, `train` and `retrain`, with or without a sampling "
        "engine in the process.")
    logprob_chunk_tokens: Int = Field(
        256, ge=0, description="Response tokens per LM-head chunk when computing log-probs and entropy: "
        "the (tokens, vocab) float32 logits exist one chunk at a time (backward recomputes each chunk), so "
        "their memory no longer grows with the micro-batch (Qwen2.5, 151k vocab: 0.16 GB per copy for 256 "
        "tokens, instead of 9.9 GB for 16k tokens). Same values and gradients; 0 = all at once. SmolLM2 step "
        "peak above weights and AdamW state (BENCHMARKS.md): 4.8 GB unchunked, 2.9 GB at 1024, 2.3 GB at 256.")
    activation_checkpointing: bool = Field(
        False, description="Keep only each decoder layer's input for backward and recompute the layer "
        "there: ~1/3 more compute for activation memory of about one layer instead of all. Turn on when a "
        "micro-batch of train.micro_batch_tokens does not fit (long responses, big models), or to fit larger "
        "micro-batches on a GPU.")
    precision: Literal["auto", "float32", "bf16"] = Field("auto", description=(
        "Compute dtype of the decoder layers. auto = bf16 on CUDA, float32 on CPU. bf16 (CUDA only): bfloat16 "
        "matmuls with float32 master weights, gradients, reductions (FSDP2 MixedPrecisionPolicy across ranks, "
        "autocast on one) and AdamW state; the LM head and the softmax behind the log-probs always run in "
        "float32, so the importance ratios are not rounded."))
    nproc: Int = Field(
        1, ge=1, description="Trainer ranks (`recpipe train --nproc N` starts them with torchrun): the model "
        "is sharded with FSDP2, each rank takes micro-batches worth a share of the batch's tokens, the loss "
        "stays the token mean over the whole batch. One per GPU; on CPU (gloo) mostly for tests.")
    devices: list[Int] | None = Field(
        None, description="CUDA devices of the trainer's ranks (CUDA_VISIBLE_DEVICES), one per rank; None = "
        "the first train.nproc devices. Keep them apart from generate.devices, or see generate.sleep_mode.")
    record_token_logprobs: bool = Field(
        True, description="Archive each trained response's per-token log-probs under the trained weights (table "
        "trained_tokens): the report colours tokens by their importance ratio, and SQL can find where trainer and "
        "sampler disagree. Costs about as much storage as rollouts.behaviour_logprobs for the trained rollouts.")
    max_bad_steps: Int = Field(3, ge=1, description="Consecutive NaN/Inf steps before the trainer stops.")
    keep_every: Int = Field(10, ge=1, description="Retention: keep every N-th policy version besides the latest and those still needed.")
    seed: Int = Field(0, description="Trainer seed (RED-Drop choices, dropout).")


class LossSection(_Section):
    preset: str = Field("rec-oneside-nois", description=f"One of {sorted(PRESETS)}.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="LossConfig fields that override the preset.")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; allowed: {', '.join(sorted(PRESETS))}")
        return value

    def build(self) -> LossConfig:
        return preset(self.preset, **self.overrides)


class LoopConfig(_Section):
    steps: Int = Field(4, ge=1, description="Training steps to run.")
    sync_interval: Int = Field(1, ge=1, description="k: generate with the policy every k steps (algorithms.md).")
    sync_offset: Int = Field(0, ge=0, description="o: lag between generation and training (algorithms.md).")
    eval_every: Int = Field(0, ge=0, description="Evaluate every N steps (0 = only at start and end).")


class RecpipeConfig(_Section):
    run: str = Field("default", pattern=RUN_NAME, description="Run name (letters, digits, _ . -).")
    store: str = Field("store", description="Archive: a local directory or s3://bucket/prefix.")
    storage_options: dict[str, str] = Field(
        default_factory=dict,
        description="S3 settings (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, "
                    "AWS_ALLOW_HTTP); the AWS_* environment variables are used for any not given here.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    loss: LossSection = Field(default_factory=LossSection)
    loop: LoopConfig = Field(default_factory=LoopConfig)
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="Experiment trackers that get each step's metrics (train/loss, "
        "train/reward_mean, ..., eval/accuracy), as TRL's report_to: tensorboard (event files), mlflow (a "
        "local file store), wandb (offline mode unless WANDB_MODE says otherwise). Each needs its package "
        "(recpipe.tracking).")
    tracking_dir: str | None = Field(
        None, description="Where trackers write: default <store>/tracking (a remote store: its local cache).")

    @model_validator(mode="after")
    def _loss_builds(self) -> RecpipeConfig:
        self.loss.build()  # reject bad overrides at load time, not at step 1
        return self

    @model_validator(mode="after")
    def _devices_fit(self) -> RecpipeConfig:
        # At load time, not after vLLM has taken 90% of a GPU and the trainer fails with out-of-memory.
        g, t = self.generate, self.train
        if t.devices is not None and len(t.devices) != t.nproc:
            raise ValueError(f"train.devices lists {len(t.devices)} device(s) for train.nproc={t.nproc} ranks; "
                             "give one device per rank")
        if g.devices is not None and len(g.devices) != g.tensor_parallel_size:
            raise ValueError(f"generate.devices lists {len(g.devices)} device(s) for "
                             f"generate.tensor_parallel_size={g.tensor_parallel_size}; give that many")
        if g.devices is None or t.devices is None or g.backend == "hf":
            return self
        shared = sorted(set(g.devices) & set(t.devices))
        if shared and not g.sleep_mode:
            raise ValueError(
                f"generate.devices and train.devices share GPU {shared[0]}: vLLM would hold "
                f"generate.gpu_memory_utilization={g.gpu_memory_utilization} of it while the trainer needs its "
                "weights, gradients and AdamW state there too. Set generate.sleep_mode=true (vLLM sleeps while "
                "the trainer trains) with generate.gpu_memory_utilization <= 0.5, or give generate.devices and "
                "train.devices different GPUs")
        if shared and g.gpu_memory_utilization > 0.5:
            raise ValueError(
                f"generate.sleep_mode shares GPU {shared[0]} with the trainer, but generate.gpu_memory_utilization"
                f"={g.gpu_memory_utilization} leaves the trainer less than half of it while vLLM samples (the "
                "trainer's weights, gradients and AdamW state stay there); set it to 0.5 or less")
        return self


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{where}: {item['msg']}{shown}")
    return "invalid config: " + "; ".join(lines)  # one line, as every CLI error


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text) if text.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (values parsed as YAML scalars) to a nested dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.field=value")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _parse_scalar(raw)
    return data


def build_config(data: dict[str, Any] | None = None, overrides: list[str] | None = None) -> RecpipeConfig:
    data = apply_overrides(dict(data or {}), overrides or [])
    try:
        return RecpipeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except ValueError as exc:  # LossConfig errors raised inside the model validator
        raise ConfigError(f"invalid config: {exc}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RecpipeConfig:
    """Read a YAML config (or defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return build_config(data, overrides)


def to_params(cfg: RecpipeConfig) -> dict[str, Any]:
    """The config as JSON flow parameters, keeping only fields that were given: defaults are filled in
    again on the other side, and code that asks whether a field was set (model_fields_set) still can."""
    return cfg.model_dump(mode="json", exclude_unset=True)


def dump_config(cfg: RecpipeConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
