"""Issue 19, item 4: retention must keep what a longer run with the same schedule samples from."""

import shutil
import subprocess

import pytest

from tests.flows.flowtools import SMALL_HF, recpipe_cmd, recpipe_env, sql_rows
from tests.flows.test_loop_e2e import check_run

SCHEDULE = ["--sync-interval", "2", "--sync-offset", "1", "--preset", "rec-oneside-nois"]


def loop(run_recpipe, store, tiny_model, steps):
    return run_recpipe("loop", "--store", str(store), "--model", str(tiny_model), "--steps", str(steps),
                       *SCHEDULE, *SMALL_HF)


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory, tiny_model, prefect_api):
    """The store of one 3-step loop, made once: each test extends a copy of it."""
    tmp = tmp_path_factory.mktemp("three-steps")
    store = tmp / "store"
    first = subprocess.run(recpipe_cmd("loop", "--store", str(store), "--model", str(tiny_model), "--steps", "3",
                                       *SCHEDULE, *SMALL_HF), capture_output=True, text=True,
                           env=recpipe_env(tmp, prefect_api), timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    return store


def test_a_loop_extended_to_more_steps_finds_the_versions_it_samples_from(tmp_path, tiny_model, run_recpipe,
                                                                          three_steps):
    # v(s) for k=2, o=1: 0 0 0 2 2 4. The 3-step call must keep v2 although none of its own steps uses it.
    store = shutil.copytree(three_steps, tmp_path / "store")
    assert (store / "checkpoints" / "default" / "v000002").is_dir()
    longer = loop(run_recpipe, store, tiny_model, 6)
    assert longer.returncode == 0, longer.stderr[-3000:]
    check_run(store, "default", steps=6, k=2, o=1)
    assert sql_rows(store, "SELECT list(DISTINCT policy_version ORDER BY policy_version) FROM rollouts") == [([0, 2, 4],)]


def test_a_needed_version_that_is_gone_is_named_with_what_to_do(tmp_path, tiny_model, run_recpipe, three_steps):
    store = shutil.copytree(three_steps, tmp_path / "store")
    shutil.rmtree(store / "checkpoints" / "default" / "v000002")  # lost (a disk problem, a user's rm)
    longer = loop(run_recpipe, store, tiny_model, 6)
    assert longer.returncode == 2, longer.stderr[-3000:]
    message = " ".join((longer.stdout + longer.stderr).split())
    assert "no config.json there" not in message
    assert "v000002" in message and "gone" in message
    assert "retrain --from-run default" in message
