-- name: ping
SELECT 1;

-- name: existing_events
SELECT source, event_id FROM usage_events
WHERE (source, event_id) IN (SELECT value ->> 0, value ->> 1 FROM json_each(?));

-- name: max_event_pk
SELECT coalesce(max(id), 0) FROM usage_events;

-- name: insert_event
INSERT INTO usage_events (id, source, event_id, type, org_id, time_ms, data, received_at, plan,
                          plan_issued_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?);

-- name: insert_meter_value
INSERT INTO meter_values (event_pk, meter, org_id, bucket_start, micros) VALUES (?, ?, ?, ?, ?);

-- name: bucket_totals_of
-- The totals of the (org, meter, bucket) keys a batch touched.
SELECT t.org_id, t.meter, t.bucket_start, t.micros
FROM json_each(?) k
CROSS JOIN bucket_totals t
    ON t.meter = json_extract(k.value, '$[1]') AND t.org_id = json_extract(k.value, '$[0]')
   AND t.bucket_start = json_extract(k.value, '$[2]');

-- name: mark_dirty
-- A new event for a held bucket releases it: the rollup tries it again.
INSERT INTO dirty_buckets (org_id, bucket_start) VALUES (?, ?)
ON CONFLICT (org_id, bucket_start) DO UPDATE SET held_reason = NULL
WHERE held_reason IS NOT NULL;

-- name: usage
-- The totals ingest keeps with the events, and gauge meters' derived ones.
SELECT org_id, meter, bucket_start, micros AS value_micros
FROM bucket_totals
WHERE (?1 IS NULL OR org_id = ?1)
  AND (?2 IS NULL OR meter = ?2)
  AND (?3 IS NULL OR bucket_start >= ?3)
  AND (?4 IS NULL OR bucket_start < ?4)
ORDER BY org_id, meter, bucket_start;

-- name: create_batch
CREATE TEMP TABLE IF NOT EXISTS rollup_batch (
    org_id TEXT NOT NULL, bucket_start INTEGER NOT NULL, PRIMARY KEY (org_id, bucket_start)
) WITHOUT ROWID;

-- name: create_batch_meters
CREATE TEMP TABLE IF NOT EXISTS rollup_meters (meter TEXT PRIMARY KEY) WITHOUT ROWID;

-- name: clear_batch
DELETE FROM temp.rollup_batch;

-- name: clear_batch_meters
DELETE FROM temp.rollup_meters;

-- name: fill_batch
-- The next closed dirty buckets, in (org, bucket) order.
INSERT INTO temp.rollup_batch (org_id, bucket_start)
SELECT org_id, bucket_start FROM dirty_buckets
WHERE bucket_start <= :last_start AND (:org IS NULL OR org_id = :org) AND held_reason IS NULL
  AND (:allowed IS NULL
       OR EXISTS (SELECT 1 FROM org_plans p
                  WHERE p.org_id = dirty_buckets.org_id
                    AND p.effective_from <= dirty_buckets.bucket_start)
       OR org_id IN (SELECT value FROM json_each(:allowed)))
ORDER BY org_id, bucket_start
LIMIT :limit;

-- name: unplanned_orgs
SELECT DISTINCT d.org_id FROM dirty_buckets d
WHERE d.bucket_start <= ?1 AND d.held_reason IS NULL
  AND NOT EXISTS (SELECT 1 FROM org_plans p
                  WHERE p.org_id = d.org_id AND p.effective_from <= d.bucket_start)
ORDER BY d.org_id;

-- name: fill_batch_meters
-- Every meter with stored values (one index seek per meter), so the joins below look up
-- exact (meter, org, bucket) keys.
INSERT INTO temp.rollup_meters (meter)
WITH RECURSIVE m (meter) AS (
    SELECT min(meter) FROM bucket_totals
    UNION ALL
    SELECT (SELECT min(meter) FROM bucket_totals WHERE meter > m.meter) FROM m
    WHERE m.meter IS NOT NULL
)
SELECT meter FROM m WHERE meter IS NOT NULL;

-- name: batch_totals
-- From the per-bucket totals that ingest keeps with the events (migration 0002). CROSS JOIN
-- fixes the join order: the batch drives, each total is one primary-key lookup.
SELECT t.org_id, t.meter, t.bucket_start, t.micros AS value_micros
FROM temp.rollup_batch b
CROSS JOIN temp.rollup_meters m
CROSS JOIN bucket_totals t
    ON t.meter = m.meter AND t.org_id = b.org_id AND t.bucket_start = b.bucket_start;

-- name: batch_ledger
-- Per reason (the rounding chain the rows are in). An offset moves no usage (it takes a sent
-- row back at the provider): its value is not counted, its revision is.
SELECT l.org_id, l.meter, l.bucket_start, l.reason,
       sum(CASE WHEN l.offsets_id IS NULL THEN l.value_micros ELSE 0 END) AS value_micros,
       max(l.revision) AS revision
FROM temp.rollup_batch b
CROSS JOIN temp.rollup_meters m
CROSS JOIN ledger l
    ON l.org_id = b.org_id AND l.meter = m.meter AND l.bucket_start = b.bucket_start
WHERE NOT (l.state = 'cancelled' AND l.reason = 'reissued')  -- its usage is in the reissue
GROUP BY l.org_id, l.meter, l.bucket_start, l.reason;

