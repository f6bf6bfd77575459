"""Batch validation, length bucketing and collation (no model)."""

from __future__ import annotations

import math
import random

import pyarrow as pa
import pytest
import torch

from recpipe.algorithms import preset
from recpipe.errors import RecpipeError
from recpipe.train import (
    REQUIRED_COLUMNS,
    MicroBatch,
    Sample,
    collate,
    plan_micro_batches,
    samples_from_table,
)
from recpipe.train.batching import BatchError
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


# The per-row implementation samples_from_table and collate replaced (Python lists, one row at a time):
# the oracle the vectorised ones must match, values and error messages alike.
def _reference_rows(table, vocab_size=None):
    cols = {c: table.column(c).to_pylist() for c in REQUIRED_COLUMNS}
    top_p = table.column("top_p").to_pylist() if "top_p" in table.column_names else [1.0] * table.num_rows
    kept = table.column("kept").to_pylist() if "kept" in table.column_names else [True] * table.num_rows
    rows = []
    for i in range(table.num_rows):
        rid = cols["rollout_id"][i]
        prompt, response, old = cols["prompt_token_ids"][i], cols["response_token_ids"][i], cols["behaviour_logprobs"][i]
        if not prompt:
            raise ValueError(f"prompt_token_ids of rollout {rid!r} is empty; the first response token needs a prompt")
        if response is None or old is None or len(old) != len(response):
            raise ValueError(
                f"behaviour_logprobs of rollout {rid!r} has {None if old is None else len(old)} values for "
                f"{None if response is None else len(response)} response tokens; they must match"
            )
        if vocab_size is not None:
            for name, ids in (("prompt_token_ids", prompt), ("response_token_ids", response)):
                bad = [t for t in ids if not 0 <= t < vocab_size]
                if bad:
                    raise ValueError(
                        f"{name} of rollout {rid!r} holds token id {bad[0]}, outside the model's vocabulary "
                        f"[0, {vocab_size}); were these rollouts generated by another model?"
                    )
        temperature = cols["temperature"][i]
        if temperature is None or not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature of rollout {rid!r} is {temperature!r}; must be a finite number > 0")
        p = 1.0 if top_p[i] is None else top_p[i]
        if not 0 < p <= 1:
            raise ValueError(f"top_p of rollout {rid!r} is {p!r}; allowed: 0 < top_p <= 1")
        nan = math.nan
        rows.append(dict(
            index=i, rollout_id=rid, policy_version=int(cols["policy_version"][i]), prompt=list(prompt),
            response=list(response), old_logprobs=[nan if x is None else float(x) for x in old],
            advantage=nan if cols["advantage"][i] is None else float(cols["advantage"][i]),
            weight=nan if cols["weight"][i] is None else float(cols["weight"][i]),
            reward=nan if cols["reward"][i] is None else float(cols["reward"][i]),
            temperature=float(temperature), top_p=float(p), kept=bool(True if kept[i] is None else kept[i]),
        ))
    return rows


def _reference_collate(rows, width, pad_id):
    B, R = len(rows), max(len(r["response"]) for r in rows)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    positions = torch.zeros(B, width, dtype=torch.bool)
    response_mask = torch.zeros(B, R, dtype=torch.bool)
    old_logprobs = torch.zeros(B, R, dtype=torch.float32)
    targets, temperature, top_p = [], [], []
    for b, r in enumerate(rows):
        seq = r["prompt"] + r["response"][:-1]
        input_ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        positions[b, len(r["prompt"]) - 1 : len(r["prompt"]) - 1 + len(r["response"])] = True
        response_mask[b, : len(r["response"])] = True
        old_logprobs[b, : len(r["response"])] = torch.tensor(r["old_logprobs"], dtype=torch.float32)
        targets.extend(r["response"])
        temperature.extend([r["temperature"]] * len(r["response"]))
        top_p.extend([r["top_p"]] * len(r["response"]))
    return {
        "input_ids": input_ids, "positions": positions, "targets": torch.tensor(targets, dtype=torch.long),
        "temperature": torch.tensor(temperature, dtype=torch.float32),
        "top_p": torch.tensor(top_p, dtype=torch.float32), "response_mask": response_mask,
        "old_logprobs": old_logprobs,
        "advantages": torch.tensor([r["advantage"] for r in rows], dtype=torch.float32),
        "weights": torch.tensor([r["weight"] for r in rows], dtype=torch.float32),
    }


