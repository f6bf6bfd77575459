"""``recpipe train --nproc N``: the same command on N trainer ranks under torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node N -m recpipe.train.launch train ...

Rank 0 runs the recpipe command line as given (its Trainer sees WORLD_SIZE and shards the model over
the ranks); every other rank runs ``recpipe.train.follow()``: it loads what rank 0 loads, trains its
share of each batch rank 0 sends, writes its optimizer shard, and never opens the store.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence


def torchrun_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """The command that runs ``recpipe ARGV`` on ``nproc`` local ranks."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "recpipe.train.launch", *argv]


def relaunch(nproc: int, argv: Sequence[str], devices: Sequence[int] | None = None) -> int:
    """Run ``recpipe ARGV`` on ``nproc`` ranks (one per CUDA device of ``devices`` when given); its exit code."""
    env = dict(os.environ)
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.run(torchrun_command(nproc, argv), env=env, check=False).returncode


def main() -> None:
    if int(os.environ.get("RANK", "0")) > 0:
        from recpipe.train.trainer import follow

        follow()
        return
    from recpipe.cli import main as cli

    sys.argv = ["recpipe", *sys.argv[1:]]
    cli()


if __name__ == "__main__":
    main()