-- name: batch_carries
SELECT c.org_id, c.meter, c.segment, c.exact_micros, c.quantity
FROM carries c WHERE c.org_id IN (SELECT DISTINCT org_id FROM temp.rollup_batch);

-- name: batch_orgs
SELECT o.org_id, o.customer, o.updated_at, p.plan, p.effective_from
FROM orgs o LEFT JOIN org_plans p ON p.org_id = o.org_id
WHERE o.org_id IN (SELECT DISTINCT org_id FROM temp.rollup_batch)
ORDER BY o.org_id, p.effective_from;

-- name: insert_rows
INSERT INTO ledger (identifier, org_id, meter, bucket_start, bucket_end, revision,
                    value_micros, quantity, state, reason, plan_source, created_at, updated_at)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12);

-- name: insert_reissue
INSERT INTO ledger (identifier, org_id, meter, bucket_start, bucket_end, revision,
                    value_micros, quantity, state, detail, created_at, updated_at, plan_source)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'pending', ?9, ?10, ?10, ?11);

-- name: upsert_carries
INSERT INTO carries (org_id, meter, segment, exact_micros, quantity) VALUES (?1, ?2, ?3, ?4, ?5)
ON CONFLICT (org_id, meter, segment) DO UPDATE SET exact_micros = excluded.exact_micros,
                                          quantity = excluded.quantity;

-- name: hold_dirty
-- ?3, the mark, is PostgreSQL's: one writer at a time needs none.
UPDATE dirty_buckets SET held_reason = ?4 WHERE org_id = ?1 AND bucket_start = ?2;

-- name: clear_dirty
DELETE FROM dirty_buckets
WHERE (org_id, bucket_start) IN (SELECT org_id, bucket_start FROM temp.rollup_batch)
  AND held_reason IS NULL;

-- name: ledger
SELECT id, identifier, org_id, meter, bucket_start, bucket_end, revision, value_micros,
       quantity, state, reason, detail, attempts, first_attempt_at, provider_id,
       created_at, updated_at, sent_at, attempt_customer, attempt_timestamp, attempt_key,
       last_attempt_at, plan_source, offsets_id
FROM ledger
WHERE (?1 IS NULL OR org_id = ?1)
  AND (?2 IS NULL OR state = ?2)
  AND (?3 IS NULL OR bucket_start >= ?3)
  AND (?4 IS NULL OR bucket_start < ?4)
  AND (?6 IS NULL OR (attempts > 0) = ?6)
  AND id > ?7
ORDER BY id
LIMIT ?5;

-- name: sendable
-- Claims the rows it returns (in no particular order); `billed`: the row's bucket has a sent
-- row (asked only with ?8, or for buckets before ?9, T: past it the sender need not know).
UPDATE ledger SET claimed_by = ?5, claim_expires = ?7
WHERE id IN (
    SELECT l.id FROM ledger l LEFT JOIN orgs o ON o.org_id = l.org_id
    WHERE l.id > ?1
      AND (l.state = 'pending'
           OR (l.state = 'held' AND l.reason = 'no_customer' AND o.customer IS NOT NULL))
      AND l.offsets_id IS NULL  -- a rollback sends its offsets, and completes them
      AND (?3 IS NULL OR l.org_id = ?3)
      AND (?4 IS NULL OR l.bucket_start < ?4)
      AND (?8 IS NULL OR EXISTS (  -- ?8: only rows of buckets billed here
            SELECT 1 FROM ledger s INDEXED BY ledger_billed_buckets
            WHERE s.org_id = l.org_id AND s.bucket_start = l.bucket_start
              AND s.state = 'sent' AND s.offsets_id IS NULL))
      AND NOT EXISTS (  -- a bucket a rollback's hand-back holds
            SELECT 1 FROM ledger h INDEXED BY ledger_billed_buckets
            WHERE h.org_id = l.org_id AND h.bucket_start = l.bucket_start
              AND h.state = 'sent' AND h.offsets_id IS NULL AND h.claimed_by IS NOT NULL
              AND h.claimed_by <> ?5 AND h.claim_expires > ?6)
      AND NOT EXISTS (
            SELECT 1 FROM ledger c INDEXED BY ledger_claims
            WHERE c.org_id = l.org_id AND c.meter = l.meter AND c.claimed_by IS NOT NULL
              AND c.claimed_by <> ?5 AND c.claim_expires > ?6)
    ORDER BY l.id
    LIMIT ?2)
RETURNING id, identifier, org_id, meter, bucket_start, bucket_end, revision, value_micros,
          quantity, state, reason, detail, attempts, first_attempt_at, provider_id,
          created_at, updated_at, sent_at, attempt_customer, attempt_timestamp, attempt_key,
          last_attempt_at, plan_source,
          (SELECT customer FROM orgs WHERE orgs.org_id = ledger.org_id) AS customer,
          CASE WHEN ?8 IS NOT NULL OR ledger.bucket_start < ?9 THEN EXISTS (
              SELECT 1 FROM ledger s INDEXED BY ledger_billed_buckets
              WHERE s.org_id = ledger.org_id AND s.bucket_start = ledger.bucket_start
                AND s.state = 'sent' AND s.offsets_id IS NULL) ELSE 0 END AS billed;

-- name: release_claims
UPDATE ledger SET claimed_by = NULL, claim_expires = NULL WHERE claimed_by = ?;

