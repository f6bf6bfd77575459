"""Synthetic rollout rows for the tests (no model needed): ``synthetic_rollouts``, a few groups as the store
writes them. The select tests and benches build large archives with tests/select/synthetic.py instead."""

from __future__ import annotations

import datetime as dt
import random

import pyarrow as pa

from recpipe.schema import SCHEMA_VERSION, conform


def synthetic_rollouts(
    *,
    run: str = "r",
    policy_version: int = 0,
    shard_id: str = "shard-0",
    groups: int = 2,
    group_size: int = 4,
    rewards: list[list[float]] | None = None,
    response_length: int = 5,
    seed: int = 0,
    task: str = "arithmetic",
) -> pa.Table:
    """Rollout rows of ``groups`` groups; rewards[g][i] if given, else random 0/1."""
    rng = random.Random(seed)
    now = dt.datetime.now(dt.UTC)
    rows = []
    for g in range(groups):
        group_id = f"{shard_id}/p{g}"
        for i in range(group_size):
            reward = rewards[g][i] if rewards else float(rng.random() < 0.5)
            length = response_length if isinstance(response_length, int) else response_length[g][i]
            rows.append(dict(
                run=run, rollout_id=f"{group_id}/{i}", group_id=group_id, sample_index=i,
                policy_version=policy_version, task=task, prompt_id=f"p{g}",
                prompt_token_ids=[rng.randrange(1, 500) for _ in range(6)],
                response_token_ids=[rng.randrange(1, 500) for _ in range(length)],
                behaviour_logprobs=[-rng.random() * 3 for _ in range(length)],
                response_length=length, finish_reason="stop", reward=reward,
                reward_parts={"correctness": float(reward >= 1.0), "format": 0.0},
                reward_terms=[{"name": "task", "weight": 1.0, "value": reward}], reward_error=None,
                response_text="x", generator=dict(backend="synthetic", model="none", temperature=1.0, top_p=1.0,
                                                  max_tokens=16, seed=seed),
                shard_id=shard_id, created_at=now, schema_version=SCHEMA_VERSION,
            ))
    return conform("rollouts", rows)
