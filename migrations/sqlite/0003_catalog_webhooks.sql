-- Price catalog versions, Stripe webhook events, finalized invoice periods, org subscriptions.

-- The org's current provider subscription and whether it is still live.
ALTER TABLE orgs ADD COLUMN subscription TEXT;
ALTER TABLE orgs ADD COLUMN subscription_status TEXT;
CREATE INDEX orgs_by_customer ON orgs (customer);
CREATE INDEX orgs_by_subscription ON orgs (subscription);

-- Each publish that changed something: the resolved provider ids per price key, as JSON.
CREATE TABLE catalog_versions (
    version      INTEGER PRIMARY KEY,
    published_at INTEGER NOT NULL,
    actor        TEXT    NOT NULL,
    digest       TEXT    NOT NULL,
    catalog      TEXT    NOT NULL
);

-- Webhook events processed to the end; a redelivered id is answered without work.
CREATE TABLE webhook_events (
    event_id     TEXT PRIMARY KEY,
    type         TEXT    NOT NULL,
    created      INTEGER,
    processed_at INTEGER NOT NULL,
    outcome      TEXT    NOT NULL
);

-- Billing periods whose invoice is finalized: usage for them can no longer change it.
CREATE TABLE closed_periods (
    invoice_id   TEXT PRIMARY KEY,
    org_id       TEXT    NOT NULL,
    period_start INTEGER NOT NULL,
    period_end   INTEGER NOT NULL,
    finalized_at INTEGER NOT NULL
);
CREATE INDEX closed_periods_by_org ON closed_periods (org_id, period_start);
