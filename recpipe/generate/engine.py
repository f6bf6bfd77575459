"""The sampling engine interface: token ids in, K samples with behaviour log-probs out.

Two backends return the same rows: VLLMEngine (vllm_engine.py, the default
whenever vLLM imports) and HFEngine (hf_engine.py, plain transformers). One
engine lives per process and is reused across policy versions: `load_weights`
swaps a new checkpoint in place.

    engine = make_engine(resolve_model("tiny"), backend="auto", seed=0, max_model_len=512)
    ids = tokenize_prompts(engine.tokenizer, prompts)
    samples = engine.sample(ids, n=8, temperature=1.0, top_p=1.0, max_tokens=48, stop=[], seed=0)
    engine.load_weights(new_checkpoint_dir)
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recpipe.errors import RecpipeError

if TYPE_CHECKING:  # a type only: the engines import without the tasks (and their pyarrow), for bench_gpu.py
    from recpipe.tasks import Prompt

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "vllm", "hf")


@dataclass(frozen=True)
class Sample:
    """One sampled response.

    token_ids: response tokens as sampled (an ending EOS included; a stop string's last token included).
    logprobs: log-prob of each token under the sampling distribution (logits / temperature, then top-p);
        under greedy decoding (temperature 0), the raw log-probs.
    text: decoded response, special tokens skipped, cut before a stop string.
    finish_reason: "stop" (EOS or stop string) or "length" (max_tokens reached).
    """

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str


class EngineError(RecpipeError, ValueError):
    """A bad engine argument: backend, checkpoint, device or a sampling argument (names it)."""


@dataclass(frozen=True)
class SamplingArgs:
    """Engine.sample's arguments, checked, as the backends receive them."""

    n: int
    temperature: float
    top_p: float
    max_tokens: int
    stop: list[str]
    seed: int | None


class Engine(ABC):
    """What both backends provide; ``sample`` checks its arguments here, each backend samples in ``_sample``.

    backend: "vllm" or "hf", recorded in the rollout table.
    model_name: the base model's name, recorded in the rollout table.
    tokenizer: the checkpoint's transformers tokenizer (chat template included).
    max_model_len: prompt + response tokens the engine accepts.
    """

    backend: str
    tokenizer: Any

    def __init__(self, checkpoint: str | Path, model_name: str, max_model_len: int) -> None:
        self.checkpoint = Path(checkpoint)
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.last_load_seconds: float | None = None  # how long the last load_weights took

    @abstractmethod
    def load_weights(self, checkpoint: str | Path) -> None:
        """Load a new checkpoint (same architecture) into the running engine."""

    def sample(
        self,
        prompts_token_ids: Sequence[Sequence[int]],
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> list[list[Sample]]:
        """n samples per prompt, in prompt order (see Sample). Same seed and batch, same samples."""
        check_sampling_args(prompts_token_ids, n, temperature, top_p, max_tokens, self.max_model_len)
        args = SamplingArgs(n, temperature, top_p, max_tokens, list(stop or ()), seed)
        samples = self._sample([list(ids) for ids in prompts_token_ids], args)
        return [samples[i * n : (i + 1) * n] for i in range(len(prompts_token_ids))]

    @abstractmethod
    def _sample(self, prompts: list[list[int]], args: SamplingArgs) -> list[Sample]:
        """args.n samples of each prompt, flat: prompt i's at [i * n, (i + 1) * n)."""

    @abstractmethod
    def close(self) -> None:
        """Free the model (and the KV cache)."""


def tokenize_prompts(tokenizer: Any, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Prompt token ids exactly as the model sees them: chat template plus the assistant header."""
    return [
        list(
            tokenizer.apply_chat_template(
                p.messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
        for p in prompts
    ]


def check_sampling_args(
    prompts_token_ids: Sequence[Sequence[int]],
    n: int,
    temperature: float,
    top_p: float,
    max_tokens: int,
    max_model_len: int,
) -> None:
    """Engine.sample's argument checks (EngineError naming the argument)."""
    if not isinstance(n, int) or n < 1:
        raise EngineError(f"n={n!r}: expected an int >= 1 (samples per prompt)")
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature >= 0):
        raise EngineError(f"temperature={temperature!r}: expected a finite number >= 0 (0 = greedy)")
    if not (isinstance(top_p, int | float) and 0 < top_p <= 1):
        raise EngineError(f"top_p={top_p!r}: expected 0 < top_p <= 1")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise EngineError(f"max_tokens={max_tokens!r}: expected an int >= 1")
    for i, ids in enumerate(prompts_token_ids):
        if len(ids) == 0:
            raise EngineError(f"prompts_token_ids[{i}] is empty: every prompt needs at least one token")
        if len(ids) + max_tokens > max_model_len:
            raise EngineError(
                f"prompts_token_ids[{i}] has {len(ids)} tokens; with max_tokens={max_tokens} that exceeds "
                f"max_model_len={max_model_len}: lower max_tokens or raise max_model_len"
            )


def vllm_available() -> bool:
    """True when `import vllm` works (it fails with "torchvision::nms" when torchvision is installed)."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # ImportError, or RuntimeError from a broken torchvision
        logger.info(
            "vLLM unavailable (%s: %s); the transformers backend will be used", type(exc).__name__, exc
        )
        return False
    return True


def make_engine(
    checkpoint: str | Path,
    backend: str = "auto",
    seed: int = 0,
    max_model_len: int = 512,
    *,
    model_name: str | None = None,
    enforce_eager: bool = True,
    dtype: str = "float32",
    device: str = "auto",
    vllm_kwargs: dict[str, Any] | None = None,
) -> Engine:
    """Start a sampling engine on ``checkpoint``.

    Args:
        checkpoint: HF checkpoint directory (see recpipe.models.resolve_model).
        backend: "auto" (vLLM when it imports, else transformers), "vllm" or "hf".
        seed: Engine seed (each `sample` call takes its own seed too).
        max_model_len: Longest prompt + response, in tokens.
        model_name: Name recorded in the rollout table (default: the checkpoint directory's name).
        enforce_eager: vLLM: skip graph compilation (CPU: ~5 s start; compiled ~50 s, ~17 s once cached).
        dtype: Weights dtype; float32 is the fast one on CPU (bfloat16 is ~6x slower there).
        device: HF backend: "auto" (CUDA when present), "cpu" or "cuda".
        vllm_kwargs: Extra keyword arguments for vllm.LLM (e.g. gpu_memory_utilization on GPUs).
    """
    if backend not in BACKENDS:
        raise EngineError(f"backend={backend!r}: expected one of {list(BACKENDS)}")
    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise EngineError(
            f"checkpoint={str(checkpoint)!r}: no config.json there (see recpipe.models.resolve_model)"
        )
    name = model_name or checkpoint.name
    if backend == "auto":
        backend = "vllm" if vllm_available() else "hf"
    if backend == "vllm":
        from recpipe.generate.vllm_engine import VLLMEngine

        return VLLMEngine(
            checkpoint,
            model_name=name,
            seed=seed,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            dtype=dtype,
            **(vllm_kwargs or {}),
        )
    from recpipe.generate.hf_engine import HFEngine

    return HFEngine(
        checkpoint, model_name=name, seed=seed, max_model_len=max_model_len, dtype=dtype, device=device
    )
