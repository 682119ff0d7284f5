-- The update trigger of 0006 joined the statement's old and new rows to find the runs whose
-- status changed. Transition tables have no index, so PostgreSQL joined them with a nested
-- loop: a batch of a thousand run changes took a million comparisons, a second for two
-- thousand. Counting every old row out and every new row in, per count, gives the same sums
-- in one pass: a run whose status did not change adds and removes one on the same count, and
-- counts whose sum is zero are left alone.
CREATE OR REPLACE FUNCTION run_counts_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO run_counts (workflow_id, analysis_id, status, n)
    SELECT workflow_id, analysis_id, status, sum(n)::bigint FROM (
        SELECT workflow_id, analysis_id, status, -1 AS n FROM old_runs
        UNION ALL
        SELECT workflow_id, analysis_id, status, 1 AS n FROM new_runs
    ) moved
    GROUP BY workflow_id, analysis_id, status
    HAVING sum(n) <> 0
    ORDER BY workflow_id, analysis_id, status
    ON CONFLICT (workflow_id, analysis_id, status) DO UPDATE SET n = run_counts.n + excluded.n;
    RETURN NULL;
END;
$$;
