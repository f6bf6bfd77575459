"""``python -m tests.store.append_worker URI WORKER SHARDS [--compact]``: append SHARDS generation shards to run "r".

Shard ids are f"s{i}" for i in 0..SHARDS-1 (the same in every worker: each must land exactly once),
plus f"w{WORKER}-{i}" of this worker alone. S3 settings come from the AWS_* environment. With
--compact the worker compacts the rollouts and groups tables between appends.
"""

from __future__ import annotations

import sys

from recpipe.store import Store
from tests.support import synthetic_rollouts

if __name__ == "__main__":
    uri, worker, shards = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = Store(uri)
    print("ready", flush=True)
    for i in range(shards):
        for shard in (f"s{i}", f"w{worker}-{i}"):
            store.append_rollouts(synthetic_rollouts(shard_id=shard, policy_version=i % 2, seed=i), shard_id=shard)
        if "--compact" in sys.argv:
            store.compact("rollouts")
            store.compact("groups")
