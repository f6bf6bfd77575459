"""What a new user meets, through the real CLI on the tiny model, against the session's Prefect server:
a console with recpipe's lines only (library output in a log file under the store), "nothing to do" on a
finished run, --dry-run, the resolved config saved with the run, and in Prefect: the flow run named after
the run, recpipe's lines in its logs, the step table as an artifact, the UI link on the console."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from tests.flows.flowtools import SMALL, recpipe_cmd, recpipe_env

RUN = "firstcontact"
# Every line recpipe itself writes to stderr during a loop (recpipe.progress); anything else is a library's.
OWN_LINE = re.compile(r"^(eval v\d+: accuracy |generate v\d+ shard \d+: |step \d+ -> v\d+  loss |prefect flow run "
                      rf"{RUN} loop: http|library output: |warning: |\d+ row\(s\)$)")


@pytest.fixture(scope="module")
def first_loop(tmp_path_factory, tiny_model, prefect_api):
    """One 2-step loop; returns (store, env, completed process)."""
    tmp = tmp_path_factory.mktemp("first-contact")
    env = recpipe_env(tmp, prefect_api)
    store = tmp / "store"
    done = subprocess.run(recpipe_cmd("loop", "--store", str(store), "--run", RUN, "--model", str(tiny_model),
                                      "--steps", "2", *SMALL), capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return store, env, done


def test_console_holds_only_recpipes_lines(first_loop):
    store, _, done = first_loop
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    foreign = [line for line in lines if not OWN_LINE.match(line)]
    assert not foreign, foreign
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 2
    for label in ("loss", "reward", "grad", "clip", "ratio", "entropy", "stale", "tok/s"):
        assert f" {label} " in steps[0], (label, steps[0])
    # The libraries' output went to the store's log folder (vLLM's weight loading, Prefect's task states).
    [log] = (store / "logs").glob("loop-*.log")
    assert f"library output: {log}" in lines
    text = log.read_text()
    assert "safetensors" in text.lower() or "Loading weights" in text
    assert "progress.py:" not in done.stderr


def cli(*args: str):
    """The CLI in this process (typer's runner): for commands that start no flow, ~1 s instead of ~20 s."""
    from typer.testing import CliRunner

    from recpipe.cli import app

    return CliRunner().invoke(app, list(args))


def test_finished_run_dry_run_and_saved_config(first_loop, tmp_path, tiny_model):
    store = first_loop[0]
    again = cli("loop", "--store", str(store), "--run", RUN, "--steps", "2", *SMALL)
    assert again.exit_code == 0, again.output[-3000:]
    assert again.stdout.startswith(f"nothing to do: run {RUN} already has 2 step(s) (loop.steps=2; give --steps 3")
    replay = cli("retrain", "--store", str(store), "--run", RUN, "--steps", "2", "--quiet", *SMALL)
    assert replay.exit_code == 0 and replay.stdout.startswith(f"nothing to do: run {RUN} already has 2 step(s)")
    assert replay.stderr == ""  # --quiet: results only
    both = cli("loop", "--store", str(store), "--run", RUN, "--verbose", "--quiet")
    assert both.exit_code == 2 and "give --verbose or --quiet, not both" in both.stderr

    fresh = tmp_path / "not-yet"
    dry = cli("loop", "--store", str(fresh), "--run", "r9", "--steps", "7", "--dry-run", "--model", str(tiny_model),
              *SMALL)
    assert dry.exit_code == 0, dry.output[-3000:]
    resolved = yaml.safe_load(dry.stdout)
    assert resolved["run"] == "r9" and resolved["loop"]["steps"] == 7 and resolved["generate"]["group_size"] == 4
    assert resolved["train"]["lr"] == 1e-3 and resolved["loss"]["preset"] == "rec-oneside-nois"  # defaults too
    assert not fresh.exists()  # nothing touched, not even a log file
    for command in ("train", "retrain", "generate"):
        dry = cli(command, "--store", str(store), "--run", RUN, "--dry-run", *SMALL)
        assert dry.exit_code == 0 and yaml.safe_load(dry.stdout)["run"] == RUN, (command, dry.output[-2000:])

    status = cli("status", "--store", str(store), "--run", RUN)
    assert status.exit_code == 0, status.output[-3000:]
    saved = yaml.safe_load(status.stdout.split(f"config of run {RUN}:\n", 1)[1])
    assert saved["run"] == RUN and saved["loop"]["steps"] == 2 and saved["select"]["groups_per_step"] == 2
    assert f"# resolved model: {tiny_model}" in status.stdout


def test_prefect_sees_the_run(first_loop, prefect_api):
    """The flow run is named after the run, holds recpipe's lines in its logs, and the step table as a
    Markdown artifact; the console printed its UI link."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterName,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    _, _, done = first_loop
    with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
        [flow_run] = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"{RUN} loop"])))
        assert flow_run.parameters["config"]["run"] == RUN
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
        messages = [entry.message for entry in logs]
        assert any(m.startswith("step 1 -> v2  loss ") for m in messages), messages
        assert any(m.startswith("eval v0: accuracy ") for m in messages)
        assert any("train step 1" in m for m in messages) or any(e.task_run_id for e in logs)  # task runs' logs
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"{RUN}-steps"])))
        assert artifact.type == "markdown" and artifact.flow_run_id == flow_run.id
        rows = [line for line in artifact.data.splitlines() if re.match(r"^\| \d+ \| v\d+ \|", line)]
        assert [row.split(" | ")[:2] for row in rows] == [["| 0", "v1"], ["| 1", "v2"]]
        resolved = yaml.safe_load(artifact.data.split("```yaml\n", 1)[1].split("```", 1)[0])
        assert resolved["run"] == RUN and resolved["loop"]["steps"] == 2 and resolved["train"]["grad_clip"] == 1.0
    ui = prefect_api.removesuffix("/api")
    assert f"prefect flow run {RUN} loop: {ui}/runs/flow-run/{flow_run.id}" in done.stderr


def test_serve_refuses_an_ephemeral_api(tmp_path):
    env = recpipe_env(tmp_path)  # no PREFECT_API_URL
    done = subprocess.run(recpipe_cmd("serve", "--flow", "loop", "--interval", "60", "--store", str(tmp_path / "s")),
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert "error: NoServer: recpipe serve needs a Prefect server: start one with `prefect server start`" in done.stderr
    assert not (tmp_path / "prefect" / "prefect.db").exists()  # no throw-away server was started


def test_recpipe_warnings_still_print_without_a_root_handler(monkeypatch, capsys):
    """The Prefect API handler on the `recpipe` logger would make Python drop its warnings (lastResort
    prints only when no handler is on the way); flows keep them on stderr."""
    import logging

    import flows  # noqa: F401  (adds the handlers)

    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    logging.getLogger("recpipe").warning("retrain: the base model is not on this machine")
    logging.getLogger("recpipe").info("step 0 -> v1")  # INFO goes to Prefect's run logs only
    assert capsys.readouterr().err == "retrain: the base model is not on this machine\n"
