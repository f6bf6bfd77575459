"""Which policy version generated the batch of training step s (docs/algorithms.md, "Off-policyness").

    behaviour_version(step=25, sync_interval=20, sync_offset=0)   # -> 20: staleness s - v(s) = 5

    v(s) = max(0, floor((s - o) / k) * k)

k = sync_interval, o = sync_offset; version n = the weights after n optimizer steps.
"""

from __future__ import annotations

from recpipe.errors import checked_int


def behaviour_version(step: int, sync_interval: int, sync_offset: int) -> int:
    """v(s) = max(0, floor((s - o) / k) * k): the policy version whose rollouts step s trains on."""
    s = checked_int("step", step, 0)
    k = checked_int("sync_interval", sync_interval, 1)
    o = checked_int("sync_offset", sync_offset, 0)
    return max(0, (s - o) // k * k)  # // floors towards -inf, as floor() does

