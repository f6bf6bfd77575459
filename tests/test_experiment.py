"""The study (recpipe.experiment, recpipe.study): grid parsing, a small study on the tiny model with its
table and figure, and a killed study that resumes without redoing finished runs."""

from __future__ import annotations

import os
import signal
import statistics
import struct
import subprocess
import sys
import time

import pytest

from recpipe.config import load_config
from recpipe.experiment import (
    cell_config,
    experiment_configs,
    finished_runs,
    parse_preset,
    parse_presets,
    parse_seeds,
    parse_settings,
    run_experiment,
    study_cells,
)
from recpipe.store import Store
from recpipe.study import restore_results, save_results

# The tiny model with the transformers backend (starts in a second): small groups, short answers.
SMALL = ["select.groups_per_step=2", "generate.group_size=4", "generate.max_tokens=8", "generate.shard_size=2",
         "task.eval_prompts=4", "train.lr=1e-3", "generate.max_model_len=128", "generate.backend=hf"]


def test_presets_with_overrides():
    wide = parse_preset("rec-oneside-nois:0.6,2.0")
    assert (wide.label, wide.preset, wide.overrides) == (
        "rec-oneside-nois_0.6-2", "rec-oneside-nois", {"epsilon_low": 0.6, "epsilon_high": 2.0})
    assert parse_preset("rec-oneside-nois:0.2").overrides == {"epsilon_low": 0.2, "epsilon_high": 0.2}
    assert parse_preset("red-weight:0.5").overrides == {"temp": 0.5}
    assert parse_preset("opmd:regularizer_coef=0.3").overrides == {"regularizer_coef": 0.3}
    assert parse_preset("grpo:std_normalize=false").overrides == {"std_normalize": False}
    # Values after "name:" continue past the commas that separate presets.
    specs = parse_presets("reinforce, rec-oneside-nois:0.6,2.0,grpo,red-weight:temp=0.5,rec-oneside-nois")
    assert [s.label for s in specs] == ["reinforce", "rec-oneside-nois_0.6-2", "grpo", "red-weight_0.5",
                                        "rec-oneside-nois"]
    base = load_config(None, ["loop.steps=6"])
    cfg = cell_config(base, study_cells([specs[1]], {"sync": (2, 0)}, [3])[0])
    loss = cfg.loss.build()
    assert (cfg.run, loss.clip_mode, loss.epsilon_low, loss.epsilon_high) == (
        "rec-oneside-nois_0.6-2.sync.s3", "one-side", 0.6, 2.0)
    assert (cfg.generate.seed, cfg.train.seed, cfg.loop.sync_interval, cfg.loop.sync_offset) == (3, 3, 2, 0)


@pytest.mark.parametrize(("text", "message"), [
    ("grpo:", "nothing after ':'"),
    ("nosuch:0.2", "unknown preset 'nosuch'"),
    ("reinforce:0.2", "takes no positional values"),
    ("rec-oneside-nois:0.1,0.2,0.3", "at most 2 value"),
    ("rec-oneside-nois:abc", "'abc' is not a number"),
    ("rec-oneside-nois:-1", "epsilon_low"),
    ("grpo:epsilon=0.3", "unknown field 'epsilon'"),
    ("grpo:0.3,temp=2", "mix of positional"),
    ("grpo,grpo", "twice"),
    ("", "empty"),
])
def test_bad_presets_name_the_item(text, message):
    with pytest.raises(ValueError, match=message):
        parse_presets(text)


def test_settings_and_seeds():
    grid = parse_settings("onpolicy,sync,syncoffset,lag,offline,3:1", 24)
    assert grid == {"onpolicy": (1, 0), "sync": (8, 0), "syncoffset": (8, 4), "lag": (1, 8), "offline": (25, 23),
                    "k3o1": (3, 1)}
    assert parse_settings("sync", 3) == {"sync": (2, 0)}
    for bad, message in [("weekly", "expected one of"), ("2:x", "integers"), ("0:1", "k >= 1"), (" , ", "empty")]:
        with pytest.raises(ValueError, match=message):
            parse_settings(bad, 6)
    assert parse_seeds("0,1") == [0, 1] and parse_seeds("2-4") == [2, 3, 4]
    for bad in ["", "a", "-1", "1,1"]:
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)


