-- API tokens of the HTTP server. A token's secret is never stored, only its sha256 (hex).
-- Times are unix milliseconds (UTC).
CREATE TABLE api_tokens (
    name       TEXT    NOT NULL PRIMARY KEY,
    hash       TEXT    NOT NULL UNIQUE,
    read_only  INTEGER NOT NULL CHECK (read_only IN (0, 1)),
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
