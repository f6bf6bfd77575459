"""behaviour_version v(s) = max(0, floor((s - o) / k) * k) on the paper's four settings."""

from __future__ import annotations

import numpy as np
import pytest

from recpipe.algorithms import behaviour_version


def staleness(step: int, k: int, o: int) -> int:
    """s - v(s): how many optimizer steps old the policy that generated step s's batch is."""
    return step - behaviour_version(step, k, o)


def versions(k: int, o: int, steps: int) -> list[int]:
    return [behaviour_version(s, k, o) for s in range(steps)]


def test_on_policy():  # k=1, o=0: every step trains on its own version
    assert versions(1, 0, 5) == [0, 1, 2, 3, 4]
    assert all(staleness(s, 1, 0) == 0 for s in range(50))


def test_periodic_sync():  # k=20, o=0: generate every 20 steps, staleness cycles 0..19
    assert versions(20, 0, 45) == [0] * 20 + [20] * 20 + [40] * 5
    assert [staleness(s, 20, 0) for s in (0, 19, 20, 39, 40)] == [0, 19, 0, 19, 0]


def test_fixed_lag():  # k=1, o=10: version s - 10, clamped at 0 for the first steps
    assert versions(1, 10, 13) == [0] * 11 + [1, 2]
    assert staleness(10, 1, 10) == 10 and staleness(100, 1, 10) == 10
    assert staleness(5, 1, 10) == 5  # the first steps are younger than the lag


def test_fully_offline():  # k=300, o=199: a 300-step run trains on version 0 throughout
    assert set(versions(300, 199, 300)) == {0}
    assert behaviour_version(498, 300, 199) == 0 and behaviour_version(499, 300, 199) == 300


def test_numpy_integers_are_accepted():
    assert behaviour_version(np.int64(45), np.int32(20), 0) == 40


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((-1, 1, 0), "step"),
        ((0, 0, 0), "sync_interval"),
        ((0, 1, -1), "sync_offset"),
        ((1.0, 1, 0), "step"),
        ((1, "2", 0), "sync_interval"),
        ((1, True, 0), "sync_interval"),
    ],
)
def test_invalid_arguments_name_the_field(args, field):
    with pytest.raises(ValueError, match=field):
        behaviour_version(*args)
