"""The Trainer: every preset trains, learning happens, micro-batching is exact, NaN steps are skipped."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recpipe.algorithms import PRESETS, preset
from recpipe.config import TrainConfig
from recpipe.schema import table_schema
from recpipe.train import Trainer, TrainingDiverged, plan_micro_batches, samples_from_table, train_step
from tests.train.train_batches import random_batch, sampled_batch

EOS = 2


def _reward(tokens: list[int]) -> float:
    return float(sum(tokens) % 2)  # arbitrary but deterministic: groups get reward variance


def _prompts() -> list[list[int]]:
    return [[5, 6, 7], [40, 41, 42, 43, 44, 45, 46, 47, 48], [100, 101, 102, 103, 104]]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_trains_two_steps(store, tiny_model, name):
    cfg = preset(name)
    with Trainer(store, "r", tiny_model, TrainConfig(lr=1e-3, micro_batch_tokens=32), cfg, name) as trainer:
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        batch = sampled_batch(trainer.model, _prompts(), cfg, group_size=4, max_new_tokens=6, temperature=1.0,
                              seed=1, eos_id=EOS, reward=_reward)
        results = [trainer.step(step, batch) for step in range(2)]  # step 1 trains on version-0 rollouts
        assert [r.applied for r in results] == [True, True]
        assert all(math.isfinite(r.row["loss"]) for r in results)
        assert trainer.current_version == 2
        changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
        assert changed, f"{name}: no parameter changed"
    steps = store.read("steps").to_pylist()
    assert sorted((r["step"], r["policy_version"], r["preset"]) for r in steps) == [(0, 1, name), (1, 2, name)]
    assert sorted(r["version"] for r in store.read("policies").to_pylist()) == [0, 1, 2]


def test_steps_row_carries_every_metric(store, tiny_model):
    cfg = preset("red-drop")
    with Trainer(store, "r", tiny_model, TrainConfig(micro_batch_tokens=32), cfg, "red-drop") as trainer:
        batch = random_batch(0, cfg, groups=4, group_size=6, policy_version=0)
        result = trainer.step(0, batch)
    (row,) = store.read("steps").to_pylist()
    missing = [f.name for f in table_schema("steps") if row[f.name] is None and f.name != "skip_reason"]
    assert missing == []
    assert row == {**result.row, "created_at": row["created_at"]}
    kept = batch.column("kept").to_pylist()
    assert row["drop_fraction"] == pytest.approx(kept.count(False) / len(kept)) and kept.count(False) > 0
    assert row["tokens"] == sum(len(r) for r in batch.column("response_token_ids").to_pylist())
    assert row["padded_tokens"] > row["tokens"] and 0 <= row["padding_fraction"] < 0.25
    assert row["staleness_mean"] == 0 and row["batch_policy_version_max"] == 0
    assert row["ratio_mean"] > 0 and row["ratio_max"] >= row["ratio_mean"] and row["lr"] == 1e-5
    assert result.metrics["loss/total"] == row["loss"] and "save_seconds" in result.metrics


def test_padding_share_is_reported_and_small_on_mixed_lengths(store, tiny_model):
    cfg = preset("reinforce")
    batch = random_batch(0, cfg, groups=8, group_size=8, prompt_len=(5, 40), response_len=(1, 48))
    with Trainer(store, "r", tiny_model, TrainConfig(micro_batch_tokens=4096), cfg, "reinforce") as trainer:
        row = trainer.step(0, batch).row
    lengths = [len(p) + len(r) - 1 for p, r in zip(batch.column("prompt_token_ids").to_pylist(),
                                                    batch.column("response_token_ids").to_pylist(), strict=True)]
    assert row["padded_tokens"] >= sum(lengths)
    assert row["padding_fraction"] == pytest.approx(1 - sum(lengths) / row["padded_tokens"])
    assert row["padding_fraction"] < 0.08 < 1 - sum(lengths) / (len(lengths) * max(lengths))


def test_learns_to_emit_a_chosen_token(store, tiny_model):
    """On-policy loop, reward 1 for starting with a chosen token: its probability must rise a lot."""
    prompt = [40, 41, 42, 43]
    cfg = preset("rec-oneside-nois")
    with Trainer(store, "r", tiny_model, TrainConfig(lr=3e-3, micro_batch_tokens=256), cfg, "rec-oneside-nois") as tr:

        def p_next() -> torch.Tensor:
            with torch.no_grad():
                return tr.model(input_ids=torch.tensor([prompt])).logits[0, -1].softmax(-1)

        probs = p_next()
        target = int(probs.argsort(descending=True)[4])  # a token the model emits sometimes, not most often
        start = probs[target].item()
        for step in range(20):
            batch = sampled_batch(tr.model, [prompt] * 2, cfg, group_size=8, max_new_tokens=2, temperature=1.0,
                                  seed=step, eos_id=EOS, reward=lambda t: float(t[0] == target),
                                  policy_version=tr.current_version)
            tr.step(step, batch)
        end = p_next()[target].item()
    assert start < 0.2
    assert end > max(0.6, 3 * start), (start, end)


@pytest.mark.parametrize("name", ["rec-oneside-is", "rec-gspo-nois", "opmd", "red-weight"])
def test_micro_batching_gives_the_gradient_of_one_big_batch(store, tiny_model, name):
    cfg = preset(name)
    with Trainer(store, "r", tiny_model, TrainConfig(), cfg, name) as trainer:
        prompts = [[3 + i] * n for i, n in enumerate([2, 9, 4, 15])]  # mixed lengths: several buckets
        batch = sampled_batch(trainer.model, prompts, cfg, group_size=3, max_new_tokens=5, temperature=1.0, seed=0,
                              eos_id=EOS, reward=_reward)
        whole = trainer.gradients(batch, micro_batch_tokens=10_000, overhead_tokens=10**9)  # one micro-batch
        split = trainer.gradients(batch, micro_batch_tokens=20)
    assert len(plan_micro_batches(samples_from_table(batch), 10_000, overhead_tokens=10**9)) == 1
    assert len(plan_micro_batches(samples_from_table(batch), 20)) > 3
    assert whole.keys() == split.keys()
    assert any(g.abs().sum() > 0 for g in whole.values())
    for n in whole:
        torch.testing.assert_close(split[n], whole[n], atol=1e-6, rtol=1e-4, msg=n)


@pytest.mark.parametrize("column", ["advantage", "weight"])
def test_a_nan_input_skips_the_step_and_says_why(store, tiny_model, column):
    cfg = preset("reinforce")
    with Trainer(store, "r", tiny_model, TrainConfig(max_bad_steps=3), cfg, "reinforce") as trainer:
        trainer.step(0, random_batch(0, cfg))
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        bad = random_batch(1, cfg)
        values = bad.column(column).to_pylist()
        values[2] = float("nan")
        bad = bad.set_column(bad.column_names.index(column), column, [values])
        result = trainer.step(1, bad)
        assert not result.applied and column in result.skip_reason and result.checkpoint is None
        assert trainer.current_version == 1 and trainer.next_step == 2
        assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
        assert not store.checkpoint_dir("r", 2).exists()
        assert trainer.step(2, random_batch(2, cfg)).policy_version == 2
    rows = {r["step"]: r for r in store.read("steps").to_pylist()}
    assert [rows[s]["applied"] for s in range(3)] == [True, False, True]
    assert rows[1]["policy_version"] == 1 and column in rows[1]["skip_reason"]


def test_a_nan_reward_is_reported_not_fatal(store, tiny_model):
    cfg = preset("reinforce")
    batch = random_batch(0, cfg)
    batch = batch.set_column(batch.column_names.index("reward"), "reward", [[float("nan")] * batch.num_rows])
    with Trainer(store, "r", tiny_model, TrainConfig(), cfg, "reinforce") as trainer:
        result = trainer.step(0, batch)  # the loss uses advantages, not rewards
    assert result.applied and math.isnan(result.row["reward_mean"]) and math.isnan(result.row["reward_std"])


def test_a_non_finite_loss_skips_the_step(store, tiny_model):
    cfg = preset("grpo")
    with Trainer(store, "r", tiny_model, TrainConfig(), cfg, "grpo") as trainer:
        with torch.no_grad():
            trainer.model.get_decoder().norm.weight[0] = float("inf")  # a diverged weight
        result = trainer.step(0, random_batch(0, cfg))
    assert not result.applied and "non-finite loss" in result.skip_reason
    assert math.isnan(result.row["loss"]) and trainer.current_version == 0
    assert not store.checkpoint_dir("r", 1).exists()


def test_a_non_finite_gradient_skips_the_step(store, tiny_model):
    cfg = preset("reinforce")
    with Trainer(store, "r", tiny_model, TrainConfig(), cfg, "reinforce") as trainer:
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        hook = trainer.model.get_decoder().norm.weight.register_hook(lambda g: g * float("inf"))  # finite loss
        result = trainer.step(0, random_batch(0, cfg))
        hook.remove()
        assert not result.applied and "non-finite gradient norm" in result.skip_reason
        assert math.isfinite(result.row["loss"]) and not math.isfinite(result.row["grad_norm"])
        assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
        assert all(p.grad is None for p in trainer.model.parameters())  # nothing leaks into the next step
        assert trainer.step(1, random_batch(1, cfg)).applied


def test_stops_after_max_bad_steps_in_a_row(store, tiny_model):
    cfg = preset("reinforce")
    bad = random_batch(0, cfg)
    bad = bad.set_column(bad.column_names.index("advantage"), "advantage", [[float("inf")] * bad.num_rows])
    with Trainer(store, "r", tiny_model, TrainConfig(max_bad_steps=2), cfg, "reinforce") as trainer:
        assert not trainer.step(0, bad).applied
        with pytest.raises(TrainingDiverged, match="2 consecutive steps skipped"):
            trainer.step(1, bad)
    assert sorted((r["step"], r["applied"]) for r in store.read("steps").to_pylist()) == [(0, False), (1, False)]
    # The streak is part of the run's state: a restarted trainer stops at the next bad step too,
    # and a good step resets it.
    with Trainer(store, "r", tiny_model, TrainConfig(max_bad_steps=2), cfg, "reinforce") as trainer:
        assert trainer.next_step == 2 and trainer.current_version == 0
        with pytest.raises(TrainingDiverged):
            trainer.step(2, bad)
        assert trainer.step(3, random_batch(3, cfg)).applied
        assert not trainer.step(4, bad).applied


def test_train_step_continues_the_run(store, tiny_model):
    cfg = preset("rec-oneside-nois")
    first = train_step(store, "r", tiny_model, random_batch(0, cfg), TrainConfig(), cfg, "rec-oneside-nois")
    second = train_step(store, "r", tiny_model, random_batch(1, cfg), TrainConfig(), cfg, "rec-oneside-nois")
    assert (first.step, first.policy_version, second.step, second.policy_version) == (0, 1, 1, 2)
    # A version dir is a complete checkpoint: the generator loads model and tokenizer (chat template included).
    model = AutoModelForCausalLM.from_pretrained(second.checkpoint, dtype=torch.float32)
    assert model.config.vocab_size == 512
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    assert (AutoTokenizer.from_pretrained(second.checkpoint).apply_chat_template(messages, tokenize=False)
            == AutoTokenizer.from_pretrained(tiny_model).apply_chat_template(messages, tokenize=False))


@pytest.mark.parametrize("column", ["behaviour_logprobs", "advantage"])
def test_a_non_finite_input_skips_the_step_and_names_the_rollout(store, tiny_model, column):
    cfg = preset("reinforce")
    batch = random_batch(0, cfg)
    values = batch.column(column).to_pylist()
    values[1] = [*values[1][:-1], float("nan")] if column == "behaviour_logprobs" else float("inf")
    batch = batch.set_column(batch.column_names.index(column), column, pa.array(values, batch.schema.field(column).type))
    with Trainer(store, "r", tiny_model, TrainConfig(), cfg, "reinforce") as trainer:
        result = trainer.step(0, batch)
        assert not result.applied and trainer.current_version == 0
    rid = batch.column("rollout_id")[1].as_py()
    assert result.skip_reason.startswith("non-finite") and repr(rid) in result.skip_reason


def _trained_tokens(store, step: int | None = None) -> dict[str, list[float]]:
    where = "step = $step" if step is not None else None
    rows = store.read("trained_tokens", where, {"step": step} if step is not None else None).to_pylist()
    return {r["rollout_id"]: r["logprobs"] for r in rows}


def test_trained_tokens_hold_the_log_probs_the_loss_used(store, tiny_model):
    """ratio_mean, ratio_max and mismatch of the steps row recomputed from the archived token log-probs and
    the batch's behaviour log-probs: the same numbers (so the report's per-token ratios are the loss's)."""
    cfg = preset("rec-oneside-is")
    batch = random_batch(3, cfg, groups=3, group_size=4, response_len=(1, 20))
    with Trainer(store, "r", tiny_model, TrainConfig(micro_batch_tokens=32), cfg, "rec-oneside-is") as trainer:
        row = trainer.step(0, batch).row
    trained = _trained_tokens(store)
    behaviour = dict(zip(batch.column("rollout_id").to_pylist(), batch.column("behaviour_logprobs").to_pylist(),
                         strict=True))
    assert trained.keys() == behaviour.keys()
    assert all(len(trained[i]) == len(behaviour[i]) for i in behaviour)
    gaps = [lp - old for i in behaviour for lp, old in zip(trained[i], behaviour[i], strict=True)]
    ratios = [math.exp(g) for g in gaps]
    assert row["ratio_mean"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-5)
    assert row["ratio_max"] == pytest.approx(max(ratios), rel=1e-5)
    assert row["mismatch"] == pytest.approx(sum(abs(g) for g in gaps) / len(gaps), rel=1e-5)
    (versions,) = {r["policy_version"] for r in store.read("trained_tokens").to_pylist()}
    assert versions == 0  # the weights that trained: the step's starting version


