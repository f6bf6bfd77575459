"""Prefect flows: thin wrappers over recpipe.recipe (see flows/pipeline_flows.py).

Importing this package points Prefect's state at recpipe's cache folder
(unless PREFECT_HOME is already set) and runs Prefect in its ephemeral mode
when no server is configured. The ephemeral API server (a uvicorn child
process) is started in its own session, so a Ctrl-C in the terminal reaches
recpipe but not the server, and it is killed by the kernel when its parent
dies, even by kill -9, so none is ever left behind.
"""

from __future__ import annotations

import os
import subprocess
import types
from pathlib import Path
from typing import Any

from recpipe.subprocesses import die_with_parent

EPHEMERAL_STARTUP_TIMEOUT_S = 300


def _configure_prefect() -> None:
    cache = Path(os.environ.get("RECPIPE_CACHE", Path.home() / ".cache" / "recpipe"))
    home = Path(os.environ.setdefault("PREFECT_HOME", str(cache / "prefect")))
    os.environ.setdefault("PREFECT_MEMO_STORE_PATH", str(home / "memo_store.toml"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # The ephemeral API server starts in 12-24 s on an idle 2-core machine and slower under load; Prefect's
    # default wait of 20 s would fail a loop for nothing ("Timed out while attempting to connect").
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_STARTUP_TIMEOUT_S))
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache / "vllm"))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # keep progress readable; export WARNING to see more
    home.mkdir(parents=True, exist_ok=True)


class _ServerSubprocess(types.ModuleType):
    """``subprocess`` as Prefect's server module sees it: the same, except that Popen starts the child in
    its own session (no terminal signals) and tied to this process's life."""

    def __init__(self) -> None:
        super().__init__("subprocess")

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args: Any, **kwargs: Any) -> subprocess.Popen[Any]:  # noqa: N802 (subprocess's name)
        kwargs.setdefault("start_new_session", True)
        kwargs.setdefault("preexec_fn", die_with_parent())
        return subprocess.Popen(*args, **kwargs)


def _hook_ephemeral_server() -> None:
    """Prefect 3.7.7 has no setting for how it starts the ephemeral server: it calls ``subprocess.Popen``
    in ``SubprocessASGIServer._run_uvicorn_command`` (prefect/server/api/server.py), so that module gets
    the ``subprocess`` above. Skipped when a server is configured: importing that module costs seconds."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    from prefect.server.api import server

    server.subprocess = _ServerSubprocess()  # type: ignore[assignment]


_configure_prefect()
_hook_ephemeral_server()
