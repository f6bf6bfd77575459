"""How the CLI reports errors: a RecpipeError (the user can fix it) is one line and exit code 2; any other
exception is a bug and keeps its traceback (exit code 1)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from recpipe.errors import RecpipeError

# The real `recpipe status`, with one library function replaced by a bug.
BUGGY = """
import sys
import recpipe.status

def runs_status(store):
    raise {error}("an internal invariant broke")

recpipe.status.runs_status = runs_status
from recpipe.cli import main
sys.argv = ["recpipe", *sys.argv[1:]]
main()
"""


def recpipe(*args: str, error: str | None = None) -> subprocess.CompletedProcess[str]:
    code = BUGGY.format(error=error) if error else "from recpipe.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("errors") / "store")
    assert recpipe("init", "--store", root).returncode == 0
    return root


@pytest.mark.parametrize("error", ["KeyError", "ValueError", "OSError", "RuntimeError"])
def test_a_bug_inside_a_command_shows_its_traceback(store, error):
    # ValueError and KeyError used to be printed as one line with exit code 2, hiding the bug.
    result = recpipe("status", "--store", store, error=error)
    assert result.returncode == 1, result.stderr
    assert "Traceback (most recent call last)" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{error}: ") and "an internal invariant broke" in last, last
    assert "in runs_status" in result.stderr  # where the bug is


def test_a_user_error_is_one_line_and_exit_code_2(store, tmp_path):
    missing = recpipe("status", "--store", str(tmp_path / "nothing-here"))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"error: StoreError: {tmp_path / 'nothing-here'} is not a recpipe store (run `recpipe init --store "
        f"{tmp_path / 'nothing-here'}`)"]
    bad_option = recpipe("status", "--store", store, "--format", "xml")
    assert bad_option.returncode == 2
    assert bad_option.stderr.strip() == "error: OptionError: --format must be table or json (got 'xml')"


def test_user_errors_are_recpipe_errors_and_keep_their_builtin_base():
    # Callers (and tests) that catch ValueError / OSError / RuntimeError still catch them.
    from recpipe.config import ConfigError
    from recpipe.errors import OptionError
    from recpipe.export import ExportError
    from recpipe.output import OutputRefused
    from recpipe.status import VersionMissing
    from recpipe.store import StoreError
    from recpipe.store.files import StoreWriteError
    from recpipe.store.lease import LeaseLost, RunLocked
    from recpipe.store.location import LocationError
    from recpipe.train.checkpoint import CheckpointError

    for cls, base in [(ConfigError, ValueError), (OptionError, ValueError), (StoreError, ValueError),
                      (LocationError, ValueError), (VersionMissing, ValueError), (ExportError, ValueError),
                      (OutputRefused, ValueError), (CheckpointError, ValueError), (StoreWriteError, OSError),
                      (RunLocked, RuntimeError), (LeaseLost, RuntimeError)]:
        assert issubclass(cls, RecpipeError) and issubclass(cls, base), cls
