"""A run whose per-step tables were compacted (the loop does it at its end, 8+ files per partition) can
still re-read every recorded step and resume: a step's lineage is found inside the compacted file."""

from recpipe.select import recorded_steps, replay_lineage
from recpipe.store import Store
from tests.flows.flowtools import SMALL_HF, sql_rows

STEPS = 10


def test_a_compacted_ten_step_run_reselects_every_step_and_resumes(tmp_path, tiny_model, run_recpipe):
    store = tmp_path / "store"
    common = ["--store", str(store), "--model", str(tiny_model), *SMALL_HF]
    first = run_recpipe("loop", "--steps", str(STEPS), *common)
    assert first.returncode == 0, first.stderr[-3000:]
    archive = Store(store)
    batches = archive.snapshot("batches").files  # the active files (the replaced ones stay until vacuum)
    assert [f.relative.rsplit("/", 1)[-1].startswith("compact-") for f in batches] == [True]  # all 10 steps

    assert recorded_steps(archive, "default") == list(range(STEPS))
    for step in range(STEPS):
        batch = replay_lineage(archive, "default", step)
        recorded = sql_rows(store, f"SELECT list(rollout_id ORDER BY rollout_id) FROM batches WHERE step = {step}")
        assert sorted(batch.rollouts.column("rollout_id").to_pylist()) == recorded[0][0], step

    # The reproduction: re-reading a recorded step through the CLI.
    again = run_recpipe("select", "--store", str(store), "--step", "0")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "groups: 2" in again.stdout

    resumed = run_recpipe("loop", "--steps", str(STEPS + 2), *common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sql_rows(store, "SELECT list(step ORDER BY step) FROM steps") == [(list(range(STEPS + 2)),)]
    assert sql_rows(store, "SELECT count(*) - count(DISTINCT (step, rollout_id)) FROM batches") == [(0,)]
