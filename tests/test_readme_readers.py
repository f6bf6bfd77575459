"""The README's lines that read the archive with polars, deltalake and pandas, run against a real store."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from recpipe.store import Store
from tests.support import synthetic_rollouts
from tests.test_status import steps_row

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readers_in_the_readme_work_on_a_store(tmp_path, monkeypatch):
    store = Store.create(tmp_path / "runs" / "demo")
    for shard in ("s0", "s1"):
        store.append_rollouts(synthetic_rollouts(run="default", shard_id=shard, seed=len(shard) + int(shard[1])),
                              shard_id=shard)
    for step in range(2):
        store.append("steps", [steps_row("default", step, 0.0)], shard_id=f"step-{step:06d}")
    [code] = re.findall(r"^```python readers\n(.*?)^```$", README.read_text(), re.M | re.S)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    con = store.connect(read_only=True)
    assert scope["steps"].height == 2 and sorted(scope["steps"]["step"].to_list()) == [0, 1]
    assert scope["rollouts"].shape == (16, 3) and list(scope["rollouts"].columns) == ["run", "policy_version", "reward"]
    assert scope["groups"].num_rows == con.execute("SELECT count(*) FROM groups").fetchone()[0] == 4
    want = con.execute("SELECT avg(reward) FROM rollouts WHERE run = 'default'").fetchone()[0]
    assert scope["mean"].item() == pytest.approx(want)
    first = scope["first"]  # table version 1: the first shard's commit only
    assert len(first) == 8 and set(first["shard_id"]) == {"s0"}
