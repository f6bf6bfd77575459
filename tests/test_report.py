"""``recpipe report``: labelled panels, integer steps, eval error bars, per-stage throughput, runs overlaid."""

from __future__ import annotations

import datetime as dt

from typer.testing import CliRunner

from recpipe.cli import app
from recpipe.report import figure
from recpipe.schema import SCHEMA_VERSION
from recpipe.store import Store
from tests.support import synthetic_rollouts
from tests.test_status import eval_row, steps_row

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


def timing(run: str, stage: str, i: int, seconds: float, tokens: int | None) -> dict:
    return {"run": run, "stage": stage, "item": f"{stage}-{i}", "policy_version": 0, "seconds": seconds,
            "tokens": tokens, "created_at": T0 + dt.timedelta(seconds=i), "schema_version": SCHEMA_VERSION}


def fill(store: Store, run: str, scale: float) -> None:
    store.append_rollouts(synthetic_rollouts(run=run, shard_id=f"{run}-0"), shard_id=f"{run}-0")
    store.append_rollouts(synthetic_rollouts(run=run, shard_id=f"{run}-1", policy_version=1, seed=3),
                          shard_id=f"{run}-1")
    for step in range(3):
        row = steps_row(run, step, 0.0) | {"clip_fraction": 0.1 * step, "ratio_mean": 1.0, "ratio_max": 1.2 + step,
                                           "mismatch": 0.01, "entropy": 2.0 - step * scale}
        store.append("steps", [row], shard_id=f"step-{step:06d}")
    store.append("evals", [eval_row(run, 0, 0.25), eval_row(run, 2, 0.5 * scale)], shard_id=f"{run}-evals")
    for i, (stage, seconds, tokens) in enumerate([("generate", 2.0, 400), ("select", 0.01, 20000),
                                                   ("train", 1.0, 300), ("generate", 1.5, 420)]):
        store.append("timings", [timing(run, stage, i, seconds * scale, tokens)], shard_id=f"{run}-t{i}")


def test_report_overlays_runs(tmp_path):
    store = Store.create(tmp_path / "store")
    fill(store, "a", 1.0)
    fill(store, "b", 0.5)
    result = CliRunner().invoke(app, ["report", "--store", str(store.root), "--run", "a", "--run", "b"])
    assert result.exit_code == 0, result.output
    out = store.root / "reports" / "a+b"
    page = (out / "index.html").read_text()
    for name in ("reward", "loss", "clip_fraction", "ratio", "entropy", "staleness", "throughput"):
        if name != "staleness":  # no batches in this store: no staleness panel
            assert (out / f"{name}.png").stat().st_size > 5000, name
            assert f'<img src="{name}.png"' in page, name
    assert "<h2>run a</h2>" in page and "<h2>run b</h2>" in page and "None" not in page
    missing = CliRunner().invoke(app, ["report", "--store", str(store.root), "--run", "a", "--run", "zz"])
    assert missing.exit_code == 2 and "run 'zz' has no rollouts and no steps" in missing.stderr


def test_panels_have_labels_integer_ticks_and_eval_error_bars():
    series = [("loss", [0, 1, 2, 3], [0.5, 0.4, 0.45, 0.3]), ("eval", [0, 3], [0.25, 0.5])]
    fig = figure("Loss", series, "step", "loss", errors={"eval": ([0.1, 0.12], [16, 16])})
    [ax] = fig.axes
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "loss"
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert len(ax.containers) == 1  # the error bars
    assert [a.get_text() for a in ax.texts] == ["n=16", "n=16"]
