"""Shared fixtures. Keep this file small: stage-specific fixtures live in their test folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

pytest_plugins = ["tests.s3fixture", "tests.ordering"]  # the real S3 server; longest test files first

# Offline, in-process vLLM with a small KV cache, caches out of the home directory. Set before any test
# module imports vllm or transformers; a value exported by the user wins.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(tempfile.gettempdir(), "recpipe-test-vllm-cache"))


SLOW_FOLDERS = {HERE / "flows", HERE / "faults"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Whole-flow and fault tests are ``slow`` (pyproject.toml's markers); elsewhere a test says so itself."""
    for item in items:
        if SLOW_FOLDERS & set(item.path.resolve().parents):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint (seed 0) with a ChatML tokenizer, built once per session."""
    from recpipe.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


def _torch_process_state() -> dict[str, object]:
    import torch

    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    return {"torch.set_num_threads": torch.set_num_threads, "torch.get_num_threads()": torch.get_num_threads(),
            "torch.get_default_dtype()": torch.get_default_dtype(), "torch.is_grad_enabled()": torch.is_grad_enabled(),
            "mkldnn.matmul.fp32_precision": getattr(matmul, "fp32_precision", None)}


@pytest.fixture(autouse=True)
def no_leaked_torch_state(request):
    """A test (or an engine it starts, even a session-scoped one) must leave torch's process-wide settings as
    it found them: a later test's numerics would otherwise depend on the test order (vLLM's CPU worker, for
    one, turns torch.set_num_threads into a no-op)."""
    before = _torch_process_state()
    yield
    after = _torch_process_state()
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert not changed, f"{request.node.nodeid} changed process-wide torch state: {changed}"


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory):
    """The API URL of a real Prefect server (``prefect server start``), one per test session, for the CLI
    tests' flows: an ephemeral server per command costs ~37 s with a fresh Prefect home. The tests of the
    ephemeral mode itself (tests/faults/test_signals.py, tests/flows/test_prefect_start.py) do not use it."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    home = tmp_path_factory.mktemp("prefect-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}"}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "wb")  # noqa: SIM115 - closed at teardown
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "prefect"), "server", "start",
                               "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 300
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
