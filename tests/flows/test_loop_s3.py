"""The loop end to end on an S3 store (a real SeaweedFS server): tables and checkpoints on object storage,
a second machine (a fresh local cache) resuming from what is there, recorded selections re-run as of
the table versions they read."""

from recpipe.store import Store
from recpipe.store.objects import remote_dirs
from tests.flows.flowtools import SMALL_HF
from tests.flows.test_loop_e2e import check_run


def test_loop_on_an_s3_store(tmp_path, tiny_model, run_recpipe, s3_server):
    uri = s3_server.bucket("loop-e2e") + "/archive"
    run_recpipe.env.update(s3_server.env())
    common = ["--store", uri, "--model", str(tiny_model), "--sync-interval", "2", "--sync-offset", "1",
              "--preset", "rec-oneside-nois", *SMALL_HF]  # the store is the subject, not vLLM
    result = run_recpipe("loop", "--steps", "4", *common)
    assert result.returncode == 0, result.stderr[-3000:]
    store = Store(uri, s3_server.storage_options())
    check_run(store, "default", steps=4, k=2, o=1)
    assert remote_dirs(store, "checkpoints/default", "manifest.json")[-1] == "v000004"
    assert not (tmp_path / "store").exists()

    # Another machine: nothing local. It resumes the run from the checkpoints and tables on S3.
    run_recpipe.env["RECPIPE_CACHE"] = str(tmp_path / "other-machine-cache")
    more = run_recpipe("loop", "--steps", "6", *common)
    assert more.returncode == 0, more.stderr[-3000:]
    check_run(store, "default", steps=6, k=2, o=1)
    assert (tmp_path / "other-machine-cache").is_dir()

    # A recorded selection, re-run as of the versions it read, chooses the same rollouts.
    rerun = run_recpipe("select", "--store", uri, "--step", "3", "--rerun")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "same_as_recorded: True" in rerun.stdout
    first = run_recpipe("sql", "--store", uri, "--as-of", "1", "--format", "csv", "SELECT count(*) AS n FROM steps")
    assert first.returncode == 0 and first.stdout.split() == ["n", "1"], first.stdout + first.stderr
