"""The group-relative REINFORCE family as one pure function of tensors.

    loss, metrics = policy_loss(logprobs, old_logprobs, advantages, mask, preset("grpo"))
    loss.backward()

Per token (docs/algorithms.md):
    L_t  = - s_i * w_t * A_i * l_t * c_t + R_t
    loss = sum_{i,t} m_t * L_t / sum_{i,t} m_t          (token mean over the batch)
with rho_t = exp(l_t - l_old_t) a constant, c_t a 0/1 clip mask, w_t a weight and R_t a regularizer.
Each of c, w and R is a small function registered by name below, so each can be read and tested alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # only a type here: the loss runs without pydantic (bench/bench_gpu.py on a bare GPU box)
    from recpipe.algorithms.config import LossConfig

Tensor = torch.Tensor


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * m) / max(sum(m), 1), over all elements or along ``dim``.

    Values under m = 0 are ignored even when they are NaN or inf (padding may hold anything); the
    denominator is clamped to 1 so an all-padding input gives 0, not NaN.
    """
    m = mask.to(x.dtype) if x.is_floating_point() else mask.float()
    x = torch.where(m != 0, x, torch.zeros_like(x))
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


# ---------------------------------------------------------------------------------------------------
# Clip masks c_t. Arguments: rho (B, T) token ratio, seq_ratio (B,) sequence ratio, adv (B, T), cfg.
# They return a bool (B, T); tokens outside the trust region give no policy gradient at all.


def _one_side(ratio: Tensor, adv: Tensor, cfg: LossConfig) -> Tensor:
    # Positive advantage: stop pushing up once rho is already above 1 + eps_high; negative: stop
    # pushing down once rho is already below 1 - eps_low. The other direction is never clipped.
    return ((adv >= 0) & (ratio <= 1 + cfg.epsilon_high)) | ((adv <= 0) & (ratio >= 1 - cfg.epsilon_low))


def _clip_none(rho: Tensor, seq_ratio: Tensor, adv: Tensor, cfg: LossConfig) -> Tensor:
    return torch.ones_like(rho, dtype=torch.bool)


def _clip_one_side(rho: Tensor, seq_ratio: Tensor, adv: Tensor, cfg: LossConfig) -> Tensor:
    return _one_side(rho, adv, cfg)


def _clip_two_side(rho: Tensor, seq_ratio: Tensor, adv: Tensor, cfg: LossConfig) -> Tensor:
    return (rho >= 1 - cfg.epsilon_low) & (rho <= 1 + cfg.epsilon_high)


def _clip_ring(rho: Tensor, seq_ratio: Tensor, adv: Tensor, cfg: LossConfig) -> Tensor:
    # The inner band, plus the far zones where the update moves rho back towards 1.
    inner = (rho >= 1 - cfg.epsilon_low) & (rho <= 1 + cfg.epsilon_high)
    low = (adv >= 0) & (rho <= 1 - cfg.epsilon_low_prime)
    high = (adv <= 0) & (rho >= 1 + cfg.epsilon_high_prime)
    return inner | low | high


def _clip_gspo_one_side(rho: Tensor, seq_ratio: Tensor, adv: Tensor, cfg: LossConfig) -> Tensor:
    # One decision per response, from its sequence ratio; broadcast to all of its tokens.
    return _one_side(seq_ratio[:, None].expand_as(adv), adv, cfg)


CLIP_MASKS: dict[str, Callable[[Tensor, Tensor, Tensor, LossConfig], Tensor]] = {
    "none": _clip_none,
    "one-side": _clip_one_side,
    "two-side": _clip_two_side,
    "ring": _clip_ring,
    "gspo-one-side": _clip_gspo_one_side,
}


# ---------------------------------------------------------------------------------------------------
# Weights w_t (B, T); all are constants (no gradient).

WEIGHTS: dict[str, Callable[[Tensor, Tensor, Tensor, LossConfig], Tensor]] = {
    "none": lambda rho, seq_ratio, adv, cfg: torch.ones_like(rho),
    "importance_sampling": lambda rho, seq_ratio, adv, cfg: rho,
    "gspo_importance_sampling": lambda rho, seq_ratio, adv, cfg: seq_ratio[:, None].expand_as(rho),
    "advantage": lambda rho, seq_ratio, adv, cfg: torch.exp(adv / cfg.temp),
}


# ---------------------------------------------------------------------------------------------------
# Regularizers R_t (B, T) from l (with gradient), l_old (constant) and beta.

REGULARIZERS: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "none": lambda logp, old_logp, beta: torch.zeros_like(logp),
    "forward-kl": lambda logp, old_logp, beta: -beta * logp,  # AsymRE: gradient -beta per token
    "k2": lambda logp, old_logp, beta: beta * (logp - old_logp) ** 2,  # OPMD: gradient 2*beta*(l - l_old)
}


# Flat names (steps table columns) -> "/" names (logging, style guide rule 9).
_SLASH_NAMES = {
    "loss": "loss/total",
    "policy_loss": "loss/policy",
    "regularizer_loss": "loss/regularizer",
    "clip_fraction": "clip/fraction",
    "ratio_mean": "is_ratio/mean",
    "ratio_max": "is_ratio/max",
    "mismatch": "mismatch/abs_mean",
    "seq_ratio_mean": "is_ratio/seq_mean",
    "seq_ratio_max": "is_ratio/seq_max",
    "tokens": "tokens/response",
}


