"""Faults 1, 2 and 4 with real processes: kill -9 during generation, two writers on one run."""

import contextlib
import os
import signal
import subprocess
import time

from recpipe.store import Store
from tests.flows.flowtools import SMALL_HF, recpipe_cmd, recpipe_env


def count(store, sql):
    try:
        return Store(store).connect().execute(sql).fetchone()[0]
    except Exception:  # not created yet
        return 0


def wait_until(predicate, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def rows(store, sql):
    con = Store(store).connect()
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_generation_killed_mid_run_then_rerun_commits_each_rollout_once(tmp_path, tiny_model, prefect_api):
    env = recpipe_env(tmp_path, prefect_api)
    store = tmp_path / "store"
    # 20 shards of 2 prompts x 4 samples: the kill lands right after the first shard's commit, while
    # later shards are being sampled or written.
    prompts, per_shard = 40, 2 * 4
    args = ["generate", "--store", str(store), "--model", str(tiny_model), "--prompts", str(prompts), *SMALL_HF,
            "--set", "generate.max_tokens=24"]
    proc = subprocess.Popen(recpipe_cmd(*args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    first_commit = store / "rollouts" / "_delta_log" / f"{1:020d}.json"  # version 0 is the empty table
    try:
        assert wait_until(first_commit.exists, proc, timeout=300), "generation ended before it could be killed"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"generation ended by itself (rc {proc.returncode})"
    # What the kill leaves: whole shards only (at least the first), each rollout once, and the group
    # summaries of every shard but at most the last (a kill between a shard's two commits).
    shards = rows(store, "SELECT shard_id, count(*), count(DISTINCT rollout_id) FROM rollouts GROUP BY 1")
    assert shards and all(n == per_shard and distinct == n for _, n, distinct in shards), shards
    assert len(shards) < prompts // 2
    unsummarised = rows(store, "SELECT DISTINCT shard_id FROM rollouts ANTI JOIN groups USING (group_id)")
    assert len(unsummarised) <= 1, unsummarised
    kept = rows(store, "SELECT rollout_id, response_text, reward FROM rollouts")
    kept_files = set(Store(store).files("rollouts"))
    result = subprocess.run(recpipe_cmd(*args), env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert count(store, "SELECT count(*) FROM rollouts") == prompts * 4
    assert count(store, "SELECT count(DISTINCT rollout_id) FROM rollouts") == prompts * 4
    assert count(store, "SELECT count(*) FROM groups") == prompts
    assert count(store, "SELECT count(*) FROM rollouts r ANTI JOIN groups g USING (group_id)") == 0
    # The rerun kept what was committed before the kill: the same files, the same rows.
    assert kept_files <= set(Store(store).files("rollouts"))
    assert set(kept) <= set(rows(store, "SELECT rollout_id, response_text, reward FROM rollouts"))
    # A temp file the killed writer left is invisible to readers; doctor removes it and then finds nothing.
    doctor = subprocess.run(recpipe_cmd("doctor", "--store", str(store), "--repair"), env=env, capture_output=True,
                            text=True)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert not list(store.rglob("*.tmp"))


def test_second_loop_on_the_same_run_is_refused(tmp_path, tiny_model, prefect_api):
    env = recpipe_env(tmp_path, prefect_api)
    store = tmp_path / "store"
    args = ["loop", "--store", str(store), "--model", str(tiny_model), *SMALL_HF]
    # The first loop has far more steps than the test needs: it is surely still running when the second starts.
    first = subprocess.Popen(recpipe_cmd(*args, "--steps", "500"), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert wait_until(lambda: count(store, "SELECT count(*) FROM steps") >= 1, first, timeout=300)
        second = subprocess.run(recpipe_cmd(*args, "--steps", "500"), env=env, capture_output=True, text=True,
                                timeout=600)
        assert first.poll() is None, "the first loop should still be running"
        assert second.returncode == 2
        assert (f"run 'default' is being written by another process (loop lease held by pid {first.pid} "
                in second.stderr)
        # Another run in the same store is independent of the first run's lock.
        other = subprocess.run(recpipe_cmd(*args, "--run", "other", "--steps", "1"), env=env, capture_output=True,
                               text=True, timeout=600)
        assert other.returncode == 0, other.stderr[-3000:]
    finally:  # a failed assertion must not leave a 500-step loop running
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # Nothing is corrupted: the archive checks clean, and the run continues where the first loop stopped.
    done = count(store, "SELECT count(*) FROM steps WHERE run = 'default'")
    doctor = subprocess.run(recpipe_cmd("doctor", "--store", str(store), "--repair"), env=env, capture_output=True,
                            text=True)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    again = subprocess.run(recpipe_cmd(*args, "--steps", str(done + 1)), env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert count(store, "SELECT count(DISTINCT step) FROM steps WHERE run = 'default'") == done + 1
    assert count(store, "SELECT count(*) FROM steps WHERE run = 'default'") == done + 1
    assert count(store, "SELECT count(*) - count(DISTINCT rollout_id) FROM rollouts") == 0
