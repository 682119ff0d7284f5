-- The checks on a run's status and a task's state, as comparisons instead of `IN` lists.
--
-- SQLite evaluates `x IN ('a', 'b', 'c', …)` in a CHECK constraint by filling a temporary
-- b-tree with the list for every row it writes: that took about two thirds of the time of
-- updating a task's row, the engine's most frequent write. A chain of comparisons allows the
-- same values and costs a few string compares.
--
-- Nothing stored changes and every row that passed the old check passes the new one, so the
-- tables' definitions are edited in place, as SQLite documents for changing constraints
-- ("Making Other Kinds Of Table Schema Changes", lang_altertable.html), instead of copying
-- every run and task into new tables.

PRAGMA writable_schema = ON;

UPDATE sqlite_master SET sql = 'CREATE TABLE runs (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    workflow_id         INTEGER NOT NULL REFERENCES workflows (id),
    analysis_id         INTEGER NOT NULL REFERENCES analyses (id),
    status              TEXT    NOT NULL DEFAULT ''ready'' CHECK (
                            status = ''ready'' OR status = ''scheduled''
                            OR status = ''in-progress'' OR status = ''completed''
                            OR status = ''error'' OR status = ''cancelled''),
    workflow_config_id  TEXT    NOT NULL REFERENCES configs (id),
    analysis_config_id  TEXT    NOT NULL REFERENCES configs (id),
    run_config_id       TEXT    NOT NULL REFERENCES configs (id),
    effective_config_id TEXT    NOT NULL REFERENCES configs (id),
    run_config_sha256   TEXT    NOT NULL,
    source_file         TEXT,
    error               TEXT,
    created_at          INTEGER NOT NULL,
    started_at          INTEGER,
    ended_at            INTEGER
)'
WHERE type = 'table' AND name = 'runs';

UPDATE sqlite_master SET sql = 'CREATE TABLE tasks (
    run_id           INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    task_id          TEXT    NOT NULL,
    -- The task''s place in the workflow definition (from 0); tasks are listed in this order.
    position         INTEGER NOT NULL,
    state            TEXT    NOT NULL DEFAULT ''pending'' CHECK (
                         state = ''pending'' OR state = ''queued'' OR state = ''running''
                         OR state = ''succeeded'' OR state = ''failed''
                         OR state = ''up_for_retry'' OR state = ''upstream_failed''
                         OR state = ''skipped'' OR state = ''timed_out''
                         OR state = ''cancelled''),
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
) WITHOUT ROWID'
WHERE type = 'table' AND name = 'tasks';

-- Reloads this connection's copy of the schema. Other connections already open keep the old,
-- equivalent checks until they next load the schema.
PRAGMA writable_schema = RESET;
