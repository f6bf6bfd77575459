"""Issue 19, items 3 and 7: a damaged checkpoint is never loaded, trained on or inherited; a full disk
during a checkpoint write commits nothing; every error names the file and what to do."""

import json
import struct
from pathlib import Path

import pytest
import torch

from recpipe.algorithms import preset
from recpipe.config import load_config
from recpipe.recipe import LoopRecipe
from recpipe.store import Store, StoreWriteError
from recpipe.train import Trainer
from recpipe.train import checkpoint as ckpt
from tests.faults.mounts import small_disk
from tests.train.kill_worker import CONFIG, PRESET, run_steps
from tests.train.train_batches import random_batch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()  # tiny steps on a busy 2-core machine: one thread is fastest
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def trained(root, tiny_model, steps=2):
    store = Store.create(root)
    run_steps(store, tiny_model, "r", steps)
    return store


def overwrite_weights(file: Path, count=4, value=3e4):
    """The issue's damage: ``count`` float32 weights of the first tensor set to ``value``, size unchanged."""
    data = bytearray(file.read_bytes())
    header = struct.unpack("<Q", data[:8])[0]
    name, meta = next((k, v) for k, v in json.loads(data[8:8 + header]).items() if k != "__metadata__")
    assert meta["dtype"] == "F32", name
    start = 8 + header + meta["data_offsets"][0]
    data[start:start + 4 * count] = struct.pack(f"<{count}f", *[value] * count)
    file.write_bytes(bytes(data))


def truncate(file: Path):
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def garbage(file: Path):
    file.write_bytes(b"\x00not what was written\xff" * 8)


DAMAGE = {"model.safetensors": overwrite_weights, "optimizer.pt": truncate, "trainer_state.json": garbage,
          "config.json": truncate, "tokenizer.json": garbage}


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_a_damaged_latest_version_is_never_resumed_from(tmp_path, tiny_model, name):
    store = trained(tmp_path / "store", tiny_model)
    latest = store.checkpoint_dir("r", 2)
    assert ckpt.verify_checkpoint(latest) == []
    DAMAGE[name](latest / name)

    problems = ckpt.verify_checkpoint(latest)
    assert len(problems) == 1 and str(latest / name) in problems[0], problems
    with pytest.raises(ckpt.CheckpointError) as raised:
        Trainer(store, "r", tiny_model, CONFIG, preset_name=PRESET).setup()
    message = str(raised.value)
    assert str(latest / name) in message and "v000002" in message
    assert "recpipe doctor" in message and "retrain --from-run r" in message
    with pytest.raises(ckpt.CheckpointError):  # again, not RunLocked: the failed setup released the lock
        Trainer(store, "r", tiny_model, CONFIG, preset_name=PRESET).setup()
    assert sorted(store.read("steps").column("step").to_pylist()) == [0, 1]  # nothing trained on it


def test_the_sampling_engine_refuses_a_damaged_version(tmp_path, tiny_model):
    store = trained(tmp_path / "store", tiny_model)
    cfg = load_config(overrides=["generate.backend=hf", f"store={store.root}", "run=r", f"model.name={tiny_model}"])
    overwrite_weights(store.checkpoint_dir("r", 1) / "model.safetensors")
    with LoopRecipe(cfg, lease=None) as recipe, pytest.raises(
            ckpt.CheckpointError, match=r"v000001.*model\.safetensors.*sha256.*recpipe doctor"):
        recipe.engine_for(1)
    # v1 lost its optimizer state to retention: that is not damage, and the engine never reads it.
    assert not (store.checkpoint_dir("r", 1) / "optimizer.pt").exists()
    assert ckpt.verify_checkpoint(store.checkpoint_dir("r", 2), optimizer="skip") == []


def test_retention_dropping_the_optimizer_state_is_not_damage(tmp_path, tiny_model):
    store = trained(tmp_path / "store", tiny_model, steps=3)
    older = store.checkpoint_dir("r", 2)
    assert not (older / "optimizer.pt").exists()
    assert ckpt.verify_checkpoint(older) == []
    assert ckpt.verify_checkpoint(older, optimizer="required") == [f"{older / 'optimizer.pt'}: missing"]
    (older / "manifest.json").unlink()
    assert ckpt.verify_checkpoint(older) == [f"{older / 'manifest.json'}: missing, the files cannot be verified"]
    assert ckpt.verify_checkpoint(tmp_path / "nothing") == [f"{tmp_path / 'nothing'}: version dir missing"]


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_a_file_that_cannot_be_loaded_is_named_even_past_the_manifest(tmp_path, tiny_model, name):
    # The loaders' own errors (safetensors header, torch zip, JSON) never said which file: now they do,
    # e.g. for a dir whose manifest was rewritten by hand after the damage.
    store = trained(tmp_path / "store", tiny_model)
    latest = store.checkpoint_dir("r", 2)
    truncate(latest / name)
    ckpt.write_manifest(latest)
    with pytest.raises(ckpt.CheckpointError) as raised:
        Trainer(store, "r", tiny_model, CONFIG, preset_name=PRESET).setup()
    assert str(latest / name) in str(raised.value) and "recpipe doctor" in str(raised.value)


