"""Tables and figures of a study (recpipe.experiment): per run, then mean and spread over seeds.

    from recpipe.study import write_study
    summary, csv_path = write_study(store, cells, "runs/study/reports/experiment", threshold=0.5)

Files written to the output folder:
  runs.csv        one row per run: initial, final and best held-out accuracy, steps to the threshold,
                  mean training reward, clip fraction, mean |l - l_old|, staleness, wall seconds;
  comparison.csv  one row per (preset, setting): each metric's mean and sample std over seeds
                  (std empty for one seed), how many seeds reached the threshold;
  comparison.md   the same as a Markdown table ("mean ± std"), for EXPERIMENTS.md;
  accuracy.png    held-out accuracy vs step, one panel per setting, one line per preset, the band
                  mean ± std over seeds; reward.png the same for the training reward per step.
Everything is read back from the archive, so the table of a resumed study is the same as of one
that ran through.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow as pa  # noqa: E402

if TYPE_CHECKING:
    from recpipe.experiment import Cell
    from recpipe.store import Store

PER_RUN = """
WITH e AS (
    SELECT run, min_by(accuracy, policy_version) AS initial_accuracy,
           max_by(accuracy, policy_version) AS final_accuracy, max(accuracy) AS best_accuracy,
           min(policy_version) FILTER (WHERE accuracy >= $threshold) AS steps_to_threshold,
           max_by(n, policy_version) AS eval_n, count(*) AS evals
    FROM evals WHERE list_contains($runs, run) GROUP BY run),
s AS (
    SELECT run, count(*) AS steps, count(*) FILTER (WHERE applied) AS applied_steps,
           avg(reward_mean) AS train_reward, avg(clip_fraction) AS clip_fraction,
           avg(mismatch) AS mismatch, avg(staleness_mean) AS staleness
    FROM steps WHERE list_contains($runs, run) GROUP BY run),
