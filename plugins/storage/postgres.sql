-- name: ping
SELECT 1;

-- name: advisory_xact_lock
SELECT pg_advisory_xact_lock($1);

-- name: advisory_xact_lock_shared
SELECT pg_advisory_xact_lock_shared($1);

-- name: advisory_lock
SELECT pg_advisory_lock($1);

-- name: try_advisory_lock
SELECT pg_try_advisory_lock($1);

-- name: advisory_unlock
SELECT pg_advisory_unlock($1);

-- name: get_setting
SELECT value FROM settings WHERE key = $1;

-- name: put_setting
INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING;

-- name: get_setting_for_update
SELECT value FROM settings WHERE key = $1 FOR UPDATE;

-- name: upsert_setting
INSERT INTO settings (key, value) VALUES ($1, $2)
ON CONFLICT (key) DO UPDATE SET value = excluded.value;

-- name: insert_events
-- Batch arrays in; the events not stored before come back (concurrent duplicates wait for
-- the other transaction, then are skipped).
INSERT INTO usage_events (source, event_id, type, org_id, time_ms, data, received_at, plan,
                          plan_issued_at)
SELECT s, e, t, o, ms, d, $7, p, pi
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[],
            $8::text[], $9::bigint[])
     AS b(s, e, t, o, ms, d, p, pi)
ON CONFLICT (source, event_id) DO NOTHING
RETURNING id, source, event_id;

-- name: insert_meter_values
INSERT INTO meter_values (event_pk, meter, org_id, bucket_start, micros)
SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::bigint[]);

-- name: add_bucket_totals
-- Sorted, so that concurrent batches lock the rows they share in one order.
INSERT INTO bucket_totals (org_id, bucket_start, meter, micros)
SELECT o, b, m, sum(v) FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[])
     AS t(o, b, m, v)
GROUP BY o, b, m
ORDER BY o, b, m
ON CONFLICT (org_id, bucket_start, meter)
DO UPDATE SET micros = bucket_totals.micros + excluded.micros
RETURNING org_id, bucket_start, meter, micros;

-- name: mark_dirty
INSERT INTO dirty_buckets (org_id, bucket_start, mark)
SELECT o, b, nextval('dirty_marks') FROM unnest($1::text[], $2::bigint[]) AS t(o, b)
ORDER BY o, b
ON CONFLICT (org_id, bucket_start) DO UPDATE SET mark = excluded.mark, held_reason = NULL;

-- name: usage
SELECT org_id, meter, bucket_start, micros AS value_micros
FROM bucket_totals
WHERE ($1::text IS NULL OR org_id = $1)
  AND ($2::text IS NULL OR meter = $2)
  AND ($3::bigint IS NULL OR bucket_start >= $3)
  AND ($4::bigint IS NULL OR bucket_start < $4)
ORDER BY org_id, meter, bucket_start;

-- name: closed_dirty
SELECT org_id, bucket_start, mark FROM dirty_buckets
WHERE bucket_start <= $1 AND ($2::text IS NULL OR org_id = $2) AND held_reason IS NULL
  AND ($4::text[] IS NULL
       OR EXISTS (SELECT 1 FROM org_plans p
                  WHERE p.org_id = dirty_buckets.org_id
                    AND p.effective_from <= dirty_buckets.bucket_start)
       OR org_id = ANY($4::text[]))
ORDER BY org_id, bucket_start
LIMIT $3;

-- name: unplanned_orgs
SELECT DISTINCT d.org_id FROM dirty_buckets d
WHERE d.bucket_start <= $1 AND d.held_reason IS NULL
  AND NOT EXISTS (SELECT 1 FROM org_plans p
                  WHERE p.org_id = d.org_id AND p.effective_from <= d.bucket_start)
ORDER BY d.org_id;

-- name: batch_totals
SELECT t.org_id, t.meter, t.bucket_start, t.micros AS value_micros
FROM unnest($1::text[], $2::bigint[]) AS b(org_id, bucket_start)
JOIN bucket_totals t ON t.org_id = b.org_id AND t.bucket_start = b.bucket_start;

-- name: batch_ledger
-- Per reason (the rounding chain the rows are in). An offset moves no usage (it takes a sent
-- row back at the provider): its value is not counted, its revision is.
SELECT l.org_id, l.meter, l.bucket_start, l.reason,
       sum(CASE WHEN l.offsets_id IS NULL THEN l.value_micros ELSE 0 END)::bigint AS value_micros,
       max(l.revision) AS revision
FROM unnest($1::text[], $2::bigint[]) AS b(org_id, bucket_start)
JOIN ledger l ON l.org_id = b.org_id AND l.bucket_start = b.bucket_start
WHERE NOT (l.state = 'cancelled' AND l.reason = 'reissued')  -- its usage is in the reissue
GROUP BY l.org_id, l.bucket_start, l.meter, l.reason;

-- name: batch_carries
SELECT org_id, meter, segment, exact_micros, quantity FROM carries WHERE org_id = ANY($1::text[]);