-- name: seam
-- Rows the provider has, or had: sent, attempted, or cancelled by a rollback.
SELECT coalesce(sum(state IN ('sent', 'cancelled') OR attempts > 0), 0) AS reached,
       coalesce(sum(state = 'excluded' AND reason = 'before_bill_from'), 0) AS excluded
FROM ledger WHERE bucket_start >= ?1;

-- name: billed_ranges
-- Per org, the runs of consecutive buckets in [?1, ?2) with a row in state `sent` (any meter;
-- not an offset),
-- each as [start, end): within a run, a bucket's start less ?3 (the bucket size) times its
-- rank in the org is the same number (gaps and islands).
WITH billed AS (
    SELECT DISTINCT org_id, bucket_start FROM ledger
    WHERE state = 'sent' AND offsets_id IS NULL  -- an offset hands its bucket back
      AND bucket_start >= ?1 AND bucket_start < ?2
      AND (?4 IS NULL OR org_id = ?4)
), runs AS (
    SELECT org_id, bucket_start,
           bucket_start - ?3 * row_number() OVER (PARTITION BY org_id ORDER BY bucket_start)
               AS run
    FROM billed
)
SELECT org_id, min(bucket_start) AS start, max(bucket_start) + ?3 AS "end"
FROM runs
GROUP BY org_id, run
ORDER BY org_id, start;

-- name: record_attempts
-- ?1 the row ids; ?5, ?6, ?7 (JSON arrays in the same order): each row's customer, timestamp
-- and idempotency key for this call (nulls: kept).
UPDATE ledger SET attempts = attempts + 1, first_attempt_at = coalesce(first_attempt_at, ?2),
                  last_attempt_at = ?2, updated_at = ?2,
                  attempt_customer = coalesce(s.customer, attempt_customer),
                  attempt_timestamp = coalesce(s.ts, attempt_timestamp),
                  attempt_key = coalesce(s.key, attempt_key),
                  claim_expires = CASE WHEN ?3 IS NULL THEN claim_expires ELSE ?4 END
FROM (SELECT i.value AS id, c.value AS customer, t.value AS ts, k.value AS key
      FROM json_each(?1) i
      JOIN json_each(?5) c ON c.key = i.key
      JOIN json_each(?6) t ON t.key = i.key
      JOIN json_each(?7) k ON k.key = i.key) AS s
WHERE ledger.id = s.id AND (?3 IS NULL OR claimed_by = ?3)
RETURNING ledger.id AS id, ledger.quantity AS quantity;

-- name: release_attempts
-- A call not made: back to never attempted when it was the only one.
UPDATE ledger SET attempts = attempts - 1,
                  first_attempt_at = CASE WHEN attempts = 1 THEN NULL ELSE first_attempt_at END,
                  last_attempt_at = CASE WHEN attempts = 1 THEN NULL ELSE last_attempt_at END,
                  attempt_customer = CASE WHEN attempts = 1 THEN NULL ELSE attempt_customer END,
                  attempt_timestamp = CASE WHEN attempts = 1 THEN NULL ELSE attempt_timestamp END,
                  attempt_key = CASE WHEN attempts = 1 THEN NULL ELSE attempt_key END
WHERE id = ?1 AND attempts > 0 AND state IN ('pending', 'held');

-- name: settleable
SELECT id FROM ledger
WHERE id IN (SELECT value FROM json_each(?)) AND state IN ('pending', 'held')
  AND coalesce(reason, '') NOT IN ('provider_error', 'provider_missing');

-- name: settle_rows
UPDATE ledger SET state = ?2, reason = ?3, detail = ?4, provider_id = coalesce(?5, provider_id),
                  sent_at = ?6, updated_at = ?7, claimed_by = NULL, claim_expires = NULL
WHERE id = ?1 AND state IN ('pending', 'held')
  AND coalesce(reason, '') NOT IN ('provider_error', 'provider_missing');

-- name: row_chains
SELECT DISTINCT org_id, meter FROM ledger WHERE id IN (SELECT value FROM json_each(?1))
ORDER BY org_id, meter;

-- name: chain_rows
-- `held`: another live claimant holds the row; it may be about to send its quantity.
SELECT id, value_micros, quantity, state, reason, attempts, offsets_id,
       coalesce(claimed_by <> ?3 AND claim_expires > ?4, 0) AS held
FROM ledger
WHERE org_id = ?1 AND meter = ?2
ORDER BY id;

-- name: set_quantities
UPDATE ledger SET quantity = ?2, updated_at = ?3 WHERE id = ?1;

-- name: get_org
SELECT org_id, customer, updated_at, subscription, subscription_status, customer_error
FROM orgs WHERE org_id = ?1;

-- name: org_plans
SELECT plan, effective_from FROM org_plans WHERE org_id = ? ORDER BY effective_from;

-- name: upsert_org
INSERT INTO orgs (org_id, customer, updated_at) VALUES (?, ?, ?)
ON CONFLICT (org_id) DO UPDATE SET customer = coalesce(excluded.customer, orgs.customer),
                                   customer_error = CASE WHEN excluded.customer IS NULL
                                                         THEN orgs.customer_error END,
                                   updated_at = excluded.updated_at;

-- name: release_org_buckets
-- The org's plan changed: the rollup tries the buckets it held (an unknown plan) again.
UPDATE dirty_buckets SET held_reason = NULL WHERE org_id = ? AND held_reason IS NOT NULL;

