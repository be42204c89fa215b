-- The reconciler reads the units at the provider per hour of the timestamp sent (issue 17):
-- an index on the timestamps of the rows it counts (sent, and cancelled by an offset), so a
-- run reads its window, not every row.
CREATE INDEX ledger_sent_stamp ON ledger (attempt_timestamp) WHERE state IN ('sent', 'cancelled');
