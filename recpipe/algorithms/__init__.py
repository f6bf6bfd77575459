"""The group-relative REINFORCE family (docs/algorithms.md) as pure functions.

    from recpipe.algorithms import preset, group_advantages, policy_loss
    cfg = preset("rec-oneside-nois")
    adv, kept = group_advantages([1.0, 0.0, 1.0, 0.0], cfg)
    loss, metrics = policy_loss(logprobs, old_logprobs, torch.tensor(adv), mask, cfg)

config      LossConfig, PRESETS, preset
advantages  group_advantages, batch_group_advantages, balance_drop
losses      policy_loss, masked_mean, CLIP_MASKS, WEIGHTS, REGULARIZERS
staleness   behaviour_version, staleness
"""

from recpipe.algorithms.losses import (
    CLIP_MASKS,
    REGULARIZERS,
    WEIGHTS,
    masked_mean,
    policy_loss,
)
from recpipe.algorithms.staleness import behaviour_version, staleness

# LossConfig (config.py, and advantages.py through it) needs pydantic: loaded on first use (PEP 562), so
# the loss itself imports with torch alone (bench/bench_gpu.py on a GPU machine without pydantic).
_WHERE = {
    **dict.fromkeys(("STD_EPS", "balance_drop", "batch_group_advantages", "group_advantages"), "advantages"),
    **dict.fromkeys(("PRESETS", "LossConfig", "preset"), "config"),
}


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


__all__ = [
    "CLIP_MASKS",
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
]
