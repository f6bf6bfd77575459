"""Ctrl-C, SIGTERM and kill -9 of a running loop, with real processes and real signals (issue 19, item 6).

SIGINT and SIGTERM stop it within seconds (exit 130 / 143, one line, no traceback, lock released) and a
rerun resumes with every step once; the Prefect API server child never outlives recpipe.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from recpipe.store import Store
from tests.flows.flowtools import SMALL, SMALL_HF, committed_steps, recpipe_cmd, recpipe_env, sql_rows

STEPS = 6
STOP_WITHIN_S = 15  # measured 1-4 s on 2 busy cores; the old code never stopped, or died by the signal


def ignore_sigint() -> None:
    """What a shell does to a background job (``recpipe loop &`` in a script): SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def start_loop(tmp_path: Path, *args: str, steps: int = STEPS, preexec=None) -> tuple[subprocess.Popen, list[str]]:
    cmd = recpipe_cmd("loop", "--store", str(tmp_path / "store"), "--steps", str(steps), *args)
    # Its own session: like a terminal's foreground job, a signal to its group reaches only it (and its
    # children), not pytest. Output to files: a full pipe would block the loop.
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.Popen(cmd, env=recpipe_env(tmp_path), stdout=out, stderr=err, start_new_session=True,
                                preexec_fn=preexec)
    return proc, cmd


def prefect_servers(pid: int) -> list[int]:
    """Prefect ephemeral API servers (uvicorn) that are children of ``pid``."""
    found = subprocess.run(["pgrep", "-P", str(pid), "-f", "prefect.server.api.server:create_app"],
                           capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only its parent (init, after recpipe died) reaps it


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the loop ended early (rc {proc.returncode}): {err_text(proc)[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the loop"
        time.sleep(0.1)


def err_text(proc: subprocess.Popen) -> str:
    return Path(proc.args[proc.args.index("--store") + 1]).parent.joinpath("err.txt").read_text()


def steps_committed(store: Path) -> bool:
    return committed_steps(store, "default") > 0


@pytest.fixture
def reap():
    """Prefect server pids the test saw: any still alive at the end is killed (the old code orphaned them)."""
    seen: list[int] = []
    yield seen
    for pid in seen:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def stop_mid_loop(tmp_path: Path, reap: list[int], send, *args: str,
                  preexec=None) -> tuple[subprocess.Popen, list[str], float, list[int]]:
    """Start a loop, let it commit a step, call ``send(proc)``; returns the process, its command, the
    seconds from the signal to its exit, and the Prefect servers it had."""
    proc, cmd = start_loop(tmp_path, *args, preexec=preexec)
    try:
        wait_for(lambda: steps_committed(tmp_path / "store"), proc)
        servers = prefect_servers(proc.pid)
        reap.extend(servers)
        assert servers, "the loop has no Prefect server child"
        sent = time.monotonic()
        send(proc)
        try:
            proc.wait(timeout=STOP_WITHIN_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {STOP_WITHIN_S} s after the signal") from None
        return proc, cmd, time.monotonic() - sent, servers
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(alive(pid) for pid in pids)


def check_stopped_cleanly(tmp_path: Path, proc: subprocess.Popen, cmd: list[str], servers: list[int],
                          name: str) -> None:
    err = err_text(proc)
    assert "Traceback" not in err, err[-3000:]
    stopped = [line for line in err.splitlines() if line.startswith(f"stopped by {name}")]
    assert len(stopped) == 1 and "resume with: recpipe loop --store" in stopped[0], err[-3000:]
    assert "Crash detected" not in err and "error:" not in err, err[-3000:]
    # The run's writer lock is free at once, and the Prefect server went with recpipe.
    Store(tmp_path / "store").lock("default", "test").acquire().release()
    assert gone_within(servers, 5), "the Prefect server outlived recpipe"


def check_resumes(tmp_path: Path, cmd: list[str], api_url: str) -> None:
    """The same command again resumes the run; it reports to the session's Prefect server (the stop is what
    these tests check with an ephemeral server, and a second ephemeral start costs ~37 s)."""
    store = tmp_path / "store"
    done = sql_rows(store, "SELECT count(*) FROM steps WHERE run = 'default'")[0][0]
    assert 1 <= done < STEPS
    again = subprocess.run(cmd, env=recpipe_env(tmp_path, api_url), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sql_rows(store, "SELECT count(*), count(DISTINCT step), min(step), max(step) FROM steps "
                           "WHERE run = 'default'") == [(STEPS, STEPS, 0, STEPS - 1)]
    assert sql_rows(store, "SELECT count(*) - count(DISTINCT rollout_id) FROM rollouts") == [(0,)]
    assert sql_rows(store, "SELECT count(*) - count(DISTINCT (step, rollout_id)) FROM batches") == [(0,)]
    assert sql_rows(store, "SELECT count(*) - count(DISTINCT version) FROM policies WHERE run = 'default'") == [(0,)]


def test_ctrl_c_stops_a_loop_started_with_sigint_ignored_and_it_resumes(tmp_path, tiny_model, reap, prefect_api):
    # Started as a script's background job (SIGINT ignored: the old code ran every step, exit 0); the
    # signal goes to the whole process group as a terminal's Ctrl-C does (the old code's Prefect server
    # died of it, and the loop crashed later).
    proc, cmd, seconds, servers = stop_mid_loop(
        tmp_path, reap, lambda p: os.killpg(p.pid, signal.SIGINT), "--model", str(tiny_model), *SMALL_HF,
        preexec=ignore_sigint)
    print(f"SIGINT to exit: {seconds:.1f} s")
    assert proc.returncode == 130, err_text(proc)[-3000:]
    check_stopped_cleanly(tmp_path, proc, cmd, servers, "SIGINT")
    check_resumes(tmp_path, cmd, prefect_api)


def test_sigterm_stops_a_loop_and_it_resumes(tmp_path, tiny_model, reap, prefect_api):
    # The old code died of the signal itself (Prefect's flow-run SIGTERM handler re-raised it): rc -15,
    # no exit handlers, so its Prefect server was orphaned.
    proc, cmd, seconds, servers = stop_mid_loop(
        tmp_path, reap, lambda p: os.kill(p.pid, signal.SIGTERM), "--model", str(tiny_model), *SMALL_HF)
    print(f"SIGTERM to exit: {seconds:.1f} s")
    assert proc.returncode == 143, err_text(proc)[-3000:]
    check_stopped_cleanly(tmp_path, proc, cmd, servers, "SIGTERM")
    check_resumes(tmp_path, cmd, prefect_api)


def test_sigint_stops_a_vllm_loop(tmp_path, tiny_model, reap):
    proc, cmd, seconds, servers = stop_mid_loop(
        tmp_path, reap, lambda p: os.kill(p.pid, signal.SIGINT), "--model", str(tiny_model), *SMALL,
        "--set", "generate.backend=vllm", preexec=ignore_sigint)
    print(f"SIGINT to exit (vLLM): {seconds:.1f} s")
    assert proc.returncode == 130, err_text(proc)[-3000:]
    check_stopped_cleanly(tmp_path, proc, cmd, servers, "SIGINT")


def test_kill_9_of_recpipe_takes_its_prefect_server_with_it(tmp_path, tiny_model, reap):
    proc, _, _, servers = stop_mid_loop(tmp_path, reap, lambda p: os.kill(p.pid, signal.SIGKILL), "--model",
                                        str(tiny_model), *SMALL_HF)
    assert proc.returncode == -signal.SIGKILL
    assert gone_within(servers, 5), "kill -9 of recpipe orphaned its Prefect server"
