-- A closed bucket the rollup cannot fold (a total stored before ingest refused totals past
-- the bound) keeps its dirty mark with the reason, and the rollup passes it by until ingest
-- marks it dirty again.
ALTER TABLE dirty_buckets ADD COLUMN held_reason TEXT;
