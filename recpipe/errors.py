"""The one base class of recpipe's user-facing errors.

A ``RecpipeError`` is something the user can fix (a bad option, a missing version, a run that is busy):
the CLI prints it as one line and exits 2. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class RecpipeError(Exception):
    """An error the user can act on; its message says what happened and what to do."""
