"""The named presets: the parameters docs/algorithms.md documents for each, and the loss each computes."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from recpipe.algorithms import PRESETS, LossConfig, policy_loss, preset

DOC = Path(__file__).resolve().parents[2] / "docs" / "algorithms.md"


def documented_presets() -> dict[str, dict[str, object]]:
    """The "Presets" table of docs/algorithms.md as LossConfig fields; what a row does not name is the
    field's default ("every field can be overridden")."""
    rows = re.findall(r"^\| ([a-z0-9-]+) \| (.+) \| (.+) \| (.+) \| (yes|no) \| (\w+) \|$", DOC.read_text(), re.M)
    table = {}
    for name, clip, weight, regularizer, std, drop in rows:
        fields: dict[str, object] = {"std_normalize": std == "yes", "drop": drop}
        clip_mode, *band = clip.replace(",", "").split()
        fields["clip_mode"] = clip_mode
        if band:  # "0.2 / 0.2" and, for the ring, "outer 0.6 / 2.0"
            numbers = [float(x) for x in band if x not in ("/", "outer")]
            keys = ("epsilon_low", "epsilon_high", "epsilon_low_prime", "epsilon_high_prime")
            fields.update(zip(keys, numbers, strict=False))
        fields["weight"], *temp = weight.replace(",", "").replace("temp", "").split()  # "advantage, temp 1.0"
        if temp:
            fields["temp"] = float(temp[0])
        fields["regularizer"], *beta = regularizer.replace(",", "").replace("beta", "").split()  # "k2, beta 0.1"
        if beta:
            fields["regularizer_coef"] = float(beta[0])
        table[name] = fields
    return table


def test_the_doc_lists_every_preset_in_order():
    assert list(documented_presets()) == list(PRESETS)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_has_the_documented_parameters(name):
    expected = {**LossConfig().model_dump(), **documented_presets()[name]}
    assert preset(name).model_dump() == expected


