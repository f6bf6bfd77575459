"""What to generate: which policy version samples for a step, and the shards of one version.

Step s trains on groups of version v(s) = max(0, floor((s - o) / k) * k) (docs/algorithms.md), whatever
the selection query: the generator samples with the policy of its last sync point, o steps behind.
A version's prompts are planned over the whole run (every step that trains on it), so its shard ids do
not depend on where a killed loop resumed or which worker generates them:

    plans = plan_shards(task, cfg, version=2, prompts=prompts_needed(cfg.loop, cfg.select, 2))
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from recpipe.algorithms import behaviour_version
from recpipe.config import LoopConfig, RecpipeConfig, SelectConfig
from recpipe.errors import ConfigError
from recpipe.generate.rollouts import shard_id, shard_prompts, shard_seed
from recpipe.tasks import Prompt, Task


@dataclass(frozen=True)
class ShardPlan:
    """One generation shard of a version: its position in the plan, id, sampling seed and prompts."""

    index: int
    shard_id: str
    seed: int
    prompts: list[Prompt]


def generation_version(loop: LoopConfig, step: int) -> int:
    """The policy version whose rollouts step ``step`` trains on (and so samples them)."""
    return behaviour_version(step, loop.sync_interval, loop.sync_offset)


def steps_using(loop: LoopConfig, version: int) -> int:
    """How many of the run's ``loop.steps`` steps train on ``version``'s rollouts."""
    return sum(1 for s in range(loop.steps) if generation_version(loop, s) == version)


def prompts_needed(loop: LoopConfig, select: SelectConfig, version: int) -> int:
    """Groups to generate with ``version``: one batch for each step that trains on it."""
    return select.groups_per_step * steps_using(loop, version)


def prompts_for_version(task: Task, cfg: RecpipeConfig, version: int, count: int) -> list[Prompt]:
    """``count`` training prompts for one version: a seeded permutation of the pool, cycled if needed."""
    pool = task.prompts("train", limit=cfg.task.train_prompts, seed=cfg.generate.seed)
    if not pool:
        raise ConfigError(f"task {task.name!r} has no training prompts")
    order = list(range(len(pool)))
    random.Random(f"{cfg.generate.seed}/{version}").shuffle(order)
    chosen = []
    for i in range(count):
        prompt = pool[order[i % len(pool)]]
        if i >= len(pool):  # a second pass over the pool: distinct prompt ids keep group ids unique
            prompt = Prompt(prompt_id=f"{prompt.prompt_id}~{i // len(pool)}", messages=prompt.messages,
                            answer=prompt.answer)
        chosen.append(prompt)
    return chosen


def plan_shards(task: Task, cfg: RecpipeConfig, version: int, prompts: int) -> list[ShardPlan]:
    """The shards that generate ``prompts`` groups with ``version`` (ids and seeds fixed by the config)."""
    g = cfg.generate
    params = {"n": g.group_size, "temperature": g.temperature, "top_p": g.top_p, "max_tokens": g.max_tokens,
              "stop": g.stop, "model": cfg.model.name}
    plans = []
    for index, shard in enumerate(shard_prompts(prompts_for_version(task, cfg, version, prompts), g.shard_size)):
        seed = shard_seed(g.seed, version, index)
        sid = shard_id(cfg.run, version, task.name, [p.prompt_id for p in shard], params, seed)
        plans.append(ShardPlan(index=index, shard_id=sid, seed=seed, prompts=shard))
    return plans
