-- name: _eligible
-- description: Groups that pass the shared filters. Every selection query is composed as
--   WITH truncated AS (_truncated.sql), eligible AS (<this file>) SELECT * FROM (<query>), so a
--   query (named or a user's file) may select FROM eligible to honour the filters below. Defaults
--   are neutral (no filter), except that groups whose reward function failed are skipped.
-- param drop_zero_variance: BOOLEAN = false   -- skip groups whose rewards are all equal (A = 0 for all)
-- param min_reward_mean: DOUBLE = NULL        -- keep groups with reward_mean >= this
-- param max_reward_mean: DOUBLE = NULL        -- keep groups with reward_mean <= this
-- param max_response_length: INTEGER = NULL   -- skip groups with a response longer than this (tokens)
-- param task: VARCHAR = NULL                  -- keep only this task
-- param exclude_reward_errors: BOOLEAN = true -- skip groups with a failed reward (reward 0 is not a real score)
-- output: every column of the groups table, one row per eligible group
SELECT g.*
FROM groups AS g
WHERE (NOT $drop_zero_variance OR g.reward_std > 0)
  AND ($min_reward_mean IS NULL OR g.reward_mean >= $min_reward_mean)
  AND ($max_reward_mean IS NULL OR g.reward_mean <= $max_reward_mean)
  AND ($max_response_length IS NULL OR g.max_response_length <= $max_response_length)
  AND ($task IS NULL OR g.task = $task)
  AND (NOT $exclude_reward_errors OR g.n_errors = 0)
  -- `truncated` is empty unless exclude_truncated (see _truncated.sql)
  AND NOT EXISTS (
      SELECT 1 FROM truncated AS t
      WHERE t.run = g.run AND t.policy_version = g.policy_version AND t.group_id = g.group_id)