-- name: batch_orgs
SELECT o.org_id, o.customer, o.updated_at, p.plan, p.effective_from
FROM orgs o LEFT JOIN org_plans p ON p.org_id = o.org_id
WHERE o.org_id = ANY($1::text[])
ORDER BY o.org_id, p.effective_from;

-- name: insert_rows
INSERT INTO ledger (identifier, org_id, meter, bucket_start, bucket_end, revision,
                    value_micros, quantity, state, reason, plan_source, created_at, updated_at)
SELECT i, o, m, bs, be, r, v, q, s, rs, ps, $12, $12
FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::integer[],
            $7::bigint[], $8::bigint[], $9::text[], $10::text[], $11::text[])
     AS t(i, o, m, bs, be, r, v, q, s, rs, ps);

-- name: upsert_carries
INSERT INTO carries (org_id, meter, segment, exact_micros, quantity)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[])
ON CONFLICT (org_id, meter, segment) DO UPDATE SET exact_micros = excluded.exact_micros,
                                                   quantity = excluded.quantity;

-- name: hold_dirty
-- Only marks no ingest renewed since they were read.
UPDATE dirty_buckets d SET held_reason = b.reason
FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[]) AS b(org_id, bucket_start, mark, reason)
WHERE d.org_id = b.org_id AND d.bucket_start = b.bucket_start AND d.mark = b.mark;

-- name: clear_dirty
-- Only marks no ingest renewed since they were read, and not held.
DELETE FROM dirty_buckets d
USING unnest($1::text[], $2::bigint[], $3::bigint[]) AS b(org_id, bucket_start, mark)
WHERE d.org_id = b.org_id AND d.bucket_start = b.bucket_start AND d.mark = b.mark
  AND d.held_reason IS NULL;

-- name: ledger
SELECT id, identifier, org_id, meter, bucket_start, bucket_end, revision, value_micros,
       quantity, state, reason, detail, attempts, first_attempt_at, provider_id,
       created_at, updated_at, sent_at, attempt_customer, attempt_timestamp, attempt_key,
       last_attempt_at, plan_source, offsets_id
FROM ledger
WHERE ($1::text IS NULL OR org_id = $1)
  AND ($2::text IS NULL OR state = $2)
  AND ($3::bigint IS NULL OR bucket_start >= $3)
  AND ($4::bigint IS NULL OR bucket_start < $4)
  AND ($6::boolean IS NULL OR (attempts > 0) = $6)
  AND id > $7
ORDER BY id
LIMIT $5;

-- name: sendable
-- Claim transactions run one at a time (an advisory lock), so the lane test below is exact;
-- SKIP LOCKED passes over rows a settling transaction holds. `billed`: the row's bucket has
-- a sent row (asked only with $8, or for buckets before $9, T: past it the sender need not
-- know).
WITH picked AS (
    SELECT l.id FROM ledger l LEFT JOIN orgs o ON o.org_id = l.org_id
    WHERE l.id > $1
      AND (l.state = 'pending'
           OR (l.state = 'held' AND l.reason = 'no_customer' AND o.customer IS NOT NULL))
      AND l.offsets_id IS NULL  -- a rollback sends its offsets, and completes them
      AND ($3::text IS NULL OR l.org_id = $3)
      AND ($4::bigint IS NULL OR l.bucket_start < $4)
      AND ($8::boolean IS NULL OR EXISTS (  -- $8: only rows of buckets billed here
            SELECT 1 FROM ledger s
            WHERE s.org_id = l.org_id AND s.bucket_start = l.bucket_start
              AND s.state = 'sent' AND s.offsets_id IS NULL))
      AND NOT EXISTS (  -- a bucket a rollback's hand-back holds
            SELECT 1 FROM ledger h
            WHERE h.org_id = l.org_id AND h.bucket_start = l.bucket_start
              AND h.state = 'sent' AND h.offsets_id IS NULL AND h.claimed_by IS NOT NULL
              AND h.claimed_by <> $5 AND h.claim_expires > $6)
      AND NOT EXISTS (
            SELECT 1 FROM ledger c
            WHERE c.org_id = l.org_id AND c.meter = l.meter AND c.claimed_by IS NOT NULL
              AND c.claimed_by <> $5 AND c.claim_expires > $6)
    ORDER BY l.id
    LIMIT $2
    FOR UPDATE OF l SKIP LOCKED
)
UPDATE ledger l SET claimed_by = $5, claim_expires = $7
FROM picked
WHERE l.id = picked.id
RETURNING l.id, l.identifier, l.org_id, l.meter, l.bucket_start, l.bucket_end, l.revision,
          l.value_micros, l.quantity, l.state, l.reason, l.detail, l.attempts,
          l.first_attempt_at, l.provider_id, l.created_at, l.updated_at, l.sent_at,
          l.attempt_customer, l.attempt_timestamp, l.attempt_key, l.last_attempt_at,
          l.plan_source, (SELECT customer FROM orgs WHERE org_id = l.org_id) AS customer,
          CASE WHEN $8::boolean IS NOT NULL OR l.bucket_start < $9::bigint THEN EXISTS (
              SELECT 1 FROM ledger s
              WHERE s.org_id = l.org_id AND s.bucket_start = l.bucket_start
                AND s.state = 'sent' AND s.offsets_id IS NULL) ELSE false END AS billed;

