-- What a row was last attempted with: the customer, timestamp and idempotency key of its
-- series of attempts (a retry repeats them, even after the org's customer changed), and when.
-- A retry whose timestamp lies in a period finalized since is re-stamped into the current one,
-- under a key of its own, only when every attempt came before that invoice was finalized.
ALTER TABLE ledger ADD COLUMN attempt_customer TEXT;
ALTER TABLE ledger ADD COLUMN attempt_timestamp INTEGER;
ALTER TABLE ledger ADD COLUMN attempt_key TEXT;
ALTER TABLE ledger ADD COLUMN last_attempt_at INTEGER;
