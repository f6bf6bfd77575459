"""Rollout generation: sampling engines (vLLM, transformers) and generation shards.

Names load on first use (PEP 562): ``recpipe.generate.hf_engine`` imports with torch and transformers
alone (bench/bench_gpu.py), without pyarrow and the archive schema that ``rollouts`` needs.
"""

from __future__ import annotations

import importlib

_WHERE = {
    **dict.fromkeys(("BACKENDS", "Engine", "Sample", "make_engine", "tokenize_prompts", "vllm_available"), "engine"),
    **dict.fromkeys(("evaluate_greedy", "generate_rollouts", "shard_id", "shard_prompts", "shard_seed"), "rollouts"),
}


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


__all__ = sorted(_WHERE)