-- name: release_claims
UPDATE ledger SET claimed_by = NULL, claim_expires = NULL WHERE claimed_by = $1;

-- name: seam
-- Rows the provider has, or had: sent, attempted, or cancelled by a rollback.
SELECT count(*) FILTER (WHERE state IN ('sent', 'cancelled') OR attempts > 0) AS reached,
       count(*) FILTER (WHERE state = 'excluded' AND reason = 'before_bill_from') AS excluded
FROM ledger WHERE bucket_start >= $1;

-- name: billed_ranges
-- Per org, the runs of consecutive buckets in [$1, $2) with a row in state `sent` (any meter;
-- not an offset),
-- each as [start, end): within a run, a bucket's start less $3 (the bucket size) times its
-- rank in the org is the same number (gaps and islands).
WITH billed AS (
    SELECT DISTINCT org_id, bucket_start FROM ledger
    WHERE state = 'sent' AND offsets_id IS NULL  -- an offset hands its bucket back
      AND bucket_start >= $1::bigint AND bucket_start < $2::bigint
      AND ($4::text IS NULL OR org_id = $4)
), runs AS (
    SELECT org_id, bucket_start,
           bucket_start - $3::bigint * row_number() OVER (PARTITION BY org_id
                                                          ORDER BY bucket_start) AS run
    FROM billed
)
SELECT org_id, min(bucket_start) AS start, max(bucket_start) + $3::bigint AS "end"
FROM runs
GROUP BY org_id, run
ORDER BY org_id, start;

-- name: record_attempts
-- $5, $6, $7: each row's customer, timestamp and idempotency key for this call (nulls: kept).
UPDATE ledger l SET attempts = l.attempts + 1,
                    first_attempt_at = coalesce(l.first_attempt_at, $2),
                    last_attempt_at = $2, updated_at = $2,
                    attempt_customer = coalesce(s.customer, l.attempt_customer),
                    attempt_timestamp = coalesce(s.ts, l.attempt_timestamp),
                    attempt_key = coalesce(s.key, l.attempt_key),
                    claim_expires = CASE WHEN $3::text IS NULL THEN l.claim_expires ELSE $4 END
FROM unnest($1::bigint[], $5::text[], $6::bigint[], $7::text[]) AS s(id, customer, ts, key)
WHERE l.id = s.id AND ($3::text IS NULL OR l.claimed_by = $3)
RETURNING l.id, l.quantity;

-- name: release_attempts
-- Calls not made: back to never attempted when it was the only one.
UPDATE ledger SET attempts = attempts - 1,
                  first_attempt_at = CASE WHEN attempts = 1 THEN NULL ELSE first_attempt_at END,
                  last_attempt_at = CASE WHEN attempts = 1 THEN NULL ELSE last_attempt_at END,
                  attempt_customer = CASE WHEN attempts = 1 THEN NULL ELSE attempt_customer END,
                  attempt_timestamp = CASE WHEN attempts = 1 THEN NULL ELSE attempt_timestamp END,
                  attempt_key = CASE WHEN attempts = 1 THEN NULL ELSE attempt_key END
WHERE id = ANY($1::bigint[]) AND attempts > 0 AND state IN ('pending', 'held');

-- name: settleable
SELECT id FROM ledger
WHERE id = ANY($1::bigint[]) AND state IN ('pending', 'held')
  AND coalesce(reason, '') NOT IN ('provider_error', 'provider_missing')
ORDER BY id
FOR UPDATE;

-- name: settle_rows
UPDATE ledger l SET state = t.state, reason = t.reason, detail = t.detail,
                    provider_id = coalesce(t.provider_id, l.provider_id), sent_at = t.sent_at,
                    updated_at = $7, claimed_by = NULL, claim_expires = NULL
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[])
     AS t(id, state, reason, detail, provider_id, sent_at)
WHERE l.id = t.id AND l.state IN ('pending', 'held')
  AND coalesce(l.reason, '') NOT IN ('provider_error', 'provider_missing');

-- name: row_chains
SELECT DISTINCT org_id, meter FROM ledger WHERE id = ANY($1::bigint[]) ORDER BY org_id, meter;

-- name: chain_rows
-- `held`: another live claimant holds the row; it may be about to send its quantity.
SELECT id, value_micros, quantity, state, reason, attempts, offsets_id,
       coalesce(claimed_by <> $3 AND claim_expires > $4, false) AS held
FROM ledger
WHERE org_id = $1 AND meter = $2
ORDER BY id
FOR UPDATE;

-- name: set_quantities
UPDATE ledger l SET quantity = t.q, updated_at = $3
FROM unnest($1::bigint[], $2::bigint[]) AS t(id, q)
WHERE l.id = t.id;

