-- Queue messages and dead letters (the SQLite `Queue`). Times are milliseconds since the epoch.

CREATE TABLE queue_messages (
    -- AUTOINCREMENT: ids are never reused, so a tag of an acked message cannot match a new one.
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    queue          TEXT    NOT NULL,
    payload        BLOB    NOT NULL,
    priority       INTEGER NOT NULL,
    -- When the message is next visible; while it is leased, the end of the lease.
    visible_at     INTEGER NOT NULL,
    deliveries     INTEGER NOT NULL DEFAULT 0,
    max_deliveries INTEGER NOT NULL,
    -- Fencing token of the latest delivery.
    token          INTEGER NOT NULL DEFAULT 0,
    -- End of the lease of delivery `token`; NULL when no delivery holds the message.
    leased_until   INTEGER,
    enqueued_at    INTEGER NOT NULL,
    -- One line per event, each ending in a newline.
    history        TEXT    NOT NULL DEFAULT ''
);

-- Dequeue order within a queue.
CREATE INDEX queue_messages_dequeue ON queue_messages (queue, priority DESC, visible_at, id);

-- Messages that used up their deliveries: few, and looked up on every dequeue.
CREATE INDEX queue_messages_exhausted ON queue_messages (queue, visible_at)
    WHERE deliveries >= max_deliveries;

CREATE TABLE queue_dead (
    -- The message's id.
    id          INTEGER PRIMARY KEY,
    queue       TEXT    NOT NULL,
    payload     BLOB    NOT NULL,
    deliveries  INTEGER NOT NULL,
    enqueued_at INTEGER NOT NULL,
    history     TEXT    NOT NULL,
    dead_at     INTEGER NOT NULL
);

CREATE INDEX queue_dead_by_queue ON queue_dead (queue, dead_at, id);
