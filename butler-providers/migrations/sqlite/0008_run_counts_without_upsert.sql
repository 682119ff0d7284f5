-- The run counts' update trigger, without an upsert.
--
-- SQLite codes the `DO UPDATE` of an upsert as able to abort the statement whatever conflict
-- clause the statement has, and on a WITHOUT ROWID table always; a statement that can abort
-- and writes more than one row (a run's row and, through the trigger, its counts) keeps a
-- statement journal: a copy of every page it changes, so it can undo itself. That copy was the
-- largest part of the engine's commonest write, a run's change of status, which the engine
-- makes with `UPDATE OR FAIL` (it rolls the whole transaction back on any error, so it needs no
-- statement undone) and which is now free of it. The counts come out the same: the row of the
-- new status is made at zero when missing, then incremented.

DROP TRIGGER run_counts_update;

CREATE TRIGGER run_counts_update AFTER UPDATE OF status ON runs
WHEN OLD.status IS NOT NEW.status
BEGIN
    UPDATE run_counts SET n = n - 1
    WHERE workflow_id = OLD.workflow_id AND analysis_id = OLD.analysis_id
      AND status = OLD.status;
    INSERT INTO run_counts (workflow_id, analysis_id, status, n)
    SELECT NEW.workflow_id, NEW.analysis_id, NEW.status, 0
    WHERE NOT EXISTS (
        SELECT 1 FROM run_counts
        WHERE workflow_id = NEW.workflow_id AND analysis_id = NEW.analysis_id
          AND status = NEW.status);
    UPDATE run_counts SET n = n + 1
    WHERE workflow_id = NEW.workflow_id AND analysis_id = NEW.analysis_id
      AND status = NEW.status;
END;
