-- The whole schema of the SQLite migrations 0001-0004, for PostgreSQL: events, meter values
-- with per-bucket totals, dirty buckets, ledger with sender claims, carries, orgs, flags, audit,
-- job runs, parity, catalog, webhooks. Money and usage are integers (micro-units), never floats.

CREATE TABLE settings (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- One row per accepted usage event; (source, event_id) is the deduplication key.
CREATE TABLE usage_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source      text   NOT NULL,
    event_id    text   NOT NULL,
    type        text   NOT NULL,
    org_id      text   NOT NULL,
    time_ms     bigint NOT NULL,
    data        text   NOT NULL,
    received_at bigint NOT NULL,
    UNIQUE (source, event_id)
);

-- What each event contributes to each meter, in integer micro-units, fixed at ingest.
CREATE TABLE meter_values (
    event_pk     bigint NOT NULL REFERENCES usage_events (id),
    meter        text   NOT NULL,
    org_id       text   NOT NULL,
    bucket_start bigint NOT NULL,
    micros       bigint NOT NULL,
    PRIMARY KEY (event_pk, meter)
);

-- Exact sum of meter_values per (org, bucket, meter), written by the ingest transaction
-- together with the values. Rollup and parity read these instead of every event.
CREATE TABLE bucket_totals (
    org_id       text    NOT NULL,
    bucket_start bigint  NOT NULL,
    meter        text    NOT NULL,
    micros       bigint NOT NULL,
    PRIMARY KEY (org_id, bucket_start, meter)
);
CREATE INDEX bucket_totals_by_meter ON bucket_totals (meter, bucket_start);

-- (org, bucket) pairs with events the rollup has not yet folded into the ledger. `mark` is
-- renewed by every ingest that touches the pair: rollup clears a mark only if it is still the
-- one it read, so an event committed while a rollup runs is never forgotten.
CREATE SEQUENCE dirty_marks;
CREATE TABLE dirty_buckets (
    org_id       text   NOT NULL,
    bucket_start bigint NOT NULL,
    mark         bigint NOT NULL,
    PRIMARY KEY (org_id, bucket_start)
);
CREATE INDEX dirty_buckets_by_bucket ON dirty_buckets (bucket_start);

CREATE TABLE ledger (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    identifier       text    NOT NULL,  -- a function of the unique key below
    org_id           text    NOT NULL,
    meter            text    NOT NULL,
    bucket_start     bigint  NOT NULL,
    bucket_end       bigint  NOT NULL,
    revision         integer NOT NULL,
    value_micros     bigint  NOT NULL,
    quantity         bigint  NOT NULL,
    state            text    NOT NULL
                     CHECK (state IN ('pending', 'sent', 'held', 'excluded', 'cancelled')),
    reason           text,
    detail           text,
    attempts         integer NOT NULL DEFAULT 0,
    first_attempt_at bigint,
    provider_id      text,
    created_at       bigint  NOT NULL,
    updated_at       bigint  NOT NULL,
    sent_at          bigint,
    claimed_by       text,   -- the sender holding the row, until claim_expires
    claim_expires    bigint,
    UNIQUE (org_id, bucket_start, meter, revision),
    CHECK (state = 'pending' OR state = 'sent' OR reason IS NOT NULL)
);
CREATE INDEX ledger_by_state ON ledger (state, id);
CREATE INDEX ledger_chain ON ledger (org_id, meter, id);
CREATE INDEX ledger_claimants ON ledger (claimed_by) WHERE claimed_by IS NOT NULL;

-- Per (org, meter, segment): exact usage and whole units written to the ledger, for the
-- rounding carry. Billed rows ('billable') and rows excluded by rule never share a segment.
CREATE TABLE carries (
    org_id       text   NOT NULL,
    meter        text   NOT NULL,
    segment      text   NOT NULL,
    exact_micros bigint NOT NULL,
    quantity     bigint NOT NULL,
    PRIMARY KEY (org_id, meter, segment)
);

CREATE TABLE orgs (
    org_id              text PRIMARY KEY,
    customer            text,
    updated_at          bigint NOT NULL,
    subscription        text,
    subscription_status text
);
CREATE INDEX orgs_by_customer ON orgs (customer);
CREATE INDEX orgs_by_subscription ON orgs (subscription);

