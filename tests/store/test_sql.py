import hashlib

import pytest

from recpipe.store import Store
from recpipe.store.sql import QueryRefused, QueryTimeout, run_read_only
from tests.support import synthetic_rollouts


@pytest.fixture
def store(tmp_path):
    store = Store.create(tmp_path / "store")
    store.append_rollouts(synthetic_rollouts(shard_id="s"), shard_id="s")
    return store


def snapshot(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_select_runs(store):
    con = store.connect(read_only=True)
    out = run_read_only(con, "SELECT policy_version, count(*) AS n FROM rollouts GROUP BY 1")
    assert out.to_pylist() == [{"policy_version": 0, "n": 8}]
    out = run_read_only(con, "SELECT count(*) AS n FROM rollouts WHERE reward >= $r", {"r": 2.0})
    assert out.to_pylist() == [{"n": 0}]
    assert run_read_only(con, "WITH a AS (SELECT 1 AS x) SELECT * FROM a").num_rows == 1
    assert run_read_only(con, "DESCRIBE rollouts").num_rows > 10
    # Reading the store's own files directly is refused: the tables are the interface.
    glob = str(store.root / "rollouts" / "**" / "*.parquet")
    with pytest.raises(QueryRefused, match="cannot read or write files; the tables are the interface"):
        run_read_only(con, f"SELECT count(*) AS n FROM read_parquet('{glob}')")


HOSTILE = {
    "insert": "INSERT INTO rollouts SELECT * FROM rollouts",
    "create": "CREATE TABLE x AS SELECT 1",
    "delete": "DELETE FROM groups",
    "drop": "DROP VIEW rollouts",
    "update": "UPDATE groups SET n = 0",
    "copy_to": "COPY (SELECT * FROM rollouts) TO '{root}/rollouts/run=r/policy_version=0/evil.parquet'",
    "copy_from": "COPY groups FROM '/etc/passwd'",
    "export": "EXPORT DATABASE '/tmp/recpipe-export'",
    "attach": "ATTACH '/tmp/recpipe-evil.duckdb' AS evil",
    "install": "INSTALL httpfs",
    "load": "LOAD httpfs",
    "set": "SET enable_external_access = true",
    "reset": "RESET allowed_directories",
    "pragma": "PRAGMA enable_profiling",
    "read_outside": "SELECT * FROM read_csv('/etc/passwd')",
    "read_traversal": "SELECT * FROM read_csv('{root}/../../../etc/passwd')",
    "read_text": "SELECT * FROM read_text('/etc/hostname')",
    "glob_outside": "SELECT * FROM glob('/etc/*')",
    "second_statement": "SELECT 1; DELETE FROM groups",
    "set_in_cte_function": "SELECT current_setting('enable_external_access'); SET threads = 1",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_sql_is_refused_and_changes_nothing(store, name):
    before = snapshot(store.root)
    con = store.connect(read_only=True)
    with pytest.raises(QueryRefused) as err:
        run_read_only(con, HOSTILE[name].format(root=store.root))
    assert str(err.value)
    assert snapshot(store.root) == before
    assert run_read_only(con, "SELECT count(*) AS n FROM rollouts").to_pylist() == [{"n": 8}]


def test_endless_query_is_interrupted(store):
    con = store.connect(read_only=True)
    with pytest.raises(QueryTimeout, match="time limit"):
        run_read_only(con, "SELECT count(*) FROM range(100000000000) a, range(100000) b", timeout_s=0.5)
    assert run_read_only(con, "SELECT 1 AS x").to_pylist() == [{"x": 1}]


# ---- no file system access at all (issue 19 item 1) ------------------------------------------------
def _attack(store, outside):
    """File operations a query could try, on a committed rollouts file and on a file outside the store;
    each also wrapped in EXPLAIN ANALYZE, which executes its inner statement."""
    target = store.files("rollouts")[0]
    plain = {
        "copy_over_store_file": f"COPY (SELECT 'x' AS x) TO '{target}' (FORMAT parquet)",
        "copy_outside": f"COPY (SELECT * FROM rollouts) TO '{outside}' (FORMAT parquet)",
        "export_into_store": f"EXPORT DATABASE '{store.root / 'rollouts'}'",
        "export_outside": f"EXPORT DATABASE '{outside}.dir'",
        "attach_in_store": f"ATTACH '{store.root / 'evil.duckdb'}' AS evil",
        "attach_outside": f"ATTACH '{outside}.duckdb' AS evil",
        "read_text_store": f"SELECT * FROM read_text('{target}')",
        "read_text_outside": "SELECT * FROM read_text('/etc/hostname')",
        "read_parquet_store": f"SELECT count(*) FROM read_parquet('{target}')",
        "read_parquet_outside": f"SELECT count(*) FROM read_parquet('{outside}')",
        "read_blob_store": f"SELECT * FROM read_blob('{store.root}/**')",
    }
    explained = {f"explain_analyze_{k}": f"EXPLAIN ANALYZE {v}" for k, v in plain.items() if k in EXPLAINABLE}
    return {**plain, **explained}


ATTACK_BASES = ["copy_over_store_file", "copy_outside", "export_into_store", "export_outside", "attach_in_store",
                "attach_outside", "read_text_store", "read_text_outside", "read_parquet_store",
                "read_parquet_outside", "read_blob_store"]
EXPLAINABLE = [b for b in ATTACK_BASES if b.startswith(("copy", "read"))]  # EXPLAIN takes no EXPORT/ATTACH
ATTACK_NAMES = ATTACK_BASES + [f"explain_analyze_{b}" for b in EXPLAINABLE]


@pytest.fixture
def outside(tmp_path):
    path = tmp_path / "outside" / "data.parquet"
    path.parent.mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"secret": [1, 2, 3]}), path)
    return path


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_no_statement_touches_a_file(store, outside, name):
    import duckdb

    import recpipe

    query = _attack(store, outside)[name]
    before, outside_before = snapshot(store.root), snapshot(outside.parent)
    con = store.connect(read_only=True)
    with pytest.raises(QueryRefused, match="cannot read or write files|not allowed"):
        run_read_only(con, query)
    user = recpipe.connect(store.root)  # the Python API, without the statement check
    with pytest.raises(duckdb.Error, match="disabled by configuration"):
        user.execute(query).fetchall()
    assert snapshot(store.root) == before and snapshot(outside.parent) == outside_before
    assert run_read_only(con, "SELECT count(*) AS n FROM rollouts").to_pylist() == [{"n": 8}]


