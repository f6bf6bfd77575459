"""doctor checks that the tables agree, not only that each file reads: summaries without rollouts, rollouts
without summaries, rollouts stored twice; and a crash inside its own repair is found by the next run."""

import shutil
import signal
import subprocess
import sys
from pathlib import Path

from test_storage_faults import corrupt, filled_store

from recpipe.store.doctor import diagnose, repair

HERE = Path(__file__).parent


def consistent(store) -> tuple[int, int]:
    con = store.connect()
    try:
        for sql in ("SELECT count(*) FROM groups g ANTI JOIN rollouts r USING (group_id)",
                    "SELECT count(*) FROM rollouts r ANTI JOIN groups g USING (group_id)",
                    "SELECT count(*) - count(DISTINCT rollout_id) FROM rollouts"):
            assert con.execute(sql).fetchone()[0] == 0, sql
        return (con.execute("SELECT count(*) FROM rollouts").fetchone()[0],
                con.execute("SELECT count(*) FROM groups").fetchone()[0])
    finally:
        con.close()


def kinds(report) -> list[str]:
    return sorted(p.kind for p in report.problems)


def test_a_crash_inside_repair_is_found_and_finished_by_the_next_run(tmp_path):
    store = filled_store(tmp_path / "store")
    corrupt(store.files("rollouts")[1], "truncated")
    killed = subprocess.run([sys.executable, str(HERE / "doctor_kill_worker.py"), str(store.root)],
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(list((store.root / "quarantine").rglob("*.parquet"))) == 1  # killed between the two moves

    found = diagnose(store)
    assert not found.ok, "a half-done repair must not look healthy"
    repair(store, found)
    assert diagnose(store).ok
    assert consistent(store) == (16, 4)  # the two good shards, rows and summaries alike


def test_summary_without_rollouts_is_found_and_quarantined(tmp_path):
    store = filled_store(tmp_path / "store")
    gone = store.files("rollouts")[0]
    gone.unlink()  # as an operator deleting a file by hand
    report = diagnose(store)
    assert kinds(report) == ["orphan-groups"] and gone.stem in report.problems[0].detail
    repair(store, report)
    assert diagnose(store).ok
    assert consistent(store) == (16, 4)
    assert list((store.root / "quarantine" / "groups").rglob(f"{gone.stem}.parquet"))


def test_rollouts_without_summary_get_it_back(tmp_path):
    store = filled_store(tmp_path / "store")
    summary = store.files("groups")[2]
    original = store.read("groups", "shard_id = $s", {"s": summary.stem}).sort_by("group_id")
    summary.unlink()
    report = diagnose(store)
    assert kinds(report) == ["missing-groups"]
    repair(store, report)
    assert diagnose(store).ok
    assert consistent(store) == (24, 6)
    rebuilt = store.read("groups", "shard_id = $s", {"s": summary.stem}).sort_by("group_id")
    assert rebuilt.drop_columns(["created_at"]).equals(original.drop_columns(["created_at"]))


def test_summaries_are_checked_inside_compacted_files(tmp_path):
    store = filled_store(tmp_path / "store")
    store.compact("groups")
    store.files("rollouts")[0].unlink()
    report = diagnose(store)
    assert kinds(report) == ["orphan-groups"]
    repair(store, report)  # the compacted file keeps the two good shards' summaries
    assert diagnose(store).ok
    assert consistent(store) == (16, 4)


def test_a_rollout_stored_twice_is_reported(tmp_path):
    store = filled_store(tmp_path / "store")
    first = store.files("rollouts")[0]
    shutil.copy(first, first.with_name("copy-of-s0.parquet"))
    report = diagnose(store)
    assert "duplicate-rollouts" in kinds(report)
    dup = next(p for p in report.problems if p.kind == "duplicate-rollouts")
    assert "8 rollout id(s)" in dup.detail and "copy-of-s0.parquet" in dup.detail


def test_doctor_names_a_damaged_checkpoint_and_migrates_a_legacy_one(tmp_path, tiny_model):
    from recpipe.config import TrainConfig
    from recpipe.doctor import diagnose as diagnose_all
    from recpipe.doctor import repair as repair_all
    from recpipe.train import Trainer
    from recpipe.train.checkpoint import MANIFEST_FILE

    sys.path.insert(0, str(HERE.parent / "train"))
    from train_batches import random_batch

    from recpipe.algorithms import preset

    store = filled_store(tmp_path / "store")
    cfg = preset("reinforce")
    with Trainer(store, "r", tiny_model, TrainConfig(keep_every=1, threads=1), cfg, "reinforce") as trainer:
        for step in range(2):
            trainer.step(step, random_batch(step, cfg))
    assert diagnose_all(store).ok
    v1, v2 = store.checkpoint_dir("r", 1), store.checkpoint_dir("r", 2)
    with open(v2 / "model.safetensors", "r+b") as f:  # one flipped byte in the weights
        f.seek(-100, 2)
        byte = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([byte[0] ^ 0x10]))
    (v1 / MANIFEST_FILE).unlink()  # as a version written before manifests existed
    report = diagnose_all(store)
    assert sorted((p.kind, p.path.name) for p in report.problems) == [("damaged-checkpoint", "v000002"),
                                                                       ("no-manifest", "v000001")]
    assert "model.safetensors" in next(p.detail for p in report.problems if p.kind == "damaged-checkpoint")
    repair_all(store, report, migrate=True)
    after = diagnose_all(store)
    assert [(p.kind, p.path.name) for p in after.problems] == [("damaged-checkpoint", "v000002")]  # never "fixed"
