"""The loop flow end to end (issue: every trained batch has the staleness the schedule dictates)."""

import os
import signal
import subprocess
import time

from recpipe.algorithms import behaviour_version
from tests.flows.flowtools import SMALL, SMALL_HF, recpipe_cmd, sql_rows


def check_run(store, run, steps, k, o):
    # Every trained batch comes from the version the schedule dictates.
    rows = sql_rows(store, f"SELECT step, min(policy_version), max(policy_version), count(*) FROM batches "
                        f"WHERE run = '{run}' GROUP BY step ORDER BY step")
    assert [r[0] for r in rows] == list(range(steps))
    for step, vmin, vmax, n in rows:
        assert vmin == vmax == behaviour_version(step, k, o), (step, vmin, vmax)
        assert n == 2 * 4  # groups_per_step x group_size
    # Lineage references existing rollouts, none twice within a run.
    assert sql_rows(store, f"SELECT count(*) FROM batches b ANTI JOIN rollouts r USING (rollout_id) WHERE b.run = '{run}'") == [(0,)]
    assert sql_rows(store, f"SELECT count(*) - count(DISTINCT rollout_id) FROM batches WHERE run = '{run}'") == [(0,)]
    assert sql_rows(store, "SELECT count(*) - count(DISTINCT rollout_id) FROM rollouts") == [(0,)]
    # Versions advance one per step; steps are neither lost nor repeated.
    assert sql_rows(store, f"SELECT list(version ORDER BY version) FROM policies WHERE run = '{run}'") == [(list(range(steps + 1)),)]
    assert sql_rows(store, f"SELECT list(step ORDER BY step), bool_and(applied) FROM steps WHERE run = '{run}'") == [(list(range(steps)), True)]
    assert sql_rows(store, f"SELECT list(policy_version ORDER BY step) FROM steps WHERE run = '{run}'") == [(list(range(1, steps + 1)),)]
    # Every metric of algorithms.md is there and finite.
    metrics = sql_rows(store, f"SELECT count(*) FROM steps WHERE run = '{run}' AND isfinite(loss) AND clip_fraction IS NOT NULL "
                           "AND ratio_mean IS NOT NULL AND mismatch IS NOT NULL AND entropy IS NOT NULL")
    assert metrics == [(steps,)]


def test_loop_follows_the_schedule(tmp_path, tiny_model, run_recpipe):
    store = tmp_path / "store"
    result = run_recpipe("loop", "--store", str(store), "--model", str(tiny_model), "--steps", "5",
                         "--sync-interval", "2", "--sync-offset", "1", "--preset", "rec-oneside-nois", *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    check_run(store, "default", steps=5, k=2, o=1)
    # The data for one version was generated once, by that version's weights, with vLLM.
    assert sql_rows(store, "SELECT DISTINCT generator.backend FROM rollouts") == [("vllm",)]
    assert sql_rows(store, "SELECT list(DISTINCT policy_version ORDER BY policy_version) FROM rollouts") == [([0, 2],)]  # v(s) for s = 0..4 with k=2, o=1: 0 0 0 2 2
    assert sql_rows(store, "SELECT count(*) FROM evals WHERE run = 'default'")[0][0] >= 2
    assert "rewards per policy version" in result.stdout + result.stderr

    # One more batch by hand, without --model (the run keeps its base model): the replay query may reuse
    # groups; its lineage lands in `batches` and is queryable with `recpipe sql`.
    chosen = run_recpipe("select", "--store", str(store), "--query", "replay", "--step", "5", "--param", "runs=[default]",
                          "--set", "select.groups_per_step=2")
    assert chosen.returncode == 0, chosen.stderr[-3000:]
    assert "groups: 2" in chosen.stdout and "query: replay" in chosen.stdout
    lineage = run_recpipe("sql", "--store", str(store), "--format", "csv",
                          "SELECT query_name, count(*) AS n FROM batches WHERE step = 5 GROUP BY 1")
    assert lineage.returncode == 0, lineage.stderr[-3000:]
    assert lineage.stdout.splitlines() == ["query_name,n", "replay,8"]


def test_killed_loop_resumes_without_duplicates(tmp_path, tiny_model, run_recpipe):
    store = tmp_path / "store"
    args = ["loop", "--store", str(store), "--model", str(tiny_model), "--steps", "6", "--sync-interval", "1",
            "--preset", "grpo", *SMALL_HF]  # two engine starts: transformers 0.3 s, vLLM ~5 s (BENCHMARKS.md) and its import
    proc = subprocess.Popen(recpipe_cmd(*args), env=run_recpipe.env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done = sql_rows(store, "SELECT count(*) FROM steps")[0][0]
        except Exception:  # store not created yet, or a file mid-commit in another table
            done = 0
        if done >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the loop ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 2 <= sql_rows(store, "SELECT count(*) FROM steps")[0][0] < 6
    result = run_recpipe(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    check_run(store, "default", steps=6, k=1, o=0)
    assert not list(store.rglob("*.tmp"))