def _ragged_table(seed, rows=40, *, token_type=pa.int32(), logprob_type=pa.float32(), top_p=True, chunks=1):
    """Random rows, ragged every way the trainer can meet: empty and one-token responses, null advantages,
    weights, rewards, top_p, kept and log-prob entries, NaN log-probs, top_p < 1; split into chunks."""
    rng = random.Random(seed)

    def maybe(value, p=0.1):
        return None if rng.random() < p else value

    records = []
    for i in range(rows):
        n = rng.choice([0, 1, 1, 2, rng.randint(3, 60)])
        records.append(dict(
            rollout_id=f"s{seed}/r{i}", policy_version=rng.randint(0, 5), advantage=maybe(rng.gauss(0, 1)),
            weight=maybe(rng.uniform(0, 2)), reward=maybe(float(rng.random() < 0.5)),
            prompt_token_ids=[rng.randrange(0, 1000) for _ in range(rng.randint(1, 30))],
            response_token_ids=[rng.randrange(0, 1000) for _ in range(n)],
            behaviour_logprobs=[maybe(rng.choice([-rng.uniform(0, 9), math.nan]), 0.05) for _ in range(n)],
            temperature=rng.choice([1.0, 0.7, 1e-3]), top_p=maybe(rng.choice([1.0, 0.9, 0.25])),
            kept=maybe(rng.random() < 0.8),
        ))
    schema = pa.schema([
        ("rollout_id", pa.string()), ("policy_version", pa.int64()), ("advantage", pa.float64()),
        ("weight", pa.float64()), ("reward", pa.float64()), ("prompt_token_ids", pa.list_(token_type)),
        ("response_token_ids", pa.list_(token_type)), ("behaviour_logprobs", pa.list_(logprob_type)),
        ("temperature", pa.float64()), ("top_p", pa.float32()), ("kept", pa.bool_()),
    ])
    table = pa.Table.from_pylist(records, schema=schema)
    if not top_p:
        table = table.drop_columns(["top_p", "kept"])
    size = -(-rows // chunks)
    return pa.concat_tables([table.slice(k, size) for k in range(0, rows, size)])


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def _assert_same_samples(samples, reference):
    assert len(samples) == len(reference)
    for s, r in zip(samples, reference, strict=True):
        for key, expected in r.items():
            value = getattr(s, key)
            if isinstance(expected, list):
                assert len(value) == len(expected) and all(map(_same, value, expected)), (s.rollout_id, key)
            else:
                assert _same(value, expected) and type(value) is type(expected), (s.rollout_id, key, value)


def _assert_same_tensors(tensors, expected):
    assert tensors.keys() == expected.keys()
    for key, value in expected.items():
        assert tensors[key].dtype == value.dtype and tensors[key].shape == value.shape, key
        assert torch.equal(tensors[key].nan_to_num(nan=7.5), value.nan_to_num(nan=7.5)), key


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    "layout",
    [{}, {"token_type": pa.int64(), "logprob_type": pa.float64()}, {"top_p": False}, {"chunks": 3}],
    ids=["int32-float32", "int64-float64", "no-top_p-no-kept", "three-chunks"],
)
def test_samples_and_collate_match_the_per_row_reference(seed, layout):
    table = _ragged_table(seed, **layout)
    samples = samples_from_table(table, vocab_size=1000)
    reference = _reference_rows(table, vocab_size=1000)
    _assert_same_samples(samples, reference)
    for budget in (64, 4096):
        plan = plan_micro_batches(samples, token_budget=budget)
        assert sorted(s.index for mb in plan for s in mb.samples) == [r["index"] for r in reference if r["response"]]
        for mb in plan:
            expected = _reference_collate([reference[s.index] for s in mb.samples], mb.width, pad_id=3)
            _assert_same_tensors(collate(mb, pad_id=3, device="cpu"), expected)
    # Empty responses never reach a plan, but collate still pads them like the reference (no targets).
    empty = [s for s in samples if not s.response][:2] + samples[:3]
    width = max(len(s.prompt) + max(len(s.response) - 1, 0) for s in empty)
    expected = _reference_collate([reference[s.index] for s in empty], width, pad_id=0)
    _assert_same_tensors(collate(MicroBatch(empty, width), pad_id=0, device="cpu"), expected)


