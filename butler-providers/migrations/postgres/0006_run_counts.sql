-- Runs per workflow, analysis and status, kept by triggers in the transaction that changes a
-- run, so counting runs (the dashboard's status chips, /metrics) reads a few rows instead of
-- scanning an index of millions. The triggers work per statement on transition tables, so a
-- launch of 10,000 runs or a batch of run changes updates each count once.
CREATE TABLE run_counts (
    workflow_id BIGINT NOT NULL,
    analysis_id BIGINT NOT NULL,
    status      TEXT COLLATE "C" NOT NULL,
    n           BIGINT NOT NULL,
    PRIMARY KEY (workflow_id, analysis_id, status)
);

INSERT INTO run_counts (workflow_id, analysis_id, status, n)
SELECT workflow_id, analysis_id, status, count(*) FROM runs
GROUP BY workflow_id, analysis_id, status;

-- Each trigger adds its statement's changes to the counts in one INSERT whose rows come in a
-- fixed order, so concurrent statements lock count rows in the same order and never deadlock;
-- it is the last thing a write statement does, after every row lock it takes.

CREATE FUNCTION run_counts_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO run_counts (workflow_id, analysis_id, status, n)
    SELECT workflow_id, analysis_id, status, count(*) FROM new_runs
    GROUP BY workflow_id, analysis_id, status
    ORDER BY workflow_id, analysis_id, status
    ON CONFLICT (workflow_id, analysis_id, status) DO UPDATE SET n = run_counts.n + excluded.n;
    RETURN NULL;
END;
$$;

CREATE FUNCTION run_counts_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Only runs whose status changed move from one count to another.
    INSERT INTO run_counts (workflow_id, analysis_id, status, n)
    SELECT workflow_id, analysis_id, status, sum(n)::bigint FROM (
        SELECT o.workflow_id, o.analysis_id, o.status, -1 AS n
        FROM old_runs o JOIN new_runs r ON r.id = o.id WHERE r.status <> o.status
        UNION ALL
        SELECT r.workflow_id, r.analysis_id, r.status, 1 AS n
        FROM old_runs o JOIN new_runs r ON r.id = o.id WHERE r.status <> o.status
    ) moved
    GROUP BY workflow_id, analysis_id, status
    ORDER BY workflow_id, analysis_id, status
    ON CONFLICT (workflow_id, analysis_id, status) DO UPDATE SET n = run_counts.n + excluded.n;
    RETURN NULL;
END;
$$;

CREATE FUNCTION run_counts_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO run_counts (workflow_id, analysis_id, status, n)
    SELECT workflow_id, analysis_id, status, -count(*) FROM old_runs
    GROUP BY workflow_id, analysis_id, status
    ORDER BY workflow_id, analysis_id, status
    ON CONFLICT (workflow_id, analysis_id, status) DO UPDATE SET n = run_counts.n + excluded.n;
    RETURN NULL;
END;
$$;

CREATE TRIGGER run_counts_insert AFTER INSERT ON runs
REFERENCING NEW TABLE AS new_runs
FOR EACH STATEMENT EXECUTE FUNCTION run_counts_insert();

CREATE TRIGGER run_counts_update AFTER UPDATE ON runs
REFERENCING OLD TABLE AS old_runs NEW TABLE AS new_runs
FOR EACH STATEMENT EXECUTE FUNCTION run_counts_update();

CREATE TRIGGER run_counts_delete AFTER DELETE ON runs
REFERENCING OLD TABLE AS old_runs
FOR EACH STATEMENT EXECUTE FUNCTION run_counts_delete();