-- name: upsert_plan
INSERT INTO org_plans (org_id, effective_from, plan) VALUES (?, ?, ?)
ON CONFLICT (org_id, effective_from) DO UPDATE SET plan = excluded.plan;

-- name: runtime_flags
SELECT name, value, version, updated_at FROM flags;

-- name: flag_versions
SELECT name, version FROM flags;

-- name: upsert_flag
INSERT INTO flags (name, value, version, updated_at) VALUES (?, ?, ?, ?)
ON CONFLICT (name) DO UPDATE SET value = excluded.value, version = excluded.version,
                                 updated_at = excluded.updated_at;

-- name: last_audit_hash
SELECT hash FROM audit_log ORDER BY id DESC LIMIT 1;

-- name: insert_audit
INSERT INTO audit_log (at, action, subject, actor, reason, before, after, forced, group_id,
                       prev_hash, hash, signature)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?);

-- name: audit_log
SELECT id, at, action, subject, actor, reason, before, after, forced, group_id, prev_hash, hash,
       signature
FROM audit_log
WHERE (?1 IS NULL OR substr(action, 1, length(?1)) = ?1)
ORDER BY id DESC
LIMIT ?2;

-- name: audit_chain
SELECT id, at, action, subject, actor, reason, before, after, forced, group_id, prev_hash, hash,
       signature
FROM audit_log WHERE id > ? ORDER BY id LIMIT ?;

-- name: insert_job_run
INSERT INTO job_runs (job, started_at, ended_at, outcome, counts, error) VALUES (?, ?, ?, ?, ?, ?);

-- name: job_runs
SELECT job, started_at, ended_at, outcome, counts, error FROM job_runs
WHERE (?1 IS NULL OR job = ?1)
ORDER BY id DESC
LIMIT ?2;

-- name: get_setting
SELECT value FROM settings WHERE key = ?;

-- name: get_setting_for_update
-- The write transaction holds the only writer's lock already.
SELECT value FROM settings WHERE key = ?;

-- name: put_setting
INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING;

-- name: upsert_setting
INSERT INTO settings (key, value) VALUES (?, ?)
ON CONFLICT (key) DO UPDATE SET value = excluded.value;

-- name: bucket_span
-- Two subqueries: each is one index lookup; min() and max() in one SELECT scan every row.
SELECT (SELECT min(bucket_start) FROM bucket_totals WHERE meter = ?1),
       (SELECT max(bucket_start) FROM bucket_totals WHERE meter = ?1);

