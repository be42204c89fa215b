-- Gauge (time_weighted) meters. Each event's reading of a series is a point; each series
-- keeps its state at `derived_to` (a bucket start): the usage of every bucket before it is
-- in bucket_totals, derived from the points with seq <= folded_seq before it. `pending_from`
-- is the earliest point stored since (a point before `derived_to` is late), `active` a level
-- other than zero (its buckets are derived without events).
CREATE TABLE gauge_series (
    meter        TEXT    NOT NULL,
    org_id       TEXT    NOT NULL,
    series       TEXT    NOT NULL,
    derived_to   INTEGER NOT NULL,
    folded_seq   INTEGER NOT NULL DEFAULT 0,
    level        TEXT    NOT NULL DEFAULT '0',  -- integer pico-units, past 64 bits
    fields       TEXT    NOT NULL DEFAULT '{}',
    active       INTEGER NOT NULL DEFAULT 0,
    pending_from INTEGER,
    PRIMARY KEY (meter, org_id, series)
) WITHOUT ROWID;
CREATE INDEX gauge_series_due ON gauge_series (pending_from) WHERE pending_from IS NOT NULL;

CREATE TABLE gauge_points (
    meter   TEXT    NOT NULL,
    org_id  TEXT    NOT NULL,
    series  TEXT    NOT NULL,
    time_ms INTEGER NOT NULL,
    ord     TEXT    NOT NULL,  -- source and event id: same-millisecond points in content order
    seq     INTEGER NOT NULL,  -- ingest order
    mode    TEXT    NOT NULL CHECK (mode IN ('level', 'delta', 'state', 'end')),
    value   TEXT,
    fields  TEXT    NOT NULL,
    PRIMARY KEY (meter, org_id, series, time_ms, ord)
) WITHOUT ROWID;
