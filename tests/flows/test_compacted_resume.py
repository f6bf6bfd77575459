"""A run whose per-step tables were compacted (the loop does it at its end, 8+ files per partition) can
still re-read every recorded step and resume: a step's lineage is found inside the compacted file."""

import subprocess

import pytest

from recpipe.select import recorded_steps, replay_lineage
from recpipe.store import Store
from tests.flows.flowtools import SMALL_HF, recpipe_cmd, recpipe_env, sql_rows
from tests.flows.test_loop_e2e import check_run

STEPS = 10


@pytest.fixture(scope="module")
def compacted(tmp_path_factory, tiny_model, prefect_api):
    """One STEPS-step loop (compacted at its end), what it left, a `select` of step 0, and the same loop
    resumed to STEPS + 2 steps over the compacted files; the tests below share them (two loops of ~10 steps
    each cost a minute on the loaded 2-core machine)."""
    tmp = tmp_path_factory.mktemp("compacted")
    env = recpipe_env(tmp, prefect_api)
    store = tmp / "store"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(recpipe_cmd(*args), capture_output=True, text=True, env=env, timeout=600)

    common = ["--store", str(store), "--model", str(tiny_model), "--no-summary", *SMALL_HF]
    first = run("loop", "--steps", str(STEPS), *common)
    assert first.returncode == 0, first.stderr[-3000:]
    # the active files (the replaced ones stay until vacuum)
    left = {"batches": [f.relative for f in Store(store).snapshot("batches").files],
            "compacted": sorted(p.parts[-3] for p in store.rglob("compact-*.parquet"))}
    again = run("select", "--store", str(store), "--step", "0")  # the reproduction, through the CLI
    resumed = run("loop", "--steps", str(STEPS + 2), *common)
    return store, left, again, resumed


def test_a_compacted_ten_step_run_reselects_every_step_and_resumes(compacted):
    store, left, again, resumed = compacted
    assert [name.rsplit("/", 1)[-1].startswith("compact-") for name in left["batches"]] == [True]  # all 10 steps
    assert again.returncode == 0, again.stderr[-3000:]
    assert "groups: 2" in again.stdout
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    # Every recorded step of the compacted file is re-read (the resumed steps added files of their own).
    archive = Store(store)
    assert recorded_steps(archive, "default") == list(range(STEPS + 2))
    for step in range(STEPS):
        batch = replay_lineage(archive, "default", step)
        recorded = sql_rows(store, f"SELECT list(rollout_id ORDER BY rollout_id) FROM batches WHERE step = {step}")
        assert sorted(batch.rollouts.column("rollout_id").to_pylist()) == recorded[0][0], step

    assert sql_rows(store, "SELECT list(step ORDER BY step) FROM steps") == [(list(range(STEPS + 2)),)]
    assert sql_rows(store, "SELECT count(*) - count(DISTINCT (step, rollout_id)) FROM batches") == [(0,)]


def test_loop_compacts_its_small_tables_and_resumes_over_them(compacted):
    store, left, _, resumed = compacted
    assert left["compacted"] == ["batches", "policies", "steps", "timings", "trained_tokens"]  # >= 8 files each; evals has 2
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    check_run(store, "default", steps=STEPS + 2, k=1, o=0)
