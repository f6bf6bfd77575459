"""A user's own .sql file as the selection query: it works, bad results are explained, hostile SQL is refused."""

from __future__ import annotations

import pytest

from recpipe.select import QueryError, QueryResultError, SelectionError, recorded_steps, select
from recpipe.store.sql import QueryRefused


@pytest.fixture
def sql_file(tmp_path):
    def write(text: str, name: str = "mine.sql") -> str:
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    return write


def test_user_query_per_group_with_its_own_weight(archive, sql_file):
    path = sql_file("""
        -- param version: INTEGER -- which version to train on
        SELECT run, group_id, 0.25 AS weight FROM eligible
        WHERE run = $run AND policy_version = $version ORDER BY group_id LIMIT $groups;
    """)
    batch = select(archive, path, {"version": 2}, run="a", step=0, groups=3)
    assert [g for _, g in batch.groups] == ["a-v2-s0/p0", "a-v2-s0/p1", "a-v2-s1/p0"]
    assert batch.weights == [0.25] * 12
    assert batch.query_name == path and recorded_steps(archive, "a") == [0]
    with pytest.raises(QueryError, match="'version' must be a INTEGER"):
        select(archive, path, {"version": "2"}, run="a", step=1, groups=3)


def test_user_query_per_response_may_bring_its_own_advantages(archive, sql_file):
    path = sql_file("""
        SELECT run, group_id, rollout_id, reward * 2 AS advantage FROM rollouts
        WHERE run = 'b' AND policy_version = 0 AND group_id = 'b-v0-s0/p1'
    """)
    batch = select(archive, path, run="t", step=0, groups=1)
    assert batch.advantages == pytest.approx([2.2, -0.2, 0.2, 1.8])
    assert batch.weights == [1.0] * 4


@pytest.mark.parametrize(("sql", "message"), [
    ("SELECT group_id FROM groups LIMIT 1", r"lacks column\(s\) \['run'\]"),
    ("SELECT run, 7 AS group_id FROM groups LIMIT 1", "column 'group_id' must be a string column; it is int32"),
    ("SELECT run, group_id, 'x' AS weight FROM groups LIMIT 1", "column 'weight' must be a number"),
    ("SELECT run, NULL::VARCHAR AS group_id FROM groups LIMIT 1", "'group_id' has 1 NULL value"),
    ("SELECT run, group_id, -1.0 AS weight FROM groups LIMIT 1", "'weight' must be finite and >= 0"),
    ("SELECT run, group_id, 1.0 AS advantage FROM groups LIMIT 1", "'advantage' column needs one row per response"),
    ("SELECT run, group_id FROM groups WHERE run = 'a' AND policy_version = 0 "
     "UNION ALL SELECT run, group_id FROM groups WHERE run = 'a' AND policy_version = 0",
     r"4 group\(s\) appear more than once: 'a:a-v0-s0/p0'"),
    ("SELECT run, group_id, rollout_id FROM rollouts WHERE group_id = 'a-v0-s0/p0' AND sample_index < 3",
     "group a:a-v0-s0/p0 is incomplete: the query returned 3 of its 4 responses"),
    ("SELECT run, group_id FROM groups", "chose 20 groups but groups=4; add LIMIT"),
    ("SELECT 'a' AS run, 'no-such-group' AS group_id", "not in the archive's groups table: a:no-such-group"),
    ("SELECT 'b' AS run, group_id, rollout_id FROM rollouts WHERE group_id = 'a-v0-s0/p0'",
     "not in the archive's groups table: b:a-v0-s0/p0"),
    ("SELECT run, 'a-v0-s0/p0' AS group_id, rollout_id FROM rollouts WHERE group_id = 'a-v0-s0/p1'",
     r"rollout\(s\) 'a-v0-s0/p1/0', .* are not responses of group a:a-v0-s0/p0"),
])
def test_bad_results_are_explained(archive, sql_file, sql, message):
    with pytest.raises(QueryResultError if "archive's groups" not in message else SelectionError, match=message):
        select(archive, sql_file(sql), run="u", step=0, groups=4)
    assert recorded_steps(archive, "u") == []  # nothing recorded


def test_a_query_must_be_one_select(archive, sql_file):
    with pytest.raises(QueryError, match="exactly one SELECT statement; found 2"):
        select(archive, sql_file("SELECT run, group_id FROM groups LIMIT 1; SELECT 1"), run="u", step=0, groups=4)
    with pytest.raises(QueryError, match="exactly one SELECT"):
        select(archive, sql_file("EXPLAIN SELECT run, group_id FROM groups"), run="u", step=0, groups=4)
    with pytest.raises(QueryError, match=r"'x' \(ANY\) has no default and was not given"):
        select(archive, sql_file("SELECT run, group_id FROM groups WHERE run = $x LIMIT $groups"),
               run="u", step=0, groups=4)


