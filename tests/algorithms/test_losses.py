"""policy_loss on tiny hand-worked tensors, and against a per-token reference for every combination.

The hand example is 2 responses x 4 tokens (4 so that every clip mode gives a different mask):

    rho   row 0 (A = +2): [1.0, 1.5, 0.3, 0.6]
    rho   row 1 (A = -1): [3.5, 0.7, 1.1, pad]
    l_old row 0 = -1, row 1 = -2; l = l_old + ln(rho)
      l row 0 = [-1, -0.594535, -2.203973, -1.510826]   (sum -5.309333)
      l row 1 = [-0.747237, -2.356675, -1.904690, pad]  (sum -5.008602)
    7 response tokens, so the token mean divides by N = 7.

Clip masks with eps 0.2/0.2 (band [0.8, 1.2]) and ring primes 0.6/2.0 (zones rho <= 0.4, rho >= 3.0):
    none      [1,1,1,1] [1,1,1]
    one-side  [1,0,1,1] [1,0,1]   A>0: rho <= 1.2 drops 1.5;      A<0: rho >= 0.8 drops 0.7
    two-side  [1,0,0,0] [0,0,1]   only 1.0 and 1.1 are inside the band
    ring      [1,0,1,0] [1,0,1]   band + 0.3 (A>0, <= 0.4) + 3.5 (A<0, >= 3.0); 0.6 is in neither
"""

from __future__ import annotations

import math

import pytest
import torch

from recpipe.algorithms import (
    CLIP_MASKS,
    REGULARIZERS,
    WEIGHTS,
    LossConfig,
    masked_mean,
    policy_loss,
    preset,
)

RHO = [[1.0, 1.5, 0.3, 0.6], [3.5, 0.7, 1.1, 1.0]]
ADV = [2.0, -1.0]
MASK = [[1, 1, 1, 1], [1, 1, 1, 0]]
N = 7

CLIP = {
    "none": [[1, 1, 1, 1], [1, 1, 1, 0]],
    "one-side": [[1, 0, 1, 1], [1, 0, 1, 0]],
    "two-side": [[1, 0, 0, 0], [0, 0, 1, 0]],
    "ring": [[1, 0, 1, 0], [1, 0, 1, 0]],
}


def example(dtype=torch.float64):
    """(logprobs with grad, old_logprobs, advantages (B,), mask): the example of the module docstring."""
    old = torch.tensor([[-1.0] * 4, [-2.0] * 4], dtype=dtype)
    logp = (old + torch.tensor(RHO, dtype=dtype).log()).detach()
    logp[1, 3] = 7.0  # padding: garbage that must not matter
    old[1, 3] = float("nan")  # padding in the archive may even be NaN
    return logp.requires_grad_(), old, torch.tensor(ADV, dtype=dtype), torch.tensor(MASK)


def loss_and_grad(config: LossConfig, **kwargs):
    logp, old, adv, mask = example()
    loss, metrics = policy_loss(logp, old, adv, mask, config, **kwargs)
    loss.backward()
    return loss.item(), logp.grad, metrics


def per_token(values_row0, values_row1) -> torch.Tensor:
    return torch.tensor(
        [list(values_row0) + [0.0] * (4 - len(values_row0)), list(values_row1) + [0.0]], dtype=torch.float64
    )


# ------------------------------------------------------------------------------------------- clip modes

# NoIS loss = -(1/7) * sum_i A_i * sum_t c_t * l_t
#   none:      -(2 * -5.309333 - 1 * -5.008602) / 7 = 0.801438
#   one-side:  -(2 * (-1 - 2.203973 - 1.510826) - (-0.747237 - 1.904690)) / 7 = 0.968239
#   two-side:  -(2 * -1 - (-1.904690)) / 7 = 0.013616
#   ring:      -(2 * (-1 - 2.203973) - (-0.747237 - 1.904690)) / 7 = 0.536574
HAND_NOIS = {"none": 0.801438, "one-side": 0.968239, "two-side": 0.013616, "ring": 0.536574}
HAND_CLIP_FRACTION = {"none": 0 / 7, "one-side": 2 / 7, "two-side": 5 / 7, "ring": 3 / 7}


