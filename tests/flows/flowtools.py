"""Helpers for whole-flow tests: the real CLI, Prefect flows, vLLM and trainer in a subprocess."""

from __future__ import annotations

import os
import sys
from pathlib import Path

SMALL = [
    "--set", "select.groups_per_step=2", "--set", "generate.group_size=4", "--set", "generate.max_tokens=8",
    "--set", "generate.shard_size=2", "--set", "task.eval_prompts=4", "--set", "train.lr=1e-3",
    "--set", "generate.max_model_len=128",
]


# Where the sampling engine is not what a test checks, the transformers backend starts faster than vLLM.
SMALL_HF = [*SMALL, "--set", "generate.backend=hf"]


def recpipe_env(tmp_path: Path, api_url: str | None = None) -> dict[str, str]:
    """The environment of a recpipe subprocess: caches under ``tmp_path``; flows report to the Prefect server
    at ``api_url`` (the session's, see tests/conftest.py::prefect_api), or to an ephemeral one of their own
    when None (37 s per command with a fresh Prefect home on this machine kind, 5 s with a server)."""
    env = dict(os.environ)
    env.update({
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "RECPIPE_CACHE": str(tmp_path / "cache"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    })
    env.pop("PREFECT_API_URL", None)  # ephemeral mode
    if api_url is not None:
        env["PREFECT_API_URL"] = api_url
    return env


def recpipe_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "recpipe.cli", *args]




def sql_rows(store: Path | str | object, sql: str) -> list[tuple]:
    """Rows of a query over the store (a path, URI or Store; a fresh read-only connection each call)."""
    from recpipe.store import Store

    con = (store if isinstance(store, Store) else Store(store)).connect(read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def committed_steps(store: Path, run: str) -> int:
    """Steps rows of ``run`` committed to the store (a data file alone is not a commit: a process stopped
    between writing it and committing the Delta log entry leaves the file and no row)."""
    if not any((store / "steps").glob(f"run={run}/**/*.parquet")):  # cheap: no file, no row yet
        return 0
    from recpipe.store import Store

    return Store(store).read("steps", "run = $run", {"run": run}).num_rows
