"""report_to: a real loop on the tiny model writes the same "/"-named metrics per step to TensorBoard event
files, an MLflow file store and a W&B offline run; each is read back with its own reader."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from recpipe.config import load_config
from recpipe.recipe import LoopRecipe
from recpipe.store import Store
from recpipe.tracking import TrackerMissing, step_metrics

SMALL = ["select.groups_per_step=2", "generate.group_size=4", "generate.max_tokens=8", "generate.shard_size=2",
         "task.eval_prompts=4", "train.lr=1e-3", "generate.max_model_len=128", "generate.backend=hf"]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_model):
    """Run r1: one step, then resumed to two (the MLflow run is found again by its tag)."""
    root = tmp_path_factory.mktemp("tracking")
    base = [f"store={root / 'store'}", "run=r1", f"model.name={tiny_model}", "report_to=[tensorboard,mlflow,wandb]",
            *SMALL]
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    try:
        for steps in (1, 2):
            with LoopRecipe(load_config(overrides=[*base, f"loop.steps={steps}"])) as recipe:
                recipe.run()
    finally:
        mp.undo()
    store = Store(root / "store")
    rows = {r["step"]: r for r in store.read("steps", "run = 'r1'").to_pylist()}
    evals = {r["policy_version"]: r for r in store.read("evals", "run = 'r1'").to_pylist()}
    return store.root / "tracking", rows, evals


def expected(rows, evals):
    """{metric: {x: value}} as the tables hold them."""
    out: dict[str, dict[int, float]] = {}
    for step, row in rows.items():
        for name, value in step_metrics(row).items():
            out.setdefault(name, {})[step] = value
    for version, row in evals.items():
        out.setdefault("eval/accuracy", {})[version] = row["accuracy"]
    return out


def check(found: dict[str, dict[int, float]], rows, evals) -> None:
    want = expected(rows, evals)
    for name in ("train/loss", "train/reward_mean", "train/reward_std", "train/clip_fraction", "train/grad_norm",
                 "train/ratio_mean", "train/entropy", "train/staleness_mean", "train/tokens_per_second"):
        assert set(found[name]) == {0, 1}, (name, found.get(name))
    for name, points in want.items():
        assert found[name].keys() == points.keys(), name
        for x, value in points.items():
            assert found[name][x] == pytest.approx(value, rel=1e-6, abs=1e-9), (name, x)
    assert found["eval/accuracy"].keys() == {0, 1, 2}  # v0 at the start, v1 after step 0, v2 at the end


def test_tensorboard_event_files(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, rows, evals = tracked_run
    events = EventAccumulator(str(folder / "tensorboard" / "r1"))
    events.Reload()
    found = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    check(found, rows, evals)


def test_mlflow_file_store(tracked_run, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    folder, rows, evals = tracked_run
    client = MlflowClient(tracking_uri=(folder / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("recpipe")
    [run] = client.search_runs([experiment.experiment_id])  # the resumed loop logged into the same run
    assert run.info.run_name == "r1" and run.data.params["loop.steps"] == "1"
    found = {name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
             for name in run.data.metrics}
    check(found, rows, evals)


def wandb_history(path: Path) -> list[dict[str, str]]:
    """The history records of a W&B offline run file (.wandb: LevelDB-log framed protobuf records after a
    7-byte header; wandb 0.31 ships no Python reader)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos = path.read_bytes(), 32768, 7
    records, partial = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            break
        partial = chunk if kind in (1, 2) else partial + chunk
        if kind in (1, 4):
            records.append(partial)
    history = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return history


def test_wandb_offline_runs(tracked_run):
    folder, rows, evals = tracked_run
    runs = sorted((folder / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2  # one per command (offline runs resume nothing: `wandb sync` uploads both)
    found: dict[str, dict[int, float]] = {}
    for path in runs:
        for entry in wandb_history(path):
            x = int(entry["step"])
            for name, value in entry.items():
                if "/" in name:
                    found.setdefault(name, {})[x] = float(value)
    check(found, rows, evals)


def test_a_missing_tracker_package_says_what_to_install(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # not importable, as when not installed
    cfg = load_config(overrides=[f"store={tmp_path / 'store'}", "run=r2", f"model.name={tiny_model}",
                                 "report_to=[wandb]", *SMALL])
    with pytest.raises(TrackerMissing, match=r"report_to: wandb needs its package.*pip install wandb==0\.31\.0"):
        LoopRecipe(cfg).setup()
    plain = load_config(overrides=[f"store={tmp_path / 'store'}", "run=r2", f"model.name={tiny_model}", *SMALL])
    LoopRecipe(plain).setup().cleanup()  # the failed setup released the run's lease