@pytest.mark.parametrize("clip_mode", list(CLIP))
def test_clip_modes_by_hand(clip_mode):
    loss, grad, metrics = loss_and_grad(LossConfig(clip_mode=clip_mode))
    assert loss == pytest.approx(HAND_NOIS[clip_mode], abs=1e-6)
    assert metrics["clip_fraction"] == pytest.approx(HAND_CLIP_FRACTION[clip_mode])
    # d loss / d l_t = -A_i * c_t * m_t / N: clipped tokens and padding get exactly zero.
    c = torch.tensor(CLIP[clip_mode], dtype=torch.float64)
    expected = -torch.tensor(ADV, dtype=torch.float64)[:, None] * c / N
    torch.testing.assert_close(grad, expected)


# IS loss = -(1/7) * sum_i A_i * sum_t c_t * rho_t * l_t
#   one-side: row 0: 1*-1 + 0.3*-2.203973 + 0.6*-1.510826 = -2.567687
#             row 1: 3.5*-0.747237 + 1.1*-1.904690 = -4.710488
#             -(2 * -2.567687 - (-4.710488)) / 7 = 0.060698
#   two-side: -(2 * -1 - 1.1 * -1.904690) / 7 = -0.013594
#   ring:     -(2 * (-1 + 0.3 * -2.203973) - (-4.710488)) / 7 = -0.198301
HAND_IS = {"one-side": 0.060698, "two-side": -0.013594, "ring": -0.198301}


@pytest.mark.parametrize("clip_mode", list(HAND_IS))
def test_importance_sampling_by_hand(clip_mode):
    loss, grad, metrics = loss_and_grad(LossConfig(clip_mode=clip_mode, weight="importance_sampling"))
    assert loss == pytest.approx(HAND_IS[clip_mode], abs=1e-6)
    # rho is a constant: d loss / d l_t = -A_i * rho_t * c_t * m_t / N (no extra d rho / d l term).
    c = torch.tensor(CLIP[clip_mode], dtype=torch.float64)
    rho = torch.tensor(RHO, dtype=torch.float64)
    expected = -torch.tensor(ADV, dtype=torch.float64)[:, None] * rho * c / N
    torch.testing.assert_close(grad, expected)


def test_gspo_one_side_by_hand():
    # Sequence ratios: row 0 exp((0 + ln 1.5 + ln 0.3 + ln 0.6) / 4) = 0.720843,
    #                  row 1 exp((ln 3.5 + ln 0.7 + ln 1.1) / 3) = 1.391617.
    # With A = +2 for both and band 1 + 4e-4: row 0 passes, row 1 (1.39 > 1.0004) is clipped whole.
    # Loss = mean over the 2 responses of token means = (-(2 * -5.309333) / 4 + 0) / 2 = 1.327333.
    logp, old, _, mask = example()
    adv = torch.tensor([2.0, 2.0], dtype=torch.float64)
    loss, metrics = policy_loss(logp, old, adv, mask, preset("rec-gspo-nois"))
    loss.backward()
    assert loss.item() == pytest.approx(1.327333, abs=1e-6)
    assert metrics["seq_ratio_mean"] == pytest.approx((0.720843 + 1.391617) / 2, abs=1e-6)
    assert metrics["seq_ratio_max"] == pytest.approx(1.391617, abs=1e-6)
    assert metrics["clip_fraction"] == pytest.approx(3 / 7)  # the 3 tokens of row 1
    # d loss / d l_t = -A_i * c_i / (n_i * #responses): row 0 -2 / (4 * 2) = -0.25; row 1 clipped.
    torch.testing.assert_close(logp.grad, per_token([-0.25] * 4, [0.0] * 3))


def test_gspo_weight_is_the_sequence_ratio():
    # gspo_importance_sampling with the token mean: grad = -A_i * seqratio_i * m / 7.
    _, grad, _ = loss_and_grad(LossConfig(weight="gspo_importance_sampling"))
    expected = per_token([-2 * 0.720843 / 7] * 4, [1.391617 / 7] * 3)
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=0)