-- name: cancellable
-- Sent rows, and rows attempted without a definite answer (the provider may have them).
SELECT id, identifier, quantity, state FROM ledger
WHERE id = ANY($1::bigint[])
  AND (state = 'sent' OR (attempts > 0 AND state IN ('pending', 'held')))
  AND offsets_id IS NULL  -- cancelling an offset would bill its row again
ORDER BY id
FOR UPDATE;

-- name: cancel_rows
UPDATE ledger SET state = 'cancelled', reason = $2, detail = $3, updated_at = $4
WHERE id = ANY($1::bigint[])
  AND (state = 'sent' OR (attempts > 0 AND state IN ('pending', 'held'))
       OR (state = 'cancelled' AND reason = 'rolled_back'))
  AND offsets_id IS NULL;

-- name: late_rows
SELECT id, identifier, org_id, meter, bucket_start, bucket_end, revision, value_micros,
       quantity, state, reason, detail, attempts, first_attempt_at, provider_id,
       created_at, updated_at, sent_at, attempt_customer, attempt_timestamp, attempt_key,
       last_attempt_at, plan_source, offsets_id
FROM ledger
WHERE org_id = $1 AND state = 'sent' AND bucket_start < $3
  AND coalesce(attempt_timestamp, bucket_start) >= $2
  AND coalesce(attempt_timestamp, bucket_start) < $3
  -- every attempt after the finalization, or the one accepted (it arrived then) after it
  AND (first_attempt_at >= $4 OR (provider_id IS NOT NULL AND last_attempt_at >= $4))
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
WHERE org_id = $1 AND state = 'sent' AND bucket_start < $3
  AND coalesce(attempt_timestamp, bucket_start) >= $2
  AND coalesce(attempt_timestamp, bucket_start) < $3
  AND first_attempt_at < $4 AND last_attempt_at >= $4 AND provider_id IS NULL
  AND offsets_id IS NULL
ORDER BY id;

-- name: reissuable
-- Sent rows, rows held for a provider error (reported invalid: never counted there), and
-- with $2, rows a rollback cancelled at the provider (billed again: their bucket stays here).
SELECT id, identifier, state, org_id, meter, bucket_start, bucket_end, value_micros, quantity,
       plan_source,
       (SELECT max(r.revision) FROM ledger r
        WHERE r.org_id = l.org_id AND r.meter = l.meter AND r.bucket_start = l.bucket_start)
       AS last_revision
FROM ledger l
WHERE id = ANY($1::bigint[])
  AND (state = 'sent' OR (state = 'held' AND reason IN ('provider_error', 'provider_missing'))
       OR ($2::boolean AND state = 'cancelled' AND reason = 'rolled_back' AND attempts > 0))
  AND offsets_id IS NULL
ORDER BY id
FOR UPDATE;

-- name: insert_reissue
INSERT INTO ledger (identifier, org_id, meter, bucket_start, bucket_end, revision,
                    value_micros, quantity, state, detail, created_at, updated_at, plan_source)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending', $9, $10, $10, $11);

-- name: offsettable
-- Sent rows that reached the provider (an attempt was made) with no offset but undone ones;
-- an offset itself is offset only to undo it.
SELECT id, identifier, state, org_id, meter, bucket_start, bucket_end, value_micros, quantity,
       attempt_customer, attempt_timestamp,
       (SELECT max(r.revision) FROM ledger r
        WHERE r.org_id = l.org_id AND r.meter = l.meter AND r.bucket_start = l.bucket_start)
       AS last_revision
FROM ledger l
WHERE id = ANY($1::bigint[]) AND state = 'sent' AND attempts > 0
  AND NOT EXISTS (SELECT 1 FROM ledger o WHERE o.offsets_id = l.id AND o.state <> 'cancelled')
ORDER BY id
FOR UPDATE;

-- name: insert_offset
-- It is called as its row was: the same customer and timestamp (the same hour, the same
-- billing period), under its own identifier.
INSERT INTO ledger (identifier, org_id, meter, bucket_start, bucket_end, revision,
                    value_micros, quantity, state, detail, offsets_id, created_at, updated_at,
                    attempt_customer, attempt_timestamp, attempt_key)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending', $9, $10,
        $11, $11, $12, $13, $1)
RETURNING id, identifier, org_id, meter, bucket_start, bucket_end, revision, value_micros,
          quantity, state, reason, detail, attempts, first_attempt_at, provider_id,
          created_at, updated_at, sent_at, attempt_customer, attempt_timestamp, attempt_key,
          last_attempt_at, plan_source, offsets_id;

-- name: pending_offsets
-- Offsetting rows still pending, with the row each offsets (still sent).
SELECT o.id, o.identifier, o.quantity, o.offsets_id, r.identifier AS original,
       r.offsets_id AS undoes  -- set when the offset undoes an offset
