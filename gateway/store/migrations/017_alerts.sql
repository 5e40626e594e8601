-- Alert deliveries (issue 17): one row per event per webhook, written before any delivery is tried,
-- so a restart loses none. `dedupe_key` makes an event once-only across instances and restarts
-- (a budget threshold: once per user, period and fraction). An instance delivers a row only after
-- claiming it (`claimed_by` / `claimed_until`, a lease), so several instances never send it twice.
-- `state`: pending (due at `next_attempt_at`), delivered, failed (attempts exhausted).

CREATE TABLE alert_outbox (
    id TEXT PRIMARY KEY,
    dedupe_key TEXT NOT NULL UNIQUE,
    event TEXT NOT NULL,
    user_id TEXT,
    webhook TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    claimed_by TEXT,
    claimed_until TEXT,
    last_status INTEGER,
    last_error TEXT,
    created_at TEXT NOT NULL,
    delivered_at TEXT
);

CREATE INDEX alert_outbox_due ON alert_outbox (state, next_attempt_at);
CREATE INDEX alert_outbox_created ON alert_outbox (created_at);

-- Where the alert scanner got to in the audit log (key.disabled, emergency_stop.changed).
CREATE TABLE alert_marks (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
)
