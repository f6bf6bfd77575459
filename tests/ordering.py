"""Run the test files longest first, so that the two xdist workers finish together.

With ``--dist loadfile`` each worker runs whole files and takes the next one when it is done; if a
90-second file comes last, one worker runs it alone while the other idles (measured: the last ~3
minutes of a 21-minute suite). Files are ordered by their measured seconds in ``tests/durations.json``
(longest first, a greedy schedule within 4/3 of the best); a file not measured yet counts as
``UNMEASURED_S``. pyproject.toml passes ``--no-loadscope-reorder``, without which xdist would reorder
files by their number of tests instead.

Measure again after adding or changing slow tests (one full run, then commit the file):

    .venv/bin/python -m pytest -q --record-durations
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

DURATIONS = Path(__file__).resolve().parent / "durations.json"
UNMEASURED_S = 10.0  # a new file: most are unit tests, a few seconds each


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--record-durations", action="store_true",
                     help=f"write each test file's total seconds to {DURATIONS.name} (for the file order)")


def file_seconds() -> dict[str, float]:
    try:
        return {str(k): float(v) for k, v in json.loads(DURATIONS.read_text()).items()}
    except (OSError, ValueError):
        return {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest files first; tests keep their order within a file (module fixtures are shared)."""
    seconds = file_seconds()
    order = {item.nodeid.split("::", 1)[0]: i for i, item in reversed(list(enumerate(items)))}
    items.sort(key=lambda item: (-seconds.get(item.nodeid.split("::", 1)[0], UNMEASURED_S),
                                 order[item.nodeid.split("::", 1)[0]]))


class _Recorder:
    """On the controller (or the only process): each file's setup + call + teardown seconds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[report.nodeid.split("::", 1)[0]] += report.duration

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if not self.seconds:
            return
        merged = {**file_seconds(), **{f: round(s, 1) for f, s in self.seconds.items()}}
        DURATIONS.write_text(json.dumps(dict(sorted(merged.items())), indent=1) + "\n")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("record_durations") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(_Recorder(), "recpipe-durations")
