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
import threading
import weakref
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


_fingerprints: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_fingerprints_lock = threading.Lock()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """16 hex digits of sha256 over what maps text to token ids: the vocabulary in id order (added tokens
    included), the BPE merges (as pairs, however tokenizer.json spells them), the special tokens. Two
    tokenizers with the same fingerprint give the same ids for the same text; recorded with every rollout
    (``generator.tokenizer``) so that retrain can refuse a model with another tokenizer even when the
    rollouts' base model is gone. Computed once per tokenizer object (~1 s for a 49k vocabulary)."""
    with _fingerprints_lock:
        known = _fingerprints.get(tokenizer)
    if known is not None:
        return known
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab, key=vocab.__getitem__)).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer: its model's merges
    if backend is not None:
        model = json.loads(backend.to_str()).get("model") or {}
        merges = [m.split(" ") if isinstance(m, str) else list(m) for m in model.get("merges") or []]
        digest.update(json.dumps([model.get("type"), merges]).encode())
    digest.update(json.dumps(sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())).encode())
    fingerprint = digest.hexdigest()[:16]
    with _fingerprints_lock:
        _fingerprints[tokenizer] = fingerprint
    return fingerprint


def prompt_token_ids(tokenizer: Any, task: Task, prompts: Sequence[Prompt]) -> list[list[int]]:
    """The prompts' token ids as the model sees them: the model's chat template (tokenize_prompts), or the
    task's own ``chat_template`` if it has one (the dataset task's option; "none" renders the raw text)."""
    template = getattr(task, "chat_template", None)
    if template is None:
        return tokenize_prompts(tokenizer, prompts)
    return [list(tokenizer.apply_chat_template(p.messages, chat_template=template, add_generation_prompt=True,
                                               tokenize=True, return_dict=False)) for p in prompts]


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
    prompt_ids = prompt_token_ids(engine.tokenizer, task, prompts)
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
        "tokenizer": tokenizer_fingerprint(engine.tokenizer),
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
        prompt_token_ids(engine.tokenizer, task, prompts),
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
