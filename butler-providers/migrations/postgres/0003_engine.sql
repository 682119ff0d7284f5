-- The engine: the task instances of runs and the event log of run and task state changes.
-- Times are unix milliseconds (UTC).

-- One row per task of a run, created with the run; rows change only by compare-and-set, under
-- row locks taken in (run_id, task_id) order.
CREATE TABLE tasks (
    run_id           BIGINT  NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    task_id          TEXT    NOT NULL,
    -- The task's place in the workflow definition (from 0); tasks are listed in this order.
    position         INTEGER NOT NULL,
    state            TEXT    NOT NULL DEFAULT 'pending' CHECK (state IN
                         ('pending', 'queued', 'running', 'succeeded', 'failed', 'up_for_retry',
                          'upstream_failed', 'skipped', 'timed_out', 'cancelled')),
    -- Counts are unsigned 32-bit in Butler, so they need more than INTEGER.
    try_number       BIGINT  NOT NULL DEFAULT 0 CHECK (try_number >= 0),
    failures         BIGINT  NOT NULL DEFAULT 0 CHECK (failures >= 0),
    -- Fencing token of the running attempt.
    token            BIGINT,
    lease_until      BIGINT,
    worker           TEXT,
    queued_at        BIGINT,
    first_started_at BIGINT,
    started_at       BIGINT,
    ended_at         BIGINT,
    next_try_at      BIGINT,
    exit_code        INTEGER,
    error            TEXT,
    PRIMARY KEY (run_id, task_id)
);

-- Finding running tasks whose lease ended, oldest first; only running tasks are indexed.
CREATE INDEX tasks_running_by_lease ON tasks (lease_until) WHERE state = 'running';

-- One row per applied run or task state change.
CREATE TABLE events (
    -- From a sequence: ids are never reused, but a transaction that took its ids first may
    -- commit after one that took later ids, so readers following the log by id look back a
    -- little (the scheduler reads with a window).
    id         BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at         BIGINT  NOT NULL,
    run_id     BIGINT  NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    -- NULL for a change of the run's own status.
    task_id    TEXT,
    try_number BIGINT,
    from_state TEXT    NOT NULL,
    to_state   TEXT    NOT NULL,
    by_whom    TEXT    NOT NULL,
    reason     TEXT    NOT NULL
);

-- A run's history in order.
CREATE INDEX events_by_run ON events (run_id, id);
