-- Money parity (issue 21): each comparison of one billing period, stored with every org's
-- amounts in minor units (NULL: absent on that side; legacy_minor NULL on the run: no legacy
-- invoices were compared).
CREATE TABLE money_parity_runs (
    id                 INTEGER PRIMARY KEY,
    period_start       INTEGER NOT NULL,
    period_end         INTEGER NOT NULL,
    checked_at         INTEGER NOT NULL,
    currency           TEXT    NOT NULL,
    tolerance          TEXT    NOT NULL,
    orgs               INTEGER NOT NULL,
    mismatches         INTEGER NOT NULL,
    only_controlplane  INTEGER NOT NULL,
    only_legacy        INTEGER NOT NULL,
    stripe_findings    INTEGER NOT NULL,
    controlplane_minor INTEGER NOT NULL,
    legacy_minor       INTEGER,
    clean              INTEGER NOT NULL CHECK (clean IN (0, 1)),
    CHECK (period_end > period_start)
);
CREATE INDEX money_parity_runs_by_period ON money_parity_runs (period_start, checked_at);

CREATE TABLE money_parity_orgs (
    run_id             INTEGER NOT NULL REFERENCES money_parity_runs (id),
    org_id             TEXT    NOT NULL,
    controlplane_minor INTEGER,
    legacy_minor       INTEGER,
    stripe_minor       INTEGER,
    within_tolerance   INTEGER NOT NULL CHECK (within_tolerance IN (0, 1)),
    PRIMARY KEY (run_id, org_id)
) WITHOUT ROWID;
