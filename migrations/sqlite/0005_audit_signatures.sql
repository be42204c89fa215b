-- Signatures of audit records: "<algorithm>:<hex>" over the record's hash (see controlplane/audit.py).

ALTER TABLE audit_log ADD COLUMN signature TEXT;
