"""The paper's study in one command: loss presets x off-policy settings x seeds, one archive.

    recpipe experiment --store runs/study --model smollm2 --steps 12 --seeds 0,1 --workers 2 \\
        --presets reinforce,grpo,rec-oneside-nois,rec-oneside-nois:0.6,2.0,red-weight \\
        --settings onpolicy,sync,offline --eval-every 4           # EXPERIMENTS.md has the full command

Each (preset, setting, seed) is a run named ``<preset>.<setting>.s<seed>`` in the same store, so every
comparison is one SQL query away. A preset may carry overrides: ``rec-oneside-nois:0.6,2.0`` is the
paper's wider one-side band (eps_low 0.6, eps_high 2.0), ``red-weight:temp=0.5`` any LossConfig field
(see ``parse_presets``). Settings follow algorithms.md, scaled to the run length (``parse_settings``).
The seed is both the sampling seed (which prompts, which samples) and the trainer's.

Runs are independent: ``workers`` processes take them in turn, each run held by its loop lease (a
worker skips a run another one holds), and a run already finished in the archive is not run again, so
a killed study rerun with the same command finishes only what is missing, then writes the whole table
(recpipe.study).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from recpipe.algorithms import PRESETS, LossConfig
from recpipe.config import RecpipeConfig
from recpipe.errors import OptionError, RecpipeError
from recpipe.schema import table_spec
from recpipe.store import Store
from recpipe.store.lease import RunLocked


# Off-policy settings as (k, o) = (sync_interval, sync_offset) for a run of `steps` steps. The paper's
# are for ~300 steps (k=20; o=10; offline k=300, o=199); at a few dozen steps, k=20/300 of the run would
# be on-policy in all but name, so periodic sync and the lag take a third of the run: staleness up to
# steps/3 - 1 (sync) or exactly steps/3 (lag), between on-policy (0) and offline (up to steps - 1).
def parse_settings(text: str, steps: int) -> dict[str, tuple[int, int]]:
    """Named sync settings scaled to a run of ``steps`` steps, or ``k:o`` for any other."""
    third = max(1, steps // 3)
    named = {
        "onpolicy": (1, 0),                      # v(s) = s
        "sync": (max(2, third), 0),              # periodic sync: the paper's k=20, o=0
        "syncoffset": (max(2, third), max(1, third // 2)),  # the paper's k=20, o=10
        "lag": (1, third),                       # fixed lag: the paper's k=1, o=10
        "offline": (steps + 1, steps - 1),       # every step trains on version-0 rollouts
    }
    grid: dict[str, tuple[int, int]] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item in named:
            grid[item] = named[item]
        elif ":" in item:
            k, _, o = item.partition(":")
            try:
                grid[f"k{int(k)}o{int(o)}"] = (int(k), int(o))
            except ValueError:
                raise OptionError(f"--settings item {item!r}: expected k:o with integers") from None
            if int(k) < 1 or int(o) < 0:
                raise OptionError(f"--settings item {item!r}: expected k >= 1 and o >= 0")
        else:
            raise OptionError(f"--settings item {item!r}: expected one of {', '.join(named)} or k:o")
    if not grid:
        raise OptionError("--settings is empty")
    return grid


@dataclass(frozen=True)
class PresetSpec:
    """A loss preset with overrides, as one grid entry: ``label`` names it in run names and tables."""

    label: str
    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)


def _positional_fields(preset: str) -> tuple[str, ...]:
    """What bare numbers after ``preset:`` mean: the clip band, RED-Weight's temperature, or beta."""
    row = PRESETS[preset]
    if row["clip_mode"] != "none":
        return ("epsilon_low", "epsilon_high")
    if row["weight"] == "advantage":
        return ("temp",)
    if row["regularizer"] != "none":
        return ("regularizer_coef",)
    return ()


def _number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise OptionError(f"--presets item {where!r}: {text!r} is not a number") from None


class ExperimentFailed(RecpipeError, RuntimeError):
    """A worker process of the study ended with an error; the message names its log."""


