"""``recpipe train --nproc N``: the same command on N trainer ranks under torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node N -m recpipe.train.launch train ...
    (recpipe train --nproc N does this, passing its arguments in RECPIPE_LAUNCH_ARGV)

Rank 0 runs the recpipe command line as given (its Trainer sees WORLD_SIZE and shards the model over
the ranks); every other rank runs ``recpipe.train.follow()``: it loads what rank 0 loads, trains its
share of each batch rank 0 sends, writes its optimizer shard, and never opens the store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence

ARGV_VARIABLE = "RECPIPE_LAUNCH_ARGV"


def torchrun_command(nproc: int) -> list[str]:
    """The command that runs recpipe on ``nproc`` local ranks (its arguments in RECPIPE_LAUNCH_ARGV)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "recpipe.train.launch"]


def relaunch(nproc: int, argv: Sequence[str], devices: Sequence[int] | None = None) -> int:
    """Run ``recpipe ARGV`` on ``nproc`` ranks (one per CUDA device of ``devices`` when given); its exit code.

    The arguments travel in the environment: torchrun's own parser would take recpipe options for
    abbreviations of its own (``--run`` for ``--run-path``, ``--nproc`` for ``--nproc-per-node``).
    """
    env = {**os.environ, ARGV_VARIABLE: json.dumps(list(argv))}
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.run(torchrun_command(nproc), env=env, check=False).returncode


def main() -> None:
    if int(os.environ.get("RANK", "0")) > 0:
        from recpipe.train.trainer import follow

        follow()
        return
    from recpipe.cli import main as cli

    given = os.environ.pop(ARGV_VARIABLE, None)  # popped: a command rank 0 starts must not inherit it
    sys.argv = ["recpipe", *(json.loads(given) if given is not None else sys.argv[1:])]
    cli()


if __name__ == "__main__":
    main()
