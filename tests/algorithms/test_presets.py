"""LossConfig and the named presets of docs/algorithms.md."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from recpipe.algorithms import PRESETS, LossConfig, preset

IS = "importance_sampling"

# docs/algorithms.md "Named presets", transcribed:
# name: (clip, eps_low, eps_high, eps_low', eps_high', weight, temp, regularizer, beta, std_normalize, drop)
TABLE = {
    "reinforce": ("none", 0.2, 0.2, 0.6, 2.0, "none", 1.0, "none", 0.0, False, "none"),
    "grpo": ("one-side", 0.2, 0.2, 0.6, 2.0, IS, 1.0, "none", 0.0, True, "none"),
    "rec-oneside-nois": ("one-side", 0.2, 0.2, 0.6, 2.0, "none", 1.0, "none", 0.0, False, "none"),
    "rec-oneside-is": ("one-side", 0.2, 0.2, 0.6, 2.0, IS, 1.0, "none", 0.0, False, "none"),
    "rec-twoside-is": ("two-side", 0.2, 0.2, 0.6, 2.0, IS, 1.0, "none", 0.0, False, "none"),
    "rec-twoside-nois": ("two-side", 0.2, 0.2, 0.6, 2.0, "none", 1.0, "none", 0.0, False, "none"),
    "rec-ring-nois": ("ring", 0.2, 0.2, 0.6, 2.0, "none", 1.0, "none", 0.0, False, "none"),
    "rec-gspo-nois": ("gspo-one-side", 3e-4, 4e-4, 0.6, 2.0, "none", 1.0, "none", 0.0, False, "none"),
    "asymre": ("none", 0.2, 0.2, 0.6, 2.0, "none", 1.0, "forward-kl", 0.1, False, "none"),
    "opmd": ("none", 0.2, 0.2, 0.6, 2.0, "none", 1.0, "k2", 0.1, False, "none"),
    "red-drop": ("none", 0.2, 0.2, 0.6, 2.0, "none", 1.0, "none", 0.0, False, "balance"),
    "red-weight": ("none", 0.2, 0.2, 0.6, 2.0, "advantage", 1.0, "none", 0.0, False, "none"),
}
FIELDS = (
    "clip_mode",
    "epsilon_low",
    "epsilon_high",
    "epsilon_low_prime",
    "epsilon_high_prime",
    "weight",
    "temp",
    "regularizer",
    "regularizer_coef",
    "std_normalize",
    "drop",
)


def test_presets_are_exactly_the_table():
    assert list(PRESETS) == list(TABLE)


@pytest.mark.parametrize("name", list(TABLE))
def test_preset_matches_the_table(name):
    cfg = preset(name)
    assert cfg.model_dump() == dict(zip(FIELDS, TABLE[name], strict=True))


def test_defaults_are_reinforce_and_every_field_is_described():
    assert LossConfig() == preset("reinforce")
    assert set(LossConfig.model_fields) == set(FIELDS)
    for name, field in LossConfig.model_fields.items():
        assert field.description, name


def test_overrides():
    wide = preset("rec-oneside-nois", epsilon_low=0.6, epsilon_high=2.0)  # the paper's wider band
    assert (wide.clip_mode, wide.epsilon_low, wide.epsilon_high) == ("one-side", 0.6, 2.0)
    assert preset("opmd", regularizer_coef=0.5).regularizer_coef == 0.5
    assert PRESETS["opmd"]["regularizer_coef"] == 0.1  # overrides never leak into the table


def test_unknown_preset_lists_the_valid_names():
    with pytest.raises(ValueError, match="grpo") as info:
        preset("ppo")
    assert "'ppo'" in str(info.value) and "red-weight" in str(info.value)


def test_unknown_override_is_named():
    with pytest.raises(ValueError, match="epsilon_hi\\b"):
        preset("grpo", epsilon_hi=0.3)
    with pytest.raises(ValidationError, match="beta"):
        LossConfig(beta=0.1)


def test_config_is_frozen():
    cfg = preset("grpo")
    with pytest.raises(ValidationError):
        cfg.epsilon_low = 0.5


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"clip_mode": "three-side"}, "clip_mode"),
        ({"weight": "is"}, "weight"),
        ({"regularizer": "kl"}, "regularizer"),
        ({"drop": "all"}, "drop"),
        ({"epsilon_low": -0.1}, "epsilon_low"),
        ({"epsilon_high": float("nan")}, "epsilon_high"),
        ({"epsilon_high_prime": float("inf")}, "epsilon_high_prime"),
        ({"temp": 0.0}, "temp"),
        ({"regularizer_coef": -0.1}, "regularizer_coef"),
        ({"std_normalize": "maybe"}, "std_normalize"),
        # Combinations that would silently train something else:
        ({"regularizer": "k2"}, "regularizer_coef"),
        ({"regularizer_coef": 0.1}, "regularizer_coef"),
        ({"clip_mode": "ring", "epsilon_low": 0.7}, "epsilon_low_prime"),
        ({"clip_mode": "ring", "epsilon_high_prime": 0.1}, "epsilon_high_prime"),
    ],
)
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        preset("reinforce", **overrides)


def test_literal_errors_list_the_allowed_values():
    with pytest.raises(ValueError, match="gspo-one-side"):
        LossConfig(clip_mode="three-side")


def test_wide_epsilons_outside_the_ring_are_fine():
    # epsilon_high > epsilon_high_prime only matters for the ring.
    assert preset("rec-oneside-is", epsilon_high=3.0).epsilon_high == 3.0
