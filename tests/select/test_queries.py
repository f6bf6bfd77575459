"""Query files: headers parse into typed parameters, values are checked, user files load."""

from __future__ import annotations

import hashlib

import duckdb
import pytest

from recpipe.select import QueryError, load_query, query_names
from recpipe.select.queries import parse_header, queries_dir
from recpipe.select.selection import _param_table, compose


def test_named_queries_are_listed_and_templates_hidden():
    names = query_names()
    assert {"schedule", "fresh", "replay", "lineage"} <= set(names)
    assert not [n for n in names if n.startswith("_")]


@pytest.mark.parametrize("name", ["schedule", "fresh", "replay", "lineage", "_eligible", "_truncated",
                                  "_advantages", "_chosen_groups"])
def test_every_query_file_has_a_header(name):
    q = load_query(name)
    assert q.description, f"{name} lacks a description"
    assert q.output, f"{name} lacks an output line"
    assert q.sha256 == hashlib.sha256((queries_dir() / f"{name}.sql").read_bytes()).hexdigest()
    assert len(duckdb.connect().extract_statements(q.body)) == 1


def test_header_types_and_defaults():
    q = load_query("fresh")
    assert q.params["max_staleness"].type == "INTEGER" and q.params["max_staleness"].default == 4
    assert q.params["current_version"].default is None and not q.params["current_version"].required
    assert q.params["run"].required
    assert load_query("_advantages").params["drop"].default == "none"
    assert load_query("replay").params["runs"].type == "VARCHAR[]"


def test_shared_parameters_have_one_type_across_files():
    templates = [load_query(n) for n in ("_eligible", "_truncated", "_advantages")]
    for name in query_names():
        _param_table(load_query(name), *templates)  # raises on a type clash


def test_bind_checks_types_and_required():
    q = load_query("fresh")
    bound = q.bind({"run": "a", "step": 3, "groups": 2})
    assert bound["max_staleness"] == 4 and bound["current_version"] is None
    with pytest.raises(QueryError, match="'max_staleness' must be a INTEGER; got '4'"):
        q.bind({"run": "a", "step": 3, "groups": 2, "max_staleness": "4"})
    with pytest.raises(QueryError, match="'max_staleness' must be a INTEGER; got 2.5"):
        q.bind({"run": "a", "step": 3, "groups": 2, "max_staleness": 2.5})
    with pytest.raises(QueryError, match="'run'.*no default"):
        q.bind({"step": 3, "groups": 2})
    with pytest.raises(QueryError, match="'runs' must be a VARCHAR"):
        load_query("replay").bind({"run": "a", "groups": 2, "seed": 0, "runs": "a"})  # a string, not a list
    with pytest.raises(QueryError, match="must be a BOOLEAN"):
        load_query("_eligible").bind({"drop_zero_variance": 1})


def test_header_parsing_rejects_unknown_types_and_bad_defaults():
    with pytest.raises(QueryError, match="unknown type"):
        parse_header("-- param x: FLOAT = 1\nSELECT 1", "q.sql")
    with pytest.raises(QueryError, match="must be a INTEGER"):
        parse_header("-- param x: INTEGER = 'a'\nSELECT 1", "q.sql")
    with pytest.raises(QueryError, match="declared twice"):
        parse_header("-- param x: INTEGER\n-- param x: INTEGER\nSELECT 1", "q.sql")
    params, fields = parse_header("-- name: q\n-- param x: DOUBLE = 0.5 -- why\nSELECT 1\n-- param y: INTEGER", "q.sql")
    assert list(params) == ["x"] and params["x"].default == 0.5 and params["x"].description == "why"


def test_user_file_without_header_gets_its_parameters(tmp_path):
    path = tmp_path / "mine.sql"
    path.write_text("SELECT run, group_id FROM groups WHERE task = $task_name LIMIT $groups;  -- done\n")
    q = load_query(str(path))
    assert not q.builtin and q.name == str(path.resolve())
    assert set(q.params) == {"task_name", "groups"} and q.params["task_name"].type == "ANY"
    assert q.body.endswith("LIMIT $groups")


def test_unknown_names_and_paths_are_explained(tmp_path):
    with pytest.raises(QueryError, match="no query named 'nope'; named queries: .*schedule"):
        load_query("nope")
    with pytest.raises(QueryError, match="does not exist"):
        load_query(str(tmp_path / "missing.sql"))
    with pytest.raises(QueryError, match="neither a query name"):
        load_query("Some Query")


def test_compose_nests_the_query_under_the_filters():
    sql = compose(load_query("schedule"), load_query("_eligible"))
    assert sql.startswith("WITH truncated AS (") and "eligible AS (" in sql
    assert "FROM rollouts" not in sql  # the truncation filter is off: the rollouts table is not read
    assert "FROM rollouts" in compose(load_query("schedule"), load_query("_eligible"), load_query("_truncated"))
