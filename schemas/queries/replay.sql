-- name: replay
-- description: Prioritized replay over the whole archive (other runs included): priority = recency
--   - use_penalty * uses, where recency = policy_version - the newest version of the group's own run
--   (0 for the newest, -1 one version back, ...; the newest version a run has rollouts of, from the
--   `versions` relation) and uses = how many steps of this run trained on the group. Ties break by a seeded hash, so equal priorities do not always favour the same run.
-- param run: VARCHAR                   -- the training run, whose earlier uses are penalized (select() fills it)
-- param groups: INTEGER                -- groups per batch (select() fills it)
-- param seed: BIGINT                   -- tie-break seed (select() fills it)
-- param runs: VARCHAR[] = NULL         -- source runs to replay from; NULL = every run in the archive
-- param use_penalty: DOUBLE = 1.0      -- priority lost per previous use, in versions of recency
-- param max_uses: INTEGER = NULL       -- never pick a group this run already used this many times
-- output: run VARCHAR, group_id VARCHAR, policy_version INTEGER, n INTEGER, shard_id VARCHAR,
--   priority DOUBLE, uses BIGINT
WITH uses AS (
    SELECT source_run AS run, group_id, count(DISTINCT step) AS uses
    FROM batches
    WHERE run = $run
    GROUP BY ALL
),
newest AS (  -- from `versions` (folder names, listed by select()): no second scan of the groups files
    SELECT run, max(policy_version) AS version
    FROM versions
    WHERE $runs IS NULL OR list_contains($runs, run)
    GROUP BY run
),
ranked AS (
    SELECT e.run, e.group_id, e.policy_version, e.n, e.shard_id,
           e.policy_version - newest.version AS recency,
           coalesce(u.uses, 0) AS uses
    FROM eligible AS e
    JOIN newest ON newest.run = e.run
    LEFT JOIN uses AS u ON u.run = e.run AND u.group_id = e.group_id
)
SELECT run, group_id, policy_version, n, shard_id, recency - $use_penalty * uses AS priority, uses
FROM ranked
WHERE $max_uses IS NULL OR uses < $max_uses
ORDER BY priority DESC, hash($seed, run, group_id), run, group_id
LIMIT $groups
