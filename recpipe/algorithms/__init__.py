"""The group-relative REINFORCE family (docs/algorithms.md) as pure functions.

    from recpipe.algorithms import preset, policy_loss
    cfg = preset("rec-oneside-nois")
    loss, metrics = policy_loss(logprobs, old_logprobs, advantages, mask, cfg)

config      LossConfig, PRESETS, preset
losses      policy_loss, masked_mean, CLIP_MASKS, WEIGHTS, REGULARIZERS
staleness   behaviour_version
"""

from recpipe.algorithms.losses import (
    CLIP_MASKS,
    REGULARIZERS,
    WEIGHTS,
    masked_mean,
    policy_loss,
)
from recpipe.algorithms.staleness import behaviour_version

# LossConfig (config.py) needs pydantic: loaded on first use (PEP 562), so
# the loss itself imports with torch alone (bench/bench_gpu.py on a GPU machine without pydantic).
_WHERE = {
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
    "WEIGHTS",
    "LossConfig",
    "behaviour_version",
    "masked_mean",
    "policy_loss",
    "preset",
]
