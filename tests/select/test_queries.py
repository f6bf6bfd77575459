"""Query files: headers parse into typed parameters, values are checked, user files load."""

from __future__ import annotations

import hashlib

import duckdb
import pytest

from recpipe.select import Param, Query, QueryError, load_query, query_names, select
from recpipe.select.queries import bind, param_table, parse_header, queries_dir
from recpipe.select.selection import compose

TEMPLATES = ("_eligible", "_truncated", "_advantages")  # what select() binds with every query


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
    templates = [load_query(n) for n in TEMPLATES]
    for name in query_names():
        param_table(load_query(name), *templates)  # raises on a type clash
    clash = Query(name="mine", path=queries_dir(), text="", params={"max_staleness": Param("max_staleness", "DOUBLE")})
    with pytest.raises(QueryError, match="'max_staleness' is INTEGER in one query and DOUBLE in mine"):
        param_table(load_query("fresh"), clash)


def test_bind_checks_types_and_required():
    q = load_query("fresh")
    table = param_table(q, *(load_query(n) for n in TEMPLATES))
    context = {"run": "a", "step": 3, "groups": 2, "seed": 0}
    bound = bind(table, {}, context, q.name)
    assert bound["max_staleness"] == 4 and bound["current_version"] is None
    assert bound["drop"] == "none" and bound["exclude_reward_errors"] is True  # the templates' defaults
    assert {k: bound[k] for k in context} == context
    assert bind(table, {"max_staleness": 2}, context, q.name)["max_staleness"] == 2
    with pytest.raises(QueryError, match="'max_staleness' must be a INTEGER; got '4'"):
        bind(table, {"max_staleness": "4"}, context, q.name)
    with pytest.raises(QueryError, match="'max_staleness' must be a INTEGER; got 2.5"):
        bind(table, {"max_staleness": 2.5}, context, q.name)
    with pytest.raises(QueryError, match="'max_staleness' must be a INTEGER; got True"):
        bind(table, {"max_staleness": True}, context, q.name)
    with pytest.raises(QueryError, match="'run'.*no default"):
        bind(q.params, {"step": 3, "groups": 2}, {}, q.name)
    with pytest.raises(QueryError, match="'runs' must be a VARCHAR"):
        bind(load_query("replay").params, {"runs": "a"}, context, "replay")  # a string, not a list
    with pytest.raises(QueryError, match="must be a BOOLEAN"):
        bind(load_query("_eligible").params, {"drop_zero_variance": 1}, {}, "_eligible")
    with pytest.raises(QueryError, match=r"unknown parameter\(s\) \['nope'\]; allowed: .*max_staleness"):
        bind(table, {"nope": 1}, context, q.name)
    with pytest.raises(QueryError, match=r"\['step'\] are set by select"):
        bind(table, {"step": 4}, context, q.name)


def test_the_schedules_behaviour_version_is_computed_from_the_bound_parameters():
    """schedule.sql filters on $behaviour_version; bind computes it with recpipe.algorithms' v(s), the one
    definition, from the step and the sync parameters as bound (given or default)."""
    q = load_query("schedule")
    context = {"run": "a", "step": 25, "groups": 2, "seed": 0}
    assert bind(q.params, {}, context, q.name)["behaviour_version"] == 25  # k=1, o=0: v(s) = s
    assert bind(q.params, {"sync_interval": 20}, context, q.name)["behaviour_version"] == 20
    assert bind(q.params, {"sync_interval": 10, "sync_offset": 8}, context, q.name)["behaviour_version"] == 10
    assert bind(q.params, {"sync_interval": 10, "sync_offset": 30}, context, q.name)["behaviour_version"] == 0
    with pytest.raises(QueryError, match=r"\['behaviour_version'\] are set by select"):
        bind(q.params, {"behaviour_version": 3}, context, q.name)
    with pytest.raises(QueryError, match="sync_interval must be an integer >= 1; got 0"):
        bind(q.params, {"sync_interval": 0}, context, q.name)
    params, _ = parse_header("-- param step: INTEGER\n-- param behaviour_version: INTEGER\nSELECT 1", "q.sql")
    with pytest.raises(QueryError, match="computed from step, sync_interval, sync_offset; declare sync_interval"):
        bind(params, {}, {"step": 1}, "q.sql")


def test_select_binds_its_parameters_this_way(archive):
    # the same checks, through select(): the binder above is the one production uses
    with pytest.raises(QueryError, match="fresh: parameter 'max_staleness' must be a INTEGER; got '4'"):
        select(archive, "fresh", {"max_staleness": "4"}, run="a", step=0, groups=2)
    with pytest.raises(QueryError, match="fresh: parameter 'drop_zero_variance' must be a BOOLEAN"):
        select(archive, "fresh", {"drop_zero_variance": 1}, run="a", step=0, groups=2)
    with pytest.raises(QueryError, match="step must be an integer >= 0; got True"):
        select(archive, "fresh", run="a", step=True, groups=2)


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
