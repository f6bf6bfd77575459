"""Damaged bytes never read back as different data; readers see whole partitions while compaction runs."""

import random
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import recpipe
from recpipe.cli import app
from recpipe.store import Store
from tests.support import synthetic_rollouts

RECPIPE = [sys.executable, "-m", "recpipe.cli"]


def data_page_ranges(path, column=None):
    """Byte ranges of every column chunk's pages (dictionary + data pages, headers included): not the footer."""
    meta = pq.read_metadata(path)
    ranges = []
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(g).column(c)
            if column is not None and col.path_in_schema.split(".")[0] != column:
                continue
            start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
            ranges.append((start, start + col.total_compressed_size))
    return ranges


def sorted_rows(table):
    return table.sort_by("rollout_id").select(sorted(table.column_names))


def read_paths(store):
    """Every read path over the archive's rollouts, each returning the file's rows."""
    def sql():
        return recpipe.connect(store.root).sql("SELECT * FROM rollouts").to_arrow_table()

    return {
        "recpipe.connect": sql,
        "Store.read": lambda: store.read("rollouts"),
        "Store.read_shard": lambda: store.read_shard("rollouts", {"run": "r", "policy_version": 0}, "big"),
    }


def flip_outcomes(store, path, flips=50, seed=0):
    """Flip one random bit inside the data pages, read back every way, restore; count the outcomes."""
    original_bytes = path.read_bytes()
    original = sorted_rows(pq.read_table(path))
    ranges = data_page_ranges(path)
    weights = [b - a for a, b in ranges]
    rng = random.Random(seed)
    outcomes = {"error naming the file": 0, "same rows": 0, "silently different": 0}
    silent = []
    try:
        for _ in range(flips):
            a, b = rng.choices(ranges, weights)[0]
            pos, bit = rng.randrange(a, b), rng.randrange(8)
            damaged = bytearray(original_bytes)
            damaged[pos] ^= 1 << bit
            path.write_bytes(bytes(damaged))
            for name, read in read_paths(store).items():
                try:
                    rows = sorted_rows(read().select(original.column_names))
                except Exception as exc:  # noqa: BLE001 - any error is fine if it names the file
                    assert path.name in str(exc) and "recpipe doctor" in str(exc), f"{name}: {exc}"
                    outcomes["error naming the file"] += 1
                    continue
                if rows.equals(original):
                    outcomes["same rows"] += 1
                else:
                    outcomes["silently different"] += 1
                    silent.append((name, pos, bit))
    finally:
        path.write_bytes(original_bytes)
    return outcomes, silent


def test_bit_flips_in_data_pages_never_read_back_as_other_data(tmp_path):
    store = Store.create(tmp_path / "store")
    rows = synthetic_rollouts(shard_id="big", groups=40, group_size=8, response_length=60, seed=3)
    store.append_rollouts(rows, shard_id="big")
    path = Path(store.files("rollouts")[0])
    outcomes, silent = flip_outcomes(store, path, flips=50)
    print(outcomes)
    assert not silent, f"{len(silent)} reads returned different rows without an error: {silent[:5]}"
    assert outcomes["error naming the file"] > 0


def test_a_damaged_file_fails_only_queries_on_its_table(tmp_path):
    store = Store.create(tmp_path / "store")
    store.append_rollouts(synthetic_rollouts(shard_id="s", groups=8, response_length=40), shard_id="s")
    path = Path(store.files("rollouts")[0])
    a, b = data_page_ranges(path, "behaviour_logprobs")[0]
    data = bytearray(path.read_bytes())
    data[(a + b) // 2] ^= 0x10
    path.write_bytes(bytes(data))

    def sql(query):  # the CLI in process
        return CliRunner().invoke(app, ["sql", "--store", str(store.root), "--format", "csv", query])

    other = sql("SELECT count(*) AS n FROM groups")
    assert other.exit_code == 0 and other.stdout.split() == ["n", "8"], other.output
    bad = sql("SELECT sum(list_sum(behaviour_logprobs)) AS s FROM rollouts")
    assert bad.exit_code == 2
    assert path.name in bad.stderr and "recpipe doctor" in bad.stderr
    assert "Traceback" not in bad.stderr
    # rollouts columns whose pages are intact still read: only the damaged pages fail
    assert sql("SELECT count(*) AS n FROM rollouts").exit_code == 0


@pytest.fixture
def many_small_files(tmp_path):
    store = Store.create(tmp_path / "store")
    for v in range(4):
        for i in range(25):
            sid = f"v{v}-s{i:02d}"
            store.append_rollouts(synthetic_rollouts(policy_version=v, shard_id=sid, seed=i), shard_id=sid)
    return store


def test_readers_see_exact_counts_while_compaction_runs(many_small_files):
    store = many_small_files
    expected = (800, 200)
    con = recpipe.connect(store.root)  # one connection, opened before compaction and kept across it
    assert con.execute("SELECT (SELECT count(*) FROM rollouts), (SELECT count(*) FROM groups)").fetchall() == [expected]
    results, errors = [], []
    done = threading.Event()

    def reader():
        while not done.is_set():
            try:
                results.append(con.execute(
                    "SELECT (SELECT count(*) FROM rollouts), (SELECT count(*) FROM groups)").fetchall()[0])
            except Exception as exc:  # noqa: BLE001 - the test reports every failure
                errors.append(str(exc).splitlines()[0])

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        compact = subprocess.run([*RECPIPE, "compact", "--store", str(store.root)], capture_output=True, text=True)
    finally:
        done.set()
        thread.join()
    assert compact.returncode == 0, compact.stdout + compact.stderr
    assert len(store.files("rollouts")) == 4 and len(store.files("groups")) == 4
    assert not errors, f"{len(errors)} of {len(results) + len(errors)} queries failed: {errors[:3]}"
    assert len(results) >= 5 and set(results) == {expected}
    assert con.execute("SELECT (SELECT count(*) FROM rollouts), (SELECT count(*) FROM groups)").fetchall() == [expected]
