-- The ledger rebuilt with its state check written as comparisons: SQLite evaluates a CHECK
-- with an IN list by building a temporary index for every row written, which cost the rollup
-- about a second per 240,000 rows. Same columns, constraints and indexes as before.

CREATE TABLE ledger_rebuilt (
    id               INTEGER PRIMARY KEY,
    identifier       TEXT    NOT NULL,  -- a function of the unique key below (meters.METER_NAME)
    org_id           TEXT    NOT NULL,
    meter            TEXT    NOT NULL,
    bucket_start     INTEGER NOT NULL,
    bucket_end       INTEGER NOT NULL,
    revision         INTEGER NOT NULL,
    value_micros     INTEGER NOT NULL,
    quantity         INTEGER NOT NULL,
    state            TEXT    NOT NULL CHECK (state = 'pending' OR state = 'sent' OR state = 'held'
                                             OR state = 'excluded' OR state = 'cancelled'),
    reason           TEXT,
    detail           TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    first_attempt_at INTEGER,
    provider_id      TEXT,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    sent_at          INTEGER,
    claimed_by       TEXT,
    claim_expires    INTEGER,
    UNIQUE (org_id, meter, bucket_start, revision),
    CHECK (state = 'pending' OR state = 'sent' OR reason IS NOT NULL)
);

INSERT INTO ledger_rebuilt (id, identifier, org_id, meter, bucket_start, bucket_end, revision,
                            value_micros, quantity, state, reason, detail, attempts,
                            first_attempt_at, provider_id, created_at, updated_at, sent_at,
                            claimed_by, claim_expires)
SELECT id, identifier, org_id, meter, bucket_start, bucket_end, revision, value_micros, quantity,
       state, reason, detail, attempts, first_attempt_at, provider_id, created_at, updated_at,
       sent_at, claimed_by, claim_expires
FROM ledger;

DROP TABLE ledger;
ALTER TABLE ledger_rebuilt RENAME TO ledger;

CREATE INDEX ledger_by_state ON ledger (state, reason, id);
CREATE INDEX ledger_claims ON ledger (org_id, meter) WHERE claimed_by IS NOT NULL;
CREATE INDEX ledger_claimants ON ledger (claimed_by) WHERE claimed_by IS NOT NULL;