def test_explain_analyze_copy_over_a_committed_file_via_the_cli(store):
    import subprocess
    import sys

    target = store.files("rollouts")[0]
    before = snapshot(store.root)
    result = subprocess.run([sys.executable, "-m", "recpipe.cli", "sql", "--store", str(store.root),
                             f"EXPLAIN ANALYZE COPY (SELECT 'x' AS x) TO '{target}' (FORMAT parquet)"],
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "cannot read or write files" in result.stderr
    assert snapshot(store.root) == before
    ok = subprocess.run([sys.executable, "-m", "recpipe.cli", "sql", "--store", str(store.root), "--format", "csv",
                         "SELECT count(*) AS n FROM rollouts"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.split() == ["n", "8"]


def test_explain_analyze_copy_via_recpipe_connect(store):
    import duckdb

    import recpipe

    target = store.files("rollouts")[0]
    before = snapshot(store.root)
    con = recpipe.connect(store.root)
    with pytest.raises(duckdb.PermissionException):
        con.execute(f"EXPLAIN ANALYZE COPY (SELECT 'x' AS x) TO '{target}' (FORMAT parquet)")
    assert snapshot(store.root) == before
    assert con.execute("SELECT count(*) FROM rollouts").fetchone()[0] == 8


def test_memory_is_bounded_and_nothing_spills(store, tmp_path, monkeypatch):
    import duckdb

    import recpipe
    from recpipe.store.sql import MEMORY_LIMIT_CAP, default_memory_limit, locked_connection

    con = recpipe.connect(store.root)
    limit, temp, allowed, external = con.execute(
        "SELECT current_setting('memory_limit'), current_setting('temp_directory'), "
        "current_setting('allowed_directories'), current_setting('enable_external_access')").fetchone()
    value, unit = limit.split()
    assert float(value) * {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit] <= MEMORY_LIMIT_CAP
    assert default_memory_limit().endswith("MiB") and int(default_memory_limit()[:-3]) * 2**20 <= MEMORY_LIMIT_CAP
    assert temp == "" and allowed == [] and external is False
    # A query past the limit fails clearly instead of spilling into `.tmp` of the current directory.
    monkeypatch.chdir(tmp_path)
    small = locked_connection("64MiB")
    with pytest.raises(duckdb.OutOfMemoryException, match="memory limit.*does not spill"):
        run_read_only(small, "SELECT count(*) FROM (SELECT * FROM range(30000000) t(i) ORDER BY hash(i))")
    assert not (tmp_path / ".tmp").exists()
    assert run_read_only(small, "SELECT 1 AS x").to_pylist() == [{"x": 1}]
