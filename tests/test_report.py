"""``recpipe report``: labelled panels, integer steps, eval error bars, per-stage throughput, runs overlaid."""

from __future__ import annotations

import datetime as dt

import pytest
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


def _sample(step: int, kind: str, trained: list[float] | None) -> dict:
    return {"step": step, "sample": kind, "reward": 1.0, "advantage": 0.5, "response_length": 3,
            "finish_reason": "stop", "response_text": "4 + 4", "rollout_id": f"r{step}{kind}",
            "response_token_ids": [52, 10, 52], "behaviour_logprobs": [-1.0, -2.0, -0.5], "trained_logprobs": trained}


def test_the_sample_browser_colours_each_token_by_its_importance_ratio():
    import math
    import re

    from recpipe.report import _samples

    page = _samples("a", [_sample(0, "best", [-0.5, -2.0, -1.5]), _sample(0, "worst", None)], False,
                    lambda ids: [{52: "4", 10: " +"}[i] for i in ids])
    spans = re.findall(r"<span class='tok' style='background:rgba\((\d+),\d+,\d+,([\d.]+)\)' data-ratio='([^']+)'"
                       r" title='[^']+'>([^<]*)</span>", page)
    assert [(text, float(ratio)) for _, _, ratio, text in spans] == [
        ("4", pytest.approx(math.exp(0.5), rel=1e-3)), (" +", 1.0), ("4", pytest.approx(math.exp(-1.0), rel=1e-3))]
    (red, strong), (_, neutral), (blue, full) = [(int(r), float(a)) for r, a, _, _ in spans]
    assert red == 220 and blue == 40 and neutral == 0.0 and 0 < strong < full == 0.8
    assert "<pre>4 + 4</pre>" in page  # a step without token log-probs shows the text
    ids_only = _samples("a", [_sample(1, "best", [-1.0, -2.0, -0.5])], False, None)
    assert ">[52]</span><span" in ids_only and ids_only.count("data-ratio='1'") == 3


def test_trained_token_log_probs_of_another_length_are_not_coloured():
    from recpipe.report import _samples

    page = _samples("a", [_sample(0, "best", [-0.5])], False, lambda ids: [str(i) for i in ids])
    assert "class='tok' style" not in page.split("</p>", 1)[1] and "<pre>4 + 4</pre>" in page
