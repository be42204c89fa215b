-- Per-bucket totals must stay integers: SQLite turns an integer sum past 2^63 - 1 into a float
-- instead of failing, and the rollup reads these totals. With this check such an ingest fails
-- (and stores nothing) instead of making a total inexact. Same rows, key, index and triggers
-- as 0002_parity (the triggers are dropped while the table is rebuilt).

DROP TRIGGER meter_values_total_insert;
DROP TRIGGER meter_values_total_delete;
DROP TRIGGER meter_values_total_update;

CREATE TABLE bucket_totals_checked (
    meter        TEXT    NOT NULL,
    org_id       TEXT    NOT NULL,
    bucket_start INTEGER NOT NULL,
    micros       INTEGER NOT NULL CHECK (typeof(micros) = 'integer'),
    PRIMARY KEY (meter, org_id, bucket_start)
) WITHOUT ROWID;

INSERT INTO bucket_totals_checked (meter, org_id, bucket_start, micros)
SELECT meter, org_id, bucket_start, micros FROM bucket_totals;

DROP TABLE bucket_totals;
ALTER TABLE bucket_totals_checked RENAME TO bucket_totals;

CREATE INDEX bucket_totals_by_bucket ON bucket_totals (meter, bucket_start);

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