def test_trained_tokens_of_an_on_policy_step_are_the_sampled_log_probs(store, tiny_model):
    cfg = preset("grpo")
    with Trainer(store, "r", tiny_model, TrainConfig(micro_batch_tokens=4096), cfg, "grpo") as trainer:
        batch = sampled_batch(trainer.model, _prompts(), cfg, group_size=4, max_new_tokens=6, temperature=0.8,
                              seed=2, eos_id=EOS, reward=_reward)
        trainer.step(0, batch)
    trained = _trained_tokens(store)
    for rollout_id, old in zip(batch.column("rollout_id").to_pylist(), batch.column("behaviour_logprobs").to_pylist(),
                               strict=True):
        assert trained[rollout_id] == pytest.approx(old, abs=1e-4)


def test_trained_tokens_do_not_depend_on_micro_batching_and_skipped_steps_have_none(tmp_path, tiny_model):
    from recpipe.store import Store

    cfg = preset("reinforce")
    batch = random_batch(4, cfg, groups=4, group_size=4, prompt_len=(3, 30), response_len=(1, 24))
    found = []
    for budget in (24, 4096):
        store = Store.create(tmp_path / f"store-{budget}")
        with Trainer(store, "r", tiny_model, TrainConfig(micro_batch_tokens=budget), cfg, "reinforce") as trainer:
            assert len(trainer._policy.plan(batch)[1]) > (3 if budget == 24 else -1)
            trainer.step(0, batch)
            nan = batch.set_column(batch.column_names.index("advantage"), "advantage",
                                   [[float("nan")] * batch.num_rows])
            assert not trainer.step(1, nan).applied
        found.append(_trained_tokens(store))
        assert _trained_tokens(store, step=1) == {}
    assert found[0].keys() == found[1].keys() and len(found[0]) == batch.num_rows
    for rollout_id in found[0]:
        assert found[0][rollout_id] == pytest.approx(found[1][rollout_id], abs=1e-4)  # float32 sums differ by padding


def test_record_token_logprobs_off_writes_no_trained_tokens(store, tiny_model):
    cfg = preset("reinforce")
    with Trainer(store, "r", tiny_model, TrainConfig(record_token_logprobs=False), cfg, "reinforce") as trainer:
        assert trainer.step(0, random_batch(0, cfg)).applied
    assert store.read("trained_tokens").num_rows == 0
    assert store.read("steps").num_rows == 1
