-- name: _advantages
-- description: Second stage of every selection: the responses of the chosen groups with their
--   advantage A_i and selection weight s_i (docs/algorithms.md), plus the payload the trainer needs.
--   select() registers the first stage's result as `chosen` (run, group_id, weight, position) and the
--   chosen groups' responses as `chosen_rollouts`, read from the chosen (run, policy_version) partitions'
--   files only, and of those files only the columns named here (selection.RESPONSE_COLUMNS).
--
--   Advantages, per group (window over run, group_id):
--     mean/std over the kept responses; A = r - mean, or (r - mean) / (std + 1e-6) with std_normalize
--     (population std); a group with one kept response has mean 0 and std 1.
--     drop = 'balance' (RED-Drop): r_i is positive iff r_i >= the whole group's mean; when negatives
--     outnumber positives, the (#neg - #pos) negatives with the smallest md5(seed:step:rollout_id) are
--     dropped (kept = false, A = 0, still in the batch), and mean/std are recomputed over the kept.
--   The positive test and the means are exact: rewards are summed as DECIMAL(38, 28) from the exact
--   decimal expansion of each double, and "r_i >= mean" is decided as the float reference does
--   (recpipe.algorithms compares r_i with the correctly rounded mean: r_i >= RN(m) iff
--   m <= r_i + half the gap to the next double). So [0.0, 0.1, 0.2] keeps 0.1 positive, whatever the
--   summation order. Rewards must be finite with |reward| * group size < 1e10.
--   Weight: s_i = chosen.weight * exp(-staleness_decay * staleness), staleness = max(0,
--   current_version - policy_version). RED-Weight's exp(A / temp) is the loss's token weight w_t
--   (LossConfig.weight = 'advantage'), not a selection weight, so it is not applied here.
-- param step: INTEGER                  -- the training step (select() fills it; seeds RED-Drop)
-- param seed: BIGINT = 0               -- RED-Drop seed
-- param std_normalize: BOOLEAN = false -- divide by the group's population std + 1e-6 (GRPO)
-- param drop: VARCHAR = 'none'         -- none | balance (RED-Drop)
-- param current_version: INTEGER = NULL -- version being trained; NULL = step
-- param staleness_decay: DOUBLE = 0.0  -- lambda of exp(-lambda * staleness); 0 = weight 1
-- output: source_run, group_id, rollout_id, sample_index, policy_version, staleness, reward, kept,
--   advantage, weight, temperature, top_p, finish_reason, response_length, prompt_token_ids,
--   response_token_ids, behaviour_logprobs; groups in the query's order, responses by sample_index
WITH responses AS (
    SELECT r.run AS source_run, r.group_id, r.rollout_id, r.sample_index, r.policy_version, r.reward,
           CAST(format('{:.28f}', r.reward) AS DECIMAL(38, 28)) AS reward_exact,
           CAST(format('{:.28f}', (nextafter(r.reward, 'inf'::DOUBLE) - r.reward) / 2) AS DECIMAL(38, 28))
               AS half_gap,
           greatest(0, coalesce($current_version, $step) - r.policy_version) AS staleness,
           c.weight AS query_weight, c.position,
           r.generator.temperature AS temperature, r.generator.top_p AS top_p,
           r.finish_reason, r.response_length,
           r.prompt_token_ids, r.response_token_ids, r.behaviour_logprobs
    FROM chosen_rollouts AS r
    JOIN chosen AS c ON c.run = r.run AND c.group_id = r.group_id
),
totals AS (
    SELECT *,
           count(*) OVER grp AS n_all,
           sum(reward_exact) OVER grp AS sum_all
    FROM responses
    WINDOW grp AS (PARTITION BY source_run, group_id)
),
signs AS (
    SELECT *, (reward_exact + half_gap) * n_all >= sum_all AS positive
    FROM totals
),
balanced AS (
    SELECT *,
           count(*) FILTER (WHERE positive) OVER grp AS n_pos,
           row_number() OVER (PARTITION BY source_run, group_id, positive
                              ORDER BY md5(concat_ws(':', $seed, $step, rollout_id)), rollout_id) AS sign_rank
    FROM signs
    WINDOW grp AS (PARTITION BY source_run, group_id)
),
kept AS (
    SELECT *,
           NOT ($drop = 'balance' AND NOT positive AND sign_rank <= (n_all - n_pos) - n_pos) AS kept
    FROM balanced
),
stats AS (
    SELECT *,
           count(*) FILTER (WHERE kept) OVER grp AS n_kept,
           sum(reward_exact) FILTER (WHERE kept) OVER grp AS sum_kept,
           stddev_pop(reward) FILTER (WHERE kept) OVER grp AS std_kept
    FROM kept
    WINDOW grp AS (PARTITION BY source_run, group_id)
)
SELECT source_run, group_id, rollout_id, sample_index, policy_version, staleness, reward, kept,
       CASE
           WHEN NOT kept THEN 0.0
           WHEN n_kept = 1 THEN reward / (CASE WHEN $std_normalize THEN 1.0 + 1e-6 ELSE 1.0 END)
           -- (n r_i - sum) / n, exact in DECIMAL: equal rewards give exactly 0
           ELSE CAST(reward_exact * n_kept - sum_kept AS DOUBLE) / n_kept
                / (CASE WHEN $std_normalize THEN std_kept + 1e-6 ELSE 1.0 END)
       END AS advantage,
       query_weight * exp(-$staleness_decay * staleness) AS weight,
       temperature, top_p, finish_reason, response_length,
       prompt_token_ids, response_token_ids, behaviour_logprobs
FROM stats
ORDER BY position, sample_index
