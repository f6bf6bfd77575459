"""Retention rules (issue 19, item 4): what a run extended with more steps still samples from stays."""

from __future__ import annotations

import pytest

from recpipe.algorithms import behaviour_version
from recpipe.config import load_config
from recpipe.recipe import needed_versions
from recpipe.train.checkpoint import future_versions, versions_to_keep


def test_a_3_step_run_keeps_the_version_its_4th_step_would_sample_from():
    # v(s) for k=2, o=1: 0 0 0 2 2 4. After 3 steps the run is at v3; `loop --steps 6` then needs v2.
    for query in ("schedule", "fresh"):  # every query samples on the same schedule
        cfg = load_config(overrides=["loop.steps=3", "loop.sync_interval=2", "loop.sync_offset=1",
                                     f"select.query={query}"])
        assert needed_versions(cfg, from_step=3, current_version=3) == {2}


@pytest.mark.parametrize("k,o", [(1, 0), (2, 1), (3, 0), (4, 7), (20, 0), (1, 10), (300, 199)])
def test_future_versions_are_exactly_the_existing_behaviour_versions_of_later_steps(k, o):
    for current in range(0, 30):
        from_step = current  # every step applied: the next step is the current version
        kept = future_versions(lambda s: behaviour_version(s, k, o), from_step, current, max_lag=k + o)
        # What any longer run samples from (a horizon well past every existing version) ...
        used = {behaviour_version(s, k, o) for s in range(from_step, from_step + 10 * (k + o) + 50)}
        assert kept == {v for v in used if v <= current}, (current, kept)
        # ... is at most one sync point's version per k steps, and never below the newest sync point.
        assert all(v >= behaviour_version(from_step, k, o) for v in kept)


def test_the_latest_two_versions_stay_even_when_nothing_needs_them():
    # keep_every=10 on a 6-step run used to keep v6 alone: one damaged folder lost the run.
    assert versions_to_keep(range(1, 7), latest=6, keep_every=10, needed=()) == {5, 6}
    assert versions_to_keep([1, 2, 6], latest=6, keep_every=10, needed=None) == {2, 6}  # complete ones only
    assert versions_to_keep([3], latest=3, keep_every=10, needed=lambda: {1}) == {3}
