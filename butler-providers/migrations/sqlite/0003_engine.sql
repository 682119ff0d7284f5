-- The engine: the task instances of runs and the event log of run and task state changes.
-- Times are unix milliseconds (UTC).

-- One row per task of a run, created with the run; rows change only by compare-and-set.
-- WITHOUT ROWID: rows are small and always found by (run_id, task_id), so the table is its
-- own primary-key index and a run's tasks sit together.
CREATE TABLE tasks (
    run_id           INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    task_id          TEXT    NOT NULL,
    -- The task's place in the workflow definition (from 0); tasks are listed in this order.
    position         INTEGER NOT NULL,
    state            TEXT    NOT NULL DEFAULT 'pending' CHECK (state IN
                         ('pending', 'queued', 'running', 'succeeded', 'failed', 'up_for_retry',
                          'upstream_failed', 'skipped', 'timed_out', 'cancelled')),
    try_number       INTEGER NOT NULL DEFAULT 0,
    failures         INTEGER NOT NULL DEFAULT 0,
    -- Fencing token of the running attempt.
    token            INTEGER,
    lease_until      INTEGER,
    worker           TEXT,
    queued_at        INTEGER,
    first_started_at INTEGER,
    started_at       INTEGER,
    ended_at         INTEGER,
    next_try_at      INTEGER,
    exit_code        INTEGER,
    error            TEXT,
    PRIMARY KEY (run_id, task_id)
) WITHOUT ROWID;

-- Finding running tasks whose lease ended, oldest first; only running tasks are indexed.
CREATE INDEX tasks_running_by_lease ON tasks (lease_until) WHERE state = 'running';

-- One row per applied run or task state change.
CREATE TABLE events (
    -- AUTOINCREMENT: ids are never reused, so readers can follow the log by id.
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at         INTEGER NOT NULL,
    run_id     INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    -- NULL for a change of the run's own status.
    task_id    TEXT,
    try_number INTEGER,
    from_state TEXT    NOT NULL,
    to_state   TEXT    NOT NULL,
    by_whom    TEXT    NOT NULL,
    reason     TEXT    NOT NULL
);

-- A run's history in order.
CREATE INDEX events_by_run ON events (run_id, id);