FROM ledger o JOIN ledger r ON r.id = o.offsets_id
WHERE o.id = ANY($1::bigint[]) AND o.state = 'pending' AND r.state = 'sent'
ORDER BY o.id
FOR UPDATE OF o, r;

-- name: offset_target
-- The row a taken offset takes off: handed back, only while it is still sent.
UPDATE ledger SET state = 'cancelled', reason = 'offset', detail = $2, updated_at = $3
WHERE id = $1 AND state = 'sent' AND offsets_id IS NULL
RETURNING id;

-- name: cancel_offset
-- An offset undone by its own offset: it no longer takes its row off the provider's total.
UPDATE ledger SET state = 'cancelled', reason = 'offset', detail = $2, updated_at = $3
WHERE id = $1 AND state = 'sent' AND offsets_id IS NOT NULL
RETURNING id;

-- name: reinstate_offset
-- The row an undone offset took off is billed here again.
UPDATE ledger SET state = 'sent', reason = NULL, detail = $2, updated_at = $3
WHERE id = $1 AND state = 'cancelled' AND reason = 'offset'
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
WHERE claimed_by IS NOT NULL AND claim_expires > $1 AND claimed_by <> coalesce($2, '');

-- name: held_by_others
-- Sent rows another live claimant holds: only a hand-back holds sent rows.
SELECT count(*) AS held FROM ledger
WHERE state = 'sent' AND offsets_id IS NULL AND claimed_by IS NOT NULL
  AND claimed_by <> $1 AND claim_expires > $2;

-- name: hold_billed_buckets
-- A rollback's hand-back holds every bucket billed here (its sent rows): no sender takes a row
-- of one until the hand-back ends (a correction sent meanwhile would split the bucket).
UPDATE ledger SET claimed_by = $1, claim_expires = $2
WHERE state = 'sent' AND offsets_id IS NULL
  AND (claimed_by IS NULL OR claim_expires <= $3 OR claimed_by = $1);

-- name: get_org
SELECT org_id, customer, updated_at, subscription, subscription_status, customer_error
FROM orgs WHERE org_id = $1;

-- name: org_plans
SELECT plan, effective_from FROM org_plans WHERE org_id = $1 ORDER BY effective_from;

-- name: upsert_org
INSERT INTO orgs (org_id, customer, updated_at) VALUES ($1, $2, $3)
ON CONFLICT (org_id) DO UPDATE SET customer = coalesce(excluded.customer, orgs.customer),
                                   customer_error = CASE WHEN excluded.customer IS NULL
                                                         THEN orgs.customer_error END,
                                   updated_at = excluded.updated_at;

-- name: release_org_buckets
-- The org's plan changed: the rollup tries the buckets it held (an unknown plan) again. Every
-- one of the org's dirty buckets gets a new mark, as ingest gives one: a rollup step that read
-- the plan before this commits neither holds nor clears them (its marks no longer match), so
-- the next step rolls them up with the new plan.
UPDATE dirty_buckets SET held_reason = NULL, mark = nextval('dirty_marks') WHERE org_id = $1;

-- name: upsert_plan
INSERT INTO org_plans (org_id, effective_from, plan) VALUES ($1, $2, $3)
ON CONFLICT (org_id, effective_from) DO UPDATE SET plan = excluded.plan;

-- name: org_subscription_statuses
-- Orgs with a provider subscription, by its status.
SELECT subscription_status AS status, COUNT(*) AS orgs FROM orgs
WHERE subscription_status IS NOT NULL
GROUP BY subscription_status ORDER BY subscription_status;

-- name: plan_orgs_without_customer
-- Orgs whose plan in force at $2 is $1 and that have no provider customer.
SELECT o.org_id FROM orgs o
WHERE o.customer IS NULL
  AND (SELECT p.plan FROM org_plans p WHERE p.org_id = o.org_id AND p.effective_from <= $2
       ORDER BY p.effective_from DESC LIMIT 1) = $1
ORDER BY o.org_id;

-- name: runtime_flags
SELECT name, value, version, updated_at FROM flags;

-- name: flag_versions
SELECT name, version FROM flags;

-- name: upsert_flag
INSERT INTO flags (name, value, version, updated_at) VALUES ($1, $2, $3, $4)
ON CONFLICT (name) DO UPDATE SET value = excluded.value, version = excluded.version,
                                 updated_at = excluded.updated_at;

-- name: last_audit_hash
SELECT hash FROM audit_log ORDER BY id DESC LIMIT 1;

-- name: insert_audit
INSERT INTO audit_log (at, action, subject, actor, reason, before, after, forced, group_id,
                       prev_hash, hash, signature)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12);

-- name: audit_log
SELECT id, at, action, subject, actor, reason, before, after, forced, group_id, prev_hash, hash,
       signature
FROM audit_log
WHERE ($1::text IS NULL OR starts_with(action, $1))
ORDER BY id DESC
LIMIT $2;

-- name: audit_chain
SELECT id, at, action, subject, actor, reason, before, after, forced, group_id, prev_hash, hash,
       signature