-- name: usage_by_org
-- For a window covering much of the meter's history: one pass over its (org, bucket) totals
-- in primary-key order (NOT INDEXED: the table's own key), so groups arrive in org order and
-- nothing is sorted; bucket_totals is kept from meter_values by triggers (0002_parity.sql).
-- The answer is one JSON object {org: [units, micros]}: the whole aggregation runs in one step
-- inside SQLite (without Python's lock) instead of handing 10,000 rows to Python one by one.
-- Whole units and the micro-units below them are summed apart: SQLite's sum() fails past
-- 2^63 - 1, which ten buckets at the bound reach (units * 10^6 + micros is exact).
SELECT json_group_object(org_id, json_array(units, micros)) FROM (
    SELECT org_id, sum(micros / 1000000) AS units, sum(micros % 1000000) AS micros
    FROM bucket_totals NOT INDEXED
    WHERE meter = :meter AND bucket_start >= :start AND bucket_start < :end
    GROUP BY org_id
);

-- name: usage_by_org_narrow
-- For a window much narrower than the history: only the window's rows, through the bucket
-- index, then a small sort.
SELECT json_group_object(org_id, json_array(units, micros)) FROM (
    SELECT org_id, sum(micros / 1000000) AS units, sum(micros % 1000000) AS micros
    FROM bucket_totals INDEXED BY bucket_totals_by_bucket
    WHERE meter = :meter AND bucket_start >= :start AND bucket_start < :end
    GROUP BY org_id
);

-- name: insert_parity_run
INSERT INTO parity_runs (meter, bucket_start, bucket_end, checked_at, orgs, mismatches, material,
                         controlplane_micros, legacy_micros, worst_org, worst_drift_micros,
                         worst_relative, clean, alarming, alarm_since)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (meter, bucket_start) DO NOTHING
RETURNING id;

-- name: insert_parity_mismatch
INSERT INTO parity_mismatches (run_id, org_id, controlplane_micros, legacy_micros)
VALUES (?, ?, ?, ?);

-- name: parity_runs
SELECT id, meter, bucket_start, bucket_end, checked_at, orgs, mismatches, material,
       controlplane_micros, legacy_micros, worst_org, worst_drift_micros, worst_relative,
       clean, alarming, alarm_since
FROM parity_runs
WHERE meter = ?1
  AND (?2 IS NULL OR bucket_start >= ?2)
  AND (?3 IS NULL OR bucket_start < ?3)
ORDER BY bucket_start DESC
LIMIT ?4;

-- name: parity_run
SELECT id, meter, bucket_start, bucket_end, checked_at, orgs, mismatches, material,
       controlplane_micros, legacy_micros, worst_org, worst_drift_micros, worst_relative,
       clean, alarming, alarm_since
FROM parity_runs WHERE id = ?;

-- name: parity_run_mismatches
SELECT org_id, controlplane_micros, legacy_micros FROM parity_mismatches
WHERE run_id = ? ORDER BY org_id;

-- name: parity_clean_tail
SELECT bucket_start FROM parity_runs
WHERE meter = ?1 AND clean = 1
  AND bucket_start > coalesce(
        (SELECT max(bucket_start) FROM parity_runs WHERE meter = ?1 AND clean = 0), -1)
ORDER BY bucket_start DESC;

-- name: parity_alerts
SELECT id, meter, bucket_start, dedup_key, text, state, created_at, attempts, sent_at, error
FROM parity_alerts
WHERE meter = ?1
  AND (?2 IS NULL OR created_at >= ?2)
  AND (?3 IS NULL OR state IN (SELECT value FROM json_each(?3)))
ORDER BY id DESC
LIMIT ?4;

-- name: update_parity_alert
UPDATE parity_alerts SET state = ?, attempts = ?, sent_at = ?, error = ? WHERE id = ?;

-- name: org_subscription
SELECT subscription, subscription_status FROM orgs WHERE org_id = ?;

-- name: org_by_subscription
SELECT org_id FROM orgs WHERE subscription = ? LIMIT 1;

-- name: customer_owner
SELECT org_id FROM orgs WHERE customer = ? AND org_id <> ? LIMIT 1;

-- name: org_by_customer
SELECT org_id FROM orgs WHERE customer = ? ORDER BY updated_at DESC LIMIT 1;

-- name: set_org_subscription
UPDATE orgs SET subscription = ?, subscription_status = ?, updated_at = ? WHERE org_id = ?;

-- name: latest_catalog
SELECT version, published_at, actor, digest, catalog FROM catalog_versions
ORDER BY version DESC LIMIT 1;

-- name: catalog_version
SELECT version, published_at, actor, digest, catalog FROM catalog_versions WHERE version = ?;

-- name: insert_catalog
INSERT INTO catalog_versions (version, published_at, actor, digest, catalog)
VALUES ((SELECT coalesce(max(version), 0) + 1 FROM catalog_versions), ?, ?, ?, ?)
RETURNING version;

-- name: webhook_event
SELECT outcome FROM webhook_events WHERE event_id = ?;

-- name: insert_webhook_event
INSERT INTO webhook_events (event_id, type, created, processed_at, outcome) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id;

-- name: insert_closed_period
INSERT INTO closed_periods (invoice_id, org_id, period_start, period_end, finalized_at)
VALUES (?, ?, ?, ?, ?)
ON CONFLICT (invoice_id) DO NOTHING;

-- name: closed_periods
SELECT invoice_id, org_id, period_start, period_end, finalized_at FROM closed_periods
WHERE org_id IN (SELECT value FROM json_each(?))
ORDER BY org_id, period_start;

-- name: cancellable
-- Sent rows, and rows attempted without a definite answer (the provider may have them).
SELECT id, identifier, quantity, state FROM ledger
WHERE id IN (SELECT value FROM json_each(?))
  AND (state = 'sent' OR (attempts > 0 AND state IN ('pending', 'held')))
  AND offsets_id IS NULL  -- cancelling an offset would bill its row again
ORDER BY id;

-- name: cancel_rows
UPDATE ledger SET state = 'cancelled', reason = ?2, detail = ?3, updated_at = ?4
WHERE id = ?1 AND (state = 'sent' OR (attempts > 0 AND state IN ('pending', 'held'))
                   OR (state = 'cancelled' AND reason = 'rolled_back'))
  AND offsets_id IS NULL;

-- name: late_rows
SELECT id, identifier, org_id, meter, bucket_start, bucket_end, revision, value_micros,
       quantity, state, reason, detail, attempts, first_attempt_at, provider_id,
       created_at, updated_at, sent_at, attempt_customer, attempt_timestamp, attempt_key,
       last_attempt_at, plan_source, offsets_id
FROM ledger
WHERE org_id = ?1 AND state = 'sent' AND bucket_start < ?3
  AND coalesce(attempt_timestamp, bucket_start) >= ?2
  AND coalesce(attempt_timestamp, bucket_start) < ?3
  -- every attempt after the finalization, or the one accepted (it arrived then) after it
  AND (first_attempt_at >= ?4 OR (provider_id IS NOT NULL AND last_attempt_at >= ?4))
  AND offsets_id IS NULL
ORDER BY id;

-- name: unsure_rows
-- Sent with a timestamp in the period, answered "already exists" by a call made at or after
-- the finalization while an earlier call came before it: on the invoice or not, unknown.
SELECT id, identifier, org_id, meter, bucket_start, bucket_end, revision, value_micros,
       quantity, state, reason, detail, attempts, first_attempt_at, provider_id,
       created_at, updated_at, sent_at, attempt_customer, attempt_timestamp, attempt_key,
       last_attempt_at, plan_source, offsets_id
FROM ledger
WHERE org_id = ?1 AND state = 'sent' AND bucket_start < ?3
  AND coalesce(attempt_timestamp, bucket_start) >= ?2
  AND coalesce(attempt_timestamp, bucket_start) < ?3
  AND first_attempt_at < ?4 AND last_attempt_at >= ?4 AND provider_id IS NULL
  AND offsets_id IS NULL
ORDER BY id;

-- name: reissuable
-- Sent rows, rows held for a provider error (reported invalid: never counted there), and
-- with ?2, rows a rollback cancelled at the provider (billed again: their bucket stays here).
SELECT id, identifier, state, org_id, meter, bucket_start, bucket_end, value_micros, quantity,
       plan_source,
       (SELECT max(r.revision) FROM ledger r
        WHERE r.org_id = l.org_id AND r.meter = l.meter AND r.bucket_start = l.bucket_start)
       AS last_revision
FROM ledger l
WHERE id IN (SELECT value FROM json_each(?1))
  AND (state = 'sent' OR (state = 'held' AND reason IN ('provider_error', 'provider_missing'))
       OR (?2 AND state = 'cancelled' AND reason = 'rolled_back' AND attempts > 0))
  AND offsets_id IS NULL
ORDER BY id;

-- name: offsettable
-- Sent rows that reached the provider (an attempt was made) with no offset but undone ones;
-- an offset itself is offset only to undo it.
SELECT id, identifier, state, org_id, meter, bucket_start, bucket_end, value_micros, quantity,
       attempt_customer, attempt_timestamp,
       (SELECT max(r.revision) FROM ledger r
        WHERE r.org_id = l.org_id AND r.meter = l.meter AND r.bucket_start = l.bucket_start)
       AS last_revision
FROM ledger l
WHERE id IN (SELECT value FROM json_each(?))
  AND state = 'sent' AND attempts > 0
  AND NOT EXISTS (SELECT 1 FROM ledger o WHERE o.offsets_id = l.id AND o.state <> 'cancelled')
ORDER BY id;

-- name: insert_offset
-- It is called as its row was: the same customer and timestamp (the same hour, the same
-- billing period), under its own identifier.
INSERT INTO ledger (identifier, org_id, meter, bucket_start, bucket_end, revision,
                    value_micros, quantity, state, detail, offsets_id, created_at, updated_at,
                    attempt_customer, attempt_timestamp, attempt_key)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'pending', ?9, ?10,
        ?11, ?11, ?12, ?13, ?1)
RETURNING id, identifier, org_id, meter, bucket_start, bucket_end, revision, value_micros,
          quantity, state, reason, detail, attempts, first_attempt_at, provider_id,
          created_at, updated_at, sent_at, attempt_customer, attempt_timestamp, attempt_key,
          last_attempt_at, plan_source, offsets_id;

-- name: pending_offsets
-- Offsetting rows still pending, with the row each offsets (still sent).
SELECT o.id, o.identifier, o.quantity, o.offsets_id, r.identifier AS original,
       r.offsets_id AS undoes  -- set when the offset undoes an offset
FROM ledger o JOIN ledger r ON r.id = o.offsets_id
WHERE o.id IN (SELECT value FROM json_each(?)) AND o.state = 'pending' AND r.state = 'sent'
ORDER BY o.id;

-- name: offset_target
-- The row a taken offset takes off: handed back, only while it is still sent.
UPDATE ledger SET state = 'cancelled', reason = 'offset', detail = ?2, updated_at = ?3
WHERE id = ?1 AND state = 'sent' AND offsets_id IS NULL
RETURNING id;

-- name: cancel_offset
-- An offset undone by its own offset: it no longer takes its row off the provider's total.
UPDATE ledger SET state = 'cancelled', reason = 'offset', detail = ?2, updated_at = ?3
WHERE id = ?1 AND state = 'sent' AND offsets_id IS NOT NULL
RETURNING id;

-- name: reinstate_offset
-- The row an undone offset took off is billed here again.
UPDATE ledger SET state = 'sent', reason = NULL, detail = ?2, updated_at = ?3
WHERE id = ?1 AND state = 'cancelled' AND reason = 'offset'
RETURNING id;

-- name: unsent_offsets
-- Offsets appended and not yet settled (a call failed or was never answered): sent again.
SELECT id, identifier, org_id, meter, bucket_start, bucket_end, revision, value_micros,
       quantity, state, reason, detail, attempts, first_attempt_at, provider_id,
       created_at, updated_at, sent_at, attempt_customer, attempt_timestamp, attempt_key,
       last_attempt_at, plan_source, offsets_id
FROM ledger WHERE offsets_id IS NOT NULL AND state = 'pending' ORDER BY id;

-- name: live_claims
SELECT count(*) FROM ledger
WHERE claimed_by IS NOT NULL AND claim_expires > ?1 AND claimed_by <> coalesce(?2, '');

-- name: held_by_others
-- Sent rows another live claimant holds: only a hand-back holds sent rows.
SELECT count(*) AS held FROM ledger
WHERE state = 'sent' AND offsets_id IS NULL AND claimed_by IS NOT NULL
  AND claimed_by <> ?1 AND claim_expires > ?2;

-- name: hold_billed_buckets
-- A rollback's hand-back holds every bucket billed here (its sent rows): no sender takes a row
-- of one until the hand-back ends (a correction sent meanwhile would split the bucket).
UPDATE ledger SET claimed_by = ?1, claim_expires = ?2
WHERE state = 'sent' AND offsets_id IS NULL
  AND (claimed_by IS NULL OR claim_expires <= ?3 OR claimed_by = ?1);

-- name: org_subscription_statuses
-- Orgs with a provider subscription, by its status.
SELECT subscription_status AS status, COUNT(*) AS orgs FROM orgs
WHERE subscription_status IS NOT NULL
GROUP BY subscription_status ORDER BY subscription_status;

-- name: plan_orgs_without_customer
-- Orgs whose plan in force at ?2 is ?1 and that have no provider customer.
SELECT o.org_id FROM orgs o
WHERE o.customer IS NULL
  AND (SELECT p.plan FROM org_plans p WHERE p.org_id = o.org_id AND p.effective_from <= ?2
       ORDER BY p.effective_from DESC LIMIT 1) = ?1
ORDER BY o.org_id;

-- name: last_job_success
-- Newest first through job_runs_by_job (job, id): usually the first row looked at.
SELECT ended_at FROM job_runs
WHERE job = ? AND outcome IN ('ok', 'skipped')
ORDER BY id DESC
LIMIT 1;

-- name: ledger_counts
SELECT state, reason, count(*) AS rows FROM ledger GROUP BY state, reason ORDER BY state, reason;

-- name: dirty_backlog
SELECT count(*) FILTER (WHERE held_reason IS NULL) AS buckets,
       min(bucket_start) FILTER (WHERE held_reason IS NULL) AS oldest_start,
       count(*) FILTER (WHERE held_reason IS NOT NULL) AS held
FROM dirty_buckets WHERE bucket_start <= ?1;

-- name: insert_alert
INSERT INTO parity_alerts (meter, bucket_start, dedup_key, text, state, created_at)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (meter, bucket_start, dedup_key) DO NOTHING
RETURNING id;

-- name: create_schema_migrations
CREATE TABLE IF NOT EXISTS schema_migrations (
    name TEXT PRIMARY KEY, checksum TEXT NOT NULL, applied_at INTEGER NOT NULL);

-- name: schema_migrations
SELECT name, checksum FROM schema_migrations;

-- name: record_migration
INSERT INTO schema_migrations (name, checksum, applied_at) VALUES (?1, ?2, ?3);

-- name: provider_error_rows
-- The reported rows the provider has from us: sent, or attempted and not yet settled.
SELECT id, identifier, org_id, state, reason, detail FROM ledger
WHERE identifier IN (SELECT value FROM json_each(?1))
  AND (state = 'sent' OR (attempts > 0 AND state IN ('pending', 'held')))
ORDER BY id;

-- name: hold_provider_error
UPDATE ledger SET state = 'held', reason = 'provider_error', detail = ?2, updated_at = ?3,
                  claimed_by = NULL, claim_expires = NULL
WHERE id = ?1;

-- name: flag_customer
UPDATE orgs SET customer_error = ?2, updated_at = ?3 WHERE org_id = ?1;

-- name: touch_gauge_series
-- Ingest: a series' first point starts it at its bucket; every point stored marks it due
-- from its time (a point before `derived_to` is late).
INSERT INTO gauge_series (meter, org_id, series, derived_to, pending_from)
VALUES (?1, ?2, ?3, ?4, ?5)
ON CONFLICT (meter, org_id, series) DO UPDATE
SET pending_from = min(coalesce(pending_from, excluded.pending_from), excluded.pending_from);

-- name: insert_gauge_point
INSERT INTO gauge_points (meter, org_id, series, time_ms, ord, seq, mode, value, fields)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9);

