-- API tokens of the HTTP server. A token's secret is never stored, only its sha256 (hex).
-- Times are unix milliseconds (UTC).
CREATE TABLE api_tokens (
    name       TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    hash       TEXT    NOT NULL UNIQUE,
    read_only  BOOLEAN NOT NULL,
    created_at BIGINT  NOT NULL
);
