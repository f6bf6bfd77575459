"""``python -m tests.faults.doctor_kill_worker STORE POINT``: ``recpipe doctor --repair``'s repair, killed by SIGKILL at POINT,
as a crash (power loss, OOM kill) inside a repair would leave it:

* ``first-commit``: right after its first Delta commit (a damaged rollouts file: its summary rows removed,
  the file itself still listed);
* ``rollouts-copy``: right after a rollouts file was copied to quarantine, before the commit removing it.
"""

import os
import signal
import sys

import recpipe.store.doctor as doctor
from recpipe.store import Store


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    store, point = Store(sys.argv[1]), sys.argv[2]
    if point == "first-commit":
        add_files = Store.add_files

        def add_then_die(self, *args, **kwargs):  # noqa: ANN001, ANN202 - Store.add_files's own signature
            add_files(self, *args, **kwargs)
            die()

        Store.add_files = add_then_die
    elif point == "rollouts-copy":
        copy = doctor.copy_to_quarantine

        def copy_then_die(store, table, file):  # noqa: ANN001, ANN202
            target = copy(store, table, file)
            if table == "rollouts":
                die()
            return target

        doctor.copy_to_quarantine = copy_then_die
    else:
        raise SystemExit(f"unknown kill point {point!r}")
    doctor.repair(store, doctor.diagnose(store))
