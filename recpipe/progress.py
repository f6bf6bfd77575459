"""What a command shows while the pipeline runs, and where the libraries' own output goes.

    with library_output(console, "loop", store_uri):   # vLLM/torch/Prefect/safetensors -> a log file
        with LoopProgress(steps, console) as progress: # recpipe's bars and one line per shard/step/eval
            loop_flow(params, progress=progress)

On a terminal: a bar per stage (shards generated, steps trained) above one line per event; elsewhere
(a pipe, a log, a test) only the lines. A step's line holds the numbers TRL prints per step: loss,
reward mean/std, grad norm, clip fraction, importance ratio, entropy, staleness and tokens/s. Every
event is also logged on the ``recpipe`` logger (Prefect sends it to the run's logs, see flows/).
``--verbose`` leaves the libraries' output on stderr; ``--quiet`` shows no progress at all.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

log = logging.getLogger("recpipe")


@dataclass
class Output:
    """How much the current command shows (set by the CLI's --verbose / --quiet)."""

    verbose: bool = False
    quiet: bool = False


OUTPUT = Output()

# The step line: (row key, label, format); a missing value is left out. Row keys are the `steps` table's.
STEP_FIELDS = (("loss", "loss", ".4f"), ("reward_mean", "reward", ".3f"), ("reward_std", "±", ".3f"),
               ("grad_norm", "grad", ".3f"), ("clip_fraction", "clip", ".3f"), ("ratio_mean", "ratio", ".3f"),
               ("entropy", "entropy", ".3f"), ("staleness_mean", "stale", ".2g"),
               ("tokens_per_second", "tok/s", ".0f"))


def _number(value: Any, fmt: str) -> str | None:
    return None if value is None else format(value, fmt)


def step_line(info: dict[str, Any]) -> str:
    """One trained (or skipped) step as a line: 'step 3 -> v4  loss 0.0123  reward 0.250±0.433 ...'.

    ``info`` is the recipe's step event: its ``row`` (the `steps` row) when there is one, else the few
    numbers an experiment's workers report (loss, reward, tokens_per_s)."""
    who = f"{info['run']} " if info.get("run") else ""
    if not info.get("applied"):
        return f"{who}step {info['step']}: skipped ({info.get('skip_reason')})"
    row = dict(info.get("row") or {"loss": info.get("loss"), "reward_mean": info.get("reward"),
                                    "tokens_per_second": info.get("tokens_per_s")})
    parts = [f"{who}step {info['step']} -> v{info['policy_version']}"]
    for key, label, fmt in STEP_FIELDS:
        text = _number(row.get(key), fmt)
        if text is None:
            continue
        if label == "±":
            parts[-1] += f"±{text}"
        else:
            parts.append(f"{label} {text}")
    return "  ".join(parts)


def event_line(event: str, info: dict[str, Any]) -> str:
    """The line shown (and logged) for one recipe event."""
    if event == "shard":
        return (f"generate v{info['version']} shard {info['shard']}: {info['rows']} rollouts, "
                f"reward {info['reward']:.3f}, {info['tokens_per_s']:.0f} tok/s")
    if event == "step":
        return step_line(info)
    if event == "wait":
        return (f"step {info['step']}: waiting for generators, {info['missing']} of {info['shards']} shards "
                f"of v{info['version']} to go")
    if event == "eval":
        return f"eval v{info['version']}: accuracy {info['accuracy']:.3f} (n={info['n']})"
    if event == "flow_run":
        return f"prefect flow run {info['name']}: {info['url']}"
    return f"{event} {info}"


class LoopProgress:
    """A ``progress(event, info)`` callable for recpipe.recipe: a bar per stage and one line per event."""

    def __init__(self, total_steps: int, console: Console | None = None, *, quiet: bool | None = None):
        self.console = console or Console(stderr=True)
        self.quiet = OUTPUT.quiet if quiet is None else quiet
        self.bar = Progress(TextColumn("[bold]{task.description:<8}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("{task.fields[status]}"), console=self.console,
                            transient=True, disable=self.quiet or not self.console.is_terminal,
                            # rich would route sys.stderr through the console, above the bar: library
                            # output written there (warnings, tqdm bars) belongs in the log file
                            redirect_stderr=OUTPUT.verbose)
        self.shards = self.bar.add_task("generate", total=None, status="")
        self.steps = self.bar.add_task("train", total=total_steps or None, status="")

    def __enter__(self) -> LoopProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.stop()

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        line = event_line(event, info)
        log.info("%s", line)  # to the Prefect run's logs (and the log file), whatever the console shows
        if event == "shard":
            self.bar.update(self.shards, advance=1, status=f"v{info['version']}")
        elif event == "step":
            self.bar.update(self.steps, advance=1, status=f"step {info['step']}")
        if not self.quiet:
            self.console.print(line, highlight=False, markup=False, soft_wrap=True)


class _ConsoleWarnings(logging.Handler):
    """recpipe's own warnings on the console while the libraries' output goes to the log file."""

    def __init__(self, console: Console):
        super().__init__(logging.WARNING)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        self.console.print(f"[yellow]warning:[/] {record.getMessage()}", highlight=False, soft_wrap=True)


def log_dir(store: str | None) -> Path:
    """Where a command's library log goes: ``<store>/logs`` for a local store that exists, else (an S3 store,
    or one not created yet) ``logs`` in the store's local cache (recpipe.store.location)."""
    if store:
        from recpipe.store import Store
        from recpipe.store.location import Location

        try:
            location = Location.parse(store)
            if location.is_local and Store.exists(store):
                return location.cache_dir() / "logs"
            if not location.is_local:
                return location.cache_dir() / "logs"
        except Exception:  # a bad --store is the command's error to report, not this one's
            pass
    return _cache_logs()


def _cache_logs() -> Path:
    return Path(os.environ.get("RECPIPE_CACHE", Path.home() / ".cache" / "recpipe")) / "logs"


def _real_stderr() -> bool:
    """Whether sys.stderr is this process's descriptor 2 (not a test runner's capture, not a pipe wrapper)."""
    try:
        return sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


@contextlib.contextmanager
def library_output(console: Console, command: str, store: str | None = None) -> Iterator[Path | None]:
    """Unless --verbose: everything written to file descriptor 2 (Python warnings, tqdm/safetensors bars,
    vLLM and torch logs, C++ warnings such as NUMA's, Prefect's banner) goes to a log file, and ``console``
    writes to the real stderr. Yields the log's path (None with --verbose).

    Descriptor-level, since much of that output is printed by C/C++ code or by handlers holding the
    stderr object from import time. A local store created by the command gets the log moved into it."""
    if OUTPUT.verbose or not _real_stderr():
        yield None
        return
    name = f"{command}-{dt.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"
    try:
        target = _open_log(log_dir(store) / name)
    except OSError:  # a read-only store: the command reports that itself; its log goes to the cache
        target = _open_log(_cache_logs() / name)
    path = Path(target.name)
    sys.stderr.flush()
    saved = os.dup(2)
    real_stderr: TextIO = os.fdopen(os.dup(saved), "w", buffering=1)
    with target:
        os.dup2(target.fileno(), 2)
    previous_file = console._file  # None: follows sys.stderr
    console.file = real_stderr
    warnings = _ConsoleWarnings(console)
    log.addHandler(warnings)
    try:
        yield path
    finally:
        log.removeHandler(warnings)
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        console._file = previous_file
        real_stderr.close()
        # What Prefect logs after the command (its ephemeral server stopping, at exit) is not news either.
        logging.getLogger("prefect").setLevel(logging.WARNING)
        _settle_log(path, store, console)


def _open_log(path: Path) -> Any:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "ab", buffering=0)  # noqa: SIM115 - closed by the caller once descriptor 2 points at it


def _settle_log(path: Path, store: str | None, console: Console) -> None:
    """Drop an empty log; move one written before its local store existed into the store; say where it is."""
    if not path.exists():
        return
    if path.stat().st_size == 0:
        path.unlink()
        return
    final = log_dir(store)
    if final != path.parent and final != _cache_logs():
        try:
            final.mkdir(parents=True, exist_ok=True)
            path = Path(shutil.move(path, final / path.name))
        except OSError:
            pass  # a read-only store: the log stays in the cache
    if not OUTPUT.quiet:
        console.print(f"[dim]library output: {path}[/]", highlight=False, soft_wrap=True)


def steps_markdown(rows: list[dict[str, Any]], title: str) -> str:
    """The step table as Markdown (the loop's Prefect artifact): one line per step, the step line's numbers."""
    heads = ["step", "version", *[label if label != "±" else "reward std" for _, label, _ in STEP_FIELDS]]
    lines = [f"# {title}", "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for row in sorted(rows, key=lambda r: r["step"]):
        cells = [str(row["step"]), f"v{row['policy_version']}" if row.get("applied") else "skipped"]
        cells += [_number(row.get(key), fmt) or "" for key, _, fmt in STEP_FIELDS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
