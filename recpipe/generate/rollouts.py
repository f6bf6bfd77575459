"""Generation shards: sample K responses per prompt, score them, return rollout rows.

A shard is a fixed list of prompts generated with one policy version and one set
of sampling parameters. Its id hashes all of that, so rerunning a shard gives
the same shard id, group ids and rollout ids (idempotent writes), and its
sampling seed derives from the run seed, the version and the shard index.

    shards = shard_prompts(prompts, shard_size=8)
    for index, shard in enumerate(shards):
        seed = shard_seed(run_seed, version, index)
        sid = shard_id(run, version, task.name, [p.prompt_id for p in shard], params, seed)
        table = generate_rollouts(engine, task, shard, run=run, policy_version=version, shard_id=sid,
                                  n=8, temperature=1.0, top_p=1.0, max_tokens=48, stop=[], seed=seed)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from recpipe.generate.engine import Engine, tokenize_prompts
from recpipe.schema import SCHEMA_VERSION, conform
from recpipe.tasks import Prompt, Task, score_responses


def shard_prompts(prompts: Sequence[Prompt], shard_size: int) -> list[list[Prompt]]:
    """Consecutive chunks of ``shard_size`` prompts (the last one may be shorter)."""
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size={shard_size!r}: expected an int >= 1")
    return [list(prompts[i : i + shard_size]) for i in range(0, len(prompts), shard_size)]


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def shard_id(
    run: str,
    policy_version: int,
    task_name: str,
    prompt_ids: Sequence[str],
    sampling_params: Mapping[str, Any],
    seed: int,
) -> str:
    """Deterministic shard id "v{version}-{16 hex}"; any change of input gives another id.

    Safe as a file name (no "/"), so group ids "{shard_id}/{prompt_id}" split unambiguously.
    """
    digest = _digest(
        {
            "run": run,
            "version": policy_version,
            "task": task_name,
            "prompts": list(prompt_ids),
            "params": dict(sampling_params),
            "seed": seed,
        }
    )
    return f"v{policy_version}-{digest[:16]}"


def shard_seed(seed: int, policy_version: int, shard_index: int) -> int:
    """Sampling seed of one shard, derived from the run seed; in [0, 2**31)."""
    return int(_digest([seed, policy_version, shard_index])[:8], 16) & 0x7FFFFFFF


def generate_rollouts(
    engine: Engine,
    task: Task,
    prompts: Sequence[Prompt],
    *,
    run: str,
    policy_version: int,
    shard_id: str,
    n: int,
    temperature: float,
    top_p: float,
    max_tokens: int,
    stop: Sequence[str] = (),
    seed: int,
    reward_timeout_s: float | None = 2.0,
) -> pa.Table:
    """Sample ``n`` responses per prompt with ``engine``, score them, return conforming rollout rows.

    A scorer failure on one response is recorded in its ``reward_error`` (reward 0); the rest of the group
    is kept. Rows come in prompt order, samples 0..n-1 within each group.
    """
    prompts = list(prompts)
    if len({p.prompt_id for p in prompts}) != len(prompts):
        raise ValueError(f"prompts: prompt ids repeat within shard {shard_id!r}; group ids would collide")
    prompt_ids = tokenize_prompts(engine.tokenizer, prompts)
    groups = engine.sample(
        prompt_ids,
        n=n,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        stop=list(stop),
        seed=seed,
    )
    flat_prompts = [p for p, group in zip(prompts, groups, strict=True) for _ in group]
    rewards = score_responses(
        task, flat_prompts, [s.text for g in groups for s in g], timeout_s=reward_timeout_s
    )

    generator = {
        "backend": engine.backend,
        "model": engine.model_name,
        "temperature": float(temperature),
        "top_p": float(top_p),
        "max_tokens": max_tokens,
        "seed": seed,
    }
    created_at = dt.datetime.now(dt.UTC)
    rows = []
    results = iter(rewards)
    for prompt, ids, group in zip(prompts, prompt_ids, groups, strict=True):
        group_id = f"{shard_id}/{prompt.prompt_id}"
        for index, sample in enumerate(group):
            rows.append(
                {
                    "run": run,
                    "rollout_id": f"{group_id}/{index}",
                    "group_id": group_id,
                    "sample_index": index,
                    "policy_version": policy_version,
                    "task": task.name,
                    "prompt_id": prompt.prompt_id,
                    "prompt_token_ids": ids,
                    "response_token_ids": sample.token_ids,
                    "behaviour_logprobs": sample.logprobs,
                    "response_length": len(sample.token_ids),
                    "finish_reason": sample.finish_reason,
                    **next(results).as_row(),
                    "response_text": sample.text,
                    "generator": generator,
                    "shard_id": shard_id,
                    "created_at": created_at,
                    "schema_version": SCHEMA_VERSION,
                }
            )
    return conform("rollouts", rows)


def evaluate_greedy(
    engine: Engine,
    task: Task,
    prompts: Sequence[Prompt],
    max_tokens: int,
    reward_timeout_s: float | None = 2.0,
) -> tuple[float, float, int]:
    """Greedy-decode each prompt once; return (accuracy = mean correctness, mean reward, prompts)."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: nothing to evaluate")
    groups = engine.sample(
        tokenize_prompts(engine.tokenizer, prompts),
        n=1,
        temperature=0.0,
        top_p=1.0,
        max_tokens=max_tokens,
        seed=0,
    )
    results = score_responses(task, prompts, [g[0].text for g in groups], timeout_s=reward_timeout_s)
    accuracy = sum(r.correctness for r in results) / len(results)
    reward_mean = sum(r.reward for r in results) / len(results)
    return accuracy, reward_mean, len(results)
