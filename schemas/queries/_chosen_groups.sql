-- name: _chosen_groups
-- description: One row per group a query chose, in the query's order (position 0, 1, ...), with its
--   policy_version, size n and shard_id from the groups summary: for results that leave them out, and
--   for every user query (its own values are not trusted). select() registers the checked result as
--   `choice`, with its row number `pos` and the group's selection weight `group_weight` (1 unless a
--   per-group result has a weight column). A group not in the archive comes back with NULLs, one the
--   groups table lists twice comes back twice (recpipe.select.validate.check_groups refuses both).
-- output: run VARCHAR, group_id VARCHAR, policy_version INTEGER, n INTEGER, shard_id VARCHAR,
--   weight DOUBLE, position INTEGER
WITH keys AS (
    SELECT run, group_id, min(pos) AS pos, any_value(group_weight) AS weight
    FROM choice
    GROUP BY run, group_id
)
SELECT k.run, k.group_id, g.policy_version, g.n, g.shard_id, k.weight,
       CAST(dense_rank() OVER (ORDER BY k.pos) - 1 AS INTEGER) AS position
FROM keys AS k
LEFT JOIN groups AS g ON g.run = k.run AND g.group_id = k.group_id
ORDER BY k.pos
