"""The console: recpipe's step lines carry TRL's per-step numbers; library output goes to a log file."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from rich.console import Console

from recpipe.progress import LoopProgress, event_line, step_line, steps_markdown

ROW = {"step": 3, "policy_version": 4, "applied": True, "loss": 0.01234, "reward_mean": 0.25, "reward_std": 0.433,
       "grad_norm": 1.5, "clip_fraction": 0.125, "ratio_mean": 1.002, "entropy": 2.75, "staleness_mean": 1.0,
       "tokens_per_second": 812.4}


def test_step_line_has_the_numbers_trl_shows():
    line = step_line({"step": 3, "policy_version": 4, "applied": True, "row": ROW})
    assert line == ("step 3 -> v4  loss 0.0123  reward 0.250±0.433  grad 1.500  clip 0.125  ratio 1.002  "
                    "entropy 2.750  stale 1  tok/s 812")
    # An experiment's workers report only loss, reward and tokens/s, with the run's name.
    short = step_line({"run": "grpo-s0", "step": 1, "policy_version": 2, "applied": True, "loss": 0.5,
                       "reward": 0.1, "tokens_per_s": 50.0})
    assert short == "grpo-s0 step 1 -> v2  loss 0.5000  reward 0.100  tok/s 50"
    assert step_line({"step": 2, "applied": False, "skip_reason": "nan"}) == "step 2: skipped (nan)"
    assert event_line("eval", {"version": 2, "accuracy": 0.5, "n": 4}) == "eval v2: accuracy 0.500 (n=4)"


def test_progress_prints_plain_lines_and_quiet_prints_none():
    console = Console(record=True, width=200, force_terminal=False)
    with LoopProgress(2, console) as progress:
        progress("step", {"step": 0, "policy_version": 1, "applied": True, "row": ROW})
        progress("shard", {"version": 1, "shard": 0, "rows": 8, "reward": 0.5, "tokens_per_s": 100.0})
    text = console.export_text()
    assert text.splitlines() == [step_line({"step": 0, "policy_version": 1, "applied": True, "row": ROW}),
                                 "generate v1 shard 0: 8 rollouts, reward 0.500, 100 tok/s"]
    assert "progress.py" not in text  # no rich log-call suffix
    quiet = Console(record=True, width=200)
    with LoopProgress(2, quiet, quiet=True) as progress:
        progress("step", {"step": 0, "policy_version": 1, "applied": True, "row": ROW})
    assert quiet.export_text() == ""


def test_bars_on_a_terminal_leave_stderr_to_the_log_file():
    """rich's live display proxies sys.stderr by default: a library's warning would land on the terminal."""
    before = sys.stderr
    console = Console(record=True, width=200, force_terminal=True)
    with LoopProgress(2, console) as progress:
        assert progress.bar.live.is_started and sys.stderr is before
        progress("step", {"step": 0, "policy_version": 1, "applied": True, "row": ROW})
    assert "step 0 -> v1  loss 0.0123" in console.export_text()


def test_steps_markdown_one_row_per_step():
    md = steps_markdown([{**ROW, "step": 1, "policy_version": 2}, {"step": 0, "applied": False}], "run r")
    lines = md.splitlines()
    assert lines[0] == "# run r" and lines[2].startswith("| step | version | loss | reward | reward std |")
    assert lines[4] == "| 0 | skipped |  |  |  |  |  |  |  |  |  |"
    assert lines[5] == "| 1 | v2 | 0.0123 | 0.250 | 0.433 | 1.500 | 0.125 | 1.002 | 2.750 | 1 | 812 |"


def test_library_output_goes_to_a_log_file(tmp_path):
    """Output written to descriptor 2 by C code, Python warnings and a stderr handler set up before the
    redirect all land in the log; recpipe's console lines and its warnings stay on the real stderr."""
    script = textwrap.dedent("""
        import logging, os, sys, warnings
        from rich.console import Console
        from recpipe import progress
        early = logging.StreamHandler(sys.stderr)  # like Prefect's/vLLM's handlers, made at import time
        logging.getLogger("vllm").addHandler(early)
        console = Console(stderr=True)
        with progress.library_output(console, "loop", sys.argv[1]) as path:
            os.write(2, b"[W utils.cpp:68] Warning: NUMA binding\\n")
            warnings.warn("torch.distributed.reduce_op is deprecated", FutureWarning)
            logging.getLogger("vllm").warning("Triton is installed")
            print("Loading safetensors checkpoint shards: 100%", file=sys.stderr)
            console.print("step 0 -> v1  loss 0.1000")
            logging.getLogger("recpipe").warning("retrain: base model not on this machine")
        print(path)
    """)
    store = tmp_path / "store"
    done = subprocess.run([sys.executable, "-c", script, str(store)], capture_output=True, text=True,
                          env={"RECPIPE_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[:2] == ["step 0 -> v1  loss 0.1000", "warning: retrain: base model not on this machine"]
    assert len(lines) == 3 and lines[2].startswith("library output: ")
    log = (tmp_path / "cache" / "logs").glob("loop-*.log")  # no store there yet: the cache's log folder
    [path] = list(log)
    assert done.stdout.strip() == str(path)
    text = path.read_text()
    for noise in ("NUMA binding", "reduce_op is deprecated", "Triton is installed", "safetensors checkpoint"):
        assert noise in text
    assert "step 0" not in text
