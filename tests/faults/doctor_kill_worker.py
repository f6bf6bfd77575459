"""``python doctor_kill_worker.py STORE``: ``recpipe doctor --repair``'s repair, killed by SIGKILL right after
its first file move, as a crash (power loss, OOM kill) inside a repair would leave it."""

import os
import shutil
import signal
import sys

from recpipe.store import Store
from recpipe.store.doctor import diagnose, repair

_move = shutil.move


def move_then_die(src, dst, *args, **kwargs):  # noqa: ANN001, ANN201 - shutil.move's own signature
    _move(src, dst, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    store = Store(sys.argv[1])
    shutil.move = move_then_die
    repair(store, diagnose(store))
