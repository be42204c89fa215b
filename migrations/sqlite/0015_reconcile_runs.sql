-- Reconciliations of the ledger with the provider's own aggregates (issue 17): each run with
-- its findings (the cells where the two differ) as a JSON array.
CREATE TABLE reconcile_runs (
    id          INTEGER PRIMARY KEY,
    checked_at  INTEGER NOT NULL,
    start_at    INTEGER NOT NULL,
    end_at      INTEGER NOT NULL,
    org_id      TEXT,
    customers   INTEGER NOT NULL,
    hours       INTEGER NOT NULL,
    units_short INTEGER NOT NULL,
    units_over  INTEGER NOT NULL,
    clean       INTEGER NOT NULL CHECK (clean IN (0, 1)),
    findings    TEXT    NOT NULL
);
CREATE INDEX reconcile_runs_by_check ON reconcile_runs (checked_at);