def test_red_weight_by_hand():
    # w = exp(A / temp): exp(2) = 7.389056, exp(-1) = 0.367879.
    # Loss = -(2 * 7.389056 * -5.309333 - 0.367879 * -5.008602) / 7 = 10.945623
    loss, grad, _ = loss_and_grad(preset("red-weight"))
    assert loss == pytest.approx(10.945623, abs=1e-5)
    torch.testing.assert_close(grad, per_token([-2 * math.exp(2) / 7] * 4, [math.exp(-1) / 7] * 3))
    # temp = 2: w = exp(A / 2): grad row 0 = -2 * e / 7.
    _, grad, _ = loss_and_grad(preset("red-weight", temp=2.0))
    torch.testing.assert_close(grad, per_token([-2 * math.e / 7] * 4, [math.exp(-0.5) / 7] * 3))


# ------------------------------------------------------------------------------------------ regularizers


def test_forward_kl_by_hand():
    # AsymRE: R_t = -beta * l_t on every response token, whatever the clip says.
    # Regularizer loss = -0.1 * (-5.309333 - 5.008602) / 7 = 0.147399; grad adds -beta / 7 per token.
    cfg = preset("asymre", clip_mode="two-side")
    loss, grad, metrics = loss_and_grad(cfg)
    assert metrics["regularizer_loss"] == pytest.approx(0.147399, abs=1e-6)
    assert metrics["policy_loss"] == pytest.approx(HAND_NOIS["two-side"], abs=1e-6)
    assert loss == pytest.approx(0.147399 + 0.013616, abs=1e-6)
    c = torch.tensor(CLIP["two-side"], dtype=torch.float64)
    m = torch.tensor(MASK, dtype=torch.float64)
    expected = (-torch.tensor(ADV, dtype=torch.float64)[:, None] * c - 0.1 * m) / N
    torch.testing.assert_close(grad, expected)


def test_k2_by_hand():
    # OPMD: R_t = beta * (l_t - l_old_t)^2 = 0.1 * ln(rho_t)^2.
    # sum ln(rho)^2 = 0 + 0.164402 + 1.449551 + 0.260943 + 1.569415 + 0.127217 + 0.009084 = 3.580612
    # regularizer loss = 0.1 * 3.580612 / 7 = 0.051152; grad adds 2 * beta * ln(rho_t) / 7.
    cfg = preset("opmd", clip_mode="one-side")
    loss, grad, metrics = loss_and_grad(cfg)
    assert metrics["regularizer_loss"] == pytest.approx(0.051152, abs=1e-6)
    assert loss == pytest.approx(0.051152 + HAND_NOIS["one-side"], abs=1e-6)
    c = torch.tensor(CLIP["one-side"], dtype=torch.float64)
    m = torch.tensor(MASK, dtype=torch.float64)
    log_rho = torch.tensor(RHO, dtype=torch.float64).log() * m
    expected = (-torch.tensor(ADV, dtype=torch.float64)[:, None] * c + 2 * 0.1 * log_rho) / N
    torch.testing.assert_close(grad, expected)


# ------------------------------------------------------------------------------------- inputs and masks


def test_metrics_by_hand():
    # rho over the 7 response tokens: mean 8.7 / 7 = 1.242857, max 3.5;
    # mismatch = mean |ln rho| = (0 + .405465 + 1.203973 + .510826 + 1.252763 + .356675 + .095310) / 7.
    _, _, metrics = loss_and_grad(preset("rec-oneside-nois"))
    assert metrics["ratio_mean"] == pytest.approx(8.7 / 7)
    assert metrics["ratio_max"] == pytest.approx(3.5)
    assert metrics["mismatch"] == pytest.approx(0.546430, abs=1e-6)
    assert metrics["tokens"] == 7
    assert metrics["loss"] == pytest.approx(metrics["policy_loss"] + metrics["regularizer_loss"])
    for flat, slash in [
        ("loss", "loss/total"),
        ("policy_loss", "loss/policy"),
        ("regularizer_loss", "loss/regularizer"),
        ("clip_fraction", "clip/fraction"),
        ("ratio_mean", "is_ratio/mean"),
        ("ratio_max", "is_ratio/max"),
        ("mismatch", "mismatch/abs_mean"),
    ]:
        assert metrics[slash] == metrics[flat]
    assert all(type(v) is float for v in metrics.values())


