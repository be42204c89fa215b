-- Money parity (issue 21): each comparison of one billing period, stored with every org's
-- amounts in minor units (NULL: absent on that side; legacy_minor NULL on the run: no legacy
-- invoices were compared).
CREATE TABLE money_parity_runs (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    period_start       bigint  NOT NULL,
    period_end         bigint  NOT NULL,
    checked_at         bigint  NOT NULL,
    currency           text    NOT NULL,
    tolerance          text    NOT NULL,
    orgs               integer NOT NULL,
    mismatches         integer NOT NULL,
    only_controlplane  integer NOT NULL,
    only_legacy        integer NOT NULL,
    stripe_findings    integer NOT NULL,
    controlplane_minor bigint  NOT NULL,
    legacy_minor       bigint,
    clean              boolean NOT NULL,
    CHECK (period_end > period_start)
);
CREATE INDEX money_parity_runs_by_period ON money_parity_runs (period_start, checked_at);

CREATE TABLE money_parity_orgs (
    run_id             bigint  NOT NULL REFERENCES money_parity_runs (id),
    org_id             text    NOT NULL,
    controlplane_minor bigint,
    legacy_minor       bigint,
    stripe_minor       bigint,
    within_tolerance   boolean NOT NULL,
    PRIMARY KEY (run_id, org_id)
);
