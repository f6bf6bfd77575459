"""Child processes tied to their parent's life (the Prefect API server, generator workers)."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` (runs in the child between fork and exec) asking the kernel to send the child ``sig``
    when its parent dies. None where there is no prctl (not Linux).

    The kernel sends it when the *thread* that forked the child ends, so it is only armed from the main
    thread, which lives as long as the process (Prefect starts the server from the flow engine's first
    client, in the main thread). libc is resolved here, in the parent: the child of a threaded process
    must not dlopen."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:  # the parent died before the line above: nobody would send it
            os.kill(os.getpid(), signal.SIGKILL)

    return arm