def parse_preset(spec: str) -> PresetSpec:
    """``name``, ``name:v1[,v2]`` (positional: eps_low[,eps_high] for a clipped preset, one value for
    both; temp for red-weight; beta for asymre/opmd) or ``name:field=value[,field=value]``."""
    name, sep, rest = spec.strip().partition(":")
    if name not in PRESETS:
        raise OptionError(f"--presets item {spec!r}: unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    if not sep:
        return PresetSpec(name, name)
    items = [t.strip() for t in rest.split(",")]
    if not rest.strip() or not all(items):
        raise OptionError(f"--presets item {spec!r}: nothing after ':' (e.g. {name}:0.6,2.0 or {name}:temp=0.5)")
    overrides: dict[str, Any] = {}
    if all("=" in t for t in items):
        for item in items:
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in LossConfig.model_fields:
                raise OptionError(f"--presets item {spec!r}: unknown field {key!r}; allowed: "
                                 f"{', '.join(LossConfig.model_fields)}")
            overrides[key] = yaml.safe_load(value) if value.strip() else ""  # 0.5, true, one-side
    elif any("=" in t for t in items):
        raise OptionError(f"--presets item {spec!r}: mix of positional values and field=value; use one form")
    else:
        fields = _positional_fields(name)
        if not fields:
            raise OptionError(f"--presets item {spec!r}: preset {name!r} takes no positional values; "
                             f"use field=value (fields: {', '.join(LossConfig.model_fields)})")
        values = [_number(t, spec) for t in items]
        if len(values) > len(fields):
            raise OptionError(f"--presets item {spec!r}: {name!r} takes at most {len(fields)} value(s) "
                             f"({', '.join(fields)}), got {len(values)}")
        if len(values) == 1 and len(fields) == 2:
            values = values * 2  # "rec-oneside-nois:0.2": the symmetric band eps_low = eps_high
        overrides = dict(zip(fields, values, strict=False))
    try:
        LossConfig(**{**PRESETS[name], **overrides})
    except ValueError as exc:  # pydantic's message names the field and the allowed values
        raise OptionError(f"--presets item {spec!r}: {' '.join(str(exc).split())}") from None
    label = name + "_" + "-".join(_short(v) for v in overrides.values())
    return PresetSpec(label, name, overrides)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value).lower()


