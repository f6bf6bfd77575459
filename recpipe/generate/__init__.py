"""Rollout generation: sampling engines (vLLM, transformers) and generation shards."""

from recpipe.generate.engine import (
    BACKENDS,
    Engine,
    Sample,
    make_engine,
    tokenize_prompts,
    vllm_available,
)
from recpipe.generate.rollouts import (
    evaluate_greedy,
    generate_rollouts,
    shard_id,
    shard_prompts,
    shard_seed,
)

__all__ = [
    "BACKENDS",
    "Engine",
    "Sample",
    "evaluate_greedy",
    "generate_rollouts",
    "make_engine",
    "shard_id",
    "shard_prompts",
    "shard_seed",
    "tokenize_prompts",
    "vllm_available",
]