-- name: due_gauge_series
-- ?1 until (a bucket start), ?2 until in ms, ?3 org or null, ?4 ?5 ?6 the key to start after.
SELECT meter, org_id, series, derived_to, folded_seq, level, fields, pending_from
FROM gauge_series
WHERE ((active AND derived_to < ?1) OR pending_from < ?2)
  AND (?3 IS NULL OR org_id = ?3)
  AND (meter, org_id, series) > (?4, ?5, ?6)
ORDER BY meter, org_id, series
LIMIT ?7;

-- name: gauge_batch_points
-- The points of each series (?1, a JSON array of [meter, org, series, from ms]) from its
-- `from` to ?2 (ms), by the series' position in ?1, in timeline order.
SELECT k.key AS idx, p.time_ms, p.ord, p.seq, p.mode, p.value, p.fields
FROM json_each(?1) k
CROSS JOIN gauge_points p
    ON p.meter = k.value ->> 0 AND p.org_id = k.value ->> 1 AND p.series = k.value ->> 2
   AND p.time_ms >= k.value ->> 3 AND p.time_ms < ?2
ORDER BY k.key, p.time_ms, p.ord;

-- name: update_gauge_series
-- The points from the new `derived_to` on are not folded: the earliest is due next.
UPDATE gauge_series
SET derived_to = ?4, folded_seq = ?5, level = ?6, fields = ?7, active = ?8,
    pending_from = (SELECT min(p.time_ms) FROM gauge_points p
                    WHERE p.meter = ?1 AND p.org_id = ?2 AND p.series = ?3
                      AND p.time_ms >= ?4 * 1000)
