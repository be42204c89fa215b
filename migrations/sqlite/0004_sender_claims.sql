-- Sender claims: which sender holds a ledger row, and until when (see controlplane/sender.py).

ALTER TABLE ledger ADD COLUMN claimed_by TEXT;
ALTER TABLE ledger ADD COLUMN claim_expires INTEGER;
CREATE INDEX ledger_claims ON ledger (org_id, meter) WHERE claimed_by IS NOT NULL;
CREATE INDEX ledger_claimants ON ledger (claimed_by) WHERE claimed_by IS NOT NULL;