@pytest.mark.parametrize("sql", [
    "COPY (SELECT 1) TO '/tmp/recpipe-select-out.csv'",
    "ATTACH '/tmp/recpipe-select.duckdb' AS other",
    "CREATE TABLE evil AS SELECT 1",
    "DELETE FROM groups",
    "SET threads = 1",
    "INSTALL httpfs",
    "SELECT run, group_id FROM groups; DROP TABLE groups",
    "SELECT 'a' AS run, content AS group_id FROM read_text('/etc/passwd')",
    "SELECT 'a' AS run, column0 AS group_id FROM read_csv('/etc/passwd')",
])
def test_hostile_sql_is_refused(archive, sql_file, sql):
    with pytest.raises(QueryRefused):
        select(archive, sql_file(sql), run="u", step=0, groups=4)
    assert recorded_steps(archive, "u") == []


def test_sql_that_tries_to_break_out_of_the_nesting_does_not_parse(archive, sql_file):
    with pytest.raises(QueryError, match="cannot parse"):
        select(archive, sql_file("SELECT 1) AS selection; DROP TABLE groups; SELECT * FROM (SELECT 1"),
               run="u", step=0, groups=4)
    assert recorded_steps(archive, "u") == []


def test_user_sql_sees_the_versions_relation(archive, sql_file):
    # versions: (run, policy_version) pairs with rollouts, from folder names
    path = sql_file("""
        SELECT g.run, g.group_id FROM groups AS g
        JOIN (SELECT run, max(policy_version) AS v FROM versions GROUP BY run) AS newest
          ON newest.run = g.run AND newest.v = g.policy_version
        ORDER BY g.run, g.group_id LIMIT $groups
    """)
    batch = select(archive, path, run="u", step=0, groups=10)
    assert [g for _, g in batch.groups] == [f"a-v3-s{s}/p{p}" for s in (0, 1) for p in (0, 1)] + \
        ["b-v1-s0/p0", "b-v1-s0/p1"]


def test_groups_the_summary_gets_wrong_are_named(archive, sql_file):
    from recpipe.store import group_summary
    from tests.select.synthetic import synthetic_shard

    # a groups summary row without rollouts ("a-v0-ghost/p0", n = 4), and a group listed twice
    ghost = synthetic_shard(run="a", policy_version=0, shard_id="a-v0-ghost", groups=1, group_size=4)
    archive.append("groups", group_summary(ghost), shard_id="a-v0-ghost")
    archive.append("groups", archive.read("groups", "group_id = 'a-v0-s0/p1'"), shard_id="a-v0-s0-again")
    with pytest.raises(SelectionError, match=r"1 chosen group\(s\) are not whole in the archive \(responses found "
                                             r"of the groups summary's count\): 'a:a-v0-ghost/p0 \(0 of 4\)'"):
        select(archive, "schedule", run="a", step=0, groups=1)  # id order: the ghost shard comes first
    with pytest.raises(SelectionError, match=r"lists 1 chosen group\(s\) more than once \('a:a-v0-s0/p1'\); "
                                             "run `recpipe doctor`"):
        select(archive, sql_file("SELECT 'a' AS run, 'a-v0-s0/p1' AS group_id"), run="u", step=0, groups=1)
    assert recorded_steps(archive, "a") == [] and recorded_steps(archive, "u") == []


def test_user_sql_reaches_the_tables_it_names_and_only_those_are_registered(archive, sql_file, monkeypatch):
    """Only the tables a selection's SQL names are registered (a word match, any case); a user's file that
    reads rollouts and "Policies" gets both, a named query gets neither."""
    from recpipe.select.connection import named_tables
    from recpipe.store import Store

    registered = []
    register = Store.register
    monkeypatch.setattr(Store, "register", lambda self, con, tables=None, **k: registered.append(sorted(tables))
                        or register(self, con, tables, **k))
    path = sql_file("""
        SELECT e.run, e.group_id FROM eligible AS e
        WHERE e.run = $run AND e.policy_version IN (SELECT max(policy_version) FROM rollouts WHERE run = $run)
          AND NOT EXISTS (SELECT 1 FROM "Policies" AS p WHERE p.run = 'nobody')
        ORDER BY e.group_id LIMIT $groups;
    """)
    select(archive, path, run="a", step=0, groups=2)
    assert registered[-1] == ["groups", "policies", "rollouts"]
    select(archive, "schedule", run="a", step=1, groups=2)
    assert registered[-1] == ["batches", "groups", "steps"]  # "steps" is a word of the query's header
    assert named_tables("SELECT * FROM versions JOIN my_groups USING (run)") == ["versions"]
