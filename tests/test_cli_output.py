"""``recpipe sql`` output formats, through the real CLI (in process) on a small store."""

from __future__ import annotations

import csv
import hashlib
import io
import json

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from recpipe.cli import app
from recpipe.store import Store
from tests.support import synthetic_rollouts

# NULL, '', NaN, Infinity, a struct with a NULL field, a list, a map, a timestamp, text that needs quoting.
AWKWARD = ("SELECT NULL::VARCHAR AS n, '' AS e, 'nan'::DOUBLE AS nan, 'inf'::DOUBLE AS inf, "
           "{'x': 1, 'y': NULL::INT} AS s, [1, 2] AS l, MAP {'k': 2.5} AS m, "
           "TIMESTAMPTZ '2025-01-02 03:04:05+00' AS t, 'a,\"b\"\nc' AS q, reward_parts FROM rollouts "
           "WHERE rollout_id = 's/p0/0'")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    store = Store.create(tmp_path_factory.mktemp("out") / "store")
    store.append_rollouts(synthetic_rollouts(shard_id="s"), shard_id="s")
    return store


def sql(store: Store, *args: str):
    return CliRunner().invoke(app, ["sql", "--store", str(store.root), *args])


def snapshot(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_csv_has_unix_line_endings_and_tells_null_from_empty(store):
    result = sql(store, "--format", "csv", AWKWARD)
    assert result.exit_code == 0, result.output
    assert "\r" not in result.stdout and result.stdout.endswith("\n")
    header, line = result.stdout.split("\n", 1)
    assert header == "n,e,nan,inf,s,l,m,t,q,reward_parts"
    assert line.startswith(',"",NaN,Infinity,')  # NULL: empty field; '': quoted empty string
    [row] = list(csv.DictReader(io.StringIO(result.stdout)))
    assert json.loads(row["s"]) == {"x": 1, "y": None}
    assert json.loads(row["l"]) == [1, 2] and json.loads(row["m"]) == {"k": 2.5}
    assert row["t"] == "2025-01-02T03:04:05+00:00" and row["q"] == 'a,"b"\nc'
    assert json.loads(row["reward_parts"]) == {"correctness": 0.0, "format": 0.0}


def test_json_lines_are_strict_json(store):
    result = sql(store, "--format", "json", AWKWARD + " UNION ALL " + AWKWARD)
    assert result.exit_code == 0, result.output

    def no_constants(name):
        raise AssertionError(f"bare {name} is not JSON")

    lines = result.stdout.splitlines()
    assert len(lines) == 2
    row = json.loads(lines[0], parse_constant=no_constants)
    assert row == {"n": None, "e": "", "nan": None, "inf": None, "s": {"x": 1, "y": None}, "l": [1, 2],
                   "m": {"k": 2.5}, "t": "2025-01-02T03:04:05+00:00", "q": 'a,"b"\nc',
                   "reward_parts": {"correctness": 0.0, "format": 0.0}}


def test_table_shows_null_not_none(store):
    result = sql(store, "SELECT NULL AS n, reward_error, {'x': NULL} AS s FROM rollouts LIMIT 1")
    assert result.exit_code == 0, result.output
    assert "None" not in result.stdout and "NULL" in result.stdout and '{"x": null}' in result.stdout


def test_parquet_goes_to_a_named_file_outside_the_archive(store, tmp_path):
    before = snapshot(store.root)
    target = tmp_path / "result.parquet"
    result = sql(store, "--format", "parquet", "--output", str(target),
                 "SELECT rollout_id, reward, reward_parts FROM rollouts ORDER BY rollout_id")
    assert result.exit_code == 0, result.output
    table = pq.read_table(target)
    assert table.num_rows == 8 and table.column_names == ["rollout_id", "reward", "reward_parts"]
    assert table.column("rollout_id").to_pylist()[0] == "s/p0/0"
    refusals = {
        "name it with --output": [],
        "is inside the archive": ["--output", str(store.root / "x.parquet")],
        "does not exist (create it first)": ["--output", str(tmp_path / "missing" / "x.parquet")],
        "is a directory": ["--output", str(tmp_path)],
        "not a URI": ["--output", "s3://bucket/x.parquet"],
    }
    for message, args in refusals.items():
        refused = sql(store, "--format", "parquet", *args, "SELECT 1")
        assert refused.exit_code == 2 and message in refused.stderr, (message, refused.output)
        assert "Traceback" not in refused.output
    assert snapshot(store.root) == before
    csv_file = tmp_path / "result.csv"
    assert sql(store, "--format", "csv", "--output", str(csv_file), "SELECT 1 AS a").exit_code == 0
    assert csv_file.read_bytes() == b"a\n1\n"


def test_several_statements_are_refused_clearly(store):
    result = sql(store, "SELECT 1 AS a; SELECT 2 AS b")
    assert result.exit_code == 2
    assert "one statement at a time: found 2 statements" in result.stderr
    assert "ResourceInUse" not in result.output