def test_a_resume_from_an_intact_checkpoint_still_matches_the_uninterrupted_run(tmp_path, tiny_model):
    # Verification reads the files; it must not change what is loaded (bit-exact resume).
    store = trained(tmp_path / "store", tiny_model, steps=2)
    run_steps(store, tiny_model, "r", 4)
    reference = trained(tmp_path / "reference", tiny_model, steps=4)
    ours = (store.checkpoint_dir("r", 4) / "model.safetensors").read_bytes()
    assert ours == (reference.checkpoint_dir("r", 4) / "model.safetensors").read_bytes()


def checkpoint_sizes(tmp_path, tiny_model) -> dict[str, int]:
    store = trained(tmp_path / "sizes", tiny_model, steps=1)
    return {p.name: p.stat().st_size for p in store.checkpoint_dir("r", 1).iterdir()}


@pytest.mark.parametrize("fails_in", ["model.safetensors", "optimizer.pt"])
def test_a_full_disk_during_a_checkpoint_write_commits_nothing(tmp_path, tiny_model, fails_in):
    sizes = checkpoint_sizes(tmp_path, tiny_model)
    # Room for the store's first rows and, for "optimizer.pt", the weights but not the optimizer state:
    # torch.save then fails with RuntimeError("unexpected pos"), safetensors with SafetensorError.
    room = 256 << 10 if fails_in == "model.safetensors" else (
        (256 << 10) + sizes["model.safetensors"] + sizes["tokenizer.json"] + sizes["optimizer.pt"] // 2)
    with small_disk(tmp_path / "small", room) as disk:
        store = Store.create(disk / "store")
        expected = f"v000001.*{fails_in}.*no space left on device.*nothing"
        with Trainer(store, "r", tiny_model, CONFIG, preset_name=PRESET) as trainer, \
                pytest.raises(StoreWriteError, match=expected):
            run_steps_in(trainer, 1)
        assert ckpt.version_dirs(store, "r") == {}
        assert not list((store.root / "checkpoints").rglob("*.tmp"))  # the temp dir went too
        assert store.read("steps").num_rows == 0  # the step was not recorded
        assert sorted(store.read("policies").column("version").to_pylist()) == [0]  # what was there reads


def run_steps_in(trainer, steps):
    cfg = preset(PRESET, epsilon_low=0.6, epsilon_high=2.0)
    for step in range(trainer.next_step, steps):
        trainer.step(step, random_batch(step, cfg, response_len=(1, 10), policy_version=0))


def test_a_damaged_older_version_does_not_stop_the_run(tmp_path, tiny_model):
    store = trained(tmp_path / "store", tiny_model, steps=5)  # keep_every=4: v4 and v5 stay
    older = store.checkpoint_dir("r", 4)
    garbage(older / "trainer_state.json")
    assert [p for p in ckpt.verify_checkpoint(older) if "trainer_state.json" in p]  # doctor sees it
    assert run_steps(store, tiny_model, "r", 6) == 6  # resume reads v5 only; v4's rows were committed


def test_doctor_gets_every_damaged_version_dir_of_the_store(tmp_path, tiny_model):
    store = trained(tmp_path / "store", tiny_model, steps=5)  # v4, v5 stay
    assert ckpt.verify_checkpoints(store) == {}
    v4, v5 = store.checkpoint_dir("r", 4), store.checkpoint_dir("r", 5)
    (v4 / "model.safetensors").unlink()  # no longer a complete version: version_dirs skips it, doctor must not
    (v5 / "optimizer.pt").unlink()  # the newest version cannot be resumed without it
    assert ckpt.verify_checkpoints(store) == {v4: [f"{v4 / 'model.safetensors'}: missing"],
                                             v5: [f"{v5 / 'optimizer.pt'}: missing"]}
    assert ckpt.verify_checkpoints(store, "other") == {}
