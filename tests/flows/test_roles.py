"""Generators and trainer as separate processes over one archive (recpipe.roles, `recpipe loop --generators`)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from recpipe.store import Store
from tests.flows.flowtools import SMALL_HF, recpipe_cmd, recpipe_env, sql_rows
from tests.flows.test_loop_e2e import check_run

# One thread everywhere: the single-process reference and the workers then sample bit-identically.
ONE_THREAD = ["--set", "train.threads=1"]
SCHEDULE = ["--steps", "6", "--sync-interval", "2", "--sync-offset", "1", "--preset", "rec-oneside-nois"]


def rollouts(store):
    return sql_rows(store, "SELECT rollout_id, policy_version, response_token_ids FROM rollouts ORDER BY rollout_id")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, prefect_api):
    """What the single-process loop writes for the config every test here runs: (common args, rollouts)."""
    tmp = tmp_path_factory.mktemp("single")
    env = {**recpipe_env(tmp, prefect_api), "OMP_NUM_THREADS": "1"}
    common = ["--model", str(tiny_model), *SCHEDULE, *SMALL_HF, *ONE_THREAD]
    single = subprocess.run(recpipe_cmd("loop", "--store", str(tmp / "store"), *common), capture_output=True,
                            text=True, env=env, timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    return common, rollouts(tmp / "store")


def check_split_run(store, reference_rows):
    """A run made by generator workers and a trainer: the schedule's staleness, no rollout twice, and the
    single-process loop's rollout ids, versions and token ids."""
    check_run(store, "default", steps=6, k=2, o=1)
    # Versions 0, 2 and 4 only (v(s) for s = 0..5 with k=2, o=1): nothing the schedule does not use.
    assert sql_rows(store, "SELECT list(DISTINCT policy_version ORDER BY policy_version) FROM rollouts") == [([0, 2, 4],)]
    # Each shard was claimed once and generated once (shard claims); none ahead of its version's commit:
    # a shard of v4 committed after v4's policies row.
    claims = sql_rows(store, "SELECT count(DISTINCT purpose) FROM leases WHERE purpose LIKE 'shard-%'")[0][0]
    assert claims == sql_rows(store, "SELECT count(DISTINCT shard_id) FROM rollouts")[0][0]
    early = sql_rows(store, "SELECT count(*) FROM groups g JOIN policies p ON p.run = g.run AND p.version = "
                            "g.policy_version WHERE g.policy_version > 0 AND g.created_at < p.created_at")
    assert early == [(0,)]
    # The same ids, versions and token ids: same weights, seeds, one thread, and the schedule takes a
    # version's groups in id order, whichever worker committed its shard first.
    assert rollouts(store) == reference_rows


def kill_9_when(proc, ready, what, *, timeout_s, poll_s, store):
    """SIGKILL ``proc``'s process group as soon as ``ready()`` holds on the store (once the store exists),
    failing if ``proc`` ended before it could be killed."""
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None:
            if Store.exists(store) and ready():
                break
            time.sleep(poll_s)
        assert proc.poll() is None, f"{what} ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_two_generator_processes_and_a_trainer_write_the_loops_rollouts(tmp_path, reference, run_recpipe):
    common, expected = reference
    run_recpipe.env["OMP_NUM_THREADS"] = "1"
    split = run_recpipe("loop", "--store", str(tmp_path / "split"), *common, "--generators", "2",
                        "--generator-devices", "0,1", "--trainer-devices", "1")
    assert split.returncode == 0, split.stderr[-3000:]
    check_split_run(tmp_path / "split", expected)
    pids = sql_rows(tmp_path / "split", "SELECT count(DISTINCT pid) FROM leases WHERE purpose LIKE 'shard-%'")
    assert pids[0][0] >= 1