CREATE TABLE org_plans (
    org_id         text   NOT NULL REFERENCES orgs (org_id),
    effective_from bigint NOT NULL,
    plan           text   NOT NULL,
    PRIMARY KEY (org_id, effective_from)
);

CREATE TABLE flags (
    name       text PRIMARY KEY,
    value      text    NOT NULL,
    version    integer NOT NULL,
    updated_at bigint  NOT NULL
);

-- Append-only and hash-chained: each record carries the hash of the one before it.
CREATE TABLE audit_log (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at        bigint  NOT NULL,
    action    text    NOT NULL,
    subject   text    NOT NULL,
    actor     text    NOT NULL,
    reason    text,
    before    text,
    after     text,
    forced    boolean NOT NULL DEFAULT false,
    group_id  text,
    prev_hash text    NOT NULL,
    hash      text    NOT NULL
);
CREATE INDEX audit_log_by_action ON audit_log (action, id);

CREATE TABLE job_runs (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job        text             NOT NULL,
    started_at double precision NOT NULL,  -- seconds, for durations; never money
    ended_at   double precision NOT NULL,
    outcome    text             NOT NULL,
    counts     text             NOT NULL,
    error      text
);
CREATE INDEX job_runs_by_job ON job_runs (job, id);

-- One row per checked bucket: each settled bucket is checked once.
CREATE TABLE parity_runs (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    meter               text    NOT NULL,
    bucket_start        bigint  NOT NULL,
    bucket_end          bigint  NOT NULL,
    checked_at          bigint  NOT NULL,
    orgs                integer NOT NULL,
    mismatches          integer NOT NULL,
    material            integer NOT NULL,
    controlplane_micros bigint  NOT NULL,
    legacy_micros       bigint  NOT NULL,
    worst_org           text,
    worst_drift_micros  bigint  NOT NULL,
    worst_relative      text,
    clean               boolean NOT NULL,
    alarming            boolean NOT NULL,
    alarm_since         bigint,
    UNIQUE (meter, bucket_start),
    CHECK (clean = (mismatches = 0))
);
CREATE INDEX parity_runs_unclean ON parity_runs (meter, bucket_start) WHERE NOT clean;

-- The orgs outside tolerance in a run (NULL: absent on that side).
CREATE TABLE parity_mismatches (
    run_id              bigint NOT NULL REFERENCES parity_runs (id),
    org_id              text   NOT NULL,
    controlplane_micros bigint,
    legacy_micros       bigint,
    PRIMARY KEY (run_id, org_id)
);

CREATE TABLE parity_alerts (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    meter        text    NOT NULL,
    bucket_start bigint  NOT NULL,
    dedup_key    text    NOT NULL,
    text         text    NOT NULL,
    state        text    NOT NULL
                 CHECK (state IN ('pending', 'sent', 'logged', 'suppressed', 'failed')),
    created_at   bigint  NOT NULL,
    attempts     integer NOT NULL DEFAULT 0,
    sent_at      bigint,
    error        text,
    UNIQUE (meter, bucket_start)
);
CREATE INDEX parity_alerts_by_meter ON parity_alerts (meter, created_at);

-- Each publish that changed something: the resolved provider ids per price key, as JSON.
CREATE TABLE catalog_versions (
    version      integer PRIMARY KEY,
    published_at bigint NOT NULL,
    actor        text   NOT NULL,
    digest       text   NOT NULL,
    catalog      text   NOT NULL
);

-- Webhook events processed to the end; a redelivered id is answered without work.
CREATE TABLE webhook_events (
    event_id     text PRIMARY KEY,
    type         text   NOT NULL,
    created      bigint,
    processed_at bigint NOT NULL,
    outcome      text   NOT NULL
);

-- Billing periods whose invoice is finalized: usage for them can no longer change it.
CREATE TABLE closed_periods (
    invoice_id   text PRIMARY KEY,
    org_id       text   NOT NULL,
    period_start bigint NOT NULL,
    period_end   bigint NOT NULL,
    finalized_at bigint NOT NULL
);
CREATE INDEX closed_periods_by_org ON closed_periods (org_id, period_start);