FROM audit_log WHERE id > $1 ORDER BY id LIMIT $2;

-- name: insert_job_run
INSERT INTO job_runs (job, started_at, ended_at, outcome, counts, error)
VALUES ($1, $2, $3, $4, $5, $6);

-- name: job_runs
SELECT job, started_at, ended_at, outcome, counts, error FROM job_runs
WHERE ($1::text IS NULL OR job = $1)
ORDER BY id DESC
LIMIT $2;

-- name: usage_by_org
-- numeric: a window's sum may pass 2^63 - 1 (ten buckets at the bound do)
SELECT org_id, sum(micros) AS micros FROM bucket_totals
WHERE meter = $1 AND bucket_start >= $2 AND bucket_start < $3
GROUP BY org_id;

-- name: insert_parity_run
INSERT INTO parity_runs (meter, bucket_start, bucket_end, checked_at, orgs, mismatches, material,
                         controlplane_micros, legacy_micros, worst_org, worst_drift_micros,
                         worst_relative, clean, alarming, alarm_since)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
ON CONFLICT (meter, bucket_start) DO NOTHING
RETURNING id;

-- name: insert_parity_mismatch
INSERT INTO parity_mismatches (run_id, org_id, controlplane_micros, legacy_micros)
VALUES ($1, $2, $3, $4);

-- name: parity_runs
SELECT id, meter, bucket_start, bucket_end, checked_at, orgs, mismatches, material,
       controlplane_micros, legacy_micros, worst_org, worst_drift_micros, worst_relative,
       clean, alarming, alarm_since
FROM parity_runs
WHERE meter = $1
  AND ($2::bigint IS NULL OR bucket_start >= $2)
  AND ($3::bigint IS NULL OR bucket_start < $3)
ORDER BY bucket_start DESC
LIMIT $4;

-- name: parity_run
SELECT id, meter, bucket_start, bucket_end, checked_at, orgs, mismatches, material,
       controlplane_micros, legacy_micros, worst_org, worst_drift_micros, worst_relative,
       clean, alarming, alarm_since
FROM parity_runs WHERE id = $1;

-- name: parity_run_mismatches
SELECT org_id, controlplane_micros, legacy_micros FROM parity_mismatches
WHERE run_id = $1 ORDER BY org_id;

-- name: parity_clean_tail
SELECT bucket_start FROM parity_runs
WHERE meter = $1 AND clean
  AND bucket_start > coalesce(
        (SELECT max(bucket_start) FROM parity_runs WHERE meter = $1 AND NOT clean), -1)
ORDER BY bucket_start DESC;

-- name: parity_alerts
SELECT id, meter, bucket_start, dedup_key, text, state, created_at, attempts, sent_at, error
FROM parity_alerts
WHERE meter = $1
  AND ($2::bigint IS NULL OR created_at >= $2)
  AND ($3::text[] IS NULL OR state = ANY($3::text[]))
ORDER BY id DESC
LIMIT $4;

-- name: update_parity_alert
UPDATE parity_alerts SET state = $1, attempts = $2, sent_at = $3, error = $4 WHERE id = $5;

-- name: org_subscription
SELECT subscription, subscription_status FROM orgs WHERE org_id = $1;

-- name: org_by_subscription
SELECT org_id FROM orgs WHERE subscription = $1 LIMIT 1;

-- name: customer_owner
SELECT org_id FROM orgs WHERE customer = $1 AND org_id <> $2 LIMIT 1;

-- name: org_by_customer
SELECT org_id FROM orgs WHERE customer = $1 ORDER BY updated_at DESC LIMIT 1;

-- name: set_org_subscription
UPDATE orgs SET subscription = $1, subscription_status = $2, updated_at = $3 WHERE org_id = $4;

-- name: latest_catalog
SELECT version, published_at, actor, digest, catalog FROM catalog_versions
ORDER BY version DESC LIMIT 1;

-- name: catalog_version
SELECT version, published_at, actor, digest, catalog FROM catalog_versions WHERE version = $1;

-- name: insert_catalog
INSERT INTO catalog_versions (version, published_at, actor, digest, catalog)
VALUES ((SELECT coalesce(max(version), 0) + 1 FROM catalog_versions), $1, $2, $3, $4)
RETURNING version;

-- name: webhook_event
SELECT outcome FROM webhook_events WHERE event_id = $1;

-- name: insert_webhook_event
INSERT INTO webhook_events (event_id, type, created, processed_at, outcome)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id;

-- name: insert_closed_period
INSERT INTO closed_periods (invoice_id, org_id, period_start, period_end, finalized_at)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (invoice_id) DO NOTHING;

-- name: closed_periods
SELECT invoice_id, org_id, period_start, period_end, finalized_at FROM closed_periods
WHERE org_id = ANY($1::text[])
ORDER BY org_id, period_start;

-- name: last_job_success
SELECT ended_at FROM job_runs
WHERE job = $1 AND outcome IN ('ok', 'skipped')
ORDER BY id DESC
LIMIT 1;

