-- name: _truncated
-- description: Groups with a response cut at max_tokens (finish_reason 'length'), which the
--   eligible filter then skips. The groups summary has no finish-reason count, so this reads the
--   rollouts table (only run, policy_version, group_id, finish_reason); select() composes it in only
--   when exclude_truncated is true, and an empty `truncated` relation otherwise.
-- param exclude_truncated: BOOLEAN = false -- skip groups with a response cut at max_tokens
-- output: run VARCHAR, policy_version INTEGER, group_id VARCHAR (one row per truncated group)
SELECT DISTINCT r.run, r.policy_version, r.group_id
FROM rollouts AS r
WHERE r.finish_reason = 'length'