# ---- the loss each preset computes, on a hand-made example (docs/algorithms.md, "The per-token loss")
#
#   rho   row 0 (A = +1): [1.1, 1.5, 0.3, 0.6]
#   rho   row 1 (A = -1): [0.9, 0.5, 3.5, pad]          l_old = -1 everywhere, l = l_old + ln(rho)
#
# With eps 0.2/0.2 (band [0.8, 1.2]) and ring zones rho <= 0.4 (A >= 0), rho >= 3.0 (A <= 0):
CLIP = {
    "none": [[1, 1, 1, 1], [1, 1, 1, 0]],
    "one-side": [[1, 0, 1, 1], [1, 0, 1, 0]],  # A > 0 drops 1.5; A < 0 drops 0.5
    "two-side": [[1, 0, 0, 0], [1, 0, 0, 0]],  # only 1.1 and 0.9 are in the band
    "ring": [[1, 0, 1, 0], [1, 0, 1, 0]],  # the band, 0.3 (A > 0) and 3.5 (A < 0); 0.6 is in neither
    # Sequence ratios 0.738 (A > 0) and 1.163 (A < 0) pass the one-side test with 3e-4 / 4e-4: all kept.
    "gspo-one-side": [[1, 1, 1, 1], [1, 1, 1, 0]],
}
RHO = torch.tensor([[1.1, 1.5, 0.3, 0.6], [0.9, 0.5, 3.5, 1.0]], dtype=torch.float64)
ADV = torch.tensor([1.0, -1.0], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
A = ADV[:, None].expand(2, 4)

# name: (clip mask, w_t, R_t as a function of (l, l_old), token-mean or per-response mean)
DOCUMENTED_LOSS = {
    "reinforce": ("none", torch.ones_like(RHO), None),
    "grpo": ("one-side", RHO, None),  # std_normalize changes A, not the loss given A
    "rec-oneside-nois": ("one-side", torch.ones_like(RHO), None),
    "rec-oneside-is": ("one-side", RHO, None),
    "rec-twoside-is": ("two-side", RHO, None),
    "rec-twoside-nois": ("two-side", torch.ones_like(RHO), None),
    "rec-ring-nois": ("ring", torch.ones_like(RHO), None),
    "rec-gspo-nois": ("gspo-one-side", torch.ones_like(RHO), None),
    "asymre": ("none", torch.ones_like(RHO), lambda logp, old: -0.1 * logp),
    "opmd": ("none", torch.ones_like(RHO), lambda logp, old: 0.1 * (logp - old) ** 2),
    "red-drop": ("none", torch.ones_like(RHO), None),  # drops responses in A, not in the loss
    "red-weight": ("none", torch.exp(A / 1.0), None),
}


def test_every_preset_has_a_documented_loss():
    assert set(DOCUMENTED_LOSS) == set(PRESETS)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_computes_its_documented_loss(name):
    old = torch.full((2, 4), -1.0, dtype=torch.float64)
    logp = (old + RHO.log()).requires_grad_()
    loss, metrics = policy_loss(logp, old, ADV, MASK, preset(name))
    loss.backward()

    clip, w, regularizer = DOCUMENTED_LOSS[name]
    c = torch.tensor(CLIP[clip], dtype=torch.float64)
    m = MASK.to(torch.float64)
    lp = logp.detach()
    per_token = (-w * A * c * lp + (regularizer(lp, old) if regularizer else 0)) * m
    if clip == "gspo-one-side":  # the mean over responses of each response's token mean
        expected = (per_token.sum(-1) / m.sum(-1)).mean()
    else:  # the token mean over the batch
        expected = per_token.sum() / m.sum()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)
    assert metrics["clip_fraction"] == pytest.approx(((1 - c) * m).sum().item() / 7)

    # rho is a constant: the gradient of each token is its coefficient (plus the regularizer's slope).
    slope = {"asymre": -0.1 * m, "opmd": 0.2 * (lp - old) * m}.get(name, 0)
    scale = 1 / (2 * m.sum(-1, keepdim=True)) if clip == "gspo-one-side" else 1 / m.sum()
    torch.testing.assert_close(logp.grad, ((-w * A * c + slope) * m * scale))


def test_the_wider_band_of_the_paper_keeps_more_tokens():
    # "The paper also runs the one-side presets with the wider band eps_low 0.6 / eps_high 2.0."
    old = torch.full((2, 4), -1.0, dtype=torch.float64)
    wide = preset("rec-oneside-nois", epsilon_low=0.6, epsilon_high=2.0)
    _, metrics = policy_loss(old + RHO.log(), old, ADV, MASK, wide)
    assert metrics["clip_fraction"] == 0  # 1.5 <= 3.0 (A > 0) and 0.5 >= 0.4 (A < 0)
    _, narrow = policy_loss(old + RHO.log(), old, ADV, MASK, preset("rec-oneside-nois"))
    assert narrow["clip_fraction"] == pytest.approx(2 / 7)
    assert math.isclose(wide.epsilon_high, 2.0) and wide.clip_mode == "one-side"


# ---- LossConfig and preset(): defaults, overrides, errors


def test_defaults_are_reinforce_and_every_field_is_described():
    assert LossConfig() == preset("reinforce")
    for name, field in LossConfig.model_fields.items():
        assert field.description, name


def test_overrides():
    wide = preset("rec-oneside-nois", epsilon_low=0.6, epsilon_high=2.0)  # the paper's wider band
    assert (wide.clip_mode, wide.epsilon_low, wide.epsilon_high) == ("one-side", 0.6, 2.0)
    assert preset("opmd", regularizer_coef=0.5).regularizer_coef == 0.5
    assert PRESETS["opmd"]["regularizer_coef"] == 0.1  # overrides never leak into the table
    assert preset("opmd").regularizer_coef == 0.1


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