def parse_presets(text: str) -> list[PresetSpec]:
    """A comma-separated grid of presets; the values of ``name:v1,v2`` continue past the comma
    ("reinforce,rec-oneside-nois:0.6,2.0,grpo" is three presets): an item that is a number or
    field=value belongs to the preset before it."""
    entries: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        continues = entries and ":" in entries[-1] and (_is_number(item) or ("=" in item and ":" not in item))
        if continues:
            entries[-1] += "," + item
        else:
            entries.append(item)
    if not entries:
        raise OptionError("--presets is empty")
    specs = [parse_preset(e) for e in entries]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise OptionError(f"--presets lists a preset twice: {', '.join(sorted({x for x in labels if labels.count(x) > 1}))}")
    return specs


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` or a range ``0-3`` (inclusive)."""
    seeds: list[int] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        low, dash, high = item.partition("-")
        try:
            seeds.extend(range(int(low), int(high) + 1) if dash and low else [int(item)])
        except ValueError:
            raise OptionError(f"--seeds item {item!r}: expected an integer >= 0 or a range like 0-3") from None
    if not seeds or min(seeds) < 0:
        raise OptionError(f"--seeds {text!r}: expected integers >= 0, e.g. 0,1")
    if len(set(seeds)) != len(seeds):
        raise OptionError(f"--seeds {text!r}: a seed is listed twice")
    return seeds


@dataclass(frozen=True)
class Cell:
    """One run of the study."""

    preset: PresetSpec
    setting: str
    sync: tuple[int, int]
    seed: int

    @property
    def run(self) -> str:
        return f"{self.preset.label}.{self.setting}.s{self.seed}"


def study_cells(presets: list[PresetSpec], grid: dict[str, tuple[int, int]], seeds: list[int]) -> list[Cell]:
    # Seed-major: with a study cut short, every cell already has its first seed.
    return [Cell(p, name, sync, seed) for seed in seeds for name, sync in grid.items() for p in presets]


def cell_config(base: RecpipeConfig, cell: Cell) -> RecpipeConfig:
    data = base.model_dump()
    data["run"] = cell.run
    data["loss"] = {"preset": cell.preset.preset, "overrides": {**base.loss.overrides, **cell.preset.overrides}}
    data["loop"].update(sync_interval=cell.sync[0], sync_offset=cell.sync[1])
    data["generate"]["seed"] = cell.seed
    data["train"]["seed"] = cell.seed
    cfg = RecpipeConfig.model_validate(data)  # a bad override fails before any run starts
    if len(cfg.run) > 64:
        raise OptionError(f"run name {cfg.run!r} is longer than 64 characters: shorten the preset overrides")
    return cfg


def experiment_configs(base: RecpipeConfig, presets: list[PresetSpec], grid: dict[str, tuple[int, int]],
                       seeds: list[int] | None = None) -> list[RecpipeConfig]:
    return [cell_config(base, c) for c in study_cells(presets, grid, seeds or [base.generate.seed])]


# ---- running ------------------------------------------------------------------------------------
def run_loop(cfg: RecpipeConfig, progress: Any = None, engines: Any = None) -> None:
    """One run through the loop recipe (resumes what the archive holds); ``engines``: a
    recpipe.generate.pool.EnginePool shared by the runs of one process (vLLM started once)."""
    from recpipe.recipe import LoopRecipe

    with LoopRecipe(cfg, progress=progress, engines=engines) as recipe:
        recipe.run()


def finished_runs(configs: list[RecpipeConfig]) -> set[str]:
    """Runs of ``configs`` (one store) that trained all their steps and evaluated the version they ended at."""
    if not configs or not Store.exists(configs[0].store, configs[0].storage_options or None):
        return set()
    steps = {c.run: c.loop.steps for c in configs}
    con = Store(configs[0].store, configs[0].storage_options or None).connect(read_only=True)
    try:
        rows = con.execute(
            "WITH s AS (SELECT run, count(DISTINCT step) AS n, max_by(policy_version, step) AS final "
            "           FROM steps WHERE list_contains($runs, run) GROUP BY run) "
            "SELECT s.run, s.n FROM s JOIN evals e ON e.run = s.run AND e.policy_version = s.final",
            {"runs": list(steps)}).fetchall()
    finally:
        con.close()
    return {run for run, n in rows if n >= steps[run]}


def _eval_settings(cfg: RecpipeConfig) -> str:
    """What a greedy evaluation of the base model depends on (not the loss, the schedule or the seeds)."""
    t, g = cfg.task, cfg.generate
    return json.dumps([cfg.model.name, t.name, t.options, t.eval_prompts, t.reward_timeout_s, g.max_tokens,
                       g.backend, g.max_model_len, g.enforce_eager], sort_keys=True, default=str)


def share_initial_evals(configs: list[RecpipeConfig]) -> int:
    """Evaluate version 0 once per base model and evaluation settings and record that row for every run
    that shares them; returns the rows recorded. Greedy decoding of the same weights on the same prompts
    is one measurement: a 30-run study would otherwise evaluate the same base model 30 times (~35 s each
    with SmolLM2 on 200 prompts). A copy has the shard id the loop's own evaluation of version 0 would
    write, so the loop finds it committed and reads it back."""
    from recpipe.recipe import LoopRecipe

    store = Store.create(configs[0].store, configs[0].storage_options or None)
    runs = [c.run for c in configs]
    existing = {r["run"]: r for r in store.read("evals", "policy_version = 0 AND list_contains($runs, run)",
                                                 {"runs": runs}).to_pylist()}
    groups: dict[str, list[RecpipeConfig]] = {}
    for cfg in configs:
        groups.setdefault(_eval_settings(cfg), []).append(cfg)
    recorded = 0
    for group in groups.values():
        source = next((existing[c.run] for c in group if c.run in existing), None)
        if source is None:
            with LoopRecipe(group[0]) as recipe:  # the run's lease: no worker runs it yet
                source = recipe.evaluate(0)
        for cfg in group:
            if cfg.run not in existing and cfg.run != source["run"]:
                row = {**source, "run": cfg.run, "created_at": dt.datetime.now(dt.UTC)}
                store.append("evals", [row], shard_id=table_spec("evals").shard_id(
                    policy_version=row["policy_version"], task=row["task"], split=row["split"]))
                recorded += 1
    return recorded


def run_pending(configs: list[RecpipeConfig], progress: Any = None) -> list[str]:
    """Run, one after another, every run not finished and not held by another process, with one engine
    pool for all of them (vLLM starts once per engine settings); returns the runs it ran."""
    from recpipe.generate.pool import EnginePool
    from recpipe.store import RunLocked

    done = []
    with EnginePool() as engines:
        for cfg in configs:
            if cfg.run in finished_runs([cfg]):  # asked again each time: another worker may have finished it
                continue
            try:
                run_loop(cfg, progress=progress, engines=engines)
            except RunLocked:  # another worker runs it now
                continue
            done.append(cfg.run)
    return done


def _worker_env(index: int, workers: int) -> dict[str, str]:
    """Worker ``index`` of ``workers`` on its share of this process's cores (threads = cores)."""
    from recpipe.roles import split_devices

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < workers:
        return {"OMP_NUM_THREADS": "1"}
    share = split_devices(cpus, workers)[index]
    return {"RECPIPE_CPUS": ",".join(map(str, share)), "OMP_NUM_THREADS": str(len(share)),
            "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, share))}


POLL_S = 10.0  # how often the study process reads the archive for its workers' progress


def _report_steps(configs: list[RecpipeConfig], seen: set[tuple[str, int]], progress: Any) -> None:
    """Tell ``progress`` about steps the workers recorded since the last call (they report to no one)."""
    con = Store(configs[0].store, configs[0].storage_options or None).connect(read_only=True, tables=["steps"])
    try:
        rows = con.execute("SELECT run, step, loss, policy_version, applied, skip_reason, reward_mean, "
                           "tokens_per_second FROM steps WHERE list_contains($runs, run) ORDER BY created_at",
                           {"runs": [c.run for c in configs]}).fetchall()
    finally:
        con.close()
    for run, step, loss, version, applied, skip_reason, reward, tokens_per_s in rows:
        if (run, step) not in seen:
            seen.add((run, step))
            progress("step", {"run": run, "step": step, "loss": loss, "policy_version": version,
                              "applied": applied, "skip_reason": skip_reason, "reward": reward,
                              "tokens_per_s": tokens_per_s})


def run_workers(configs: list[RecpipeConfig], workers: int, log_dir: Path, progress: Any = None) -> None:
    """``workers`` processes (``python -m recpipe.experiment PLAN``) over the same list of runs, each
    taking the next run no other holds; they die with this process."""
    from recpipe.subprocesses import die_with_parent

    log_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="study-plan-", delete=False) as plan:
        json.dump([c.model_dump(mode="json") for c in configs], plan)
    procs = []
    try:
        for i in range(workers):
            log = open(log_dir / f"worker-{i}.log", "ab")  # noqa: SIM115 - closed below
            argv = [sys.executable, "-m", "recpipe.experiment", plan.name, str(i)]
            procs.append((subprocess.Popen(argv,
                                           env={**os.environ, **_worker_env(i, workers)}, stdout=log,
                                           stderr=subprocess.STDOUT, preexec_fn=die_with_parent(signal.SIGKILL)),
                          log))
        seen: set[tuple[str, int]] = set()
        while alive := [proc for proc, _ in procs if proc.poll() is None]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                alive[0].wait(timeout=POLL_S)
            if progress is not None:
                _report_steps(configs, seen, progress)
        failed = []
        for i, (proc, _) in enumerate(procs):
            if proc.wait() != 0:
                path = log_dir / f"worker-{i}.log"
                tail = " | ".join(path.read_text(errors="replace").strip().splitlines()[-3:])
                failed.append(f"worker {i} exited with {proc.returncode} (log {path}: ... {tail})")
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
        os.unlink(plan.name)
    if failed:
        raise ExperimentFailed("; ".join(failed))


def _worker_main(plan: str, index: int) -> None:
    from recpipe.roles import pin_to_cpus

    pin_to_cpus()
    configs = [RecpipeConfig.model_validate(c) for c in json.loads(Path(plan).read_text())]
    # Worker i starts at run i, so two rarely race for a lease, and all go through the list in order: the
    # study stays seed-major (a study cut short has the first seed of every cell).
    ran = run_pending(configs[index:] + configs[:index])
    print(f"worker {index}: ran {len(ran)} run(s): {', '.join(ran)}", flush=True)


def run_experiment(base: RecpipeConfig, presets: list[PresetSpec], grid: dict[str, tuple[int, int]],
                   seeds: list[int] | None = None, *, workers: int = 1, threshold: float = 0.5,
                   out_dir: str | Path | None = None, progress: Any = None) -> tuple[pa.Table, Path]:
    """Run every (preset, setting, seed) not yet finished, then write the study's tables and figure.

    One worker runs them in this process; more run in their own processes (their output goes to
    ``<out>/logs/worker-<i>.log``), and ``progress`` hears of their steps from the archive."""
    from recpipe.study import write_study

    if workers < 1:
        raise OptionError(f"--workers must be >= 1 (got {workers})")
    cells = study_cells(presets, grid, seeds or [base.generate.seed])
    configs = [cell_config(base, c) for c in cells]
    store = Store.create(base.store, base.storage_options or None)  # before workers race to create it
    out = Path(out_dir) if out_dir else store.root / "reports" / "experiment"
    finished = finished_runs(configs)
    pending = [c for c in configs if c.run not in finished]
    if pending:
        share_initial_evals(pending)
    if workers == 1 or len(pending) <= 1:
        run_pending(pending, progress)
    else:
        run_workers(pending, min(workers, len(pending)), out / "logs", progress)
    missing = sorted({c.run for c in configs} - finished_runs(configs))
    if missing:  # another process holds them (the same study started twice): its table will be complete
        raise RunLocked(f"runs not finished, held by another process: {', '.join(missing)}; rerun the "
                         "same command once it ends")
    return write_study(store, cells, out, threshold=threshold)


if __name__ == "__main__":
    _worker_main(sys.argv[1], int(sys.argv[2]))
