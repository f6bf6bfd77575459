"""Whole-flow tests run the real CLI in a subprocess on the tiny model."""

from __future__ import annotations

import subprocess

import pytest

from tests.flows.flowtools import recpipe_cmd, recpipe_env


@pytest.fixture
def run_recpipe(tmp_path, prefect_api):
    """The real CLI in a subprocess, its flows reporting to the session's Prefect server."""
    env = recpipe_env(tmp_path, prefect_api)

    def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(recpipe_cmd(*args), capture_output=True, text=True, env=env, timeout=timeout)

    run.env = env
    return run
