"""What a store holds, run by run, for ``recpipe status``; and which policy versions are still on disk.

    runs_status(store)   # one row per run: steps, versions, checkpoints on disk, last eval, model, lag, config
    require_version(store, "r1", 3)   # VersionMissing saying that retention removed it, and what is left

Every number comes from the tables (one read-only SQL query); the checkpoints on disk come from the
store's storage (recpipe.train.checkpoint.version_dirs), since retention deletes folders but keeps the
``policies`` rows as history.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from recpipe.errors import RecpipeError
from recpipe.store import Store
from recpipe.train import checkpoint as ckpt

RUNS_SQL = """
WITH runs AS (
    SELECT run FROM groups UNION SELECT run FROM policies UNION SELECT run FROM steps
), data AS (
    SELECT run, sum(n) AS rollouts, count(*) AS groups, max(policy_version) AS sampled_version,
           max(created_at) AS last_rollout
    FROM groups GROUP BY run
), pol AS (
    SELECT run, max(version) AS latest_version, count(*) AS versions,
           arg_min(base_model, version) AS model
    FROM policies GROUP BY run
), st AS (
    SELECT run, count(*) FILTER (WHERE applied) AS steps_applied, count(*) AS steps, max(step) AS last_step,
           arg_max(staleness_mean, step) AS lag, max(staleness_mean) AS max_lag, arg_max(preset, step) AS preset,
           arg_max(loss, step) AS last_loss, max(created_at) AS last_step_at
    FROM steps GROUP BY run
), ev AS (
    SELECT run, arg_max(policy_version, policy_version) AS eval_version, arg_max(accuracy, policy_version) AS accuracy,
           arg_max(n, policy_version) AS eval_n, count(*) AS evals
    FROM evals GROUP BY run
), held AS (
    SELECT run, string_agg(purpose || ' by ' || host || ' pid ' || pid, '; ') AS held_by
    FROM (SELECT run, purpose, arg_max(released, epoch) AS released, arg_max(expires_at, epoch) AS expires_at,
                 arg_max(host, epoch) AS host, arg_max(pid, epoch) AS pid
          FROM leases GROUP BY run, purpose)
    WHERE NOT released AND expires_at > now() GROUP BY run
)
SELECT runs.run, pol.model, st.preset, st.steps_applied, st.steps, st.last_step, pol.latest_version,
       pol.versions, data.rollouts, data.groups, data.sampled_version, ev.eval_version, ev.accuracy, ev.eval_n,
       ev.evals, st.lag, st.max_lag, st.last_loss, held.held_by,
       greatest(data.last_rollout, st.last_step_at) AS last_activity
FROM runs LEFT JOIN data USING (run) LEFT JOIN pol USING (run) LEFT JOIN st USING (run)
     LEFT JOIN ev USING (run) LEFT JOIN held USING (run)
ORDER BY runs.run
"""


class VersionMissing(RecpipeError, ValueError):
    """A policy version asked for has no checkpoint folder: never trained, or removed by retention."""


def versions_on_disk(store: Store, run: str) -> list[int]:
    """The run's committed checkpoint versions (on a remote store: complete on its storage)."""
    return sorted(ckpt.version_dirs(store, run))


def recorded_versions(store: Store, run: str) -> dict[int, dict[str, Any]]:
    """The run's ``policies`` rows by version (history: the rows stay when retention removes a folder)."""
    return {row["version"]: row for row in store.read("policies", "run = $run", {"run": run}).to_pylist()}


def store_runs(store: Store) -> list[str]:
    return sorted(set(store.read("policies").column("run").to_pylist()))


def missing_version_message(store: Store, run: str, version: int) -> str:
    """Why ``version`` of ``run`` has no checkpoint folder, and which versions do (what evaluate and export
    say instead of a loader's "no config.json")."""
    recorded = recorded_versions(store, run)
    listing = ", ".join(str(v) for v in versions_on_disk(store, run)) or "none"
    if not recorded:
        return f"run {run!r} has no policy versions in {store.uri} (runs: {', '.join(store_runs(store)) or 'none'})"
    if version not in recorded:
        return (f"run {run!r} has no version {version}: it is at version {max(recorded)} "
                f"(checkpoints on disk: {listing})")
    return (f"run {run!r}: version {version} was trained (step {recorded[version]['step']}) but retention "
            f"removed its checkpoint (train.keep_every keeps every k-th version and the latest two); "
            f"versions still on disk: {listing}")


