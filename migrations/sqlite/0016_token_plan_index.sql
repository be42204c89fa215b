-- The rollup reads the plan of the newest capability token among a bucket's events: only
-- events that carried one are indexed.
CREATE INDEX usage_events_token_plans ON usage_events (org_id, time_ms) WHERE plan IS NOT NULL;
ALTER TABLE ledger ADD COLUMN plan_source TEXT;