WHERE meter = ?1 AND org_id = ?2 AND series = ?3;

-- name: add_gauge_totals
INSERT INTO bucket_totals (org_id, meter, bucket_start, micros) VALUES (?1, ?2, ?3, ?4)
ON CONFLICT (meter, org_id, bucket_start) DO UPDATE SET micros = micros + excluded.micros;

-- name: gauge_series
SELECT meter, org_id, series, derived_to, folded_seq, level, fields, active
FROM gauge_series WHERE (?1 IS NULL OR meter = ?1)
ORDER BY meter, org_id, series;

-- name: untokened_events
-- Events of the given types (a JSON array) stored from ?2 (unix ms) on without a capability
-- token.
SELECT count(*) FROM usage_events
WHERE type IN (SELECT value FROM json_each(?1)) AND time_ms >= ?2 AND plan IS NULL;

-- name: ledger_quantities
SELECT org_id, meter, sum(quantity) AS quantity FROM ledger
WHERE bucket_start >= ?1 AND bucket_start < ?2
  AND NOT (state = 'excluded' AND reason IS 'free_plan')
  AND NOT (state = 'cancelled' AND reason IS 'reissued')
  AND offsets_id IS NULL  -- an offset moves no usage
GROUP BY org_id, meter
ORDER BY org_id, meter;