def require_version(store: Store, run: str, version: int) -> None:
    """VersionMissing unless version ``version`` >= 1 of ``run`` has a committed checkpoint (0 is the base model)."""
    if version > 0 and version not in ckpt.version_dirs(store, run):
        raise VersionMissing(missing_version_message(store, run, version))


RUN_CONFIG = "checkpoints/{run}/config.yaml"  # beside the run's checkpoints, on the store's storage


def save_run_config(store: Store, cfg: Any, model: str | None = None) -> str:
    """Write the command's resolved config (every field, defaults included; YAML) as the run's config,
    plus the model path it resolved to; returns the file's path on the store's storage. Overwritten by
    each command on the run: the latest command's settings are the run's."""
    from recpipe.config import dump_config

    text = dump_config(cfg)
    if model is not None:
        text += f"# resolved model: {model}\n"
    path = store.location.path(*RUN_CONFIG.format(run=cfg.run).split("/"))
    fs = store.location.fs
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(text.encode())
    return path


def saved_run_config(store: Store, run: str) -> str | None:
    """The resolved config the run's latest command saved (YAML text), or None."""
    try:
        with store.location.fs.open_input_stream(store.location.path(*RUN_CONFIG.format(run=run).split("/"))) as f:
            return f.read().decode()
    except (FileNotFoundError, OSError):
        return None


def steps_done(uri: str, run: str, storage_options: dict[str, str] | None = None) -> tuple[int, int, bool]:
    """(steps recorded, latest policy version, whether that version was evaluated) of ``run``; zeros for a
    run or store that does not exist. Read-only."""
    if not Store.exists(uri, storage_options):
        return 0, 0, False
    store = Store(uri, storage_options)
    steps = store.read("steps", "run = $run", {"run": run}).column("step").to_pylist()
    version = max([0, *store.read("policies", "run = $run", {"run": run}).column("version").to_pylist()])
    evaluated = store.read("evals", "run = $run AND policy_version = $v", {"run": run, "v": version}).num_rows > 0
    return max([-1, *steps]) + 1, version, evaluated


def runs_status(store: Store) -> pa.Table:
    """One row per run of the store, with the checkpoint versions on disk (``on_disk``, a list)."""
    con = store.connect(read_only=True)
    try:
        table = con.sql(RUNS_SQL).to_arrow_table()
    finally:
        con.close()
    names = table.column("run").to_pylist()
    on_disk = [versions_on_disk(store, run) for run in names]
    table = table.add_column(table.schema.get_field_index("versions") + 1, "on_disk",
                             pa.array(on_disk, pa.list_(pa.int32())))
    return table.append_column("config", pa.array([saved_run_config(store, run) for run in names], pa.string()))


SHOWN = {  # column -> heading of the table view; JSON gets every column
    "run": "run", "model": "model", "preset": "preset", "steps": "steps", "versions": "versions",
    "on_disk": "on disk", "rollouts": "rollouts", "last_eval": "last eval", "lag": "lag (max)",
    "state": "state",
}


def table_rows(status: pa.Table) -> pa.Table:
    """The status as the short strings of ``recpipe status``'s table."""
    rows = []
    for r in status.to_pylist():
        model = r["model"] or ""
        rows.append({
            "run": r["run"],
            "model": model.rstrip("/").rsplit("/", 1)[-1] if "/" in model else model,
            "preset": r["preset"],
            "steps": None if r["steps"] is None else f"{r['steps_applied']}/{r['steps']} (last {r['last_step']})",
            "versions": None if r["latest_version"] is None else f"v{r['latest_version']}",
            "on_disk": ", ".join(f"v{v}" for v in r["on_disk"]) or None,
            "rollouts": r["rollouts"],
            "last_eval": None if r["eval_version"] is None else
            f"v{r['eval_version']}: {r['accuracy']:.3f} (n={r['eval_n']})",
            "lag": None if r["lag"] is None else f"{r['lag']:g} ({r['max_lag']:g})",
            "state": f"running ({r['held_by']})" if r["held_by"] else "idle",
        })
    return pa.Table.from_pylist(rows).rename_columns(list(SHOWN.values())) if rows else pa.table(
        {name: pa.array([], pa.string()) for name in SHOWN.values()})
