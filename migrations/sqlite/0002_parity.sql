-- Parity: per-bucket usage totals kept from meter values; the checker's runs, the orgs that
-- did not match in each, and the alerts it raised.

-- Exact sum of meter_values per (meter, org, bucket), kept by the triggers below in the same
-- transaction as the values themselves. Parity reads these totals instead of every event, so
-- its cost grows with orgs x buckets, not with the number of events.
CREATE TABLE bucket_totals (
    meter        TEXT    NOT NULL,
    org_id       TEXT    NOT NULL,
    bucket_start INTEGER NOT NULL,
    micros       INTEGER NOT NULL,
    PRIMARY KEY (meter, org_id, bucket_start)
) WITHOUT ROWID;

-- For windows much narrower than the meter's history (the checker's one bucket): only the
-- window's rows are read. Rows are added once per (org, bucket), never moved by updates.
CREATE INDEX bucket_totals_by_bucket ON bucket_totals (meter, bucket_start);

INSERT INTO bucket_totals (meter, org_id, bucket_start, micros)
SELECT meter, org_id, bucket_start, sum(micros) FROM meter_values
GROUP BY meter, org_id, bucket_start;

CREATE TRIGGER meter_values_total_insert AFTER INSERT ON meter_values
BEGIN
    INSERT INTO bucket_totals (meter, org_id, bucket_start, micros)
    VALUES (new.meter, new.org_id, new.bucket_start, new.micros)
    ON CONFLICT (meter, org_id, bucket_start) DO UPDATE SET micros = micros + excluded.micros;
END;

CREATE TRIGGER meter_values_total_delete AFTER DELETE ON meter_values
BEGIN
    UPDATE bucket_totals SET micros = micros - old.micros
    WHERE meter = old.meter AND org_id = old.org_id AND bucket_start = old.bucket_start;
END;

CREATE TRIGGER meter_values_total_update
AFTER UPDATE OF meter, org_id, bucket_start, micros ON meter_values
BEGIN
    UPDATE bucket_totals SET micros = micros - old.micros
    WHERE meter = old.meter AND org_id = old.org_id AND bucket_start = old.bucket_start;
    INSERT INTO bucket_totals (meter, org_id, bucket_start, micros)
    VALUES (new.meter, new.org_id, new.bucket_start, new.micros)
    ON CONFLICT (meter, org_id, bucket_start) DO UPDATE SET micros = micros + excluded.micros;
END;

-- One row per checked bucket: each settled bucket is checked once.
CREATE TABLE parity_runs (
    id                  INTEGER PRIMARY KEY,
    meter               TEXT    NOT NULL,
    bucket_start        INTEGER NOT NULL,
    bucket_end          INTEGER NOT NULL,
    checked_at          INTEGER NOT NULL,
    orgs                INTEGER NOT NULL,
    mismatches          INTEGER NOT NULL,
    material            INTEGER NOT NULL,
    controlplane_micros INTEGER NOT NULL,
    legacy_micros       INTEGER NOT NULL,
    worst_org           TEXT,
    worst_drift_micros  INTEGER NOT NULL,
    worst_relative      TEXT,
    clean               INTEGER NOT NULL CHECK (clean IN (0, 1)),
    alarming            INTEGER NOT NULL CHECK (alarming IN (0, 1)),
    alarm_since         INTEGER,
    UNIQUE (meter, bucket_start),
    CHECK (clean = (mismatches = 0))
);
CREATE INDEX parity_runs_unclean ON parity_runs (meter, bucket_start) WHERE clean = 0;

-- The orgs outside tolerance in a run (NULL: absent on that side).
CREATE TABLE parity_mismatches (
    run_id              INTEGER NOT NULL REFERENCES parity_runs (id),
    org_id              TEXT    NOT NULL,
    controlplane_micros INTEGER,
    legacy_micros       INTEGER,
    PRIMARY KEY (run_id, org_id)
) WITHOUT ROWID;

CREATE TABLE parity_alerts (
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
    UNIQUE (meter, bucket_start)
);
CREATE INDEX parity_alerts_by_meter ON parity_alerts (meter, created_at);
