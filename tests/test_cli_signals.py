"""A stop signal that a library rewraps still stops the command (recpipe.cli.stoppable).

CI once saw a `retrain` answer SIGTERM with exit 1 and a traceback: the signal landed while DuckDB was
reading a Python dataset inside a Prefect task, Prefect's handler raised its TerminationSignal there,
and DuckDB turned it into an InvalidInputException, so neither Prefect nor recpipe knew a signal had
come. The same situation is made here deterministically: the process signals itself from inside a
DuckDB Python UDF that a Prefect flow runs.
"""

import subprocess
import sys
import textwrap

from tests.flows.flowtools import recpipe_env

SCRIPT = textwrap.dedent("""
    import os, signal, time
    import duckdb
    from duckdb.sqltypes import BIGINT
    from prefect import flow
    from recpipe.cli import stoppable

    def signal_self(x):
        os.kill(os.getpid(), signal.{name})
        time.sleep(0.05)  # the Python handler runs here, inside DuckDB's call
        return x

    @flow
    def query():
        con = duckdb.connect()
        con.create_function("signal_self", signal_self, [BIGINT], BIGINT, side_effects=True)
        return con.sql("SELECT signal_self(i) FROM range(1) t(i)").fetchall()  # not a constant: no folding call

    print("finished", stoppable(query)())
""")
# Without the CLI's library_output, Prefect logs to this stderr too (its flow-failure traceback, and an
# exit-time "EventsWorker" line after ours): the stop line is looked for among them, not as the last.


def run_script(tmp_path, prefect_api, name: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT.format(name=name)], env=recpipe_env(tmp_path, prefect_api),
                          capture_output=True, text=True, timeout=300)


def test_sigterm_that_duckdb_rewraps_inside_a_prefect_flow_still_exits_143(tmp_path, prefect_api):
    done = run_script(tmp_path, prefect_api, "SIGTERM")
    assert done.returncode == 143, done.stderr[-3000:]
    assert "finished" not in done.stdout
    assert any(line.startswith("stopped by SIGTERM") for line in done.stderr.splitlines()), done.stderr[-3000:]


def test_sigint_that_duckdb_rewraps_inside_a_prefect_flow_still_exits_130(tmp_path, prefect_api):
    done = run_script(tmp_path, prefect_api, "SIGINT")
    assert done.returncode == 130, done.stderr[-3000:]
    assert any(line.startswith("stopped by SIGINT") for line in done.stderr.splitlines()), done.stderr[-3000:]
