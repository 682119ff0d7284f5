-- The analysis tracker: configs, workflows, analyses and analysis runs.
-- Timestamps are unix milliseconds (UTC); ids of configs are UUIDs as text.

-- Immutable JSON configs, referenced by id from their owners and from runs.
CREATE TABLE configs (
    id         TEXT    PRIMARY KEY NOT NULL,
    data       TEXT    NOT NULL,
    sha256     TEXT    NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE workflows (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT    NOT NULL,
    version    TEXT    NOT NULL,
    definition TEXT    NOT NULL,
    config_id  TEXT    NOT NULL REFERENCES configs (id),
    created_at INTEGER NOT NULL,
    UNIQUE (name, version)
);

CREATE TABLE analyses (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT    NOT NULL,
    start_date TEXT    NOT NULL,
    config_id  TEXT    NOT NULL REFERENCES configs (id),
    created_at INTEGER NOT NULL
);

CREATE TABLE runs (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    workflow_id         INTEGER NOT NULL REFERENCES workflows (id),
    analysis_id         INTEGER NOT NULL REFERENCES analyses (id),
    status              TEXT    NOT NULL DEFAULT 'ready' CHECK (status IN
                            ('ready', 'scheduled', 'in-progress', 'completed', 'error', 'cancelled')),
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
);

-- Listing runs of an analysis, a workflow or a state in id order, and counting per state.
CREATE INDEX runs_by_analysis_status ON runs (analysis_id, status, id);
CREATE INDEX runs_by_analysis ON runs (analysis_id, id);
CREATE INDEX runs_by_workflow_status ON runs (workflow_id, status, id);
CREATE INDEX runs_by_workflow ON runs (workflow_id, id);
CREATE INDEX runs_by_status ON runs (status, id);
-- Finding run configs already launched for a workflow and analysis.
CREATE INDEX runs_by_run_config ON runs (workflow_id, analysis_id, run_config_sha256);
