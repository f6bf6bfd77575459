"""Progress shown while the pipeline runs: rich bars on a terminal, one log line per event otherwise."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class LoopProgress:
    """A ``progress(event, info)`` callable for recpipe.recipe: steps bar plus the latest numbers."""

    def __init__(self, total_steps: int, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("{task.fields[status]}"), console=self.console,
                            transient=False)
        self.task = self.bar.add_task("steps", total=total_steps, status="starting")

    def __enter__(self) -> LoopProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.stop()

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event == "shard":
            status = (f"generated v{info['version']} shard {info['shard']}: {info['rows']} rollouts, "
                      f"reward {info['reward']:.3f}, {info['tokens_per_s']:.0f} tok/s")
        elif event == "step":
            self.bar.advance(self.task)
            if info.get("applied"):
                status = (f"step {info['step']}: loss {info['loss']:.4f}, batch reward {info['reward']:.3f}, "
                          f"{info['tokens_per_s'] or 0:.0f} tok/s -> policy v{info['policy_version']}")
            else:
                status = f"step {info['step']}: skipped ({info.get('skip_reason')})"
        elif event == "wait":
            status = (f"step {info['step']}: waiting for generators, {info['missing']} of {info['shards']} shards "
                      f"of v{info['version']} to go")
        elif event == "eval":
            status = f"eval v{info['version']}: accuracy {info['accuracy']:.3f} (n={info['n']})"
        else:
            status = f"{event} {info}"
        self.bar.update(self.task, status=status)
        self.console.log(status, highlight=False)
