-- Ledger rows by (state, reason): /metrics counts them per scrape from the index alone.

DROP INDEX ledger_by_state;
CREATE INDEX ledger_by_state ON ledger (state, reason, id);
