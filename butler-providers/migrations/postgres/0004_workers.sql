-- Workers and leadership: the worker list (`butler list-workers`) and role leases, such as
-- the one that makes a single scheduler lead. Times are unix milliseconds (UTC); lease times
-- come from the database server's clock, so holders on hosts with skewed clocks take turns.
-- Names sort byte by byte (COLLATE "C"), whatever the database's locale, as in the other stores.

-- One row per worker, replaced whole by each of its heartbeats.
CREATE TABLE workers (
    name         TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    host         TEXT   NOT NULL,
    pid          BIGINT NOT NULL CHECK (pid >= 0),
    queue        TEXT   NOT NULL,
    slots        BIGINT NOT NULL CHECK (slots >= 0),
    running      BIGINT NOT NULL CHECK (running >= 0),
    version      TEXT   NOT NULL,
    started_at   BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
);

-- One row per role ever taken; an ended lease (until in the past) stays until another holder
-- takes the role.
CREATE TABLE role_leases (
    role   TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    holder TEXT   NOT NULL,
    since  BIGINT NOT NULL,
    until  BIGINT NOT NULL
);
