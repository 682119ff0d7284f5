-- Runs per workflow, analysis and status, kept by triggers in the transaction that changes a
-- run, so counting runs (the dashboard's status chips, /metrics) reads a few rows instead of
-- scanning an index of millions.
CREATE TABLE run_counts (
    workflow_id INTEGER NOT NULL,
    analysis_id INTEGER NOT NULL,
    status      TEXT    NOT NULL,
    n           INTEGER NOT NULL CHECK (n >= 0),
    PRIMARY KEY (workflow_id, analysis_id, status)
) WITHOUT ROWID;

INSERT INTO run_counts (workflow_id, analysis_id, status, n)
SELECT workflow_id, analysis_id, status, count(*) FROM runs
GROUP BY workflow_id, analysis_id, status;

CREATE TRIGGER run_counts_insert AFTER INSERT ON runs
BEGIN
    INSERT INTO run_counts (workflow_id, analysis_id, status, n)
    VALUES (NEW.workflow_id, NEW.analysis_id, NEW.status, 1)
    ON CONFLICT (workflow_id, analysis_id, status) DO UPDATE SET n = n + 1;
END;

CREATE TRIGGER run_counts_update AFTER UPDATE OF status ON runs
WHEN OLD.status IS NOT NEW.status
BEGIN
    UPDATE run_counts SET n = n - 1
    WHERE workflow_id = OLD.workflow_id AND analysis_id = OLD.analysis_id
      AND status = OLD.status;
    INSERT INTO run_counts (workflow_id, analysis_id, status, n)
    VALUES (NEW.workflow_id, NEW.analysis_id, NEW.status, 1)
    ON CONFLICT (workflow_id, analysis_id, status) DO UPDATE SET n = n + 1;
END;

CREATE TRIGGER run_counts_delete AFTER DELETE ON runs
BEGIN
    UPDATE run_counts SET n = n - 1
    WHERE workflow_id = OLD.workflow_id AND analysis_id = OLD.analysis_id
      AND status = OLD.status;
END;
