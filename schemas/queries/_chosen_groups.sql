-- name: _chosen_groups
-- description: policy_version and size of each group a query chose, from the groups summary, for
--   results that leave them out (and for every user query: its own values are not trusted).
--   select() registers the chosen (run, group_id) pairs as `chosen`. A group not in the archive
--   comes back with NULLs.
-- output: run VARCHAR, group_id VARCHAR, policy_version INTEGER, n INTEGER, shard_id VARCHAR
SELECT c.run, c.group_id, g.policy_version, g.n, g.shard_id
FROM chosen AS c
LEFT JOIN groups AS g ON g.run = c.run AND g.group_id = c.group_id
