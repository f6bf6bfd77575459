"""Prefect flows: thin wrappers over recpipe.pipeline (see flows/pipeline_flows.py).

Importing this package points Prefect's state at recpipe's cache folder
(unless PREFECT_HOME is already set) and runs Prefect in its ephemeral mode
when no server is configured.
"""

from __future__ import annotations

import os
from pathlib import Path

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


_configure_prefect()
