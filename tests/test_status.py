"""``recpipe status``, ``recpipe --version`` and what evaluate says about a version retention removed."""

from __future__ import annotations

import datetime as dt
import json
import shutil

from typer.testing import CliRunner

import recpipe
from recpipe import cli
from recpipe.cli import app
from recpipe.schema import SCHEMA_VERSION, table_schema
from recpipe.store import Store
from tests.support import synthetic_rollouts
from tests.test_export import make_store


def steps_row(run: str, step: int, staleness: float, applied: bool = True) -> dict:
    row = {f.name: None for f in table_schema("steps")}
    return row | {"run": run, "step": step, "policy_version": step + 1, "applied": applied, "preset": "grpo",
                  "staleness_mean": staleness, "loss": 0.5 - step / 10, "tokens": 100, "seconds": 1.0, "created_at": dt.datetime.now(dt.UTC),
                  "schema_version": SCHEMA_VERSION}


def eval_row(run: str, version: int, accuracy: float) -> dict:
    return {"run": run, "policy_version": version, "task": "arithmetic", "split": "test", "accuracy": accuracy,
            "reward_mean": accuracy, "n": 4, "created_at": dt.datetime.now(dt.UTC), "schema_version": SCHEMA_VERSION}


def test_status_lists_each_run(monkeypatch, tmp_path, tiny_model):
    store = make_store(Store.create(tmp_path / "store"), tiny_model, versions=3)  # run "r": v0..v3
    store.append_rollouts(synthetic_rollouts(run="r", shard_id="r0"), shard_id="r0")
    store.append_rollouts(synthetic_rollouts(run="other", shard_id="o0", groups=3), shard_id="o0")
    for step, staleness in enumerate([0.0, 2.0, 1.0]):
        store.append("steps", [steps_row("r", step, staleness)], shard_id=f"step-{step:06d}")
    store.append("evals", [eval_row("r", 0, 0.25)], shard_id="e0")
    store.append("evals", [eval_row("r", 2, 0.75)], shard_id="e2")
    shutil.rmtree(store.checkpoint_dir("r", 1))  # retention
    runner = CliRunner()
    with store.lock("other", "loop"):
        result = runner.invoke(app, ["status", "--store", str(store.root), "--format", "json"])
        monkeypatch.setattr(cli.out, "width", 250)  # the CLI's console was sized when it was imported
        table = runner.invoke(app, ["status", "--store", str(store.root)])
    assert result.exit_code == 0, result.output
    runs = {r["run"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert sorted(runs) == ["other", "r"]
    r, other = runs["r"], runs["other"]
    assert (r["steps"], r["steps_applied"], r["last_step"], r["latest_version"], r["versions"]) == (3, 3, 2, 3, 4)
    assert r["on_disk"] == [2, 3] and r["rollouts"] == 8 and other["rollouts"] == 12
    assert (r["eval_version"], r["accuracy"], r["eval_n"], r["evals"]) == (2, 0.75, 4, 2)
    assert (r["lag"], r["max_lag"]) == (1.0, 2.0) and r["model"] == str(tiny_model)
    assert r["held_by"] is None and other["held_by"].startswith("loop by ")
    assert other["steps"] is None and other["on_disk"] == []
    assert table.exit_code == 0, table.output
    assert "v2: 0.750 (n=4)" in table.stdout and "3/3 (last 2)" in table.stdout and "v2, v3" in table.stdout
    assert "running (loop by" in table.stdout and "idle" in table.stdout and "None" not in table.stdout


def test_version_option():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"recpipe {recpipe.__version__}"


def test_evaluate_says_retention_removed_the_version(tmp_path, tiny_model):
    store = make_store(Store.create(tmp_path / "store"), tiny_model, versions=3)
    shutil.rmtree(store.checkpoint_dir("r", 1))
    result = CliRunner().invoke(app, ["evaluate", "--store", str(store.root), "--run", "r", "--version", "1",
                                      "--set", "generate.backend=hf"])
    assert result.exit_code == 2, result.output
    assert "version 1 was trained (step 0) but retention removed its checkpoint" in result.stderr
    assert "versions still on disk: 2, 3" in result.stderr and "config.json" not in result.stderr
    ahead = CliRunner().invoke(app, ["evaluate", "--store", str(store.root), "--run", "r", "--version", "9",
                                     "--set", "generate.backend=hf"])
    assert ahead.exit_code == 2 and "has no version 9: it is at version 3" in ahead.stderr
