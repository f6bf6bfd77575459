"""Task registry: names -> factories, plus two ways for users to plug in their own.

    from recpipe.tasks import get_task, register_task
    register_task("my_task", MyTask)                 # then get_task("my_task", **options)
    get_task("my_package.my_module:make_task", n=3)   # "module:callable", imported on demand

An installed package can also declare an entry point in the `recpipe.tasks` group
(pyproject: `[project.entry-points."recpipe.tasks"] my_task = "my_package:MyTask"`); `get_task`
loads it by name. Lookup order: registered names, then "module:callable", then entry points.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from recpipe.tasks.base import Task, TaskError

ENTRY_POINT_GROUP = "recpipe.tasks"

_FACTORIES: dict[str, Callable[..., Task]] = {}


def register_task(name: str, factory: Callable[..., Task], *, overwrite: bool = False) -> None:
    """Register `factory(**options) -> Task` under `name` (a class works as its own factory)."""
    if not isinstance(name, str) or not name or ":" in name:
        raise TaskError(f"name={name!r}: expected a non-empty str without ':' (':' marks module:callable)")
    if not callable(factory):
        raise TaskError(f"factory={factory!r}: expected a callable returning a Task")
    if name in _FACTORIES and not overwrite and _FACTORIES[name] is not factory:
        raise TaskError(f"name={name!r} is already registered; pass overwrite=True to replace it")
    _FACTORIES[name] = factory


def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def task_names() -> list[str]:
    """Registered task names and installed `recpipe.tasks` entry points, sorted."""
    return sorted(set(_FACTORIES) | set(_entry_points()))


def import_callable(spec: str, what: str = "task") -> Callable[..., Any]:
    """The callable a "module:callable" string names (a task factory, a reward function); ValueError saying
    what is wrong with it."""
    module_name, _, attr_path = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not module_name or not attr_path:
        raise TaskError(f"{what}={spec!r}: expected 'module:callable', e.g. 'my_package.tasks:MyTask'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise TaskError(f"{what}={spec!r}: cannot import module {module_name!r} ({e})") from e
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise TaskError(f"{what}={spec!r}: {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise TaskError(f"{what}={spec!r}: {attr_path!r} is not callable")
    return obj


def get_task(name: str, **options: Any) -> Task:
    """Build the task `name` with keyword `options` (e.g. get_task("arithmetic", operation="mul")).

    `reward_funcs` / `reward_weights` options, for any task, replace its reward by a weighted sum of
    reward functions (recpipe.tasks.rewards)."""
    reward_funcs = options.pop("reward_funcs", None)
    reward_weights = options.pop("reward_weights", None)
    if reward_weights is not None and reward_funcs is None:
        raise TaskError("reward_weights given without reward_funcs")
    task = _build_task(name, **options)
    if reward_funcs is None:
        return task
    from recpipe.tasks.rewards import WeightedRewards, resolve_rewards

    return WeightedRewards(task, tuple(resolve_rewards(task, reward_funcs, reward_weights)))


def _build_task(name: str, **options: Any) -> Task:
    if name in _FACTORIES:
        factory = _FACTORIES[name]
    elif isinstance(name, str) and ":" in name:
        factory = import_callable(name)
    else:
        eps = _entry_points()
        if name not in eps:
            raise TaskError(
                f"task={name!r} is unknown: registered tasks are {task_names()}; "
                "register one with register_task or pass 'module:callable'"
            )
        factory = eps[name].load()
    task = factory(**options)
    # Catch a wrong factory here, not halfway through a generation run.
    if not isinstance(task, Task) or not isinstance(getattr(task, "name", None), str):
        raise TaskError(
            f"task={name!r}: the factory returned {type(task).__name__}, "
            "expected a Task: a str `name`, `prompts(split, limit, seed)` and `score(prompt, response)`"
        )
    return task