-- name: ledger_counts
SELECT state, reason, count(*) AS rows FROM ledger GROUP BY state, reason ORDER BY state, reason;

-- name: dirty_backlog
SELECT count(*) FILTER (WHERE held_reason IS NULL) AS buckets,
       min(bucket_start) FILTER (WHERE held_reason IS NULL) AS oldest_start,
       count(*) FILTER (WHERE held_reason IS NOT NULL) AS held
FROM dirty_buckets WHERE bucket_start <= $1;

-- name: insert_alert
INSERT INTO parity_alerts (meter, bucket_start, dedup_key, text, state, created_at)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (meter, bucket_start, dedup_key) DO NOTHING
RETURNING id;

-- name: create_schema_migrations
CREATE TABLE IF NOT EXISTS schema_migrations (
    name text PRIMARY KEY, checksum text NOT NULL, applied_at bigint NOT NULL);

-- name: schema_migrations
SELECT name, checksum FROM schema_migrations;

-- name: record_migration
INSERT INTO schema_migrations (name, checksum, applied_at) VALUES ($1, $2, $3);

-- name: provider_error_rows
-- The reported rows the provider has from us: sent, or attempted and not yet settled.
SELECT id, identifier, org_id, state, reason, detail FROM ledger
WHERE identifier = ANY($1::text[])
  AND (state = 'sent' OR (attempts > 0 AND state IN ('pending', 'held')))
ORDER BY id
FOR UPDATE;

-- name: hold_provider_error
UPDATE ledger SET state = 'held', reason = 'provider_error', detail = $2, updated_at = $3,
                  claimed_by = NULL, claim_expires = NULL
WHERE id = $1;

-- name: flag_customer
UPDATE orgs SET customer_error = $2, updated_at = $3 WHERE org_id = $1;

-- name: touch_gauge_series
-- Ingest, before it stores the points: a series' first point starts it at its bucket; every
-- point marks it due from its time (a point before `derived_to` is late). Sorted, so that
-- concurrent batches and the derivation lock series rows in one order.
INSERT INTO gauge_series (meter, org_id, series, derived_to, pending_from)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[])
     AS u(m, o, s, d, t)
ORDER BY m, o, s
ON CONFLICT (meter, org_id, series) DO UPDATE
SET pending_from = LEAST(gauge_series.pending_from, excluded.pending_from);

-- name: insert_gauge_point
INSERT INTO gauge_points (meter, org_id, series, time_ms, ord, mode, value, fields)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[],
                     $7::text[], $8::text[]);

-- name: due_gauge_series
-- Locks the rows taken: an ingest storing points of one of them waits for the derivation.
SELECT meter, org_id, series, derived_to, folded_seq, level, fields, pending_from
FROM gauge_series
WHERE ((active AND derived_to < $1) OR pending_from < $2)
  AND ($3::text IS NULL OR org_id = $3)
  AND (meter, org_id, series) > ($4::text, $5::text, $6::text)
ORDER BY meter, org_id, series
LIMIT $7
FOR UPDATE;

-- name: gauge_batch_points
-- The points of each series from its `from` to $5 (ms), by the series' position (from 0) in
-- the arrays, in timeline order.
SELECT k.idx - 1 AS idx, p.time_ms, p.ord, p.seq, p.mode, p.value, p.fields
FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) WITH ORDINALITY AS k(m, o, s, f, idx)
JOIN gauge_points p ON p.meter = k.m AND p.org_id = k.o AND p.series = k.s
                   AND p.time_ms >= k.f AND p.time_ms < $5
ORDER BY k.idx, p.time_ms, p.ord COLLATE "C";

-- name: update_gauge_series
UPDATE gauge_series g
SET derived_to = u.d, folded_seq = u.q, level = u.l, fields = u.f, active = u.a,
    pending_from = (SELECT min(p.time_ms) FROM gauge_points p
                    WHERE p.meter = u.m AND p.org_id = u.o AND p.series = u.s
                      AND p.time_ms >= u.d * 1000)
FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::text[],
            $7::text[], $8::boolean[]) AS u(m, o, s, d, q, l, f, a)
WHERE g.meter = u.m AND g.org_id = u.o AND g.series = u.s;

-- name: add_gauge_totals
-- Sorted by the caller in ingest's order (org, bucket, meter).
INSERT INTO bucket_totals (org_id, meter, bucket_start, micros)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])
ON CONFLICT (org_id, bucket_start, meter)
DO UPDATE SET micros = bucket_totals.micros + excluded.micros;

-- name: gauge_series
SELECT meter, org_id, series, derived_to, folded_seq, level, fields, active
FROM gauge_series WHERE ($1::text IS NULL OR meter = $1)
ORDER BY meter, org_id, series;

-- name: untokened_events
-- Events of the given types stored from $2 (unix ms) on without a capability token.
SELECT count(*) FROM usage_events WHERE type = ANY($1::text[]) AND time_ms >= $2 AND plan IS NULL;

