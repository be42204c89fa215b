-- Alerts are one per (meter, bucket, dedup key): the held-bucket alerts of two orgs in the same
-- bucket, or two reconciliations starting at the same hour, are distinct incidents (their keys
-- name the org or the run); before, the second one was dropped.
CREATE TABLE parity_alerts_new (
    id           INTEGER PRIMARY KEY,
    meter        TEXT    NOT NULL,
    bucket_start INTEGER NOT NULL,
    dedup_key    TEXT    NOT NULL,
    text         TEXT    NOT NULL,
    state        TEXT    NOT NULL
                 CHECK (state IN ('pending', 'sent', 'logged', 'suppressed', 'failed')),
    created_at   INTEGER NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    sent_at      INTEGER,
    error        TEXT,
    UNIQUE (meter, bucket_start, dedup_key)
);
INSERT INTO parity_alerts_new SELECT id, meter, bucket_start, dedup_key, text, state, created_at,
                                     attempts, sent_at, error FROM parity_alerts;
DROP TABLE parity_alerts;
ALTER TABLE parity_alerts_new RENAME TO parity_alerts;
CREATE INDEX parity_alerts_by_meter ON parity_alerts (meter, created_at);
