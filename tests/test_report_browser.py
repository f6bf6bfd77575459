"""``recpipe report``'s page as a browser shows it: headless Chromium (Debian's ``chromium``) renders the
HTML of a small tiny-model run, runs its script, and takes a screenshot (under the test's tmp dir)."""

from __future__ import annotations

import math
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recpipe.cli import app
from recpipe.config import load_config
from recpipe.recipe import LoopRecipe
from recpipe.store import Store

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
STEPS = 2
PANELS = ("reward", "loss", "clip_fraction", "ratio", "entropy", "grad_norm", "length", "truncation",
          "reward_distribution", "advantage_distribution", "staleness", "throughput")


def render(page, screenshot, width=1400, height=5000):
    """(DOM after the page's scripts ran, console lines) of ``page``; writes ``screenshot``."""
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr",
         "--allow-file-access-from-files", f"--window-size={width},{height}", f"--screenshot={screenshot}",
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console


def png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


@pytest.mark.slow  # a 2-step loop of the tiny model (~1-2 min on 2 busy cores) and a browser
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary: scripts/setup.sh installs Debian's chromium "
                                              "(apt-get, as root); or install it yourself")
def test_the_report_renders_in_a_browser_with_every_panel_and_the_sample_browser(tmp_path, tiny_model):
    store = tmp_path / "store"
    cfg = load_config(overrides=[
        f"store={store}", "run=demo", f"model.name={tiny_model}", f"loop.steps={STEPS}", "generate.backend=hf",
        "select.groups_per_step=2", "generate.group_size=4", "generate.max_tokens=8", "generate.shard_size=2",
        "task.eval_prompts=4", "generate.max_model_len=128"])
    with LoopRecipe(cfg) as recipe:
        recipe.run()
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", "--store", str(store), "--run", "demo", "--out", str(out)])
    assert result.exit_code == 0, result.output

    dom, console = render(out / "index.html", tmp_path / "report.png")

    assert console == [], console  # no script error, no image that failed to load
    for name in PANELS:
        assert re.search(rf'<img src="{name}\.png" alt="[^"]+">', dom), name
        assert (out / f"{name}.png").stat().st_size > 5000, name
    assert dom.count("<figure>") == len(PANELS)
    # the sample browser: each step's best and worst trained response, as the archive has them
    rows = re.findall(r'<tr class="sample (best|worst)" data-step="(\d+)"><td>\d+</td><td>\w+</td>'
                      r"<td>([^<]+)</td><td>([^<]+)</td>", dom)
    assert [(kind, int(step)) for kind, step, _, _ in rows] == [
        (kind, step) for step in range(STEPS) for kind in ("best", "worst")]
    con = Store(store).connect(read_only=True)
    for kind, step, reward, _ in rows:
        rewards = [r for (r,) in con.execute(
            "SELECT r.reward FROM batches b JOIN rollouts r USING (rollout_id) WHERE b.run = 'demo' AND b.step = ?",
            [int(step)]).fetchall()]
        assert float(reward) == pytest.approx(max(rewards) if kind == "best" else min(rewards), abs=1e-3)
    # each shown response coloured token by token by its importance ratio at the step (trained_tokens)
    for kind, step, body in re.findall(r'<tr class="sample (best|worst)" data-step="(\d+)">(.*?)</tr>', dom, re.S):
        rollout_id = re.findall(r"<td>([^<]*)</td>", body)[-1]
        ((trained, behaviour),) = con.execute(
            "SELECT t.logprobs, r.behaviour_logprobs FROM trained_tokens t JOIN rollouts r USING (rollout_id) "
            "WHERE t.run = 'demo' AND t.step = ? AND t.rollout_id = ?", [int(step), rollout_id]).fetchall()
        shown = [float(x) for x in re.findall(r'<span class="tok" style="[^"]+" data-ratio="([^"]+)"', body)]
        assert shown == pytest.approx([math.exp(a - b) for a, b in zip(trained, behaviour, strict=True)],
                                      rel=1e-3), (kind, step)
        assert shown and all(0.2 < x < 5 for x in shown)  # the loss's ratios: near 1 one step from the sampler
    # docs/observability.md's SQL for the same ratios runs on this store and gives them
    doc = (Path(__file__).parents[1] / "docs" / "observability.md").read_text()
    query = re.search(r"```sql\n(SELECT t.step.*?)```", doc, re.S).group(1).replace("'default'", "'demo'")
    for step, rollout_id, ratios in con.execute(query).fetchall():
        ((trained, behaviour),) = con.execute(
            "SELECT t.logprobs, r.behaviour_logprobs FROM trained_tokens t JOIN rollouts r USING (rollout_id) "
            "WHERE t.step = ? AND t.rollout_id = ?", [step, rollout_id]).fetchall()
        assert ratios == pytest.approx([math.exp(a - b) for a, b in zip(trained, behaviour, strict=True)], rel=1e-5)
    # the step filter's options were made by the page's script from the rows (absent from the HTML file)
    assert re.findall(r'<option value="(\w+)">', dom) == ["all", *map(str, range(STEPS))]
    assert '<option value="0">' not in (out / "index.html").read_text()
    width, height = png_size(tmp_path / "report.png")
    assert (width, height) == (1400, 5000) and (tmp_path / "report.png").stat().st_size > 100_000
