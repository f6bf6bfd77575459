"""A served deployment on a short interval, against a real local Prefect server, runs by itself."""

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from recpipe.store import Store
from tests.flows.flowtools import recpipe_cmd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"{what}: process exited early with {proc.returncode}")
        if predicate():
            return
        time.sleep(1)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def rollouts(store) -> int:
    try:
        return Store(store).connect().execute("SELECT count(*) FROM rollouts").fetchone()[0]
    except Exception:  # not created yet
        return 0


def test_served_deployment_runs_on_its_schedule(tmp_path, tiny_model, run_recpipe):
    env = dict(run_recpipe.env)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env["PREFECT_API_URL"] = api
    env["PREFECT_SERVER_API_HOST"] = "127.0.0.1"
    env["PREFECT_SERVER_API_PORT"] = str(port)
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}"
    logs = tmp_path / "logs"
    logs.mkdir()
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "prefect"), "server", "start",
                               "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)  # noqa: SIM115
    served = None
    try:
        wait_for(lambda: healthy(api), 180, "the Prefect server", [server])
        store = tmp_path / "store"
        served = subprocess.Popen(
            recpipe_cmd("serve", "--flow", "generate", "--interval", "5", "--store", str(store),
                        "--set", f"model.name={tiny_model}", "--set", "generate.backend=hf",
                        "--set", "generate.max_tokens=4", "--set", "select.groups_per_step=2",
                        "--set", "generate.group_size=2"),
            env=env, stdout=open(logs / "serve.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)  # noqa: SIM115
        wait_for(lambda: rollouts(store) > 0, 300, "a scheduled generate run to write rollouts", [served, server])
        assert rollouts(store) == 4  # 2 groups x 2 samples; later scheduled runs skip the committed shards
    finally:
        for proc in (served, server):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, 15)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
