"""Generators and trainer as separate processes over one archive (recpipe.roles, `recpipe loop --generators`)."""

import os
import signal
import subprocess
import time

from flowtools import SMALL_HF, recpipe_cmd, sql_rows
from test_loop_e2e import check_run

from recpipe.store import Store

# One thread everywhere: the single-process reference and the workers then sample bit-identically.
ONE_THREAD = ["--set", "train.threads=1"]
SCHEDULE = ["--steps", "6", "--sync-interval", "2", "--sync-offset", "1", "--preset", "rec-oneside-nois"]


def rollouts(store):
    return sql_rows(store, "SELECT rollout_id, policy_version, response_token_ids FROM rollouts ORDER BY rollout_id")


def test_two_generators_and_a_trainer_follow_the_schedule_and_write_the_loops_rollout_ids(
        tmp_path, tiny_model, run_recpipe):
    run_recpipe.env["OMP_NUM_THREADS"] = "1"
    common = ["--model", str(tiny_model), *SCHEDULE, *SMALL_HF, *ONE_THREAD]
    split = run_recpipe("loop", "--store", str(tmp_path / "split"), *common, "--generators", "2",
                        "--generator-devices", "0,1", "--trainer-devices", "1")
    assert split.returncode == 0, split.stderr[-3000:]
    check_run(tmp_path / "split", "default", steps=6, k=2, o=1)
    # Each shard was generated once, by one of the worker processes (shard claims), never ahead of the schedule:
    # versions 0, 2 and 4 only (v(s) for s = 0..5 with k=2, o=1), and v4 only once the trainer committed it.
    assert sql_rows(tmp_path / "split", "SELECT list(DISTINCT policy_version ORDER BY policy_version) FROM rollouts") \
        == [([0, 2, 4],)]
    claims = sql_rows(tmp_path / "split", "SELECT count(DISTINCT purpose), count(DISTINCT pid) FROM leases "
                                         "WHERE purpose LIKE 'shard-%'")
    shards = sql_rows(tmp_path / "split", "SELECT count(DISTINCT shard_id) FROM rollouts")[0][0]
    assert claims[0][0] == shards and claims[0][1] >= 1

    single = run_recpipe("loop", "--store", str(tmp_path / "single"), *common)
    assert single.returncode == 0, single.stderr[-3000:]
    split_rows, single_rows = rollouts(tmp_path / "split"), rollouts(tmp_path / "single")
    # The same ids, versions and token ids: same weights, seeds, one thread, and the schedule takes a
    # version's groups in id order, whichever worker committed its shard first.
    assert split_rows == single_rows


HELD_CLAIM = """
SELECT (SELECT count(*) FROM rollouts) > 0 AND count(*) > 0 FROM (
    SELECT purpose FROM leases WHERE purpose LIKE 'shard-%' GROUP BY purpose HAVING NOT bool_or(released)
) AS held WHERE substr(purpose, 7) NOT IN (SELECT shard_id FROM rollouts)
"""


def test_a_generator_killed_mid_shard_leaves_it_to_another(tmp_path, tiny_model, run_recpipe):
    store = tmp_path / "store"
    common = ["--store", str(store), "--model", str(tiny_model), *SCHEDULE, *SMALL_HF,
              "--set", "generate.max_tokens=64", "--set", "generate.shard_size=1"]
    # No trainer: the generators can only produce version 0's shards (steps 0..2), then they are idle.
    first = subprocess.Popen(recpipe_cmd("generator", *common), env=run_recpipe.env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and first.poll() is None:
            if Store.exists(store) and sql_rows(store, HELD_CLAIM)[0][0]:
                break  # one shard is in, and the worker holds the claim of another it is generating
            time.sleep(0.1)
        assert first.poll() is None, "the generator ended before it could be killed"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    done = sql_rows(store, "SELECT count(DISTINCT shard_id) FROM rollouts")[0][0]
    claimed = sql_rows(store, "SELECT count(DISTINCT purpose) FROM leases WHERE purpose LIKE 'shard-%'")[0][0]
    assert claimed > done, "the kill should have landed while a shard was claimed"
    # Another worker takes the killed one's claim (same host, the holder is gone) and finishes v0.
    second = run_recpipe("generator", *common, "--exit-when-idle")
    assert second.returncode == 0, second.stderr[-3000:]
    groups = 3 * 2  # steps 0..2 train on v0, 2 groups each
    assert sql_rows(store, "SELECT count(*), count(DISTINCT rollout_id), count(DISTINCT group_id) FROM rollouts") \
        == [(groups * 4, groups * 4, groups)]
    assert sql_rows(store, "SELECT list(DISTINCT policy_version) FROM rollouts") == [([0],)]
