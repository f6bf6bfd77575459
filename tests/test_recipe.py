"""The loop recipe's own checks (the loop itself runs end to end in tests/flows)."""

from __future__ import annotations

import json
import shutil

import pytest

from recpipe.config import RecpipeConfig, load_config
from recpipe.errors import RecpipeError
from recpipe.recipe import LoopRecipe, TokenizerMismatch
from recpipe.store import Store
from recpipe.train import Trainer


def other_tokenizer(tiny_model, dest):
    """A copy of the tiny model whose tokenizer maps one more piece of text to an id."""
    shutil.copytree(tiny_model, dest)
    spec = json.loads((dest / "tokenizer.json").read_text())
    top = max(t["id"] for t in spec["added_tokens"])
    spec["added_tokens"].append({**spec["added_tokens"][-1], "id": top + 1, "content": "<|extra|>"})
    (dest / "tokenizer.json").write_text(json.dumps(spec, indent=1))
    return dest


def test_tokenizer_fingerprint_ignores_formatting_and_sees_the_vocabulary(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from recpipe.generate.rollouts import tokenizer_fingerprint

    def fingerprint(path):
        return tokenizer_fingerprint(AutoTokenizer.from_pretrained(path))

    resaved = shutil.copytree(tiny_model, tmp_path / "resaved")
    spec = json.loads((resaved / "tokenizer.json").read_text())
    (resaved / "tokenizer.json").write_text(json.dumps(dict(reversed(list(spec.items()))), indent=4))
    assert fingerprint(resaved) == fingerprint(tiny_model)
    assert fingerprint(other_tokenizer(tiny_model, tmp_path / "other")) != fingerprint(tiny_model)


def test_retrain_refuses_a_model_whose_tokenizer_differs_from_the_rollouts(tiny_model, tmp_path):
    store = Store.create(tmp_path / "store")
    Trainer(store, "a", tiny_model).setup().close()  # run a: version 0 is the tiny model
    other = other_tokenizer(tiny_model, tmp_path / "other")
    cfg = load_config(overrides=[f"store={store.root}", "run=b", f"model.name={other}"])
    with LoopRecipe(cfg) as recipe, pytest.raises(TokenizerMismatch, match=r"run 'a'.*another tokenizer.*leave out"):
        recipe.retrain("a")
    assert store.read("policies", "run = 'b'").num_rows == 0  # refused before anything of run b was written
    same = load_config(overrides=[f"store={store.root}", "run=b", f"model.name={tiny_model}"])
    with LoopRecipe(same) as recipe, pytest.raises(ValueError, match="no recorded batches"):
        recipe.retrain("a")  # the same tokenizer passes the check (and then finds nothing to replay)


def test_tokenizer_fingerprint_sees_the_ids_not_the_file(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from recpipe.generate.rollouts import tokenizer_fingerprint

    resaved = shutil.copytree(tiny_model, tmp_path / "resaved")
    spec = json.loads((resaved / "tokenizer.json").read_text())
    (resaved / "tokenizer.json").write_text(json.dumps(dict(reversed(list(spec.items()))), indent=4))
    mine = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_model))
    assert len(mine) == 16 and tokenizer_fingerprint(AutoTokenizer.from_pretrained(resaved)) == mine
    other = other_tokenizer(tiny_model, tmp_path / "other")
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(other)) != mine


def test_retrain_refuses_another_tokenizer_from_the_fingerprint_recorded_with_the_rollouts(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from recpipe.generate.rollouts import tokenizer_fingerprint

    base = shutil.copytree(tiny_model, tmp_path / "base-a")
    store = tmp_path / "store"
    small = ["generate.backend=hf", "generate.group_size=2", "generate.max_tokens=4", "generate.shard_size=2"]
    cfg = load_config(overrides=[f"store={store}", "run=a", f"model.name={base}", *small])
    with LoopRecipe(cfg) as recipe:
        assert recipe.generate(0, prompts=2) == 4
    recorded = Store(store).read("rollouts", "run = 'a'").column("generator").to_pylist()
    theirs = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_model))
    assert {g["tokenizer"] for g in recorded} == {theirs}
    shutil.rmtree(base)  # the rollouts' base model is gone: the check needs only what the archive recorded

    other = other_tokenizer(tiny_model, tmp_path / "other")
    ours = tokenizer_fingerprint(AutoTokenizer.from_pretrained(other))
    cfg = load_config(overrides=[f"store={store}", "run=b", f"model.name={other}", *small])
    with LoopRecipe(cfg) as recipe, pytest.raises(TokenizerMismatch) as refused:
        recipe.retrain("a")
    message = str(refused.value)
    assert isinstance(refused.value, RecpipeError)
    assert f"run 'a''s rollouts are token ids of tokenizer {theirs} (a: {base})" in message, message
    assert f"run 'b' ({other}) has another tokenizer, {ours}" in message
    assert "train from a model with the same tokenizer" in message  # base-a is gone: no --model hint
    assert Store(store).read("policies", "run = 'b'").num_rows == 0  # refused before anything of run b
    same = load_config(overrides=[f"store={store}", "run=b", f"model.name={tiny_model}", *small])
    with LoopRecipe(same) as recipe, pytest.raises(ValueError, match="no recorded batches"):
        recipe.retrain("a")  # the same tokenizer at another path passes (and then finds nothing to replay)


def test_retrain_plan_refuses_a_source_run_without_recorded_batches(tiny_model, tmp_path):
    from recpipe.errors import OptionError
    from recpipe.recipe import retrain_plan

    store = Store.create(tmp_path / "store")
    Trainer(store, "a", tiny_model).setup().close()  # run a exists (version 0) but never trained
    cfg = RecpipeConfig(store=str(tmp_path / "store"), run="b")
    with pytest.raises(OptionError, match=r"--from-run 'a': that run has no recorded batches"):
        retrain_plan(cfg, "a", steps_given=False, model_given=False)


def test_compact_at_the_end_of_a_run_merges_each_of_its_versions_and_nothing_else(tiny_model, tmp_path):
    from tests.support import synthetic_rollouts

    store = Store.create(tmp_path / "store")
    for run, version, shards in (("a", 0, 3), ("a", 1, 1), ("b", 0, 2)):
        for i in range(shards):
            shard = f"{run}{version}s{i}"
            store.append_rollouts(synthetic_rollouts(run=run, policy_version=version, shard_id=shard, seed=i),
                                  shard_id=shard)
    before = {t: store.read(t).sort_by("group_id") for t in ("rollouts", "groups")}
    cfg = RecpipeConfig(store=str(tmp_path / "store"), run="a", model={"name": str(tiny_model)})
    with LoopRecipe(cfg) as recipe:
        recipe.compact()
    store = Store(tmp_path / "store")
    for table in ("rollouts", "groups"):
        files = {}
        for f in store.snapshot(table).files:
            files.setdefault((f.values["run"], f.values["policy_version"]), []).append(f.shard_id)
        assert files == {("a", 0): [None], ("a", 1): ["a1s0"], ("b", 0): ["b0s0", "b0s1"]}, table  # None: merged
        assert store.read(table).sort_by("group_id").equals(before[table]), table
