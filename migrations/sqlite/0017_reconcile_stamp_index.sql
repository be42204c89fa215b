-- The reconciler reads the units sent per hour of the timestamp sent (issue 17): an index on
-- the sent rows' timestamps, so a run reads its window, not every sent row.
CREATE INDEX ledger_sent_stamp ON ledger (attempt_timestamp) WHERE state = 'sent';
