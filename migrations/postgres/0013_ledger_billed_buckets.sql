-- A bucket with a sent row is billed here, whole (the seam): its corrections are sent by the
-- control plane whatever the flags say since (a rollback that kept it, a later T). The
-- sender asks, per row it reads, whether its bucket has one.
CREATE INDEX ledger_billed_buckets ON ledger (org_id, bucket_start)
    WHERE state = 'sent' AND offsets_id IS NULL;
