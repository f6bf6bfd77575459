"""The group-relative REINFORCE family (docs/algorithms.md) as pure functions.

    from recpipe.algorithms import preset, group_advantages, policy_loss
    cfg = preset("rec-oneside-nois")
    adv, kept = group_advantages([1.0, 0.0, 1.0, 0.0], cfg)
    loss, metrics = policy_loss(logprobs, old_logprobs, torch.tensor(adv), mask, cfg)

config      LossConfig, PRESETS, preset
advantages  group_advantages, batch_group_advantages, balance_drop
losses      policy_loss, masked_mean, token_entropy, CLIP_MASKS, WEIGHTS, REGULARIZERS
staleness   behaviour_version, staleness, PAPER_SYNC_SETTINGS
"""

from recpipe.algorithms.advantages import STD_EPS, balance_drop, batch_group_advantages, group_advantages
from recpipe.algorithms.config import PRESETS, LossConfig, preset
from recpipe.algorithms.losses import (
    CLIP_MASKS,
    REGULARIZERS,
    WEIGHTS,
    masked_mean,
    policy_loss,
    token_entropy,
)
from recpipe.algorithms.staleness import PAPER_SYNC_SETTINGS, behaviour_version, staleness

__all__ = [
    "CLIP_MASKS",
    "PAPER_SYNC_SETTINGS",
    "PRESETS",
    "REGULARIZERS",
    "STD_EPS",
    "WEIGHTS",
    "LossConfig",
    "balance_drop",
    "batch_group_advantages",
    "behaviour_version",
    "group_advantages",
    "masked_mean",
    "policy_loss",
    "preset",
    "staleness",
    "token_entropy",
]
