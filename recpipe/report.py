"""``recpipe report --run R``: PNG plots and one HTML page from the archive's tables.

    recpipe report --store store --run default --out report/
    recpipe report --store store --run grpo --run rec   # runs overlaid in each panel

Every number comes from SQL over the archive (the queries below), so a report
can be rebuilt at any time, for any run, without the model.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402

from recpipe.errors import OptionError  # noqa: E402
from recpipe.store import Store  # noqa: E402

QUERIES = {
    "rewards": """
        SELECT policy_version, avg(reward) AS reward_mean, avg(reward_parts.correctness) AS correct,
               count(*) AS rollouts
        FROM rollouts WHERE run = $run GROUP BY 1 ORDER BY 1""",
    "accuracy": "SELECT policy_version, accuracy, n FROM evals WHERE run = $run ORDER BY 1",
    "lengths": """
        SELECT policy_version, avg(response_length) AS length_mean, max(response_length) AS length_max,
               avg(CASE WHEN finish_reason = 'length' THEN 1.0 ELSE 0.0 END) AS truncated
        FROM rollouts WHERE run = $run GROUP BY 1 ORDER BY 1""",
    "steps": """
        SELECT step, loss, clip_fraction, ratio_mean, ratio_max, mismatch, entropy, grad_norm, staleness_mean,
               tokens_per_second, padding_fraction, applied
        FROM steps WHERE run = $run ORDER BY step""",
    "reward_values": "SELECT reward FROM rollouts WHERE run = $run AND reward_error IS NULL",
    "advantages": "SELECT advantage FROM batches WHERE run = $run",
    # The sample browser: each step's best and worst trained response (by reward, then advantage).
    "samples": """
        WITH trained AS (
            SELECT b.step, b.advantage, r.reward, r.rollout_id, b.source_run,
                   row_number() OVER (PARTITION BY b.step ORDER BY r.reward DESC, b.advantage DESC, r.rollout_id) AS best,
                   row_number() OVER (PARTITION BY b.step ORDER BY r.reward, b.advantage, r.rollout_id DESC) AS worst
            FROM batches b JOIN rollouts r ON r.rollout_id = b.rollout_id AND r.run = b.source_run
            WHERE b.run = $run)
        -- the texts and token lists of the two shown rollouts per step only, not of every trained one
        SELECT s.step, CASE WHEN best = 1 THEN 'best' ELSE 'worst' END AS sample, s.reward, advantage,
               r.response_length, r.finish_reason, r.response_text, s.rollout_id, r.response_token_ids,
               r.behaviour_logprobs, t.logprobs AS trained_logprobs
        FROM trained s JOIN rollouts r ON r.rollout_id = s.rollout_id AND r.run = s.source_run
        LEFT JOIN trained_tokens t ON t.run = $run AND t.step = s.step AND t.rollout_id = s.rollout_id
        WHERE best = 1 OR worst = 1 ORDER BY s.step, best""",
    "base_model": "SELECT base_model FROM policies WHERE run = $run ORDER BY version LIMIT 1",
    "staleness": """
        SELECT b.step - b.policy_version AS staleness, count(*) AS rollouts
        FROM batches b WHERE b.run = $run GROUP BY 1 ORDER BY 1""",
    "throughput": """
        SELECT stage, sum(seconds) AS seconds, sum(tokens) AS tokens,
               sum(tokens) / nullif(sum(seconds), 0) AS tokens_per_second, count(*) AS calls
        FROM timings WHERE run = $run GROUP BY 1 ORDER BY 1""",
    "timings": """
        SELECT stage, row_number() OVER (PARTITION BY stage ORDER BY created_at, item) AS call, seconds,
               tokens / nullif(seconds, 0) AS tokens_per_second
        FROM timings WHERE run = $run ORDER BY stage, call""",
}
SHOWN_TABLES = ("rewards", "accuracy", "lengths", "steps", "staleness", "throughput")
SAMPLE_CHARS = 600  # of each response shown in the sample browser
SAMPLE_TOKENS = 300  # of each response shown token by token, coloured by its importance ratio


def collect(store: Store, run: str) -> dict[str, list[dict[str, Any]]]:
    con = store.connect(read_only=True)
    try:
        return {name: con.sql(sql, params={"run": run}).to_arrow_table().to_pylist() for name, sql in QUERIES.items()}
    finally:
        con.close()


Series = tuple[str, list[Any], list[Any]]


def _axes(ax: Any, title: str, xlabel: str, ylabel: str, integer_x: bool) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if integer_x:  # steps and versions are whole numbers: no 0.5 ticks
        xs = {x for line in ax.lines for x in line.get_xdata()} | {
            x for c in ax.containers for x in getattr(c.lines[0], "get_xdata", lambda: [])()}
        if len(xs) == 1:  # one point: the locator would pick ticks around it like 0.995
            ax.set_xticks(sorted(xs))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def figure(title: str, series: list[Series], xlabel: str, ylabel: str, kind: str = "line",
           errors: dict[str, tuple[list[float], list[int]]] | None = None) -> Any:
    """One panel; ``errors[label]`` = (standard errors, n) draws that series as points with error bars."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for label, xs, ys in series:
        if kind == "hist":  # xs: the values; ys unused
            ax.hist(xs, bins=20, alpha=0.6 if len(series) > 1 else 0.9, label=label)
        elif kind == "bar":
            ax.bar([str(x) for x in xs], ys, width=0.6, label=label)
            if len(xs) == 1:  # one bar would fill the panel
                ax.set_xlim(-1.5, 1.5)
        elif errors and label in errors:
            err, ns = errors[label]
            ax.errorbar(xs, ys, yerr=err, fmt="s", capsize=4, label=label)
            for x, y, n in zip(xs, ys, ns, strict=True):
                ax.annotate(f"n={n}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7)
            ax.margins(x=0.08, y=0.12)  # room for the n= labels of points at the panel's edge
        else:
            ax.plot(xs, ys, marker="o", label=label)
    _axes(ax, title, xlabel, ylabel, integer_x=kind == "line")
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _stage_panels(path: Path, runs: dict[str, list[dict[str, Any]]]) -> bool:
    """Tokens/s of each call, one panel per stage with its own scale: select's 20k tokens/s would flatten
    generate's and train's hundreds on a shared axis. Stages without token counts show seconds per call."""
    stages = sorted({row["stage"] for rows in runs.values() for row in rows})
    if not stages:
        return False
    fig, axes = plt.subplots(1, len(stages), figsize=(3.4 * len(stages), 3.4), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        rows_of = {run: [r for r in rows if r["stage"] == stage] for run, rows in runs.items()}
        with_tokens = any(r["tokens_per_second"] is not None for rows in rows_of.values() for r in rows)
        key, unit = ("tokens_per_second", "tokens/s") if with_tokens else ("seconds", "seconds per call")
        for run, rows in rows_of.items():
            rows = [r for r in rows if r[key] is not None]
            ax.plot([r["call"] for r in rows], [r[key] for r in rows], marker=".", label=run)
        _axes(ax, stage, "call", unit, integer_x=True)
        if len(runs) > 1:
            ax.legend(fontsize=7)
    fig.suptitle("Throughput per stage")
    fig.tight_layout()
    _save(fig, path)
    return True


def _col(rows: list[dict[str, Any]], name: str) -> list[Any]:
    return [r[name] for r in rows]


def _standard_error(p: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on n prompts."""
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else 0.0


def write_report(store: Store, run: str | Sequence[str], out_dir: str | Path) -> Path:
    """Write the PNG plots and ``index.html`` for one run, or several overlaid; return the HTML path."""
    runs = [run] if isinstance(run, str) else list(dict.fromkeys(run))
    data = {name: collect(store, name) for name in runs}
    for name, d in data.items():
        if not d["rewards"] and not d["steps"]:
            raise OptionError(f"run {name!r} has no rollouts and no steps in {store.uri}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    several = len(runs) > 1

    def label(name: str, what: str) -> str:
        return f"{name}: {what}" if several else what

    def plot(name: str, title: str, series: list[Series], xlabel: str, ylabel: str, kind: str = "line",
             errors: dict[str, tuple[list[float], list[int]]] | None = None) -> None:
        if any(xs for _, xs, _ in series):
            _save(figure(title, series, xlabel, ylabel, kind, errors), out / f"{name}.png")
            plots.append((name, title))

    def per_run(table: str, x: str, y: str, what: str, applied_only: bool = False) -> list[Series]:
        series = []
        for name, d in data.items():
            rows = [row for row in d[table] if row.get("applied", True) or not applied_only]
            series.append((label(name, what), _col(rows, x), _col(rows, y)))
        return series

    errors = {}
    reward_series = per_run("rewards", "policy_version", "reward_mean", "sampled reward")
    reward_series += per_run("rewards", "policy_version", "correct", "sampled correct")
    for name, d in data.items():
        acc = d["accuracy"]
        what = label(name, "greedy eval accuracy (± s.e.)")
        reward_series.append((what, _col(acc, "policy_version"), _col(acc, "accuracy")))
        errors[what] = ([_standard_error(r["accuracy"], r["n"]) for r in acc], _col(acc, "n"))
    plot("reward", "Reward and accuracy per policy version", reward_series, "policy version",
         "reward / fraction correct", errors=errors)
    plot("loss", "Loss per step", per_run("steps", "step", "loss", "loss", True), "step", "loss")
    plot("clip_fraction", "Clip fraction per step", per_run("steps", "step", "clip_fraction", "clip fraction", True),
         "step", "fraction of tokens clipped")
    plot("ratio", "Importance ratio rho per step",
         per_run("steps", "step", "ratio_mean", "mean", True) + per_run("steps", "step", "ratio_max", "max", True)
         + per_run("steps", "step", "mismatch", "mean |l - l_old|", True), "step", "ratio / log-prob gap")
    plot("entropy", "Policy entropy per step", per_run("steps", "step", "entropy", "entropy", True), "step",
         "entropy (nats/token)")
    plot("grad_norm", "Gradient norm per step (before clipping)",
         per_run("steps", "step", "grad_norm", "grad norm", True), "step", "gradient L2 norm")
    plot("length", "Response length per policy version",
         per_run("lengths", "policy_version", "length_mean", "mean") + per_run("lengths", "policy_version",
                                                                             "length_max", "max"),
         "policy version", "response tokens")
    plot("truncation", "Truncated responses per policy version (finish_reason = length)",
         per_run("lengths", "policy_version", "truncated", "truncated"), "policy version", "fraction of responses")
    plot("reward_distribution", "Reward distribution (every scored rollout)",
         [(label(name, "reward"), _col(d["reward_values"], "reward"), []) for name, d in data.items()],
         "reward", "rollouts", kind="hist")
    plot("advantage_distribution", "Advantage distribution (every trained rollout)",
         [(label(name, "advantage"), _col(d["advantages"], "advantage"), []) for name, d in data.items()],
         "advantage", "rollouts", kind="hist")
    if several:
        plot("staleness", "Staleness of trained rollouts (step - generating version)",
             per_run("staleness", "staleness", "rollouts", "rollouts"), "staleness (steps)", "rollouts")
    else:
        plot("staleness", "Staleness of trained rollouts (step - generating version)",
             per_run("staleness", "staleness", "rollouts", "rollouts"), "staleness (steps)", "rollouts", kind="bar")
    if _stage_panels(out / "throughput.png", {name: d["timings"] for name, d in data.items()}):
        plots.append(("throughput", "Throughput per stage"))

    tables = "".join((f"<h2>run {html.escape(name)}</h2>" if several else "")
                     + "".join(_html_table(t, d[t]) for t in SHOWN_TABLES) for name, d in data.items())
    samples = "".join(_samples(name, d["samples"], several, _token_text(d["base_model"], d["samples"]))
                      for name, d in data.items())
    # no caption: each PNG carries its title (a caption repeated it under every panel)
    images = "".join(f'<figure><img src="{name}.png" alt="{html.escape(title)}"></figure>' for name, title in plots)
    title = "recpipe run" + ("s " if several else " ") + html.escape(", ".join(runs))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style>"
            f"</head><body><h1>{title}</h1><p>store: {html.escape(str(store.uri))}</p>"
            f"{images}{samples}{tables}<script>{SCRIPT}</script></body></html>")
    path = out / "index.html"
    path.write_text(page)
    return path


STYLE = ("body{font-family:sans-serif;margin:2em}figure{display:inline-block;margin:0.5em;vertical-align:top}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 6px;vertical-align:top}"
         "tr.best td.text{background:#eefbea}tr.worst td.text{background:#fdeeee}"
         "td.text pre{white-space:pre-wrap;max-width:70em;margin:0;font-size:0.85em}"
         "span.tok{border-radius:2px}")
# The sample browser's step filter: its options come from the rows, so a page without samples has none.
SCRIPT = """
for (const browser of document.querySelectorAll("section.samples")) {
  const select = browser.querySelector("select.step-filter");
  const rows = [...browser.querySelectorAll("tr.sample")];
  for (const step of [...new Set(rows.map(r => r.dataset.step))]) {
    select.add(new Option(`step ${step}`, step));
  }
  select.addEventListener("change", () => {
    for (const r of rows) r.hidden = select.value !== "all" && r.dataset.step !== select.value;
  });
}
"""


TokenText = Callable[[list[int]], list[str]]


def _token_text(rows: list[dict[str, Any]], samples: list[dict[str, Any]]) -> TokenText | None:
    """Each token id's text, by the run's base model's tokenizer (the one that made the rollouts' ids:
    recpipe refuses to train a run on another tokenizer's ids); None when it cannot be loaded here
    (the report then shows token ids), or when no sample is shown token by token (nothing to load)."""
    if not rows or all(r["trained_logprobs"] is None for r in samples):
        return None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(rows[0]["base_model"])
    except Exception:  # moved, deleted, or a hub id not in this machine's cache: ids instead of text
        return None
    return lambda ids: [tokenizer.decode([i]) for i in ids]


def _ratio_colour(ratio: float) -> str:
    """Red above 1 (the trained policy likes the token more than the sampler did), blue below; full
    colour at a factor of e (|log ratio| >= 1)."""
    if not math.isfinite(ratio) or ratio <= 0:
        return "rgba(128,128,128,0.5)"
    strength = min(abs(math.log(ratio)), 1.0) * 0.8
    return f"rgba(220,40,40,{strength:.2f})" if ratio > 1 else f"rgba(40,90,220,{strength:.2f})"


def _ratio_tokens(r: dict[str, Any], token_text: TokenText | None) -> str | None:
    """The response token by token, each coloured by its importance ratio exp(l - l_old) at the step
    (l: trained_tokens.logprobs, l_old: the behaviour log-prob); None without the step's token log-probs."""
    trained, behaviour, ids = r["trained_logprobs"], r["behaviour_logprobs"], r["response_token_ids"]
    if trained is None or len(trained) != len(ids):
        return None
    shown = ids[:SAMPLE_TOKENS]
    pieces = token_text(shown) if token_text is not None else [f"[{i}]" for i in shown]
    spans = []
    for piece, token, lp, old in zip(pieces, shown, trained, behaviour, strict=False):
        ratio = math.exp(lp - old) if math.isfinite(lp - old) else math.nan
        spans.append(f"<span class='tok' style='background:{_ratio_colour(ratio)}' data-ratio='{ratio:.4g}' "
                     f"title='ratio {ratio:.3g}, l {lp:.3f}, l_old {old:.3f}, id {token}'>{html.escape(piece)}</span>")
    more = f" ... ({len(ids)} tokens)" if len(ids) > SAMPLE_TOKENS else ""
    return "".join(spans) + more


def _samples(run: str, rows: list[dict[str, Any]], several: bool, token_text: TokenText | None = None) -> str:
    """Each step's best and worst trained response, with its reward and advantage, coloured token by token
    by its importance ratio where the step's token log-probs are archived; a step filter."""
    heading = f"Samples per step, run {html.escape(run)}" if several else "Samples per step"
    if not rows:
        return f"<section class='samples'><h2>{heading}</h2><p>(no trained rollouts)</p></section>"
    body = []
    for r in rows:
        shown = _ratio_tokens(r, token_text)
        if shown is None:
            text = r["response_text"]
            shown = html.escape(text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS]
                                + f" ... ({len(text)} characters)")
        body.append(f"<tr class='sample {r['sample']}' data-step='{r['step']}'><td>{r['step']}</td><td>{r['sample']}"
                    f"</td><td>{_fmt(r['reward'])}</td><td>{_fmt(r['advantage'])}</td><td>{r['response_length']}"
                    f"</td><td>{html.escape(r['finish_reason'])}</td><td class='text'><pre>{shown}</pre>"
                    f"</td><td>{html.escape(r['rollout_id'])}</td></tr>")
    head = "".join(f"<th>{h}</th>" for h in ("step", "sample", "reward", "advantage", "tokens", "finish",
                                               "response", "rollout_id"))
    legend = ("<p class='legend'>Tokens are coloured by their importance ratio exp(l - l_old) at the step: "
              "<span class='tok' style='background:rgba(220,40,40,0.8)'>above 1</span> the trained policy gives "
              "the token more probability than the sampler did, <span class='tok' "
              "style='background:rgba(40,90,220,0.8)'>below 1</span> less; hover a token for its numbers.</p>")
    return (f"<section class='samples'><h2>{heading}</h2>{legend}<label>show <select class='step-filter'>"
            f"<option value='all'>every step</option></select></label><table><tr>{head}</tr>{''.join(body)}"
            "</table></section>")


def _html_table(name: str, rows: list[dict[str, Any]]) -> str:
    if not rows:
        return f"<h3>{name}</h3><p>(no rows)</p>"
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row.values()) + "</tr>" for row in rows)
    return f"<h3>{name}</h3><table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    if value is None:
        return "<span style='color:#999'>NULL</span>"
    return f"{value:.4g}" if isinstance(value, float) else html.escape(str(value))
