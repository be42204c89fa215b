-- Offsets (issue 23): a rollback hands a sent row back to the legacy biller, past the
-- provider's cancel window, by sending an offsetting row (its negative) into the same open
-- billing period. The offsetting row names the row it offsets.
ALTER TABLE ledger ADD COLUMN offsets_id bigint REFERENCES ledger (id);
CREATE INDEX ledger_offsets ON ledger (offsets_id) WHERE offsets_id IS NOT NULL;
