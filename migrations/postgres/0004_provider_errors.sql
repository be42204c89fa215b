-- Asynchronous provider errors (Stripe's meter-event error reports): sampled rows are found by
-- identifier and held as `provider_error` (the code in `detail`); an org whose customer the
-- provider did not find is flagged until its customer is set again.
ALTER TABLE orgs ADD COLUMN customer_error TEXT;
CREATE INDEX ledger_by_identifier ON ledger (identifier);
