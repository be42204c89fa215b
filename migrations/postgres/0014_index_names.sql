-- The two backends build one schema (tests/contract/test_schema_parity.py): the index of
-- bucket totals by meter and bucket takes SQLite's name, and the sender's lane test (rows
-- another claimant holds in an org's meter) gets SQLite's partial index.
ALTER INDEX bucket_totals_by_meter RENAME TO bucket_totals_by_bucket;
CREATE INDEX ledger_claims ON ledger (org_id, meter) WHERE claimed_by IS NOT NULL;
