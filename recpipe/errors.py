"""The one base class of recpipe's user-facing errors, the two kinds every layer raises, and the one
integer check every layer uses.

A ``RecpipeError`` is something the user can fix (a bad option, a missing version, a run that is busy):
the CLI prints it as one line and exits 2. Any other exception is a bug and keeps its traceback. Each
module defines its own subclasses next to the code that raises them (StoreError, RunLocked,
CheckpointError, ...); a subclass also derives from the builtin error callers catch (ValueError, OSError).
"""

from __future__ import annotations

import operator
from typing import Any


class RecpipeError(Exception):
    """An error the user can act on; its message says what happened and what to do."""


class ConfigError(RecpipeError, ValueError):
    """A configuration field is missing, unknown or has a bad value."""


class OptionError(RecpipeError, ValueError):
    """A command-line option or argument has a bad value; the message names the option and what is allowed."""


def as_int(value: Any) -> int:
    """``value`` as an int: Python and numpy integers pass; bools, 2.0 and "2" raise TypeError."""
    if isinstance(value, bool):
        raise TypeError("bool is not an integer")
    return operator.index(value)


def checked_int(name: str, value: Any, minimum: int, error: type[Exception] = ValueError) -> int:
    """``value`` (``as_int``) if it is at least ``minimum``; else ``error`` naming ``name``."""
    try:
        number = as_int(value)
    except TypeError:
        raise error(f"{name} must be an integer >= {minimum}; got {value!r}") from None
    if number < minimum:
        raise error(f"{name} must be an integer >= {minimum}; got {number}")
    return number