def _png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_small_study_table_and_figure(tmp_path, tiny_model):
    base = load_config(None, [f"store={tmp_path / 'exp'}", f"model.name={tiny_model}", "loop.steps=2",
                              "loop.eval_every=1", *SMALL])
    presets = parse_presets("rec-oneside-nois:0.6,2.0")
    grid = parse_settings("onpolicy,offline", 2)
    table, path = run_experiment(base, presets, grid, [0, 1], threshold=0.0)
    out = path.parent
    store = Store(base.store)
    assert finished_runs(experiment_configs(base, presets, grid, [0, 1])) == {
        c.run for c in study_cells(presets, grid, [0, 1])}

    summary = table.to_pylist()
    assert [(r["preset"], r["setting"], r["seeds"]) for r in summary] == [
        ("rec-oneside-nois_0.6-2", "onpolicy", 2), ("rec-oneside-nois_0.6-2", "offline", 2)]
    con = store.connect(read_only=True)
    final = dict(con.execute("SELECT run, max_by(accuracy, policy_version) FROM evals GROUP BY run").fetchall())
    reward = dict(con.execute("SELECT run, avg(reward_mean) FROM steps GROUP BY run").fetchall())
    evaluated = con.execute("SELECT run, list(policy_version ORDER BY policy_version) FROM evals GROUP BY run").fetchall()
    # Offline trains every step on version-0 rollouts; on-policy on the newest version.
    versions = dict(con.execute("SELECT run, list(DISTINCT policy_version ORDER BY policy_version) FROM batches "
                                "GROUP BY run").fetchall())
    # Seeds are different samples: the two seeds of one cell did not draw the same responses.
    texts = dict(con.execute("SELECT run, list(response_text ORDER BY rollout_id) FROM rollouts "
                             "WHERE policy_version = 0 GROUP BY run").fetchall())
    # The base model is evaluated once; every run records that row as its version 0.
    base_evals = con.execute("SELECT count(*) FROM timings WHERE stage = 'evaluate' AND item LIKE 'v000000-%'").fetchall()
    initial = con.execute("SELECT count(*), count(DISTINCT run), count(DISTINCT accuracy) FROM evals "
                          "WHERE policy_version = 0").fetchall()
    con.close()
    assert base_evals == [(1,)] and initial == [(4, 4, 1)]
    assert sorted(evaluated) == sorted((r, [0, 1, 2]) for r in final)  # eval_every=1: every version
    assert versions["rec-oneside-nois_0.6-2.offline.s0"] == [0]
    assert versions["rec-oneside-nois_0.6-2.onpolicy.s0"] == [0, 1]
    assert texts["rec-oneside-nois_0.6-2.onpolicy.s0"] != texts["rec-oneside-nois_0.6-2.onpolicy.s1"]
    for row in summary:
        runs = [f"{row['preset']}.{row['setting']}.s{seed}" for seed in (0, 1)]
        assert row["final_accuracy_mean"] == pytest.approx(statistics.fmean(final[r] for r in runs))
        assert row["final_accuracy_std"] == pytest.approx(statistics.stdev(final[r] for r in runs))
        assert row["train_reward_mean"] == pytest.approx(statistics.fmean(reward[r] for r in runs))
        assert row["reached_threshold"] == 2 and row["steps_to_threshold_mean"] == 0  # threshold 0: at v0
        assert 0 <= row["clip_fraction_mean"] <= 1 and row["mismatch_mean"] >= 0

    lines = (out / "runs.csv").read_text().splitlines()
    assert lines[0].startswith("preset,setting,sync_interval,sync_offset,seed,run,initial_accuracy,final_accuracy")
    assert len(lines) == 1 + 4
    md = (out / "comparison.md").read_text()
    assert "| rec-oneside-nois_0.6-2 | offline (3, 1) | 2 |" in md and " ± " in md
    for name in ("accuracy.png", "reward.png"):
        width, height = _png_size(out / name)
        assert (width, height) == (2 * 360, 320), name  # one 3.6 x 3.2 in panel per setting at 100 dpi

    # Nothing left to do: the same study again runs no stage of any run and writes the same table.
    timings = store.read("timings").num_rows
    again, _ = run_experiment(base, presets, grid, [0, 1], threshold=0.0)
    assert again.to_pylist() == summary and store.read("timings").num_rows == timings

    # A study that outlives its machine: the finished runs' result rows, saved and appended to a new store,
    # make the same study there run nothing and report the same table (restoring twice adds nothing).
    saved = save_results(store, sorted(final), tmp_path / "results")
    moved = load_config(None, [f"store={tmp_path / 'moved'}", f"model.name={tiny_model}", "loop.steps=2",
                               "loop.eval_every=1", *SMALL])
    assert restore_results(Store.create(moved.store), saved) == 3 * 4  # steps, evals, timings x 4 runs
    assert restore_results(Store(moved.store), saved) == 0
    there, _ = run_experiment(moved, presets, grid, [0, 1], threshold=0.0)
    assert there.to_pylist() == summary and Store(moved.store).read("timings").num_rows == timings


