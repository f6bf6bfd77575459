-- name: fresh
-- description: The newest groups of this run generated at most $max_staleness versions behind the
--   current policy, newest first, each group at most once per run.
-- param run: VARCHAR                   -- the training run (select() fills it)
-- param step: INTEGER                  -- the training step (select() fills it)
-- param groups: INTEGER                -- groups per batch (select() fills it)
-- param current_version: INTEGER = NULL -- version being trained; NULL = step (version n = after n steps)
-- param max_staleness: INTEGER = 4     -- oldest allowed version is current_version - max_staleness
-- output: run VARCHAR, group_id VARCHAR, policy_version INTEGER, n INTEGER, shard_id VARCHAR
--   (one row per chosen group)
-- scope: run                          -- reads only this run's partitions of groups and batches
SELECT e.run, e.group_id, e.policy_version, e.n, e.shard_id
FROM eligible AS e
WHERE e.run = $run
  AND e.policy_version BETWEEN coalesce($current_version, $step) - $max_staleness
                           AND coalesce($current_version, $step)
  AND NOT EXISTS (
      SELECT 1 FROM batches AS b
      WHERE b.run = $run AND b.source_run = e.run AND b.group_id = e.group_id)
ORDER BY e.policy_version DESC, e.created_at DESC, e.group_id
LIMIT $groups
