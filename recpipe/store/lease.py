"""Exclusive roles of a run (one loop, one trainer), held through the archive itself, across machines.

    with store.lock("a", "trainer") as lease:   # RunLocked if another live process holds it
        ...
        lease.check()                            # LeaseLost if another process took it over meanwhile

A lease is a row of the ``leases`` table whose commit carries the application transaction
``run=<run>/lease/<purpose>`` at version ``epoch``. Delta commits an application transaction version
once only (two processes committing the same epoch: one gets a concurrent-transaction conflict), so
of two processes taking a lease at once exactly one wins, on a local disk as on S3.

The holder renews the lease from a background thread every ``ttl / 3`` seconds. A lease is free when
released, when its holder ran on this host and that process is gone (a kill -9 frees it at once), or
when its ``expires_at`` has passed (a holder on another machine that stopped renewing).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import threading
from types import TracebackType
from typing import TYPE_CHECKING

import pyarrow as pa

from recpipe.errors import RecpipeError
from recpipe.schema import SCHEMA_VERSION, conform
from recpipe.store.files import StoreWriteError

if TYPE_CHECKING:
    from recpipe.store import Store

DEFAULT_TTL_S = 60.0


class RunLocked(RecpipeError, RuntimeError):
    """Another live process holds this role of the run."""


class LeaseLost(RecpipeError, RuntimeError):
    """The lease expired and another process took it: this one must stop writing."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid from the holder)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def new_holder() -> str:
    """host:pid:start time:nonce - one per Lease object, so two leases of one process exclude each other too."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}:{os.urandom(4).hex()}"


def _alive_here(holder: str) -> bool:
    _, pid, started, _ = holder.rsplit(":", 3)
    return _start_time(int(pid)) == started


class Lease:
    def __init__(self, store: Store, run: str, purpose: str = "writer", ttl_s: float = DEFAULT_TTL_S):
        self.store, self.run, self.purpose, self.ttl_s = store, run, purpose, ttl_s
        self.app_id = f"run={run}/lease/{purpose}"
        self.holder = new_holder()
        self.epoch = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None
        self._mutex = threading.Lock()

    # ---- state in the archive -----------------------------------------------------------------
    def _current(self, store: Store) -> tuple[int, dict | None]:
        epoch = store.delta("leases").transaction_version(self.app_id) or 0
        if not epoch:
            return 0, None
        rows = store.read("leases", "run = $run AND purpose = $purpose AND epoch = $epoch",
                          {"run": self.run, "purpose": self.purpose, "epoch": epoch}).to_pylist()
        return epoch, rows[0] if rows else None

    def _free(self, row: dict | None) -> bool:
        if row is None or row["released"] or row["holder"] == self.holder:
            return True
        if row["host"] == socket.gethostname():
            return not _alive_here(row["holder"])
        return row["expires_at"] < dt.datetime.now(dt.UTC)

    def _commit(self, store: Store, epoch: int, *, released: bool) -> bool:
        now = dt.datetime.now(dt.UTC)
        host, pid = self.holder.split(":")[:2]
        row = {"run": self.run, "purpose": self.purpose, "epoch": epoch, "holder": self.holder,
               "host": host, "pid": int(pid), "released": released,
               "expires_at": now + dt.timedelta(seconds=self.ttl_s), "created_at": now,
               "schema_version": SCHEMA_VERSION}
        data = conform("leases", pa.Table.from_pylist([row]))
        relative = f"run={self.run}/lease-{self.purpose}-{epoch:08d}~{os.urandom(6).hex()}.parquet"
        return store.add_files("leases", [(relative, data.drop_columns(["run"]), {"run": self.run})],
                               app_id=self.app_id, app_version=epoch, operation=f"lease {self.purpose} {epoch}")

    # ---- verbs -------------------------------------------------------------------------------
    def acquire(self) -> Lease:
        for _ in range(5):
            epoch, row = self._current(self.store)
            if not self._free(row):
                raise RunLocked(
                    f"run {self.run!r} is being written by another process ({self.purpose} lease held by pid "
                    f"{row['pid']} on {row['host']}, renewed until {row['expires_at']:%Y-%m-%d %H:%M:%S} UTC); "
                    "wait for it to finish or stop it")
            try:
                taken = self._commit(self.store, epoch + 1, released=False)
            except StoreWriteError as exc:  # a read-only mount, no permission, a full disk: say which store
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                raise StoreWriteError(exc.errno, f"cannot take the {self.purpose} lease of run {self.run!r} in "
                                      f"{self.store.uri}: {reason}; nothing was written") from None
            if taken:
                self.epoch = epoch + 1
                self._start_heartbeat()
                return self
        raise RunLocked(f"run {self.run!r}: could not take the {self.purpose} lease (others kept taking it)")

    def _start_heartbeat(self) -> None:
        from recpipe.store import Store

        own = Store(self.store.uri, self.store.location.storage_options)  # its own table handles: a thread

        def beat() -> None:
            while not self._stop.wait(self.ttl_s / 3):
                with self._mutex:
                    if self._stop.is_set():
                        return
                    try:
                        if self._commit(own, self.epoch + 1, released=False):
                            self.epoch += 1
                        else:
                            self._lost = f"another process took the {self.purpose} lease of run {self.run!r}"
                            return
                    except Exception:  # a storage hiccup: the next beat comes well before expiry
                        continue

        self._stop.clear()
        self._thread = threading.Thread(target=beat, name=f"lease-{self.run}-{self.purpose}", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise LeaseLost if another process holds the lease now (call before a commit only one may make)."""
        if self._lost is None and self.epoch:
            epoch, row = self._current(self.store)
            if epoch != self.epoch and (row is None or row["holder"] != self.holder):
                self._lost = f"another process (pid {row['pid'] if row else '?'}) took the {self.purpose} lease"
        if self._lost is not None:
            raise LeaseLost(f"run {self.run!r}: {self._lost}; this process stops writing")

    def release(self) -> None:
        if not self.epoch:
            return
        self._stop.set()
        with self._mutex:
            if self._thread is not None:
                self._thread.join(timeout=1)
            if self._lost is None:
                # Best effort: a lease whose holder has exited is free anyway (here at once, elsewhere at expiry).
                with contextlib.suppress(OSError):
                    self._commit(self.store, self.epoch + 1, released=True)
            self.epoch = 0
            self._thread = None

    @property
    def held(self) -> bool:
        return bool(self.epoch) and self._lost is None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
