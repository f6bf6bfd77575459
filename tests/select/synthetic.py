"""Synthetic rollout shards, vectorized: the select tests and the benches (bench/bench_select.py,
bench/bench_commit.py) build archives with them. A test fixture, not part of the package: the benches
import it as ``tests.select.synthetic`` from the checkout (scripts/setup.sh installs recpipe editable,
which puts the checkout on sys.path).

    from tests.select.synthetic import synthetic_shard
    table = synthetic_shard(run="a", policy_version=3, shard_id="a-v3-s0", groups=100, group_size=8, seed=1)
    store.append_rollouts(table, shard_id="a-v3-s0")

Rewards follow the default task's shape (correctness 0/1 plus a +/-0.1 format term, so values in
{-0.1, 0.1, 0.9, 1.1}); each group draws its own success rate, so some groups are all right or all wrong
(zero variance) and most are mixed. Token ids are uniform over a 49,152-token vocabulary (SmolLM2's);
behaviour log-probs mimic a small LM sampled at temperature 1 (see synthetic_logprobs). Rows are
built with numpy and Arrow list offsets, so millions of rows take seconds, not minutes.
"""

from __future__ import annotations

import datetime as dt
import zlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recpipe.schema import SCHEMA_VERSION, conform

VOCAB = 49_152


def _lists(lengths: np.ndarray, values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))


def synthetic_logprobs(rng: np.random.Generator, n: int) -> np.ndarray:
    """float32 log-probs of sampled tokens, shaped like SmolLM2-135M's at temperature 1 (median about
    -1.1, 10% above -0.015, 10% below -5): a fifth near-certain tokens, the rest log-normal."""
    certain = rng.random(n) < 0.2
    magnitude = np.where(certain, np.exp(rng.normal(np.log(0.01), 1.5, n)), np.exp(rng.normal(np.log(1.6), 0.9, n)))
    return (-magnitude).astype(np.float32)


def synthetic_shard(
    *,
    run: str,
    policy_version: int,
    shard_id: str,
    groups: int,
    group_size: int = 8,
    seed: int = 0,
    rewards: Sequence[Sequence[float]] | None = None,
    prompt_length: int = 8,
    max_tokens: int = 16,
    truncated_fraction: float = 0.05,
    task: str = "arithmetic",
    created_at: dt.datetime | None = None,
    reward_errors: Sequence[tuple[int, int]] = (),
    truncated: Sequence[tuple[int, int]] = (),
) -> pa.Table:
    """One generation shard of ``groups`` x ``group_size`` rollouts, conformed to the rollouts schema.

    rewards: rewards[g][i] for exact control in tests (else drawn as described in the module docstring).
    prompt_length / max_tokens: token payload sizes; responses are 1..max_tokens long and a
    ``truncated_fraction`` of them hit max_tokens with finish_reason "length".
    reward_errors: (group, sample) pairs whose reward function "failed" (reward 0, reward_error set).
    truncated: (group, sample) pairs cut at max_tokens, on top of the random ``truncated_fraction``.
    Ids: group_id = f"{shard_id}/p{g}", rollout_id = f"{group_id}/{i}" (the generator's scheme).
    """
    if groups < 1 or group_size < 1:
        raise ValueError(f"groups={groups}, group_size={group_size}: both must be >= 1")
    rng = np.random.default_rng([seed, policy_version, zlib.crc32(shard_id.encode())])
    n = groups * group_size
    g_index = np.repeat(np.arange(groups), group_size)
    s_index = np.tile(np.arange(group_size, dtype=np.int32), groups)

    if rewards is not None:
        if len(rewards) != groups or any(len(r) != group_size for r in rewards):
            raise ValueError(f"rewards must be {groups} lists of {group_size} values")
        reward = np.asarray(rewards, dtype=np.float64).reshape(-1)
        correctness = (reward >= 0.5).astype(np.float64)
        fmt = reward - correctness
    else:
        p_correct = rng.beta(0.7, 1.2, groups)[g_index]  # per group: many all-wrong, some all-right
        correctness = (rng.random(n) < p_correct).astype(np.float64)
        fmt = np.where(rng.random(n) < 0.7, 0.1, -0.1)
        reward = correctness + fmt
    error = np.zeros(n, dtype=bool)
    for g, i in reward_errors:
        error[g * group_size + i] = True
    reward = np.where(error, 0.0, reward)

    cut = rng.random(n) < truncated_fraction
    for g, i in truncated:
        cut[g * group_size + i] = True
    response_length = np.where(cut, max_tokens, rng.integers(1, max_tokens + 1, n)).astype(np.int32)
    prompt_lengths = np.full(n, prompt_length, dtype=np.int32)
    # One prompt per group: its K samples share the prompt tokens.
    group_prompts = rng.integers(1, VOCAB, (groups, prompt_length), dtype=np.int32)
    prompt_values = group_prompts[g_index].reshape(-1)
    total = int(response_length.sum())

    prompt_id = pc.binary_join_element_wise("p", pa.array(g_index.astype(str)), "")
    group_id = pc.binary_join_element_wise(shard_id, prompt_id, "/")
    rollout_id = pc.binary_join_element_wise(group_id, pa.array(s_index.astype(str)), "/")
    when = created_at or dt.datetime.now(dt.UTC)
    columns = {
        "run": pa.repeat(run, n),
        "rollout_id": rollout_id,
        "group_id": group_id,
        "sample_index": pa.array(s_index),
        "policy_version": pa.array(np.full(n, policy_version, dtype=np.int32)),
        "task": pa.repeat(task, n),
        "prompt_id": prompt_id,
        "prompt_token_ids": _lists(prompt_lengths, prompt_values, pa.int32()),
        "response_token_ids": _lists(response_length, rng.integers(1, VOCAB, total, dtype=np.int32), pa.int32()),
        "behaviour_logprobs": _lists(response_length, synthetic_logprobs(rng, total), pa.float32()),
        "response_length": pa.array(response_length),
        "finish_reason": pa.array(np.where(cut, "length", "stop")),
        "reward": pa.array(reward),
        "reward_parts": pa.StructArray.from_arrays(
            [pa.array(np.where(error, 0.0, correctness)), pa.array(np.where(error, 0.0, fmt))],
            ["correctness", "format"],
        ),
        "reward_terms": pa.nulls(n),  # not recorded for synthetic rows (as in rows before schema_version 4)
        "reward_error": pa.array(np.where(error, "ValueError: synthetic failure", None), pa.string()),
        "response_text": pa.repeat("x", n),
        "generator": pa.StructArray.from_arrays(
            [pa.repeat("synthetic", n), pa.repeat("none", n), pa.repeat(1.0, n), pa.repeat(1.0, n),
             pa.repeat(pa.scalar(max_tokens, pa.int32()), n), pa.repeat(pa.scalar(seed, pa.int64()), n)],
            ["backend", "model", "temperature", "top_p", "max_tokens", "seed"],
        ),
        "shard_id": pa.repeat(shard_id, n),
        "created_at": pa.array(np.full(n, np.datetime64(when.replace(tzinfo=None), "us")), pa.timestamp("us", "UTC")),
        "schema_version": pa.array(np.full(n, SCHEMA_VERSION, dtype=np.int32)),
    }
    return conform("rollouts", pa.table(columns))