def _check_shapes(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, sample_weight: Tensor | None
) -> None:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be (B, T); got shape {tuple(logprobs.shape)}")
    shape = logprobs.shape
    for name, t in (("old_logprobs", old_logprobs), ("mask", mask)):
        if t.shape != shape:
            raise ValueError(f"{name} must have the shape of logprobs {tuple(shape)}; got {tuple(t.shape)}")
    if advantages.shape not in (shape, shape[:1]):
        raise ValueError(
            f"advantages must be (B,) = {tuple(shape[:1])} or (B, T) = {tuple(shape)}; "
            f"got {tuple(advantages.shape)}"
        )
    if sample_weight is not None and sample_weight.shape != shape[:1]:
        raise ValueError(f"sample_weight must be (B,) = {tuple(shape[:1])}; got {tuple(sample_weight.shape)}")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    config: LossConfig,
    sample_weight: Tensor | None = None,
    *,
    total_tokens: float | None = None,
    total_responses: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The loss of docs/algorithms.md and its metrics.

    Args:
        logprobs: (B, T) l_t under the policy being trained; the only input with a gradient.
        old_logprobs: (B, T) l_old_t recorded by the generator (detached here).
        advantages: (B,) A_i per response, or (B, T) already broadcast to tokens.
        mask: (B, T) bool or float, 1 on response tokens. Padding may hold anything, even NaN.
        config: which member of the family.
        sample_weight: (B,) s_i from the selection query; None = 1.
        total_tokens: denominator of the token mean (default: sum of this mask). Pass the whole batch's
            token count when the batch is split into micro-batches: the micro-batch losses then sum to
            the full-batch loss exactly.
        total_responses: the same for clip_mode="gspo-one-side", whose loss is a mean over responses
            (default: responses with at least one token in this mask).

    Returns:
        loss: scalar with a gradient w.r.t. logprobs.
        metrics: python floats, flat names as in the steps table (loss, policy_loss, regularizer_loss,
            clip_fraction, ratio_mean, ratio_max, mismatch, seq_ratio_mean, seq_ratio_max, tokens) and the
            same values under "/" names (loss/total, clip/fraction, is_ratio/max, ...). Ratios are over
            response tokens (0 when there are none); clip_fraction is the masked mean of 1 - c.
    """
    _check_shapes(logprobs, old_logprobs, advantages, mask, sample_weight)
    for name, value in (("total_tokens", total_tokens), ("total_responses", total_responses)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0 (a count of the whole batch); got {value}")
    B, T = logprobs.shape
    # Loss math in at least float32: bf16 log-prob differences near 0 would round rho to 1.
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    m = mask.to(dtype)  # (B, T)
    on = m != 0
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    # Sanitize padding first, so no NaN/inf there can reach the loss or the gradient (0 * NaN = NaN).
    logp = torch.where(on, logprobs.to(dtype), zero)  # (B, T)
    old_logp = torch.where(on, old_logprobs.detach().to(dtype), zero)  # (B, T)
    adv = advantages.detach().to(dtype)
    adv = torch.where(on, adv[:, None].expand(B, T) if adv.dim() == 1 else adv, zero)  # (B, T)
    if sample_weight is None:
        s = torch.ones(B, dtype=dtype, device=logp.device)  # (B,)
    else:
        s = sample_weight.detach().to(dtype)  # (B,)

    log_ratio = (logp - old_logp).detach()  # (B, T), 0 on padding
    rho = torch.exp(log_ratio)  # (B, T) constant: no gradient flows through it
    tokens_per_response = m.sum(-1)  # (B,)
    seq_ratio = torch.exp(masked_mean(log_ratio, m, dim=-1))  # (B,) exp(mean_t (l - l_old))

    c = CLIP_MASKS[config.clip_mode](rho, seq_ratio, adv, config).to(dtype)  # (B, T) in {0, 1}
    w = WEIGHTS[config.weight](rho, seq_ratio, adv, config)  # (B, T)
    pg = -(s[:, None] * w * adv * c) * logp  # (B, T)
    reg = REGULARIZERS[config.regularizer](logp, old_logp, config.regularizer_coef)  # (B, T)

    if config.clip_mode == "gspo-one-side":
        # Sequence-level: each response's token mean, then the mean over responses.
        n_resp = (tokens_per_response > 0).sum().clamp(min=1) if total_responses is None else total_responses
        per_response = tokens_per_response.clamp(min=1)

        def aggregate(x: Tensor) -> Tensor:
            return ((x * m).sum(-1) / per_response).sum() / n_resp
    else:
        n_tok = m.sum().clamp(min=1) if total_tokens is None else total_tokens

        def aggregate(x: Tensor) -> Tensor:
            return (x * m).sum() / n_tok

    pg_loss = aggregate(pg)
    reg_loss = aggregate(reg)
    loss = pg_loss + reg_loss

    with torch.no_grad():
        has_tokens = tokens_per_response > 0
        values = {
            "loss": loss,
            "policy_loss": pg_loss,
            "regularizer_loss": reg_loss,
            "clip_fraction": masked_mean(1 - c, m),
            "ratio_mean": masked_mean(rho, m),
            "ratio_max": rho[on].max() if on.any() else zero,
            "mismatch": masked_mean(log_ratio.abs(), m),
            "seq_ratio_mean": masked_mean(seq_ratio, has_tokens),
            "seq_ratio_max": seq_ratio[has_tokens].max() if has_tokens.any() else zero,
            "tokens": m.sum(),
        }
        # One device->host copy for all metrics instead of one sync per .item().
        flat = dict(
            zip(values, torch.stack([v.detach().to(dtype) for v in values.values()]).tolist(), strict=True)
        )
    for flat_name, slash_name in _SLASH_NAMES.items():
        flat[slash_name] = flat[flat_name]
    return loss, flat
