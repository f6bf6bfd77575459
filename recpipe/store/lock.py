"""One writer per run: an advisory ``flock`` on ``<store>/locks/<run>.lock``.

The kernel drops a flock when its process dies, so a lock left by a killed
loop is stale by construction and the next writer takes it; the file's text
(pid, host, purpose, start time) only serves the error message.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from recpipe.store.files import StoreWriteError


class RunLocked(RuntimeError):
    """Another live process is writing this run."""


class RunLock:
    def __init__(self, path: Path, *, run: str, purpose: str = "writer"):
        self.path = Path(path)
        self.run = run
        self.purpose = purpose
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # a read-only mount, no permission, a full disk: say which store
            raise StoreWriteError(exc.errno, f"cannot take the writer lock of run {self.run!r} ({self.path}): "
                                  f"{exc.strerror}; nothing was written") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.path.read_text().strip() or "{}"
            os.close(fd)
            try:
                info = json.loads(holder)
            except json.JSONDecodeError:
                info = {}
            raise RunLocked(
                f"run {self.run!r} is being written by another process "
                f"(pid {info.get('pid', '?')} on {info.get('host', '?')}, {info.get('purpose', '?')} "
                f"since {info.get('since', '?')}); wait for it to finish or stop it"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
                                     "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())
            os.fsync(fd)
        except OSError as exc:  # e.g. a full disk: the holder's text is only for messages, but say so
            os.close(fd)
            raise StoreWriteError(exc.errno, f"cannot write the writer lock of run {self.run!r} ({self.path}): "
                                  f"{exc.strerror}; nothing was written") from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
