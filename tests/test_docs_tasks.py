"""docs/tasks.md's worked example, run as written (the real CLI in a subprocess), and its task class."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "tasks.md"
BLOCK = re.compile(r"^```(\w+)( [^\n]*)?\n(.*?)^```$", re.M | re.S)


def blocks() -> list[tuple[str, str, str]]:
    return [(lang, (info or "").strip(), body) for lang, info, body in BLOCK.findall(DOC.read_text())]


@pytest.mark.slow  # a whole generate flow: ~60 s on 2 busy cores (the Prefect server is the session's)
def test_the_worked_example_runs_as_written(tmp_path, prefect_api):
    from recpipe.store import Store
    from recpipe.tasks import get_task
    from recpipe.tasks.math_reward import math_reward

    files = {info.removeprefix("file="): body for _, info, body in blocks() if info.startswith("file=")}
    assert set(files) == {"qa.jsonl", "my_rewards.py"}
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    [script] = [body for lang, info, body in blocks() if lang == "bash" and info == "run"]
    # The transformers backend starts faster than vLLM; everything else as the page says.
    script = script.replace("recpipe generate ", "recpipe generate --set generate.backend=hf ")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": prefect_api,
           "RECPIPE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[-5:-3] == ["task,n", "dataset,4"]
    assert lines[-3] == "name,weight,n,mean"
    means = {}
    for line, name, weight in zip(lines[-2:], ["math", "my_rewards:brevity"], ["1.0", "0.1"], strict=True):
        got_name, got_weight, n, mean = line.split(",")
        assert (got_name, got_weight, n) == (name, weight, "4"), line
        means[name] = float(mean)
    task = get_task("dataset", path=str(tmp_path / "qa.jsonl"))
    prompts = {p.prompt_id: p for split in ("train", "test") for p in task.prompts(split)}
    rows = Store(tmp_path / "runs" / "qa").read("rollouts").to_pylist()
    for row in rows:  # reward = 1.0 * math + 0.1 * brevity of the response it was given for
        prompt, text = prompts[row["prompt_id"]], row["response_text"]
        want = math_reward(prompt, text)
        assert row["reward"] == pytest.approx(want.reward + 0.1 * (-len(text) / 100))
        assert row["reward_parts"] == {"correctness": want.correctness, "format": want.format}
        assert row["reward_terms"] == [{"name": "math", "weight": 1.0, "value": want.reward},
                                       {"name": "my_rewards:brevity", "weight": 0.1, "value": -len(text) / 100}]
        assert row["reward_error"] is None
    for i, name in enumerate(means):  # what the second `recpipe sql` printed: each function's mean value
        assert means[name] == pytest.approx(sum(r["reward_terms"][i]["value"] for r in rows) / len(rows), abs=1e-3)


def test_the_task_class_example_is_a_task():
    from recpipe.tasks import Task

    [code] = [body for lang, info, body in blocks() if lang == "python" and "class Capitals" in body]
    scope: dict = {}
    exec(compile(code, str(DOC), "exec"), scope)
    task = scope["Capitals"]()
    assert isinstance(task, Task)
    [peru] = task.prompts("test")
    assert task.score(peru, "It is Lima.").correctness == 1.0 and task.score(peru, "Quito").correctness == 0.0
    assert len(task.prompts("train", limit=2)) == 2
