"""A slow start of Prefect's ephemeral API server (a loaded machine) does not fail a flow."""

import os
import subprocess
import sys
from pathlib import Path

from tests.flows.flowtools import recpipe_env

SLOW_SERVER = Path(__file__).parent / "slow_server"
FLOW = "import flows; from prefect import flow; print('result', flow(name='probe')(lambda: 41 + 1)())"


def test_a_flow_waits_for_an_ephemeral_server_slower_than_prefects_default(tmp_path):
    env = recpipe_env(tmp_path)
    env.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)
    # 25 s: past Prefect's own default wait of 20 s.
    env.update(PYTHONPATH=os.pathsep.join([str(SLOW_SERVER), env.get("PYTHONPATH", "")]),
               RECPIPE_TEST_SERVER_DELAY_S="25")
    done = subprocess.run([sys.executable, "-c", FLOW], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "result 42" in done.stdout
