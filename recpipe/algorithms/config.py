"""LossConfig: one frozen pydantic model that selects a member of the REINFORCE family.

    from recpipe.algorithms import preset
    cfg = preset("rec-oneside-nois", epsilon_low=0.6, epsilon_high=2.0)   # the paper's wider band

The presets are the table of docs/algorithms.md ("Named presets"); every field
can be overridden. Bad values raise pydantic's ``ValidationError`` (a
``ValueError``) naming the field, the value and what is allowed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from recpipe.errors import ConfigError

ClipMode = Literal["none", "one-side", "two-side", "ring", "gspo-one-side"]
Weight = Literal["none", "importance_sampling", "gspo_importance_sampling", "advantage"]
Regularizer = Literal["none", "forward-kl", "k2"]
Drop = Literal["none", "balance"]
# A finite float >= 0: the clip band's epsilons and beta.
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class LossConfig(BaseModel):
    """How the per-token loss L_t = -s_i * w_t * A_i * l_t * c_t + R_t is built (docs/algorithms.md).

    Clipping (c_t, a 0/1 mask, never a clamp):
        clip_mode (str, "none"): none | one-side | two-side | ring | gspo-one-side.
        epsilon_low, epsilon_high (float, 0.2, 0.2): the band [1 - eps_low, 1 + eps_high] around rho = 1.
        epsilon_low_prime, epsilon_high_prime (float, 0.6, 2.0): ring only, the outer zones
            rho <= 1 - eps_low_prime (A >= 0) and rho >= 1 + eps_high_prime (A <= 0) that are let through.
    Weighting (w_t):
        weight (str, "none"): none | importance_sampling (rho_t) | gspo_importance_sampling
            (the sequence ratio) | advantage (exp(A_i / temp), RED-Weight).
        temp (float, 1.0): RED-Weight temperature.
    Regularizer (R_t, on every response token, independent of c_t):
        regularizer (str, "none"): none | forward-kl (-beta * l_t, AsymRE)
            | k2 (beta * (l_t - l_old_t)^2, OPMD).
        regularizer_coef (float, 0.0): beta.
    Advantages (per group):
        std_normalize (bool, False): divide by the group's population std + 1e-6 (GRPO).
        drop (str, "none"): none | balance (RED-Drop: drop surplus negatives).

    Paper: Yao, Chen et al., "Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm"
    (arXiv 2509.24203).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    clip_mode: ClipMode = Field("none", description="Clip mask c_t: none | one-side | two-side | ring | "
                                "gspo-one-side (one-side on the sequence ratio, loss = mean over responses of "
                                "each response's token mean).")
    epsilon_low: NonNegative = Field(0.2, description="Lower band edge 1 - epsilon_low on rho (unitless, >=0).")
    epsilon_high: NonNegative = Field(0.2, description="Upper band edge 1 + epsilon_high on rho (unitless, >=0).")
    epsilon_low_prime: NonNegative = Field(0.6, description="Ring only: tokens with A >= 0 and rho <= 1 - "
                                       "epsilon_low_prime keep their gradient.")
    epsilon_high_prime: NonNegative = Field(2.0, description="Ring only: tokens with A <= 0 and rho >= 1 + "
                                        "epsilon_high_prime keep their gradient.")
    weight: Weight = Field("none", description="Token weight w_t: none (NoIS) | importance_sampling (rho_t) | "
                           "gspo_importance_sampling (sequence ratio) | advantage (exp(A/temp), RED-Weight).")
    temp: float = Field(1.0, gt=0, allow_inf_nan=False,
                        description="Temperature of the advantage weight exp(A/temp) (> 0).")
    regularizer: Regularizer = Field("none", description="Added term R_t: none | forward-kl (-beta*l_t, AsymRE) "
                                     "| k2 (beta*(l-l_old)^2, OPMD).")
    regularizer_coef: NonNegative = Field(0.0, description="beta, the regularizer coefficient (>= 0; > 0 iff used).")
    std_normalize: bool = Field(False, description="Divide advantages by the group's population std + 1e-6 (GRPO).")
    drop: Drop = Field("none", description="Group shaping: none | balance (RED-Drop: drop surplus negatives at "
                       "random).")

    @model_validator(mode="after")
    def _check_combinations(self) -> LossConfig:
        # A regularizer with beta = 0 (or a beta without a regularizer) silently does nothing: almost
        # always a typo in an override, so say so instead of training a different algorithm.
        if self.regularizer != "none" and self.regularizer_coef == 0:
            raise ValueError(
                f"regularizer={self.regularizer!r} with regularizer_coef=0.0 has no effect; "
                "set regularizer_coef > 0 (the paper uses 0.1) or regularizer='none'"
            )
        if self.regularizer == "none" and self.regularizer_coef != 0:
            raise ValueError(
                f"regularizer_coef={self.regularizer_coef} has no effect with regularizer='none'; "
                "set regularizer to 'forward-kl' or 'k2', or regularizer_coef=0"
            )
        # The ring's outer zones must lie outside its inner band, else the ring is not a ring.
        if self.clip_mode == "ring":
            if self.epsilon_low_prime < self.epsilon_low:
                raise ValueError(
                    f"clip_mode='ring' needs epsilon_low_prime >= epsilon_low; got "
                    f"epsilon_low_prime={self.epsilon_low_prime}, epsilon_low={self.epsilon_low}"
                )
            if self.epsilon_high_prime < self.epsilon_high:
                raise ValueError(
                    f"clip_mode='ring' needs epsilon_high_prime >= epsilon_high; got "
                    f"epsilon_high_prime={self.epsilon_high_prime}, epsilon_high={self.epsilon_high}"
                )
        return self


