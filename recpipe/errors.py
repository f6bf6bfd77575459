"""The one base class of recpipe's user-facing errors, and the two kinds every layer raises.

A ``RecpipeError`` is something the user can fix (a bad option, a missing version, a run that is busy):
the CLI prints it as one line and exits 2. Any other exception is a bug and keeps its traceback. Each
module defines its own subclasses next to the code that raises them (StoreError, RunLocked,
CheckpointError, ...); a subclass also derives from the builtin error callers catch (ValueError, OSError).
"""

from __future__ import annotations


class RecpipeError(Exception):
    """An error the user can act on; its message says what happened and what to do."""


class ConfigError(RecpipeError, ValueError):
    """A configuration field is missing, unknown or has a bad value."""


class OptionError(RecpipeError, ValueError):
    """A command-line option or argument has a bad value; the message names the option and what is allowed."""
