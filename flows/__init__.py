"""Prefect flows: thin wrappers over recpipe.recipe (see flows/pipeline_flows.py).

Importing this package points Prefect's state at recpipe's cache folder
(unless PREFECT_HOME is already set) and runs Prefect in its ephemeral mode
when no server is configured. recpipe's log lines (the ``recpipe`` logger:
each shard, step and eval) go to the Prefect run's logs, at INFO; the CLI
keeps Prefect's own console output out of the terminal (recpipe.progress). The ephemeral API server (a uvicorn child
process) is started in its own session, so a Ctrl-C in the terminal reaches
recpipe but not the server, and it is killed by the kernel when its parent
dies, even by kill -9, so none is ever left behind.
"""

from __future__ import annotations

import logging
import os
import subprocess
import types
from pathlib import Path
from typing import Any

from recpipe.errors import RecpipeError
from recpipe.subprocesses import die_with_parent

EPHEMERAL_STARTUP_TIMEOUT_S = 300


def _configure_prefect() -> None:
    cache = Path(os.environ.get("RECPIPE_CACHE", Path.home() / ".cache" / "recpipe"))
    home = Path(os.environ.setdefault("PREFECT_HOME", str(cache / "prefect")))
    os.environ.setdefault("PREFECT_MEMO_STORE_PATH", str(home / "memo_store.toml"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # INFO: task runs' state changes and recpipe's lines reach the run's logs in the UI (at WARNING the API
    # got none: `POST /api/logs/filter` returned []). The CLI sends the console copy to a log file.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # recpipe logs outside flows too
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


def _in_a_run(record: logging.LogRecord) -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


class _LastResort(logging.Handler):
    """Python prints a warning nobody handles (logging.lastResort) only while no logger on its way has a
    handler; the API handler below would silence recpipe's warnings. This keeps them, while the root
    logger has no handler of its own."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers and logging.lastResort is not None:
            logging.lastResort.handle(record)


def _recpipe_logs_to_prefect() -> None:
    """The ``recpipe`` logger at INFO, with Prefect's API handler: what it logs inside a flow or task run is
    in that run's logs (what PREFECT_LOGGING_EXTRA_LOGGERS would do, had prefect not been imported first)."""
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger("recpipe")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        handler = APILogHandler()
        handler.addFilter(_in_a_run)
        logger.addHandler(handler)
        logger.addHandler(_LastResort())


def server_configured() -> bool:
    """Whether flows report to a Prefect server (PREFECT_API_URL), not to an ephemeral one of their own."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


class NoServer(RecpipeError):
    """A command that needs a Prefect server (serve's schedules) would get a throw-away API."""


def require_server(what: str) -> None:
    """NoServer unless PREFECT_API_URL names a server: an ephemeral API ends with the command that started
    it, so deployments registered there would never run and no UI would show them."""
    if not server_configured():
        raise NoServer(f"{what} needs a Prefect server: start one with `prefect server start` and export "
                       "PREFECT_API_URL=http://127.0.0.1:4200/api (PREFECT_API_URL is not set, so the deployments "
                       "would be registered with a throw-away API that ends with this command)")


_configure_prefect()
_hook_ephemeral_server()
_recpipe_logs_to_prefect()
