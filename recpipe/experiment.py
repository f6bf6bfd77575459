"""The paper's study in one command: loss presets x off-policy settings, one archive.

Each (preset, setting) pair is a run named ``<preset>.<setting>`` in the same
store, so every comparison is one SQL query away. Settings follow
algorithms.md: on-policy (k=1, o=0), periodic sync (k, 0), fixed lag (1, o),
fully offline (every step trains on version-0 rollouts); ``k:o`` for any other.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow as pa  # noqa: E402

from recpipe.config import RecpipeConfig  # noqa: E402
from recpipe.store import Store  # noqa: E402


def parse_settings(text: str, steps: int) -> dict[str, tuple[int, int]]:
    """Named sync settings scaled to a run of ``steps`` steps (the paper's are for 300+ steps)."""
    third = max(1, steps // 3)
    named = {"onpolicy": (1, 0), "sync": (max(2, third), 0), "lag": (1, third), "offline": (steps + 1, steps - 1)}
    grid = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item in named:
            grid[item] = named[item]
        elif ":" in item:
            k, _, o = item.partition(":")
            try:
                grid[f"k{int(k)}o{int(o)}"] = (int(k), int(o))
            except ValueError:
                raise ValueError(f"--settings item {item!r}: expected k:o with integers") from None
        else:
            raise ValueError(f"--settings item {item!r}: expected one of {', '.join(named)} or k:o")
    if not grid:
        raise ValueError("--settings is empty")
    return grid


def experiment_configs(base: RecpipeConfig, presets: list[str], grid: dict[str, tuple[int, int]]) -> list[RecpipeConfig]:
    configs = []
    for preset in presets:
        for name, (k, o) in grid.items():
            data = base.model_dump()
            data["run"] = f"{preset}.{name}"
            data["loss"] = {"preset": preset, "overrides": base.loss.overrides}
            data["loop"].update(sync_interval=k, sync_offset=o)
            configs.append(RecpipeConfig.model_validate(data))  # bad preset names fail before any run starts
    return configs


COMPARISON = """
SELECT e.run, max_by(e.accuracy, e.policy_version) AS final_accuracy, max(e.accuracy) AS best_accuracy,
       min(e.policy_version) FILTER (WHERE e.accuracy >= $threshold) AS steps_to_threshold
FROM evals e WHERE list_contains($runs, e.run) GROUP BY e.run ORDER BY e.run
"""


def run_experiment(base: RecpipeConfig, presets: list[str], grid: dict[str, tuple[int, int]],
                   run_one: Callable[[RecpipeConfig], Any], *, threshold: float = 0.5,
                   out_dir: str | Path | None = None) -> tuple[pa.Table, Path]:
    """Run every (preset, setting) with ``run_one`` (the loop flow); write the table and the plot."""
    configs = experiment_configs(base, presets, grid)
    wall = {}
    for cfg in configs:
        started = time.perf_counter()
        run_one(cfg)
        wall[cfg.run] = time.perf_counter() - started
    store = Store(base.store, base.storage_options or None)
    runs = [c.run for c in configs]
    con = store.connect(read_only=True)
    rows = con.sql(COMPARISON, params={"threshold": threshold, "runs": runs}).to_arrow_table().to_pylist()
    curves = con.sql("SELECT run, policy_version, accuracy FROM evals WHERE list_contains($runs, run) "
                     "ORDER BY run, policy_version", params={"runs": runs}).to_arrow_table().to_pylist()
    for row in rows:
        row["wall_seconds"] = round(wall.get(row["run"], float("nan")), 1)
    table = pa.Table.from_pylist(rows)
    out = Path(out_dir) if out_dir else store.root / "reports" / "experiment"
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.csv").write_text(
        ",".join(table.column_names) + "\n" + "\n".join(",".join(str(v) for v in r.values()) for r in rows) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        pts = [(c["policy_version"], c["accuracy"]) for c in curves if c["run"] == run]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=run)
    ax.set_xlabel("policy version (= training steps)")
    ax.set_ylabel("greedy held-out accuracy")
    ax.set_title("presets x off-policy settings")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=100)
    plt.close(fig)
    return table, out / "comparison.csv"
