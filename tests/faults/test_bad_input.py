"""Faults 5 and 7 through the command line: hostile SQL and bad configs or arguments."""

import hashlib
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from recpipe.cli import app
from recpipe.store import Store
from tests.faults.mounts import read_only
from tests.support import synthetic_rollouts


def recpipe(*args, cwd=None):
    """The CLI in process (fast); one test below runs it as a real subprocess too."""
    here = os.getcwd()
    os.chdir(cwd or here)
    try:
        return CliRunner().invoke(app, list(args))
    finally:
        os.chdir(here)


def snapshot(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = Store.create(tmp_path_factory.mktemp("faults") / "store")
    store.append_rollouts(synthetic_rollouts(shard_id="s"), shard_id="s")
    return store


@pytest.mark.parametrize("query", [
    "DELETE FROM rollouts",
    "COPY rollouts TO '/tmp/recpipe-stolen.csv'",
    "ATTACH '/tmp/recpipe-evil.db'",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT 1; DROP VIEW rollouts",
])
def test_hostile_sql_on_the_command_line(store, query):
    before = snapshot(store.root)
    result = recpipe("sql", "--store", str(store.root), query)
    assert result.exit_code == 2
    assert "error:" in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert snapshot(store.root) == before


def test_hostile_sql_in_a_real_process(store):
    before = snapshot(store.root)
    result = subprocess.run([sys.executable, "-m", "recpipe.cli", "sql", "--store", str(store.root),
                             "COPY rollouts TO '/tmp/recpipe-stolen.csv'"], capture_output=True, text=True)
    assert result.returncode == 2 and "COPY statements are not allowed" in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(store.root) == before


def test_endless_query_is_stopped(store):
    result = recpipe("sql", "--store", str(store.root), "--timeout", "1",
                     "SELECT count(*) FROM range(100000000000) a, range(1000000) b")
    assert result.exit_code == 2 and "time limit" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["loop", "--steps", "0"], "loop.steps: Input should be greater than or equal to 1"),
    (["loop", "--preset", "ppo"], "unknown preset 'ppo'"),
    (["loop", "--set", "train.lr=abc"], "train.lr: Input should be a valid number"),
    (["loop", "--set", "generate.backend=tpu"], "generate.backend"),
    (["loop", "--task", "chess"], "chess"),
    (["loop", "--model", "/nonexistent/model"], "/nonexistent/model"),
    (["loop", "--config", "/nonexistent.yaml"], "does not exist"),
    (["sql", "--format", "xml", "SELECT 1"], "--format must be one of table, csv, json"),
    (["compact", "--table", "nope"], "--table must be one of"),
    (["loop", "--set", "train.betas=[2,3]"], "train.betas.0: Input should be less than 1 (got 2)"),
    (["loop", "--set", "train.betas=[0.9,1.0]"], "train.betas.1: Input should be less than 1 (got 1.0)"),
    (["loop", "--set", "loop.steps=true"], "loop.steps: Input should be a valid integer, not a boolean (got True)"),
    (["loop", "--set", "generate.group_size=false"], "generate.group_size: Input should be a valid integer, not a "
                                                     "boolean (got False)"),
])
def test_bad_arguments_fail_clearly_and_create_nothing(tmp_path, args, message):
    target = tmp_path / "new-store"
    result = recpipe(*args, "--store", str(target), cwd=tmp_path)
    assert result.exit_code == 2
    assert message in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # one line, the error
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not target.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["generate", "--prompts", "0"], "--prompts must be an integer >= 1 (got 0)"),
    (["generate", "--prompts", "-3"], "--prompts must be an integer >= 1 (got -3)"),
    (["generate", "--version", "-1"], "--version must be an integer >= 0 (got -1)"),
    (["train", "--steps", "0"], "--steps must be an integer >= 1 (got 0)"),
    (["select", "--step", "-1"], "--step must be an integer >= 0 (got -1)"),
    (["evaluate", "--version", "-1"], "--version must be an integer >= 0 (got -1)"),
])
def test_bad_numeric_options_are_refused_before_anything_runs(tmp_path, tiny_model, args, message):
    # `generate --prompts 0` used to mean "the default" and wrote 64 rollouts; `train --steps 0` created a store.
    target = tmp_path / "new-store"
    model = [] if args[0] == "select" else ["--model", str(tiny_model)]
    result = recpipe(*args, "--store", str(target), *model, "--set", "generate.backend=hf", cwd=tmp_path)
    assert result.exit_code == 2, result.stdout + result.stderr
    assert result.stderr.strip() == f"error: OptionError: {message}"
    assert not target.exists()


@pytest.mark.parametrize("args", [["compact"], ["doctor", "--repair"]])
def test_read_only_store_is_one_clear_error(tmp_path, args):
    store = Store.create(tmp_path / "store")
    for shard in ("s", "t"):  # two files of one partition: compact has work to do
        store.append_rollouts(synthetic_rollouts(shard_id=shard, seed=len(shard)), shard_id=shard)
    if args[0] == "doctor":  # and so does doctor --repair
        with open(store.files("groups")[0], "r+b") as f:
            f.write(b"damaged!" * 8)
    before = snapshot(store.root)
    with read_only(store.root):
        result = recpipe(*args, "--store", str(store.root))
    assert result.exit_code == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: StoreWriteError: [Errno 30] "), result.stderr
    assert "Read-only file system" in lines[0] and "Traceback" not in result.stderr
    assert snapshot(store.root) == before


def test_loop_on_a_read_only_store_is_one_clear_error(tmp_path, tiny_model, prefect_api):
    from tests.flows.flowtools import SMALL_HF, recpipe_env

    store = Store.create(tmp_path / "store")
    store.append_rollouts(synthetic_rollouts(shard_id="s"), shard_id="s")
    before = snapshot(store.root)
    with read_only(store.root):
        result = subprocess.run([sys.executable, "-m", "recpipe.cli", "loop", "--store", str(store.root), "--model",
                                 str(tiny_model), "--steps", "1", *SMALL_HF], capture_output=True, text=True,
                                env=recpipe_env(tmp_path, prefect_api), timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert (f"error: StoreWriteError: [Errno 30] cannot take the loop lease of run 'default' "
            f"in {store.root}: Read-only file system; nothing was written") in result.stderr
    assert snapshot(store.root) == before


def test_unknown_option_is_a_usage_error(tmp_path):
    result = recpipe("loop", "--stepz", "3", "--store", str(tmp_path / "s"))
    assert result.exit_code == 2 and "No such option" in result.stderr
    assert not (tmp_path / "s").exists()


def test_endless_user_selection_query_is_stopped(store, tmp_path):
    from recpipe.select import select
    from recpipe.store.sql import QueryTimeout

    endless = tmp_path / "endless.sql"
    endless.write_text("SELECT g.run, g.group_id, g.policy_version FROM groups g, range(100000000000) a, "
                       "range(1000000) b WHERE a.range + b.range < 0\n")
    before = snapshot(store.root)
    with pytest.raises(QueryTimeout, match="time limit"):
        select(store, endless, run="r", step=0, groups=1, timeout_s=1.0)
    assert snapshot(store.root) == before