-- name: ledger_quantities
SELECT org_id, meter, sum(quantity)::bigint AS quantity FROM ledger
WHERE bucket_start >= $1 AND bucket_start < $2
  AND NOT (state = 'excluded' AND reason IS NOT DISTINCT FROM 'free_plan')
  AND NOT (state = 'cancelled' AND reason IS NOT DISTINCT FROM 'reissued')
  AND offsets_id IS NULL  -- an offset moves no usage
GROUP BY org_id, meter
ORDER BY org_id, meter;

-- name: insert_money_run
INSERT INTO money_parity_runs (period_start, period_end, checked_at, currency, tolerance, orgs,
                               mismatches, only_controlplane, only_legacy, stripe_findings,
                               controlplane_minor, legacy_minor, clean)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
RETURNING id;

-- name: insert_money_org
INSERT INTO money_parity_orgs (run_id, org_id, controlplane_minor, legacy_minor, stripe_minor,
                               within_tolerance)
VALUES ($1, $2, $3, $4, $5, $6);

-- name: money_runs
SELECT id, period_start, period_end, checked_at, currency, tolerance, orgs, mismatches,
       only_controlplane, only_legacy, stripe_findings, controlplane_minor, legacy_minor, clean
FROM money_parity_runs
ORDER BY period_start DESC, checked_at DESC, id DESC
LIMIT $1;

-- name: money_run
SELECT id, period_start, period_end, checked_at, currency, tolerance, orgs, mismatches,
       only_controlplane, only_legacy, stripe_findings, controlplane_minor, legacy_minor, clean
FROM money_parity_runs WHERE id = $1;

-- name: money_run_orgs
SELECT org_id, controlplane_minor, legacy_minor, stripe_minor, within_tolerance
FROM money_parity_orgs WHERE run_id = $1 ORDER BY org_id;

-- name: insert_reconcile_run
INSERT INTO reconcile_runs (checked_at, start_at, end_at, org_id, customers, hours, units_short,
                            units_over, clean, findings)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
RETURNING id;

-- name: reconcile_runs
SELECT id, checked_at, start_at AS start, end_at AS "end", org_id, customers, hours, units_short,
       units_over, clean, findings
FROM reconcile_runs ORDER BY checked_at DESC, id DESC LIMIT $1;

-- name: sent_cells
-- Units at the provider per (org, customer, meter, hour of the timestamp sent) in [$1, $2):
-- rows sent, and rows an offset or a credit note handed back (the provider holds them still).
-- Rows a rollback cancelled count 0 but bring their cell (and customer) into the run, so a
-- cancel the provider did not apply shows as units over. $3: one org's rows, or all (NULL).
SELECT org_id, attempt_customer AS customer, meter,
       attempt_timestamp - attempt_timestamp % 3600 AS hour,
       sum(CASE WHEN state = 'sent' OR reason IN ('offset', 'credited') THEN quantity
                ELSE 0 END)::bigint AS units,
       max(last_attempt_at) AS last_attempt_at
FROM ledger
WHERE state IN ('sent', 'cancelled')
  AND (state = 'sent' OR reason IN ('offset', 'credited', 'rolled_back'))
  AND attempt_timestamp >= $1 AND attempt_timestamp < $2
  AND attempt_customer IS NOT NULL AND ($3::text IS NULL OR org_id = $3)
GROUP BY org_id, attempt_customer, meter, attempt_timestamp - attempt_timestamp % 3600;

-- name: stamped_rows
-- The rows of one (org, meter) called for `customer` with a timestamp in [$4, $5).
SELECT id, identifier, org_id, meter, bucket_start, bucket_end, revision, value_micros,
       quantity, state, reason, detail, attempts, first_attempt_at, provider_id,
       created_at, updated_at, sent_at, attempt_customer, attempt_timestamp, attempt_key,
       last_attempt_at, plan_source, offsets_id
FROM ledger
WHERE org_id = $1 AND meter = $2 AND attempt_customer = $3
  AND attempt_timestamp >= $4 AND attempt_timestamp < $5
ORDER BY id;

-- name: move_row
-- A row moved by what the provider's books show, only from the state (and reason) it was
-- read in: $6, $7.
UPDATE ledger SET state = $2, reason = $3, detail = $4, updated_at = $5,
                  sent_at = CASE WHEN $2 = 'sent' THEN coalesce(sent_at, $5) ELSE sent_at END
WHERE id = $1 AND state = $6 AND coalesce(reason, '') = coalesce($7, '')
RETURNING id;

-- name: batch_token_plans
-- Per dirty (org, bucket), the plans of the capability tokens its events carried ($3: the
-- bucket length); the newest issued wins.
SELECT b.org_id, b.bucket_start, e.plan, e.plan_issued_at
FROM unnest($1::text[], $2::bigint[]) AS b(org_id, bucket_start)
JOIN usage_events e
  ON e.org_id = b.org_id AND e.time_ms >= b.bucket_start * 1000
 AND e.time_ms < (b.bucket_start + $3) * 1000
WHERE e.plan IS NOT NULL;
