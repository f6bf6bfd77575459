"""Batch validation, length bucketing and collation (no model)."""

from __future__ import annotations

import pytest
import torch

from recpipe.algorithms import preset
from recpipe.train import collate, plan_micro_batches, samples_from_table
from tests.train.train_batches import batch_table, random_batch


def _mixed_lengths(n: int = 64, seed: int = 0):
    return random_batch(seed, preset("reinforce"), groups=n // 8, group_size=8, prompt_len=(10, 40),
                        response_len=(1, 48))


def test_every_micro_batch_fits_the_padded_token_budget():
    samples = samples_from_table(_mixed_lengths())
    plan = plan_micro_batches(samples, token_budget=256)
    assert sorted(s.index for mb in plan for s in mb.samples) == list(range(len(samples)))
    for mb in plan:
        assert mb.width == max(s.length for s in mb.samples)
        assert mb.padded_tokens <= 256 or len(mb.samples) == 1


def _padding(plan) -> float:
    return 1 - sum(mb.real_tokens for mb in plan) / sum(mb.padded_tokens for mb in plan)


@pytest.mark.parametrize("budget", [512, 4096, 100_000])
def test_bucketing_keeps_padding_small_on_mixed_lengths(budget):
    samples = samples_from_table(_mixed_lengths())
    # What bucketing avoids: the whole batch as one tensor padded to its longest row.
    naive = 1 - sum(s.length for s in samples) / (len(samples) * max(s.length for s in samples))
    assert naive > 0.3
    assert _padding(plan_micro_batches(samples, token_budget=budget, overhead_tokens=16)) < 0.05
    assert _padding(plan_micro_batches(samples, token_budget=budget)) < 0.1  # the default trades a bit more


def test_cut_points_trade_padding_against_micro_batch_overhead():
    samples = samples_from_table(_mixed_lengths())
    assert _padding(plan_micro_batches(samples, 10_000, overhead_tokens=0)) == 0  # free micro-batches: no padding
    assert len(plan_micro_batches(samples, 10_000, overhead_tokens=10**9)) == 1  # as few as the budget allows
    few, many = plan_micro_batches(samples, 10_000, 256), plan_micro_batches(samples, 10_000, 16)
    assert len(few) < len(many) and _padding(few) > _padding(many)


def test_a_sequence_longer_than_the_budget_gets_its_own_micro_batch():
    samples = samples_from_table(random_batch(0, preset("reinforce"), prompt_len=(30, 30), response_len=(40, 40)))
    plan = plan_micro_batches(samples, token_budget=16)
    assert [len(mb.samples) for mb in plan] == [1] * len(samples)


def test_collate_aligns_predicting_positions_with_response_tokens():
    table = batch_table([
        dict(rollout_id="a", group_id="g", policy_version=0, advantage=1.0, weight=1.0, kept=True,
             prompt_token_ids=[10, 11, 12], response_token_ids=[20, 21], behaviour_logprobs=[-1.0, -2.0],
             reward=1.0, temperature=0.5),
        dict(rollout_id="b", group_id="g", policy_version=0, advantage=-1.0, weight=2.0, kept=True,
             prompt_token_ids=[10], response_token_ids=[30, 31, 32], behaviour_logprobs=[-3.0, -4.0, -5.0],
             reward=0.0, temperature=0.5),
    ])
    (mb,) = plan_micro_batches(samples_from_table(table), token_budget=100)
    t = collate(mb, pad_id=0, device="cpu")
    # Row order: longest input first (a: 3 + 2 - 1 = 4 tokens, b: 1 + 3 - 1 = 3).
    assert t["input_ids"].tolist() == [[10, 11, 12, 20], [10, 30, 31, 0]]
    # The token at position p + 1 is predicted at p: a's 20 at 2, 21 at 3; b's 30 at 0, 31 at 1, 32 at 2.
    assert t["positions"].tolist() == [[False, False, True, True], [True, True, True, False]]
    assert t["targets"].tolist() == [20, 21, 30, 31, 32]
    assert t["response_mask"].tolist() == [[True, True, False], [True, True, True]]
    assert torch.equal(t["old_logprobs"], torch.tensor([[-1.0, -2.0, 0.0], [-3.0, -4.0, -5.0]]))
    assert t["advantages"].tolist() == [1.0, -1.0] and t["weights"].tolist() == [1.0, 2.0]
    assert t["temperature"].tolist() == [0.5] * 5


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("behaviour_logprobs", [-1.0], "must match"),
        ("temperature", 0.0, "temperature"),
        ("prompt_token_ids", [], "prompt_token_ids"),
    ],
)
def test_bad_rows_name_the_column_and_the_rollout(column, value, message):
    row = dict(rollout_id="r-7", group_id="g", policy_version=0, advantage=1.0, weight=1.0, kept=True,
               prompt_token_ids=[1, 2], response_token_ids=[3, 4], behaviour_logprobs=[-1.0, -1.0], reward=1.0,
               temperature=1.0)
    row[column] = value
    with pytest.raises(ValueError, match=message) as info:
        samples_from_table(batch_table([row]))
    assert "r-7" in str(info.value)


def test_token_ids_outside_the_vocabulary_are_rejected():
    table = random_batch(0, preset("reinforce"), vocab=1000)
    samples_from_table(table)  # no vocabulary given: not checked
    with pytest.raises(ValueError, match=r"outside the model's vocabulary \[0, 100\)"):
        samples_from_table(table, vocab_size=100)


def test_missing_columns_are_listed():
    table = random_batch(0, preset("reinforce")).drop_columns(["temperature", "weight"])
    with pytest.raises(ValueError, match=r"lacks columns \['weight', 'temperature'\]"):
        samples_from_table(table)
