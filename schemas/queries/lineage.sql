-- name: lineage
-- description: The groups an earlier run trained on at a step (its batches rows), to retrain a new
--   policy on exactly the same data: select(store, "lineage", {"source_run": "a"}, run="b", step=s,
--   groups=G, loss_config=new) gives run b step s the groups of run a step s, with advantages
--   recomputed under the new loss config and lineage recorded for run b. No LIMIT: groups must be at
--   least the recorded batch's group count.
-- param step: INTEGER                  -- the training step (select() fills it)
-- param source_run: VARCHAR            -- the run whose recorded batch is reused
-- param source_step: INTEGER = NULL    -- its step; NULL = the same step
-- output: run VARCHAR, group_id VARCHAR, policy_version INTEGER (one row per recorded group)
SELECT DISTINCT b.source_run AS run, b.group_id, b.policy_version
FROM batches AS b
WHERE b.run = $source_run AND b.step = coalesce($source_step, $step)
ORDER BY run, group_id
