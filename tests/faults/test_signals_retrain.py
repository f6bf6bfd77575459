"""SIGTERM stops a running `retrain` within seconds (issue 17 measured 33 s), its lock released, and the
same command resumes it with every step once."""

import os
import signal
import subprocess
import time

from recpipe.config import load_config
from recpipe.recipe import LoopRecipe
from recpipe.store import Store
from tests.flows.flowtools import SMALL_HF, committed_steps, recpipe_cmd, recpipe_env, sql_rows

STEPS = 4
STOP_WITHIN_S = 15  # measured 1.1-1.5 s on 2 busy cores (load 7)


# ~60 s idle, 130 s at load 7: a source run, a retrain stopped and resumed
def test_sigterm_stops_a_retrain_and_it_resumes(tmp_path, tiny_model, prefect_api):
    store = tmp_path / "store"
    overrides = [item for item in SMALL_HF if item != "--set"]
    source = load_config(overrides=[f"store={store}", f"model.name={tiny_model}", f"loop.steps={STEPS}", *overrides])
    with LoopRecipe(source) as recipe:  # the source run, in this process (no Prefect): its batches are recorded
        recipe.run()
    cmd = recpipe_cmd("retrain", "--store", str(store), "--from-run", "default", "--run", "re", *SMALL_HF)
    env = recpipe_env(tmp_path, prefect_api)
    with open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not committed_steps(store, "re"):
            assert proc.poll() is None, (tmp_path / "err.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "retrain committed no step"
            time.sleep(0.2)
        sent = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=STOP_WITHIN_S)
        print(f"SIGTERM to exit (retrain): {time.monotonic() - sent:.1f} s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = (tmp_path / "err.txt").read_text()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("stopped by SIGTERM"), err[-3000:]
    Store(store).lock("re", "test").acquire().release()  # the run's lock is free
    done = sql_rows(store, "SELECT count(*) FROM steps WHERE run = 're'")[0][0]
    assert 1 <= done < STEPS
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sql_rows(store, "SELECT count(*), count(DISTINCT step), min(step), max(step) FROM steps "
                           "WHERE run = 're'") == [(STEPS, STEPS, 0, STEPS - 1)]