def test_generator_actors_on_a_local_ray_cluster_write_the_loops_rollouts(tmp_path, reference, run_recpipe):
    common, expected = reference
    run_recpipe.env["OMP_NUM_THREADS"] = "1"
    ray_run = run_recpipe("loop", "--store", str(tmp_path / "ray"), *common, "--generators", "2", "--ray", "local")
    assert ray_run.returncode == 0, ray_run.stderr[-3000:]
    check_split_run(tmp_path / "ray", expected)
    # The shards were generated in the actors' processes, not the trainer's (the loop lease's holder).
    trainer_pid = sql_rows(tmp_path / "ray", "SELECT any_value(pid) FROM leases WHERE purpose = 'loop'")[0][0]
    worker_pids = sql_rows(tmp_path / "ray", "SELECT list(DISTINCT pid) FROM leases WHERE purpose LIKE 'shard-%'")
    assert trainer_pid not in worker_pids[0][0]


def test_the_trainer_killed_mid_run_restarts_while_a_generator_keeps_going(tmp_path, reference, run_recpipe):
    common, expected = reference
    store = tmp_path / "store"
    run_recpipe.env["OMP_NUM_THREADS"] = "1"
    args = ["--store", str(store), *common]
    generator = subprocess.Popen(recpipe_cmd("generator", *args), env=run_recpipe.env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        trainer = subprocess.Popen(recpipe_cmd("trainer", *args), env=run_recpipe.env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        kill_9_when(trainer, lambda: sql_rows(store, "SELECT count(*) FROM steps")[0][0] >= 2, "the trainer",
                    timeout_s=600, poll_s=0.2, store=store)
        trained = sql_rows(store, "SELECT count(*) FROM steps")[0][0]
        assert 2 <= trained < 6
        time.sleep(2)
        assert generator.poll() is None, "the generator should keep going while the trainer is down"
        again = run_recpipe("trainer", *args)  # the same host: the dead trainer's lease is free at once
        assert again.returncode == 0, again.stderr[-3000:]
        assert generator.wait(timeout=120) == 0, generator.stderr.read()[-3000:]  # it ends once all steps are in
    finally:
        if generator.poll() is None:
            os.killpg(generator.pid, signal.SIGKILL)
            generator.wait()
    check_split_run(store, expected)


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
    # Killed once one shard is in and the worker holds the claim of another it is generating.
    kill_9_when(first, lambda: sql_rows(store, HELD_CLAIM)[0][0], "the generator", timeout_s=300, poll_s=0.1,
                store=store)
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


ROLES_AS_FLOWS = """
import json, sys, threading
from flows.pipeline_flows import generator, trainer
from recpipe.config import load_config, to_params

cfg = to_params(load_config(overrides=sys.argv[1:]))
worker = threading.Thread(target=generator, args=(cfg,))
worker.start()
try:
    trainer(cfg, wait_timeout_s=600)
finally:  # a trainer error must be the last traceback on stderr, not the generator's at interpreter exit
    worker.join()

from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    flows = {f.id: f.name for f in client.read_flows()}
    runs = [flows[r.flow_id] for r in client.read_flow_runs() if r.state.is_completed()]
    tasks = [t.name for t in client.read_task_runs() if t.state.is_completed()]
print(json.dumps({"flow_runs": runs, "task_runs": tasks}))
"""


def test_the_roles_run_as_prefect_flows_with_a_task_run_per_shard_and_step(tmp_path, tiny_model, prefect_api):
    env = recpipe_env(tmp_path, prefect_api)
    overrides = [f"store={tmp_path / 'store'}", "run=flows", f"model.name={tiny_model}", "loop.steps=2",
                 "loop.sync_interval=1", "loop.sync_offset=1", "generate.backend=hf", "select.groups_per_step=2",
                 "generate.group_size=4", "generate.max_tokens=8", "generate.shard_size=1", "task.eval_prompts=4"]
    done = subprocess.run([sys.executable, "-c", ROLES_AS_FLOWS, *overrides], capture_output=True, text=True,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"generator", "trainer"} <= set(seen["flow_runs"])
    # v(s) = max(0, s - 1) for s = 0, 1: both steps train on v0, 2 groups each, one group per shard.
    assert {f"generate v0 shard {i}" for i in range(4)} <= set(seen["task_runs"])
    assert {"train step 0", "train step 1", "select step 0", "select step 1"} <= set(seen["task_runs"])
    check = sql_rows(tmp_path / "store", "SELECT list(step ORDER BY step) FROM steps WHERE run = 'flows'")
    assert check == [([0, 1],)]