def test_rho_and_inputs_other_than_logprobs_get_no_gradient():
    logp, old, adv, mask = example()
    old = old.clone().requires_grad_()
    adv = adv.clone().requires_grad_()
    weight = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    cfg = preset("opmd", clip_mode="ring", weight="importance_sampling")
    loss, _ = policy_loss(logp, old, adv, mask, cfg, sample_weight=weight)
    loss.backward()
    assert old.grad is None and adv.grad is None and weight.grad is None
    # A PPO-style -A * rho would give d/dl = -A * rho too, but its *value* differs: ours is -A * rho * l.
    loss_value, _, _ = loss_and_grad(LossConfig(weight="importance_sampling"))
    assert loss_value == pytest.approx(-(2 * -3.45949 - (-6.360161)) / 7, abs=1e-6)


def test_padding_never_matters():
    cfg = preset("opmd", clip_mode="ring", weight="importance_sampling")
    logp, old, adv, mask = example()
    loss, _ = policy_loss(logp, old, adv, mask, cfg)
    loss.backward()
    assert logp.grad[1, 3] == 0
    assert torch.isfinite(logp.grad).all()
    # Other garbage in the padded slot (inf, another value) and a bool mask: same loss.
    logp2, old2, _, _ = example()
    with torch.no_grad():
        logp2[1, 3] = -float("inf")
    old2[1, 3] = 123.0
    loss2, _ = policy_loss(logp2, old2, adv, mask.bool(), cfg)
    assert loss2.item() == pytest.approx(loss.item())
    # A token outside the mask really is excluded: masking a real token changes the loss.
    mask3 = mask.clone()
    mask3[0, 0] = 0
    loss3, m3 = policy_loss(logp.detach(), old, adv, mask3, cfg)
    assert m3["tokens"] == 6 and loss3.item() != pytest.approx(loss.item())


def test_sample_weight_scales_each_response_policy_gradient():
    # s = [0.5, 3]: grad = -s_i * A_i * c_t / 7; the regularizer is not scaled by s.
    s = torch.tensor([0.5, 3.0], dtype=torch.float64)
    _, grad, _ = loss_and_grad(preset("asymre"), sample_weight=s)
    expected = per_token([(-0.5 * 2 - 0.1) / 7] * 4, [(3.0 * 1 - 0.1) / 7] * 3)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("name", ["grpo", "rec-ring-nois", "rec-gspo-nois", "red-weight", "opmd"])
def test_per_response_and_per_token_advantages_agree(name):
    logp, old, adv, mask = example()
    loss_b, metrics_b = policy_loss(logp, old, adv, mask, preset(name))
    loss_bt, metrics_bt = policy_loss(logp, old, adv[:, None].expand(2, 4), mask, preset(name))
    (grad_b,) = torch.autograd.grad(loss_b, logp)
    (grad_bt,) = torch.autograd.grad(loss_bt, logp)
    assert loss_b.item() == loss_bt.item()
    torch.testing.assert_close(grad_b, grad_bt)
    assert metrics_b == metrics_bt


@pytest.mark.parametrize("name", ["rec-oneside-is", "rec-gspo-nois", "asymre"])
def test_micro_batches_sum_to_the_full_batch(name):
    # The trainer splits a batch; passing the batch totals makes the pieces add up exactly.
    torch.manual_seed(0)
    logp = (-torch.rand(5, 6, dtype=torch.float64)).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(5, 6, dtype=torch.float64)
    adv = torch.randn(5, dtype=torch.float64)
    mask = torch.ones(5, 6)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    full, _ = policy_loss(logp, old, adv, mask, preset(name))
    totals = {"total_tokens": mask.sum().item(), "total_responses": 5}
    parts = [
        policy_loss(logp[i:j], old[i:j], adv[i:j], mask[i:j], preset(name), **totals)[0]
        for i, j in [(0, 2), (2, 5)]
    ]
    assert (parts[0] + parts[1]).item() == pytest.approx(full.item())


