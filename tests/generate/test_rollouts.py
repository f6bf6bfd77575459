"""Generation shards: rollout rows that fit the schema, deterministic ids, scorer failures kept per row."""

from __future__ import annotations

import math
import threading

import pyarrow as pa
import pytest

from recpipe.generate import (
    evaluate_greedy,
    generate_rollouts,
    shard_id,
    shard_prompts,
    shard_seed,
    tokenize_prompts,
)
from recpipe.generate.rollouts import tokenizer_fingerprint
from recpipe.schema import SCHEMA_VERSION, table_schema
from recpipe.tasks import Prompt, RewardResult, get_task

PARAMS = {"n": 4, "temperature": 1.0, "top_p": 1.0, "max_tokens": 12}


def _shard(engine, task, prompts, **overrides):
    args = {
        "run": "r",
        "policy_version": 3,
        "shard_id": "v3-abc",
        **PARAMS,
        "stop": [],
        "seed": 7,
    } | overrides
    return generate_rollouts(engine, task, prompts, **args)


def test_rollouts_conform_and_form_groups(engine, tiny_model):
    from transformers import AutoTokenizer

    # what retrain compares with a new model's tokenizer: each backend records the checkpoint tokenizer's
    checkpoint_tokenizer = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_model))
    task = get_task("arithmetic")
    prompts = task.prompts("train", limit=3, seed=0)
    table = _shard(engine, task, prompts)
    assert isinstance(table, pa.Table)
    assert table.schema.equals(table_schema("rollouts"), check_metadata=False)
    assert table.num_rows == 3 * 4
    rows = table.to_pylist()
    ids = tokenize_prompts(engine.tokenizer, prompts)
    for r in rows:
        assert r["group_id"] == f"v3-abc/{r['prompt_id']}"
        assert r["rollout_id"] == f"{r['group_id']}/{r['sample_index']}"
        assert r["response_length"] == len(r["response_token_ids"]) == len(r["behaviour_logprobs"])
        assert r["finish_reason"] in ("stop", "length")
        assert all(math.isfinite(x) and x <= 0 for x in r["behaviour_logprobs"])
        assert r["prompt_token_ids"] == ids[[p.prompt_id for p in prompts].index(r["prompt_id"])]
        assert r["reward"] == pytest.approx(r["reward_parts"]["correctness"] + r["reward_parts"]["format"])
        assert r["reward_error"] is None
        assert (r["run"], r["policy_version"], r["task"], r["shard_id"]) == ("r", 3, "arithmetic", "v3-abc")
        assert r["generator"] == {
            "backend": engine.backend,
            "model": "tiny",
            "temperature": 1.0,
            "top_p": 1.0,
            "max_tokens": 12,
            "seed": 7,
            "tokenizer": checkpoint_tokenizer,
        }
        assert r["reward_terms"] == [{"name": "task", "weight": 1.0, "value": r["reward"]}]
        assert r["schema_version"] == SCHEMA_VERSION
    for p in prompts:
        group = [r for r in rows if r["prompt_id"] == p.prompt_id]
        assert sorted(r["sample_index"] for r in group) == [0, 1, 2, 3]
    assert len({r["rollout_id"] for r in rows}) == len(rows)


class FlakyTask:
    """A real task whose scorer raises on its second call (scoring goes in order, so that is response 1)."""

    name = "flaky"

    def __init__(self):
        self.calls = 0
        self.lock = threading.Lock()

    def prompts(self, split, limit=None, seed=0):
        return [
            Prompt(f"q{i}", [{"role": "user", "content": f"Say {i}."}], str(i)) for i in range(limit or 2)
        ]

    def score(self, prompt, response):
        with self.lock:
            self.calls += 1
            call = self.calls
        if call == 2:
            raise RuntimeError("scorer exploded")
        return RewardResult.from_parts(correct=prompt.answer in response, formatted=False)


def test_scorer_failure_is_recorded_and_the_group_kept(hf_engine):
    task = FlakyTask()
    table = _shard(hf_engine, task, task.prompts("train", limit=2))
    rows = table.to_pylist()
    assert len(rows) == 8
    failed = [r for r in rows if r["reward_error"] is not None]
    assert [r["rollout_id"] for r in failed] == ["v3-abc/q0/1"]
    assert "RuntimeError: scorer exploded" in failed[0]["reward_error"]
    assert failed[0]["reward"] == 0.0 and failed[0]["reward_terms"] == []
    assert all(
        r["reward"] == pytest.approx(-0.1) or r["reward"] == pytest.approx(0.9)
        for r in rows
        if r not in failed
    )


def test_rollouts_are_reproducible_for_a_shard(engine):
    task = get_task("arithmetic")
    prompts = task.prompts("train", limit=2, seed=0)
    first, again = _shard(engine, task, prompts), _shard(engine, task, prompts)
    columns = ["rollout_id", "response_token_ids", "behaviour_logprobs", "reward"]
    assert first.select(columns).equals(again.select(columns))


def test_duplicate_prompt_ids_are_rejected(hf_engine):
    task = get_task("arithmetic")
    prompt = task.prompts("train", limit=1)[0]
    with pytest.raises(ValueError, match="prompt ids repeat"):
        _shard(hf_engine, task, [prompt, prompt])


def test_shard_prompts_chunks_in_order():
    prompts = get_task("arithmetic").prompts("train", limit=5)
    shards = shard_prompts(prompts, 2)
    assert [len(s) for s in shards] == [2, 2, 1]
    assert [p for s in shards for p in s] == prompts
    with pytest.raises(ValueError, match="shard_size=0"):
        shard_prompts(prompts, 0)


def test_shard_id_is_deterministic_and_sensitive_to_every_input():
    base = ("r", 1, "arithmetic", ["a", "b"], {"n": 4, "temperature": 1.0}, 0)
    sid = shard_id(*base)
    assert sid == shard_id(*base)
    assert sid.startswith("v1-") and "/" not in sid
    variants = [
        ("r2", *base[1:]),
        (base[0], 2, *base[2:]),
        (*base[:2], "gsm8k", *base[3:]),
        (*base[:3], ["b", "a"], *base[4:]),
        (*base[:4], {"n": 4, "temperature": 0.7}, base[5]),
        (*base[:5], 1),
    ]
    assert len({sid} | {shard_id(*v) for v in variants}) == len(variants) + 1


def test_shard_seed_is_deterministic_and_varies():
    seeds = {shard_seed(0, v, i) for v in range(3) for i in range(5)}
    assert len(seeds) == 15
    assert shard_seed(0, 1, 2) == shard_seed(0, 1, 2) != shard_seed(1, 1, 2)
    assert all(0 <= s < 2**31 for s in seeds)


def test_evaluate_greedy_scores_the_greedy_answers(engine):
    task = get_task("arithmetic")
    prompts = task.prompts("test", limit=4, seed=0)
    accuracy, reward_mean, n = evaluate_greedy(engine, task, prompts, max_tokens=8)
    greedy = engine.sample(tokenize_prompts(engine.tokenizer, prompts), 1, 0.0, 1.0, 8, seed=0)
    expected = [task.score(p, g[0].text) for p, g in zip(prompts, greedy, strict=True)]
    assert n == 4
    assert accuracy == pytest.approx(sum(r.correctness for r in expected) / 4)
    assert reward_mean == pytest.approx(sum(r.reward for r in expected) / 4)
    with pytest.raises(ValueError, match="empty"):
        evaluate_greedy(engine, task, [], max_tokens=8)
