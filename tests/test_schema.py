"""Shard templates of schemas/tables.yaml: a shard id names its rows' values and reads back to them."""

from __future__ import annotations

import datetime as dt

import pytest

from recpipe.schema import SCHEMA_VERSION, table_names, table_spec
from recpipe.store import Store

EXAMPLES = {"batches": {"step": 7}, "steps": {"step": 7}, "trained_tokens": {"step": 7}, "policies": {"version": 12},
            "evals": {"policy_version": 3, "task": "arith-add", "split": "test"}}


def test_every_shard_template_is_covered_here():
    assert {t for t in table_names() if table_spec(t).shard} == set(EXAMPLES)


@pytest.mark.parametrize("table", sorted(EXAMPLES))
def test_a_shard_id_reads_back_to_its_values(table):
    spec = table_spec(table)
    values = EXAMPLES[table]
    shard = spec.shard_id(**values)
    assert spec.shard_filter(shard) == values
    assert all(field in spec.schema.names for field in values)
    assert spec.shard_filter("not-a-shard") is None


def test_an_evals_shard_is_read_back_by_its_id(tmp_path):
    store = Store.create(tmp_path / "store")
    row = {"run": "a", "policy_version": 3, "task": "arith-add", "split": "test", "accuracy": 0.5,
           "reward_mean": 0.5, "n": 10, "created_at": dt.datetime.now(dt.UTC), "schema_version": SCHEMA_VERSION}
    shard = table_spec("evals").shard_id(policy_version=3, task="arith-add", split="test")
    assert store.append("evals", [row], shard_id=shard)
    assert not store.append("evals", [row], shard_id=shard)  # idempotent by the shard id
    other = {**row, "policy_version": 4}
    store.append("evals", [other], shard_id=table_spec("evals").shard_id(policy_version=4, task="arith-add", split="test"))
    assert store.read_shard("evals", {"run": "a"}, shard).column("policy_version").to_pylist() == [3]