def test_empty_mask_gives_zero_not_nan():
    logp, old, adv, _ = example()
    for name in ["grpo", "rec-gspo-nois", "opmd"]:
        loss, metrics = policy_loss(logp, old, adv, torch.zeros(2, 4), preset(name))
        loss.backward()
        assert loss.item() == 0.0
        assert all(math.isfinite(v) for v in metrics.values())
        assert metrics["tokens"] == 0 and metrics["ratio_max"] == 0


def test_low_precision_inputs_are_computed_in_float32():
    logp, old, adv, mask = example()
    loss, _ = policy_loss(logp.detach().bfloat16(), old.bfloat16(), adv, mask, preset("grpo"))
    assert loss.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"logprobs": torch.zeros(2, 4, 1)}, "logprobs"),
        ({"old_logprobs": torch.zeros(2, 3)}, "old_logprobs"),
        ({"mask": torch.ones(4, 2)}, "mask"),
        ({"advantages": torch.zeros(3)}, "advantages"),
        ({"sample_weight": torch.ones(2, 1)}, "sample_weight"),
        ({"total_tokens": 0}, "total_tokens"),
        ({"total_responses": -1.0}, "total_responses"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(kwargs, field):
    logp, old, adv, mask = example()
    args = {"logprobs": logp, "old_logprobs": old, "advantages": adv, "mask": mask, "config": LossConfig()}
    with pytest.raises(ValueError, match=field):
        policy_loss(**{**args, **kwargs})


# ---------------------------------------------------------------- every combination against a reference


def reference_loss(logp, old, adv, mask, cfg, s):
    """The algorithms.md formulas one token at a time, in plain python floats (only for testing)."""
    B, T = len(logp), len(logp[0])
    terms = []  # (response, token, L_t, dL_t / dl_t, response length)
    clipped = []  # 1 - c_t per response token
    for i in range(B):
        toks = [t for t in range(T) if mask[i][t]]
        seq = math.exp(sum(logp[i][t] - old[i][t] for t in toks) / max(len(toks), 1))
        for t in toks:
            rho = math.exp(logp[i][t] - old[i][t])
            a = adv[i]
            r = seq if cfg.clip_mode == "gspo-one-side" else rho
            one = (a >= 0 and r <= 1 + cfg.epsilon_high) or (a <= 0 and r >= 1 - cfg.epsilon_low)
            band = 1 - cfg.epsilon_low <= rho <= 1 + cfg.epsilon_high
            c = {
                "none": True,
                "one-side": one,
                "two-side": band,
                "ring": band
                or (a >= 0 and rho <= 1 - cfg.epsilon_low_prime)
                or (a <= 0 and rho >= 1 + cfg.epsilon_high_prime),
                "gspo-one-side": one,
            }[cfg.clip_mode]
            w = {
                "none": 1.0,
                "importance_sampling": rho,
                "gspo_importance_sampling": seq,
                "advantage": math.exp(a / cfg.temp),
            }[cfg.weight]
            beta = cfg.regularizer_coef
            reg = {"none": 0.0, "forward-kl": -beta * logp[i][t], "k2": beta * (logp[i][t] - old[i][t]) ** 2}[
                cfg.regularizer
            ]
            dreg = {"none": 0.0, "forward-kl": -beta, "k2": 2 * beta * (logp[i][t] - old[i][t])}[
                cfg.regularizer
            ]
            clipped.append(1.0 - float(c))
            coef = -s[i] * w * a * float(c)
            terms.append((i, t, coef * logp[i][t] + reg, coef + dreg, len(toks)))
    grad = [[0.0] * T for _ in range(B)]
    if cfg.clip_mode == "gspo-one-side":
        n_resp = max(sum(1 for i in range(B) if any(mask[i])), 1)
        loss = sum(v / (n * n_resp) for _, _, v, _, n in terms)
        for i, t, _, d, n in terms:
            grad[i][t] = d / (n * n_resp)
    else:
        n_tok = max(len(terms), 1)
        loss = sum(v for _, _, v, _, _ in terms) / n_tok
        for i, t, _, d, _ in terms:
            grad[i][t] = d / n_tok
    return loss, grad, sum(clipped) / max(len(clipped), 1)


REF_CONFIG = {"epsilon_low": 0.1, "epsilon_high": 0.15, "epsilon_low_prime": 0.3, "epsilon_high_prime": 0.4}


def reference_inputs():
    """4 responses x 5 tokens: random log-probs, chosen ratios, varied lengths and sample weights.

    With the band [0.9, 1.15] and ring zones rho <= 0.7 / rho >= 1.4, the ratios hit every clip branch:
    inside the band, above and below it, in each ring zone, for A > 0, A < 0 and A = 0.
    """
    gen = torch.Generator().manual_seed(1)
    logp = -2 * torch.rand(4, 5, generator=gen, dtype=torch.float64)
    rho = torch.tensor(
        [
            [0.6, 4.4, 1.1, 0.95, 0.8],  # A = +1.3
            [1.5, 0.6, 1.05, 0.5, 9.0],  # A = -0.7, last two are padding
            [1.0, 1.3, 0.5, 1.6, 3.0],  # A = 0, last is padding
            [2.0, 0.1, 0.1, 0.1, 0.1],  # A = -1.1, one token
        ],
        dtype=torch.float64,
    )
    old = logp - rho.log()
    adv = torch.tensor([1.3, -0.7, 0.0, -1.1], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    s = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=torch.float64)
    return logp.requires_grad_(), old, adv, mask, s


@pytest.mark.parametrize("clip_mode", list(CLIP_MASKS))
@pytest.mark.parametrize("weight", list(WEIGHTS))
@pytest.mark.parametrize("regularizer", list(REGULARIZERS))
def test_every_combination_matches_the_reference(clip_mode, weight, regularizer):
    beta = 0.0 if regularizer == "none" else 0.1
    cfg = LossConfig(
        clip_mode=clip_mode,
        weight=weight,
        regularizer=regularizer,
        regularizer_coef=beta,
        temp=0.7,
        **REF_CONFIG,
    )
    logp, old, adv, mask, s = reference_inputs()
    loss, metrics = policy_loss(logp, old, adv, mask, cfg, sample_weight=s)
    loss.backward()
    ref_loss, ref_grad, ref_clip_fraction = reference_loss(
        logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), cfg, s.tolist()
    )
    assert loss.item() == pytest.approx(ref_loss, abs=1e-12)
    torch.testing.assert_close(logp.grad, torch.tensor(ref_grad, dtype=torch.float64))
    assert metrics["clip_fraction"] == pytest.approx(ref_clip_fraction)


def test_reference_example_exercises_every_clip_branch():
    # Guards the test above: with its data the clip modes must all differ and the ring's zones be hit.
    logp, old, adv, mask, _ = reference_inputs()
    on = mask.bool()
    rho = (logp.detach() - old).exp()
    adv = adv[:, None].expand(4, 5)
    cfg = LossConfig(**REF_CONFIG)
    seq = torch.stack([rho[i][on[i]].log().mean().exp() for i in range(4)])
    masks = {name: fn(rho, seq, adv, cfg)[on] for name, fn in CLIP_MASKS.items()}
    assert len({tuple(m.tolist()) for m in masks.values()}) == len(masks)
    for sign in (adv > 0, adv < 0, adv == 0):
        assert ((rho <= 0.7) & sign & on).any() and ((rho >= 1.4) & sign & on).any()


# --------------------------------------------------------------------------------------------- helpers


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert masked_mean(x, m).item() == pytest.approx((1 + 2 + 4 + 6) / 4)
    torch.testing.assert_close(masked_mean(x, m, dim=-1), torch.tensor([1.5, 5.0]))
    assert masked_mean(x, torch.zeros(2, 3)).item() == 0.0
