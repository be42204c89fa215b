-- Reconciliations of the ledger with the provider's own aggregates (issue 17): each run with
-- its findings (the cells where the two differ) as a JSON array.
CREATE TABLE reconcile_runs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    checked_at  bigint  NOT NULL,
    start_at    bigint  NOT NULL,
    end_at      bigint  NOT NULL,
    org_id      text,
    customers   integer NOT NULL,
    hours       integer NOT NULL,
    units_short bigint  NOT NULL,
    units_over  bigint  NOT NULL,
    clean       boolean NOT NULL,
    findings    text    NOT NULL
);
CREATE INDEX reconcile_runs_by_check ON reconcile_runs (checked_at);
