import hashlib

import pytest

from recpipe.store import Store
from recpipe.store.sql import QueryRefused, QueryTimeout, run_read_only
from recpipe.testing import synthetic_rollouts


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
