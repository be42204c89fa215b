-- The plan an event's capability token states (verified at ingest), and when the token was
-- issued: the plan authority chain's first link, and the proof an event carried a token.
ALTER TABLE usage_events ADD COLUMN plan TEXT;
ALTER TABLE usage_events ADD COLUMN plan_issued_at BIGINT;
