"""Sampling engines kept loaded across policy versions and runs.

Starting vLLM costs seconds; loading another version's weights into a running engine a fraction of one.
So whoever runs several versions (a loop, a generator worker) or several runs (an experiment) holds one
pool and closes it when done:

    with EnginePool() as engines:
        engine = engines.get(cfg, base_model, weights)   # started once per engine settings
        engine = engines.get(cfg, base_model, newer)     # same engine, newer weights swapped in place
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recpipe.config import RecpipeConfig
from recpipe.generate.engine import Engine, make_engine
from recpipe.generate.vllm_engine import engine_options


@dataclass
class _Loaded:
    engine: Engine
    weights: Path


class EnginePool:
    """One engine per (base model, engine settings); each holds the weights it was last given."""

    def __init__(self) -> None:
        self._engines: dict[tuple[Any, ...], _Loaded] = {}

    @staticmethod
    def settings(cfg: RecpipeConfig, base_model: Path) -> tuple[Any, ...]:
        """What a running engine cannot change (sampling parameters are per call, weights are swapped)."""
        g = cfg.generate
        return (str(base_model), g.backend, g.seed, g.max_model_len, g.enforce_eager, cfg.model.name, g.dtype,
                g.gpu_memory_utilization, g.tensor_parallel_size, tuple(g.devices or ()), g.sleep_mode)

    def holds(self, cfg: RecpipeConfig, base_model: Path, weights: Path) -> bool:
        """Whether the engine for these settings is running with ``weights`` already."""
        loaded = self._engines.get(self.settings(cfg, base_model))
        return loaded is not None and loaded.weights == weights

    def get(self, cfg: RecpipeConfig, base_model: Path, weights: Path) -> Engine:
        """The engine for ``cfg``'s settings holding ``weights`` (started, or its weights swapped in place)."""
        key = self.settings(cfg, base_model)
        loaded = self._engines.get(key)
        if loaded is None:
            g = cfg.generate
            options = engine_options(g)  # dtype (bf16 on CUDA), and vLLM's GPU settings on CUDA
            engine = make_engine(weights, backend=g.backend, seed=g.seed, max_model_len=g.max_model_len,
                                 model_name=cfg.model.name, enforce_eager=g.enforce_eager,
                                 dtype=options.pop("dtype"), vllm_kwargs=options)
            loaded = self._engines[key] = _Loaded(engine, weights)
        elif loaded.weights != weights:
            loaded.engine.load_weights(weights)
            loaded.weights = weights
        return loaded.engine

    def close(self) -> None:
        while self._engines:
            self._engines.popitem()[1].engine.close()

    def __enter__(self) -> EnginePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
