"""retrain replays a run's lineage with another preset; report writes its files (experiment: tests/test_experiment.py)."""

import json

from tests.flows.flowtools import SMALL_HF, sql_rows


def test_retrain_replays_lineage_and_report_renders(tmp_path, tiny_model, run_recpipe):
    store = tmp_path / "store"
    # 5 steps: more than loop.steps' default (4), which retrain once fell back to, replaying 4 of them.
    base = run_recpipe("loop", "--store", str(store), "--model", str(tiny_model), "--steps", "5", "--run", "base",
                       "--preset", "reinforce", *SMALL_HF)
    assert base.returncode == 0, base.stderr[-3000:]
    rollouts_before = sql_rows(store, "SELECT count(*) FROM rollouts")
    # No --model: a new run replaying another run's rollouts starts from that run's base model.
    again = run_recpipe("retrain", "--store", str(store), "--from-run", "base", "--run", "re", "--preset", "red-drop",
                        "--set", "train.lr=5e-4")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "trained 5 step(s) now; it replays 5 of the 5 recorded steps of run base" in " ".join(again.stdout.split())
    assert sql_rows(store, "SELECT DISTINCT base_model FROM policies WHERE version = 0") == [(str(tiny_model),)]
    # Same rollout ids step by step, no generation, a new run with its own versions and loss.
    per_step = "SELECT step, list(rollout_id ORDER BY rollout_id) FROM batches WHERE run = '{}' GROUP BY step ORDER BY step"
    replayed, original = sql_rows(store, per_step.format("re")), sql_rows(store, per_step.format("base"))
    assert [s for s, _ in original] == [0, 1, 2, 3, 4]
    assert replayed == original
    assert sql_rows(store, "SELECT count(*) FROM batches WHERE run = 're'") == sql_rows(store, "SELECT count(*) FROM batches WHERE run = 'base'")
    assert sql_rows(store, "SELECT count(*) FROM rollouts") == rollouts_before
    assert sql_rows(store, "SELECT count(*) FROM rollouts WHERE run = 're'") == [(0,)]
    assert sql_rows(store, "SELECT list(DISTINCT preset), bool_and(applied) FROM steps WHERE run = 're'") == [(["red-drop"], True)]
    assert sql_rows(store, "SELECT max(version) FROM policies WHERE run = 're'") == [(5,)]
    assert sql_rows(store, "SELECT DISTINCT query_name FROM batches WHERE run = 're'") == [("lineage",)]
    params = sql_rows(store, "SELECT any_value(params) FROM batches WHERE run = 're'")[0][0]
    assert json.loads(params)["source_run"] == "base"

    report = run_recpipe("report", "--store", str(store), "--run", "base", "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr[-3000:]
    for name in ("index.html", "reward.png", "loss.png", "clip_fraction.png", "ratio.png", "staleness.png",
                 "throughput.png"):
        assert (tmp_path / "report" / name).stat().st_size > 1000, name
    html = (tmp_path / "report" / "index.html").read_text()
    assert "<img" in html and "throughput" in html

