-- Events, meter values, dirty buckets, ledger, orgs, flags, audit, job runs.

CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- One row per accepted usage event; (source, event_id) is the deduplication key.
CREATE TABLE usage_events (
    id          INTEGER PRIMARY KEY,
    source      TEXT    NOT NULL,
    event_id    TEXT    NOT NULL,
    type        TEXT    NOT NULL,
    org_id      TEXT    NOT NULL,
    time_ms     INTEGER NOT NULL,
    data        TEXT    NOT NULL,
    received_at INTEGER NOT NULL,
    UNIQUE (source, event_id)
);

-- What each event contributes to each meter, in integer micro-units, fixed at ingest.
CREATE TABLE meter_values (
    event_pk     INTEGER NOT NULL REFERENCES usage_events (id),
    meter        TEXT    NOT NULL,
    org_id       TEXT    NOT NULL,
    bucket_start INTEGER NOT NULL,
    micros       INTEGER NOT NULL,
    PRIMARY KEY (event_pk, meter)
);
CREATE INDEX meter_values_by_bucket ON meter_values (org_id, bucket_start, meter);

-- (org, bucket) pairs with events the rollup has not yet folded into the ledger.
CREATE TABLE dirty_buckets (
    org_id       TEXT    NOT NULL,
    bucket_start INTEGER NOT NULL,
    PRIMARY KEY (org_id, bucket_start)
) WITHOUT ROWID;

CREATE TABLE ledger (
    id               INTEGER PRIMARY KEY,
    identifier       TEXT    NOT NULL,  -- a function of the unique key below (meters.METER_NAME)
    org_id           TEXT    NOT NULL,
    meter            TEXT    NOT NULL,
    bucket_start     INTEGER NOT NULL,
    bucket_end       INTEGER NOT NULL,
    revision         INTEGER NOT NULL,
    value_micros     INTEGER NOT NULL,
    quantity         INTEGER NOT NULL,
    state            TEXT    NOT NULL CHECK (state IN ('pending', 'sent', 'held', 'excluded', 'cancelled')),
    reason           TEXT,
    detail           TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    first_attempt_at INTEGER,
    provider_id      TEXT,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    sent_at          INTEGER,
    UNIQUE (org_id, meter, bucket_start, revision),
    CHECK (state = 'pending' OR state = 'sent' OR reason IS NOT NULL)
);
CREATE INDEX ledger_by_state ON ledger (state, id);

-- Per (org, meter, segment): exact usage and whole units written to the ledger, for the
-- rounding carry. Billed rows ('billable') and rows excluded by rule never share a segment.
CREATE TABLE carries (
    org_id       TEXT    NOT NULL,
    meter        TEXT    NOT NULL,
    segment      TEXT    NOT NULL,
    exact_micros INTEGER NOT NULL,
    quantity     INTEGER NOT NULL,
    PRIMARY KEY (org_id, meter, segment)
) WITHOUT ROWID;

CREATE TABLE orgs (
    org_id     TEXT PRIMARY KEY,
    customer   TEXT,
    updated_at INTEGER NOT NULL
);

CREATE TABLE org_plans (
    org_id         TEXT    NOT NULL REFERENCES orgs (org_id),
    effective_from INTEGER NOT NULL,
    plan           TEXT    NOT NULL,
    PRIMARY KEY (org_id, effective_from)
);

CREATE TABLE flags (
    name       TEXT PRIMARY KEY,
    value      TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

-- Append-only and hash-chained: each record carries the hash of the one before it.
CREATE TABLE audit_log (
    id        INTEGER PRIMARY KEY,
    at        INTEGER NOT NULL,
    action    TEXT    NOT NULL,
    subject   TEXT    NOT NULL,
    actor     TEXT    NOT NULL,
    reason    TEXT,
    before    TEXT,
    after     TEXT,
    forced    INTEGER NOT NULL DEFAULT 0,
    group_id  TEXT,
    prev_hash TEXT    NOT NULL,
    hash      TEXT    NOT NULL
);
CREATE INDEX audit_log_by_action ON audit_log (action, id);

CREATE TABLE job_runs (
    id         INTEGER PRIMARY KEY,
    job        TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at   REAL NOT NULL,
    outcome    TEXT NOT NULL,
    counts     TEXT NOT NULL,
    error      TEXT
);
CREATE INDEX job_runs_by_job ON job_runs (job, id);
