"""``recpipe report --run R``: PNG plots and one HTML page from the archive's tables.

    recpipe report --store store --run default --out report/

Every number comes from SQL over the archive (the queries below), so a report
can be rebuilt at any time, for any run, without the model.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402

from recpipe.store import Store  # noqa: E402

QUERIES = {
    "rewards": """
        SELECT policy_version, avg(reward) AS reward_mean, avg(reward_parts.correctness) AS correct,
               count(*) AS rollouts
        FROM rollouts WHERE run = $run GROUP BY 1 ORDER BY 1""",
    "accuracy": "SELECT policy_version, accuracy FROM evals WHERE run = $run ORDER BY 1",
    "steps": """
        SELECT step, loss, clip_fraction, ratio_mean, ratio_max, mismatch, entropy, staleness_mean,
               tokens_per_second, padding_fraction, applied
        FROM steps WHERE run = $run ORDER BY step""",
    "staleness": """
        SELECT b.step - b.policy_version AS staleness, count(*) AS rollouts
        FROM batches b WHERE b.run = $run GROUP BY 1 ORDER BY 1""",
    "throughput": """
        SELECT stage, sum(seconds) AS seconds, sum(tokens) AS tokens,
               sum(tokens) / nullif(sum(seconds), 0) AS tokens_per_second, count(*) AS calls
        FROM timings WHERE run = $run GROUP BY 1 ORDER BY 1""",
}


def collect(store: Store, run: str) -> dict[str, list[dict[str, Any]]]:
    con = store.connect(read_only=True)
    try:
        return {name: con.sql(sql, params={"run": run}).to_arrow_table().to_pylist() for name, sql in QUERIES.items()}
    finally:
        con.close()


def _plot(path: Path, title: str, series: list[tuple[str, list[Any], list[Any]]], xlabel: str, kind: str = "line") -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, xs, ys in series:
        if kind == "bar":
            ax.bar([str(x) for x in xs], ys, label=label)
        else:
            ax.plot(xs, ys, marker="o", label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _col(rows: list[dict[str, Any]], name: str) -> list[Any]:
    return [r[name] for r in rows]


def write_report(store: Store, run: str, out_dir: str | Path) -> Path:
    """Write the PNG plots and ``index.html`` for ``run``; return the HTML path."""
    data = collect(store, run)
    if not data["rewards"] and not data["steps"]:
        raise ValueError(f"run {run!r} has no rollouts and no steps in {store.root}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = []

    def plot(name: str, title: str, series: list[tuple[str, list[Any], list[Any]]], xlabel: str,
             kind: str = "line") -> None:
        if any(xs for _, xs, _ in series):
            _plot(out / f"{name}.png", title, series, xlabel, kind)
            plots.append((name, title))

    r, s = data["rewards"], [row for row in data["steps"] if row["applied"]]
    plot("reward", "Reward and accuracy per policy version",
         [("sampled reward", _col(r, "policy_version"), _col(r, "reward_mean")),
          ("sampled correct", _col(r, "policy_version"), _col(r, "correct")),
          ("greedy eval accuracy", _col(data["accuracy"], "policy_version"), _col(data["accuracy"], "accuracy"))],
         "policy version")
    plot("loss", "Loss per step", [("loss", _col(s, "step"), _col(s, "loss"))], "step")
    plot("clip_fraction", "Clip fraction per step", [("clip fraction", _col(s, "step"), _col(s, "clip_fraction"))],
         "step")
    plot("ratio", "Importance ratio rho per step",
         [("mean", _col(s, "step"), _col(s, "ratio_mean")), ("max", _col(s, "step"), _col(s, "ratio_max")),
          ("mean |l - l_old|", _col(s, "step"), _col(s, "mismatch"))], "step")
    plot("staleness", "Staleness of trained rollouts (step - generating version)",
         [("rollouts", _col(data["staleness"], "staleness"), _col(data["staleness"], "rollouts"))], "staleness",
         kind="bar")
    t = [row for row in data["throughput"] if row["tokens_per_second"] is not None]
    plot("throughput", "Tokens/s per stage", [("tokens/s", _col(t, "stage"), _col(t, "tokens_per_second"))],
         "stage", kind="bar")

    tables = "".join(_html_table(name, rows) for name, rows in data.items())
    images = "".join(f'<figure><img src="{name}.png" alt="{html.escape(title)}"><figcaption>{html.escape(title)}'
                     f"</figcaption></figure>" for name, title in plots)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>recpipe run {html.escape(run)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}figure{display:inline-block;margin:0.5em}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 6px}</style>"
            f"</head><body><h1>recpipe run {html.escape(run)}</h1><p>store: {html.escape(str(store.root))}</p>"
            f"{images}{tables}</body></html>")
    path = out / "index.html"
    path.write_text(page)
    return path


def _html_table(name: str, rows: list[dict[str, Any]]) -> str:
    if not rows:
        return f"<h2>{name}</h2><p>(no rows)</p>"
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row.values()) + "</tr>" for row in rows)
    return f"<h2>{name}</h2><table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else html.escape(str(value))