def test_a_sliced_table_is_read_from_its_own_rows():
    table = _ragged_table(1, rows=30).slice(7, 12)
    _assert_same_samples(samples_from_table(table), _reference_rows(table))


def test_samples_built_from_lists_collate_like_the_reference():
    # bench/bench_gpu.py builds Samples from Python lists.
    rows = _reference_rows(_ragged_table(2, rows=12))
    samples = [Sample(**r) for r in rows if r["response"]]
    (mb,) = plan_micro_batches(samples, token_budget=10**6, overhead_tokens=10**6)
    expected = _reference_collate([rows[s.index] for s in mb.samples], mb.width, pad_id=0)
    _assert_same_tensors(collate(mb, pad_id=0, device="cpu"), expected)


_CORRUPTIONS = [
    ("prompt_token_ids", []), ("prompt_token_ids", None), ("response_token_ids", None),
    ("behaviour_logprobs", None), ("behaviour_logprobs", "drop"), ("prompt_token_ids", "vocab"),
    ("response_token_ids", "vocab"), ("response_token_ids", "negative"), ("temperature", 0.0),
    ("temperature", None), ("temperature", math.inf), ("temperature", math.nan), ("top_p", 0.0),
    ("top_p", 1.5), ("top_p", math.nan),
]


@pytest.mark.parametrize("seed", range(10))
def test_bad_rows_raise_the_reference_message_for_the_first_bad_row(seed):
    rng = random.Random(seed)
    records = _ragged_table(seed, rows=20).to_pylist()
    for _ in range(rng.randint(1, 4)):  # several bad rows, several faults in one row: the first one wins
        record = rng.choice(records)
        column, value = rng.choice(_CORRUPTIONS)
        if value == "drop":
            value = record[column][:-1] if record[column] else [-1.0]
        elif value == "vocab":
            value = (record[column] or [5]) + [1000 + rng.randrange(5)]
        elif value == "negative":
            value = [-1] + (record[column] or [])
            record["behaviour_logprobs"] = [-1.0] * len(value)
        record[column] = value
    table = pa.Table.from_pylist(records, schema=_ragged_table(seed, rows=1).schema)
    with pytest.raises(ValueError) as expected:
        _reference_rows(table, vocab_size=1000)
    with pytest.raises(BatchError) as info:
        samples_from_table(table, vocab_size=1000)
    assert str(info.value) == str(expected.value)
    assert isinstance(info.value, RecpipeError)


def test_null_token_ids_are_rejected():
    records = _ragged_table(0, rows=3).to_pylist()
    records[1]["response_token_ids"] = [5, None]
    records[1]["behaviour_logprobs"] = [-1.0, -1.0]
    table = pa.Table.from_pylist(records, schema=_ragged_table(0, rows=1).schema)
    for vocab_size in (None, 1000):
        with pytest.raises(BatchError, match=r"response_token_ids of rollout 's0/r1' holds a null token id"):
            samples_from_table(table, vocab_size=vocab_size)


def test_selection_batches_carry_every_column_the_trainer_requires():
    # Two lists on purpose: what the trainer needs (a subset) and what selection writes; this keeps them in step.
    from recpipe.select import BATCH_COLUMNS

    assert set(REQUIRED_COLUMNS) | {"top_p", "kept"} <= set(BATCH_COLUMNS)