def test_figure_grid_has_a_panel_per_setting_and_a_line_per_preset(tmp_path):
    from recpipe.study import plot_grid

    # Two seeds of "a" (a band), one of "b" (a line only); "b" has no offline run: no line there.
    data = {("a", "onpolicy"): [{0: 0.1, 2: 0.3}, {0: 0.2, 2: 0.5}], ("b", "onpolicy"): [{0: 0.1, 2: 0.2}],
            ("a", "offline"): [{0: 0.1, 2: 0.1}, {0: 0.1, 2: 0.2, 4: 0.9}], ("b", "offline"): [{}]}
    settings = {"onpolicy": (1, 0), "sync": (2, 0), "offline": (5, 3)}
    panels = plot_grid(data, settings, "accuracy", tmp_path / "grid.png")
    assert panels == {"onpolicy (k=1, o=0)": ["a", "b"], "sync (k=2, o=0)": [], "offline (k=5, o=3)": ["a"]}
    assert _png_size(tmp_path / "grid.png") == (3 * 360, 320)


@pytest.mark.slow
def test_killed_study_resumes_without_redoing_finished_runs(tmp_path, tiny_model):
    store = tmp_path / "exp"
    env = {**os.environ, "RECPIPE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "recpipe.cli", "experiment", "--store", str(store), "--model", str(tiny_model),
           "--steps", "2", "--presets", "reinforce,red-weight", "--settings", "onpolicy,offline",
           "--seeds", "0", "--workers", "2", *(x for s in SMALL for x in ("--set", s))]
    base = load_config(None, [f"store={store}", f"model.name={tiny_model}", "loop.steps=2", *SMALL])
    configs = experiment_configs(base, parse_presets("reinforce,red-weight"),
                                 parse_settings("onpolicy,offline", 2), [0])
    study = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    done: set[str] = set()
    while not done and study.poll() is None and time.monotonic() < deadline:
        time.sleep(0.3)
        done = finished_runs(configs)
    assert done and len(done) < len(configs), f"no kill point: {done} {study.poll()}"
    os.kill(study.pid, signal.SIGKILL)  # the study process itself; its workers die with it
    study.wait()
    time.sleep(1)
    con = Store(store).connect(read_only=True)
    before = dict(con.execute("SELECT run, list(created_at ORDER BY created_at) FROM timings GROUP BY run").fetchall())
    con.close()
    done = finished_runs(configs)  # a worker may have finished one more before it died

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert finished_runs(configs) == {c.run for c in configs}
    con = Store(store).connect(read_only=True)
    after = dict(con.execute("SELECT run, list(created_at ORDER BY created_at) FROM timings GROUP BY run").fetchall())
    steps = dict(con.execute("SELECT run, list(step ORDER BY step) FROM steps GROUP BY run").fetchall())
    con.close()
    for run in done:
        assert after[run] == before[run], f"{run} was redone"  # not a single stage ran again
    assert all(s == [0, 1] for s in steps.values()) and len(steps) == len(configs)  # each step once
    logs = store / "reports" / "experiment" / "logs"
    ran = {run for path in logs.glob("worker-*.log") for line in path.read_text().splitlines()
           if line.startswith("worker ") for run in line.partition(": ")[2].partition(": ")[2].split(", ")}
    assert not ran & done, "a worker of the rerun ran a finished run"
    table = (store / "reports" / "experiment" / "comparison.csv").read_text().splitlines()
    assert len(table) == 1 + len(configs)
