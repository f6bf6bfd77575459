"""Faults 1, 2 and 4 with real processes: kill -9 during generation, two writers on one run."""

import os
import signal
import subprocess
import sys
import time

from recpipe.store import Store

FLOWS_DIR = os.path.join(os.path.dirname(__file__), "..", "flows")
sys.path.insert(0, FLOWS_DIR)
from flowtools import SMALL_HF, recpipe_cmd, recpipe_env  # noqa: E402


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


def test_generation_killed_mid_run_then_rerun_commits_each_rollout_once(tmp_path, tiny_model, prefect_api):
    env = recpipe_env(tmp_path, prefect_api)
    store = tmp_path / "store"
    # 60 shards of 2 prompts: the kill lands while later shards are being sampled or written.
    prompts = 120
    args = ["generate", "--store", str(store), "--model", str(tiny_model), "--prompts", str(prompts), *SMALL_HF,
            "--set", "generate.max_tokens=24"]
    proc = subprocess.Popen(recpipe_cmd(*args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    part = store / "rollouts" / "run=default" / "policy_version=0"
    # Kill while a shard's temp file exists if the poll catches one, else right after the first commit.
    assert wait_until(lambda: part.exists() and (any(part.glob(".*.tmp")) or any(part.glob("*.parquet"))), proc,
                      timeout=300), "generation ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    committed = count(store, "SELECT count(*) FROM rollouts")
    assert 0 <= committed < prompts * 4
    assert count(store, "SELECT count(*) - count(DISTINCT rollout_id) FROM rollouts") == 0
    result = subprocess.run(recpipe_cmd(*args), env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert count(store, "SELECT count(*) FROM rollouts") == prompts * 4
    assert count(store, "SELECT count(DISTINCT rollout_id) FROM rollouts") == prompts * 4
    assert count(store, "SELECT count(*) FROM groups") == prompts
    assert count(store, "SELECT count(*) FROM rollouts r ANTI JOIN groups g USING (group_id)") == 0
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
