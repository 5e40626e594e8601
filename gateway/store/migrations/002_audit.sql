-- Append-only record of key, token, tier, suspension and emergency-stop operations.
-- Never holds a secret: details carry labels and last-4s only.

CREATE TABLE audit_log (
    id {{AUTOINC}},
    at TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    user_id TEXT,
    target TEXT,
    details TEXT NOT NULL DEFAULT '{}'
);

CREATE INDEX audit_log_user ON audit_log (user_id, id);
CREATE INDEX audit_log_action ON audit_log (action, id)