t AS (SELECT run, sum(seconds) AS wall_seconds FROM timings WHERE list_contains($runs, run) GROUP BY run)
SELECT e.*, s.steps, s.applied_steps, s.train_reward, s.clip_fraction, s.mismatch, s.staleness, t.wall_seconds
FROM e LEFT JOIN s USING (run) LEFT JOIN t USING (run)
"""

# Metrics averaged over seeds in comparison.csv, in column order.
METRICS = ("initial_accuracy", "final_accuracy", "best_accuracy", "train_reward", "clip_fraction", "mismatch",
           "staleness", "wall_seconds")
PANEL_INCHES, DPI = (3.6, 3.2), 100


def per_run(store: Store, cells: Sequence[Cell], threshold: float) -> list[dict[str, Any]]:
    """One dict per cell (its preset label, setting, seed and metrics), in the cells' order."""
    con = store.connect(read_only=True)
    try:
        rows = con.sql(PER_RUN, params={"threshold": threshold, "runs": [c.run for c in cells]}).to_arrow_table()
    finally:
        con.close()
    by_run = {r["run"]: r for r in rows.to_pylist()}
    out = []
    for cell in cells:
        row = by_run.get(cell.run, {"run": cell.run})
        out.append({"preset": cell.preset.label, "setting": cell.setting, "sync_interval": cell.sync[0],
                    "sync_offset": cell.sync[1], "seed": cell.seed, **row})
    return out


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds per (preset, setting); steps to threshold over the seeds that got there."""
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in runs:
        cells.setdefault((row["preset"], row["setting"]), []).append(row)
    out = []
    for (preset, setting), rows in cells.items():
        summary: dict[str, Any] = {"preset": preset, "setting": setting, "sync_interval": rows[0]["sync_interval"],
                                   "sync_offset": rows[0]["sync_offset"], "seeds": len(rows)}
        for metric in METRICS:
            summary[f"{metric}_mean"], summary[f"{metric}_std"] = _mean_std([r.get(metric) for r in rows])
        reached = [r["steps_to_threshold"] for r in rows if r.get("steps_to_threshold") is not None]
        summary["reached_threshold"] = len(reached)
        summary["steps_to_threshold_mean"] = statistics.fmean(reached) if reached else None
        out.append(summary)
    return out


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: _fmt(v, 4) for k, v in row.items()} for row in rows)


def markdown(summary: list[dict[str, Any]], threshold: float) -> str:
    """The comparison as a Markdown table: mean ± std over seeds."""
    def pm(row: dict[str, Any], metric: str, spec: str = ".3f") -> str:
        mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
        return "" if mean is None else format(mean, spec) + ("" if std is None else f" ± {format(std, spec)}")

    head = ["preset", "setting (k, o)", "seeds", "initial acc", "final acc", "best acc",
            f"steps to {threshold:g} (seeds)", "train reward", "clip frac", "mean abs(l - l_old)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary:
        reached = (f"{_fmt(row['steps_to_threshold_mean'], 1)} ({row['reached_threshold']}/{row['seeds']})"
                   if row["reached_threshold"] else f"- (0/{row['seeds']})")
        lines.append("| " + " | ".join([
            row["preset"], f"{row['setting']} ({row['sync_interval']}, {row['sync_offset']})", str(row["seeds"]),
            pm(row, "initial_accuracy"), pm(row, "final_accuracy"), pm(row, "best_accuracy"), reached,
            pm(row, "train_reward"), pm(row, "clip_fraction"), pm(row, "mismatch", ".2e")]) + " |")  # ~1e-6: engine and trainer agree
    return "\n".join(lines) + "\n"


def curves(store: Store, cells: Sequence[Cell], sql: str) -> dict[tuple[str, str], list[dict[int, float]]]:
    """(preset label, setting) -> one {step: value} per seed, from ``sql`` (run, x, y rows of $runs)."""
    con = store.connect(read_only=True)
    try:
        rows = con.execute(sql, {"runs": [c.run for c in cells]}).fetchall()
    finally:
        con.close()
    by_run: dict[str, dict[int, float]] = {}
    for run, x, y in rows:
        if y is not None:
            by_run.setdefault(run, {})[x] = y
    out: dict[tuple[str, str], list[dict[int, float]]] = {}
    for cell in cells:
        out.setdefault((cell.preset.label, cell.setting), []).append(by_run.get(cell.run, {}))
    return out


def plot_grid(data: dict[tuple[str, str], list[dict[int, float]]], settings: dict[str, tuple[int, int]],
              ylabel: str, path: Path) -> dict[str, list[str]]:
    """One panel per setting, one line per preset (mean over seeds at the steps every seed has), the band
    mean ± std; returns {panel title: [line labels]}."""
    presets = list(dict.fromkeys(label for label, _ in data))
    fig, axes = plt.subplots(1, len(settings), figsize=(PANEL_INCHES[0] * len(settings), PANEL_INCHES[1]),
                             sharey=True, squeeze=False)
    panels: dict[str, list[str]] = {}
    for ax, (setting, (k, o)) in zip(axes[0], settings.items(), strict=True):
        title = f"{setting} (k={k}, o={o})"
        panels[title] = []
        for color, label in enumerate(presets):
            seeds = [c for c in data.get((label, setting), []) if c]
            if not seeds:
                continue
            xs = sorted(set.intersection(*(set(c) for c in seeds)))
            means = [statistics.fmean(c[x] for c in seeds) for x in xs]
            line = ax.plot(xs, means, marker="o", markersize=3, color=f"C{color}", label=f"{label} (n={len(seeds)})")
            if len(seeds) > 1:
                stds = [statistics.stdev(c[x] for c in seeds) for x in xs]
                ax.fill_between(xs, [m - s for m, s in zip(means, stds, strict=True)],
                                [m + s for m, s in zip(means, stds, strict=True)], color=line[0].get_color(), alpha=0.2)
            panels[title].append(label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training step (= policy version)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return panels


ACCURACY = "SELECT run, policy_version, accuracy FROM evals WHERE list_contains($runs, run) ORDER BY run, policy_version"
REWARD = "SELECT run, step, reward_mean FROM steps WHERE list_contains($runs, run) ORDER BY run, step"


def write_study(store: Store, cells: Sequence[Cell], out: str | Path, *,
                threshold: float = 0.5) -> tuple[pa.Table, Path]:
    """Write runs.csv, comparison.csv/.md, accuracy.png and reward.png; return the comparison and its path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = per_run(store, cells, threshold)
    summary = summarise(runs)
    write_csv(runs, out / "runs.csv")
    write_csv(summary, out / "comparison.csv")
    (out / "comparison.md").write_text(markdown(summary, threshold))
    settings = dict((c.setting, c.sync) for c in cells)
    plot_grid(curves(store, cells, ACCURACY), settings, "greedy held-out accuracy", out / "accuracy.png")
    plot_grid(curves(store, cells, REWARD), settings, "training reward (batch mean)", out / "reward.png")
    shown = ["preset", "setting", "seeds", "final_accuracy_mean", "final_accuracy_std", "best_accuracy_mean",
             "reached_threshold", "steps_to_threshold_mean", "train_reward_mean", "clip_fraction_mean",
             "mismatch_mean"]
    table = pa.Table.from_pylist([{k: row[k] for k in shown} for row in summary])
    return table, out / "comparison.csv"


# ---- a study that outlives its machine -----------------------------------------------------------
# What the tables and figures above and recpipe.experiment.finished_runs read: a store holding these
# rows of a run counts it as finished and reports it, without its rollouts or checkpoints.
RESULT_TABLES = ("steps", "evals", "timings")


def save_results(store: Store, runs: Sequence[str], to: str | Path) -> Path:
    """Write the ``RESULT_TABLES`` rows of ``runs`` (finished runs of a study) to ``<to>/<table>.parquet``."""
    import pyarrow.parquet as pq

    out = Path(to)
    out.mkdir(parents=True, exist_ok=True)
    for table in RESULT_TABLES:
        pq.write_table(store.read(table, "list_contains($runs, run)", {"runs": list(runs)}), out / f"{table}.parquet")
    (out / "runs.txt").write_text("".join(f"{run}\n" for run in sorted(runs)))
    return out


def restore_results(store: Store, source: str | Path) -> int:
    """Append rows saved by save_results to ``store``, one commit per table and run; returns the commits
    made. Idempotent: rows already restored (the same shard id) are not added again."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    added = 0
    for table in RESULT_TABLES:
        rows = pq.read_table(Path(source) / f"{table}.parquet")
        for run in sorted(set(rows.column("run").to_pylist())):  # a commit holds one partition
            added += store.append(table, rows.filter(pc.equal(rows["run"], run)), shard_id=f"restored-{table}")
    return added