-- name: insert_money_run
INSERT INTO money_parity_runs (period_start, period_end, checked_at, currency, tolerance, orgs,
                               mismatches, only_controlplane, only_legacy, stripe_findings,
                               controlplane_minor, legacy_minor, clean)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
RETURNING id;

-- name: insert_money_org
INSERT INTO money_parity_orgs (run_id, org_id, controlplane_minor, legacy_minor, stripe_minor,
                               within_tolerance)
VALUES (?1, ?2, ?3, ?4, ?5, ?6);

-- name: money_runs
SELECT id, period_start, period_end, checked_at, currency, tolerance, orgs, mismatches,
       only_controlplane, only_legacy, stripe_findings, controlplane_minor, legacy_minor, clean
FROM money_parity_runs
ORDER BY period_start DESC, checked_at DESC, id DESC
LIMIT ?1;

-- name: money_run
SELECT id, period_start, period_end, checked_at, currency, tolerance, orgs, mismatches,
       only_controlplane, only_legacy, stripe_findings, controlplane_minor, legacy_minor, clean
FROM money_parity_runs WHERE id = ?1;

-- name: money_run_orgs
SELECT org_id, controlplane_minor, legacy_minor, stripe_minor, within_tolerance
FROM money_parity_orgs WHERE run_id = ?1 ORDER BY org_id;

-- name: insert_reconcile_run
INSERT INTO reconcile_runs (checked_at, start_at, end_at, org_id, customers, hours, units_short,
                            units_over, clean, findings)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
RETURNING id;

-- name: reconcile_runs
SELECT id, checked_at, start_at AS start, end_at AS "end", org_id, customers, hours, units_short,
       units_over, clean, findings
FROM reconcile_runs ORDER BY checked_at DESC, id DESC LIMIT ?1;

-- name: sent_cells
-- Units at the provider per (org, customer, meter, hour of the timestamp sent) in [?1, ?2):
-- rows sent, and rows an offset or a credit note handed back (the provider holds them still).
-- Rows a rollback cancelled count 0 but bring their cell (and customer) into the run, so a
-- cancel the provider did not apply shows as units over. ?3: one org's rows, or all (NULL).
SELECT org_id, attempt_customer AS customer, meter,
       attempt_timestamp - attempt_timestamp % 3600 AS hour,
       sum(CASE WHEN state = 'sent' OR reason IN ('offset', 'credited') THEN quantity
                ELSE 0 END) AS units,
       max(last_attempt_at) AS last_attempt_at
FROM ledger
WHERE state IN ('sent', 'cancelled')
  AND (state = 'sent' OR reason IN ('offset', 'credited', 'rolled_back'))
  AND attempt_timestamp >= ?1 AND attempt_timestamp < ?2
  AND attempt_customer IS NOT NULL AND (?3 IS NULL OR org_id = ?3)
GROUP BY org_id, attempt_customer, meter, attempt_timestamp - attempt_timestamp % 3600;

-- name: stamped_rows
-- The rows of one (org, meter) called for `customer` with a timestamp in [?4, ?5).
SELECT id, identifier, org_id, meter, bucket_start, bucket_end, revision, value_micros,
       quantity, state, reason, detail, attempts, first_attempt_at, provider_id,
       created_at, updated_at, sent_at, attempt_customer, attempt_timestamp, attempt_key,
       last_attempt_at, plan_source, offsets_id
FROM ledger
WHERE org_id = ?1 AND meter = ?2 AND attempt_customer = ?3
  AND attempt_timestamp >= ?4 AND attempt_timestamp < ?5
ORDER BY id;

-- name: move_row
-- A row moved by what the provider's books show, only from the state (and reason) it was
-- read in: ?6, ?7.
UPDATE ledger SET state = ?2, reason = ?3, detail = ?4, updated_at = ?5,
                  sent_at = CASE WHEN ?2 = 'sent' THEN coalesce(sent_at, ?5) ELSE sent_at END
WHERE id = ?1 AND state = ?6 AND coalesce(reason, '') = coalesce(?7, '')
RETURNING id;

-- name: batch_token_plans
-- Per dirty (org, bucket), the plans of the capability tokens its events carried (?1: the
-- bucket length); the newest issued wins.
SELECT b.org_id, b.bucket_start, e.plan, e.plan_issued_at
FROM temp.rollup_batch b
CROSS JOIN usage_events e
    ON e.org_id = b.org_id AND e.time_ms >= b.bucket_start * 1000
   AND e.time_ms < (b.bucket_start + ?1) * 1000
WHERE e.plan IS NOT NULL;
