"""The loop recipe's own checks (the loop itself runs end to end in tests/flows)."""

from __future__ import annotations

import json
import shutil

import pytest

from recpipe.config import load_config
from recpipe.models.load import tokenizer_identity
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


def test_tokenizer_identity_ignores_formatting_and_sees_the_vocabulary(tiny_model, tmp_path):
    resaved = shutil.copytree(tiny_model, tmp_path / "resaved")
    spec = json.loads((resaved / "tokenizer.json").read_text())
    (resaved / "tokenizer.json").write_text(json.dumps(dict(reversed(list(spec.items()))), indent=4))
    assert tokenizer_identity(resaved) == tokenizer_identity(tiny_model) is not None
    assert tokenizer_identity(other_tokenizer(tiny_model, tmp_path / "other")) != tokenizer_identity(tiny_model)
    assert tokenizer_identity(tmp_path) is None  # no tokenizer.json: nothing to compare


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
