"""Which policy version generated the batch of training step s (docs/algorithms.md, "Off-policyness").

    behaviour_version(step=25, sync_interval=20, sync_offset=0)   # -> 20: staleness s - v(s) = 5

    v(s) = max(0, floor((s - o) / k) * k)

k = sync_interval, o = sync_offset; version n = the weights after n optimizer steps.
"""

from __future__ import annotations

import operator


def _as_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    try:
        value = operator.index(value)  # accepts numpy integers, rejects 2.0 and "2"
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value}")
    return value


def behaviour_version(step: int, sync_interval: int, sync_offset: int) -> int:
    """v(s) = max(0, floor((s - o) / k) * k): the policy version whose rollouts step s trains on."""
    s = _as_int("step", step, 0)
    k = _as_int("sync_interval", sync_interval, 1)
    o = _as_int("sync_offset", sync_offset, 0)
    return max(0, (s - o) // k * k)  # // floors towards -inf, as floor() does

