-- Queue messages and dead letters (the PostgreSQL `Queue`), in the schema first on the search
-- path, which Butler sets on every connection. Times are the database server's clock.

CREATE TABLE queue_messages (
    -- An identity is never reused, so a tag of an acked message cannot match a new one.
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue          text        NOT NULL,
    payload        bytea       NOT NULL,
    priority       integer     NOT NULL,
    -- When the message is next visible; while it is leased, the end of the lease.
    visible_at     timestamptz NOT NULL,
    deliveries     bigint      NOT NULL DEFAULT 0,
    max_deliveries bigint      NOT NULL CHECK (max_deliveries >= 1),
    -- Fencing token of the latest delivery.
    token          bigint      NOT NULL DEFAULT 0,
    -- End of the lease of delivery `token`; NULL when no delivery holds the message.
    leased_until   timestamptz,
    enqueued_at    timestamptz NOT NULL,
    -- One entry per event, oldest first.
    history        text[]      NOT NULL DEFAULT '{}'
);

-- Dequeue order within a queue.
CREATE INDEX queue_messages_dequeue ON queue_messages (queue, priority DESC, visible_at, id);

-- When the next message of a queue becomes visible, for waiting dequeues and depth.
CREATE INDEX queue_messages_due ON queue_messages (queue, visible_at);

-- Messages that used up their deliveries: few, and looked up on every dequeue.
CREATE INDEX queue_messages_exhausted ON queue_messages (queue, visible_at)
    WHERE deliveries >= max_deliveries;

CREATE TABLE queue_dead (
    -- The message's id.
    id          bigint      PRIMARY KEY,
    queue       text        NOT NULL,
    payload     bytea       NOT NULL,
    deliveries  bigint      NOT NULL,
    enqueued_at timestamptz NOT NULL,
    history     text[]      NOT NULL,
    dead_at     timestamptz NOT NULL
);

CREATE INDEX queue_dead_by_queue ON queue_dead (queue, dead_at, id);
