-- Alerts are one per (meter, bucket, dedup key): the held-bucket alerts of two orgs in the same
-- bucket, or two reconciliations starting at the same hour, are distinct incidents (their keys
-- name the org or the run); before, the second one was dropped.
ALTER TABLE parity_alerts DROP CONSTRAINT parity_alerts_meter_bucket_start_key;
ALTER TABLE parity_alerts ADD CONSTRAINT parity_alerts_meter_bucket_start_dedup_key_key
    UNIQUE (meter, bucket_start, dedup_key);
