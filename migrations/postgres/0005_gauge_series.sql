-- Gauge (time_weighted) meters. Each event's reading of a series is a point; each series
-- keeps its state at `derived_to` (a bucket start): the usage of every bucket before it is
-- in bucket_totals, derived from the points with seq <= folded_seq before it. `pending_from`
-- is the earliest point stored since (a point before `derived_to` is late), `active` a level
-- other than zero (its buckets are derived without events). Ingest locks a series' row
-- before it stores the series' points, so a derivation holding the row sees every point
-- numbered below the ones it has not seen.
CREATE TABLE gauge_series (
    meter        text    NOT NULL,
    org_id       text    NOT NULL,
    series       text    NOT NULL,
    derived_to   bigint  NOT NULL,
    folded_seq   bigint  NOT NULL DEFAULT 0,
    level        text    NOT NULL DEFAULT '0',  -- integer pico-units, past 64 bits
    fields       text    NOT NULL DEFAULT '{}',
    active       boolean NOT NULL DEFAULT false,
    pending_from bigint,
    PRIMARY KEY (meter, org_id, series)
);
CREATE INDEX gauge_series_due ON gauge_series (pending_from) WHERE pending_from IS NOT NULL;

CREATE SEQUENCE gauge_seq;
CREATE TABLE gauge_points (
    meter   text    NOT NULL,
    org_id  text    NOT NULL,
    series  text    NOT NULL,
    time_ms bigint  NOT NULL,
    ord     text    NOT NULL,
    seq     bigint  NOT NULL DEFAULT nextval('gauge_seq'),
    mode    text    NOT NULL CHECK (mode IN ('level', 'delta', 'state', 'end')),
    value   text,
    fields  text    NOT NULL,
    PRIMARY KEY (meter, org_id, series, time_ms, ord)
);
