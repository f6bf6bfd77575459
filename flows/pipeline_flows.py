"""The recpipe flows. Each is a few lines: the logic lives in recpipe.recipe.

    python -m flows.pipeline_flows          # runs `loop` with the default config

Each recipe verb a flow calls becomes a Prefect task named by what it does ("generate v3 shard 2",
"train step 7"); generation shards get retries (a flaky engine or disk is retried; a committed shard is
skipped, so a retry never writes twice). A task's arguments are plain values (a step, a version, a shard
plan, a batch): the engine and the trainer stay inside the recipe. Tasks use ``NO_CACHE``: the archive,
not Prefect's result store, is where results persist.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows import server_configured
from recpipe import recipe as recipes
from recpipe.config import RecpipeConfig
from recpipe.errors import OptionError
from recpipe.generate.pool import EnginePool

RETRIES = {"generate_shard": 2}
TASK_RUN_NAMES = {"generate_shard": "generate v{version} shard {plan.index}", "select": "select step {step}",
                  "train_step": "train step {step}", "evaluate": "evaluate v{version}"}


def as_task(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a recipe verb (a bound method) as a Prefect task named after what it does."""
    name = fn.__name__
    return task(fn, name=name, task_run_name=TASK_RUN_NAMES.get(name, name), cache_policy=NO_CACHE,
                retries=RETRIES.get(name, 0), retry_delay_seconds=2, log_prints=False,
                retry_condition_fn=_not_stopping)


def _not_stopping(*_: Any) -> bool:
    """No retry once the user asked the process to stop (the failure may be the stop itself, disguised)."""
    return not recipes.STOP.is_set()


def _recipe(config: RecpipeConfig | dict[str, Any], progress: Any, engines: EnginePool | None = None,
            lease: str | None = "loop") -> recipes.LoopRecipe:
    cfg = config if isinstance(config, RecpipeConfig) else RecpipeConfig.model_validate(config)
    return recipes.LoopRecipe(cfg, progress=progress, lease=lease, engines=engines, stage=as_task)


@contextlib.contextmanager
def _training(config: RecpipeConfig | dict[str, Any], progress: Any,
              engines: EnginePool | None = None) -> Iterator[recipes.LoopRecipe]:
    """A flow that trains the run: the recipe, started (``_started``); once the body is done, the run's
    step table is published (``_publish_steps``)."""
    with _recipe(config, progress, engines) as recipe:
        _started(recipe)
        yield recipe
        _publish_steps(recipe)


def _run_name() -> str:
    """A flow run is named after the recpipe run: "r1 loop" (Prefect's default is a random "witty-owl")."""
    from prefect.runtime import flow_run

    config = flow_run.parameters.get("config") or {}
    return f"{config.get('run', 'default')} {flow_run.flow_name}"


def _started(recipe: recipes.LoopRecipe) -> None:
    """Once the recipe holds the run: save its resolved config beside its checkpoints (recpipe status shows
    it) and, when flows report to a Prefect server, tell the progress where the run is in the UI."""
    from prefect.runtime import flow_run
    from prefect.utilities.urls import url_for

    from recpipe.status import save_run_config

    save_run_config(recipe.store, recipe.cfg, str(recipe.model_path))
    # url_for: the UI's route (/runs/flow-run/ID); prefect.runtime's ui_url names an older one
    url = url_for("flow-run", obj_id=flow_run.get_id()) if server_configured() else None
    if url:
        recipe.progress("flow_run", {"name": flow_run.name, "url": url})


def _publish_steps(recipe: recipes.LoopRecipe) -> None:
    """The run's step table and resolved config as a Markdown artifact of the flow run (key: "<run>-steps",
    a version per flow run)."""
    import re

    from prefect.artifacts import create_markdown_artifact

    from recpipe.config import dump_config
    from recpipe.progress import steps_markdown

    rows = recipe.store.read("steps", "run = $run", {"run": recipe.cfg.run}).to_pylist()
    key = re.sub(r"[^a-z0-9-]+", "-", f"{recipe.cfg.run.lower()}-steps")
    # The flow's parameters hold only the fields the command set; the artifact has every one.
    markdown = (steps_markdown(rows, f"run {recipe.cfg.run}: steps") + "\n## resolved config\n\n```yaml\n"
                + dump_config(recipe.cfg) + "```\n")
    create_markdown_artifact(markdown=markdown, key=key,
                             description=f"recpipe run {recipe.cfg.run}: one row per trained step")


@flow(name="loop", flow_run_name=_run_name, validate_parameters=False)
def loop(config: dict[str, Any], progress: Any = None, engines: EnginePool | None = None) -> int:
    """generate -> select -> train for loop.steps steps (resumes from the archive)."""
    with _training(config, progress, engines) as recipe:
        return len(recipe.run())


@flow(name="generate", flow_run_name=_run_name, validate_parameters=False)
def generate(config: dict[str, Any], version: int | None = None, prompts: int | None = None,
             progress: Any = None) -> int:
    """Generate rollouts with a policy version (default: the latest) into the archive."""
    if prompts is not None and prompts < 1:  # 0 is not "the default": refuse it before the store is touched
        raise OptionError(f"prompts must be an integer >= 1 (got {prompts})")
    with _recipe(config, progress) as recipe:
        _started(recipe)
        version = recipe.latest_version() if version is None else version
        return recipe.generate(version, prompts or recipe.cfg.select.groups_per_step)


@flow(name="train", flow_run_name=_run_name, validate_parameters=False)
def train(config: dict[str, Any], steps: int = 1, progress: Any = None) -> int:
    """Train the next ``steps`` steps on batches selected from the archive (no generation)."""
    with _training(config, progress) as recipe:
        return len(recipe.train(steps))


@flow(name="evaluate", flow_run_name=_run_name, validate_parameters=False)
def evaluate(config: dict[str, Any], version: int | None = None, progress: Any = None) -> dict[str, Any]:
    """Greedy held-out accuracy of a policy version into `evals`."""
    with _recipe(config, progress) as recipe:
        return recipe.stage(recipe.evaluate)(recipe.latest_version() if version is None else version)


@flow(name="retrain", flow_run_name=_run_name, validate_parameters=False)
def retrain(config: dict[str, Any], source_run: str | None = None, progress: Any = None) -> int:
    """Train a new run from archived rollouts only: replay ``source_run``'s batches, or select with the query."""
    with _training(config, progress) as recipe:
        return len(recipe.retrain(source_run))


@flow(name="generator", flow_run_name=_run_name, validate_parameters=False)
def generator(config: dict[str, Any], exit_when_idle: bool = False, progress: Any = None) -> int:
    """A generator worker (recpipe.roles): samples the shards the run's schedule needs, beside a trainer."""
    from recpipe.roles import run_generator

    with _recipe(config, progress, lease=None) as recipe:
        return run_generator(recipe, exit_when_idle=exit_when_idle)


@flow(name="trainer", flow_run_name=_run_name, validate_parameters=False)
def trainer(config: dict[str, Any], wait_timeout_s: float = 3600.0, progress: Any = None) -> int:
    """The trainer role (recpipe.roles): trains each step once generators committed its rollouts."""
    from recpipe.roles import run_trainer

    with _training(config, progress) as recipe:
        return len(run_trainer(recipe, wait_timeout_s=wait_timeout_s))


FLOWS = {"loop": loop, "generate": generate, "train": train, "evaluate": evaluate, "retrain": retrain,
         "generator": generator, "trainer": trainer}


if __name__ == "__main__":
    loop(RecpipeConfig().model_dump(mode="json"))