def _row(
    clip_mode: str = "none",
    eps: tuple[float, float] = (0.2, 0.2),
    weight: str = "none",
    regularizer: str = "none",
    beta: float = 0.0,
    std_normalize: bool = False,
    drop: str = "none",
    eps_prime: tuple[float, float] = (0.6, 2.0),
    temp: float = 1.0,
) -> dict[str, Any]:
    """One row of the presets table as a complete field dict (so each preset reads like the doc's table)."""
    return {
        "clip_mode": clip_mode,
        "epsilon_low": eps[0],
        "epsilon_high": eps[1],
        "epsilon_low_prime": eps_prime[0],
        "epsilon_high_prime": eps_prime[1],
        "weight": weight,
        "temp": temp,
        "regularizer": regularizer,
        "regularizer_coef": beta,
        "std_normalize": std_normalize,
        "drop": drop,
    }


# docs/algorithms.md, "Named presets". Values are complete field dicts: PRESETS[name] is the whole config.
PRESETS: dict[str, dict[str, Any]] = {
    "reinforce": _row(),
    "grpo": _row("one-side", weight="importance_sampling", std_normalize=True),
    "rec-oneside-nois": _row("one-side"),
    "rec-oneside-is": _row("one-side", weight="importance_sampling"),
    "rec-twoside-is": _row("two-side", weight="importance_sampling"),
    "rec-twoside-nois": _row("two-side"),
    "rec-ring-nois": _row("ring", eps_prime=(0.6, 2.0)),
    "rec-gspo-nois": _row("gspo-one-side", eps=(3e-4, 4e-4)),
    "asymre": _row(regularizer="forward-kl", beta=0.1),
    "opmd": _row(regularizer="k2", beta=0.1),
    "red-drop": _row(drop="balance"),
    "red-weight": _row(weight="advantage", temp=1.0),
}


def preset(name: str, **overrides: Any) -> LossConfig:
    """The LossConfig of a named preset, with any field overridden.

    Raises ConfigError (a ValueError) for an unknown preset name or an unknown field (listing what is
    allowed), and pydantic's ValidationError (a ValueError) for a bad value.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown loss preset {name!r}; allowed: {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - set(LossConfig.model_fields))
    if unknown:
        raise ConfigError(
            f"unknown LossConfig field(s) {unknown} in overrides of preset {name!r}; "
            f"allowed: {', '.join(LossConfig.model_fields)}"
        )
    return LossConfig(**{**PRESETS[name], **overrides})
