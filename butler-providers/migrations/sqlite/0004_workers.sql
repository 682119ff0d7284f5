-- Workers and leadership: the worker list (`butler list-workers`) and role leases, such as
-- the one that makes a single scheduler lead. Times are unix milliseconds (UTC).

-- One row per worker, replaced whole by each of its heartbeats.
CREATE TABLE workers (
    name         TEXT    NOT NULL PRIMARY KEY,
    host         TEXT    NOT NULL,
    pid          INTEGER NOT NULL CHECK (pid >= 0),
    queue        TEXT    NOT NULL,
    slots        INTEGER NOT NULL CHECK (slots >= 0),
    running      INTEGER NOT NULL CHECK (running >= 0),
    version      TEXT    NOT NULL,
    started_at   INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL
) WITHOUT ROWID;

-- One row per role ever taken; an ended lease (until in the past) stays until another holder
-- takes the role.
CREATE TABLE role_leases (
    role   TEXT    NOT NULL PRIMARY KEY,
    holder TEXT    NOT NULL,
    since  INTEGER NOT NULL,
    until  INTEGER NOT NULL
) WITHOUT ROWID;
