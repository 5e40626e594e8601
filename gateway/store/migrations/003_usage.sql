-- One row per generation, keyed by its OpenRouter generation id. Written in batches by
-- the accounting ledger; `settle_status` tracks the cost look-up: `pending` (provisional
-- cost from the response, look-up due at `next_attempt_at`), `settled` (authoritative
-- `total_cost` from GET /generation), `unsettled` (look-ups exhausted: provisional kept).
-- No foreign key to users: usage history outlives a deleted user. Money is exact TEXT.

CREATE TABLE usage_records (
    generation_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    token_id TEXT,
    request_id TEXT,
    endpoint TEXT NOT NULL,
    model_requested TEXT,
    model TEXT,
    provider TEXT,
    streamed INTEGER NOT NULL DEFAULT 0,
    cancelled INTEGER NOT NULL DEFAULT 0,
    finish_reason TEXT,
    error TEXT,
    status INTEGER,
    prompt_tokens BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    reasoning_tokens BIGINT NOT NULL DEFAULT 0,
    cached_tokens BIGINT NOT NULL DEFAULT 0,
    provisional_cost TEXT NOT NULL,
    provider_cost TEXT NOT NULL,
    markup TEXT NOT NULL,
    total_cost TEXT NOT NULL,
    markup_pct TEXT NOT NULL,
    markup_reason TEXT NOT NULL,
    free INTEGER NOT NULL DEFAULT 0,
    tier TEXT NOT NULL,
    latency_ms BIGINT,
    created_at TEXT NOT NULL,
    settled_at TEXT,
    settle_status TEXT NOT NULL,
    settle_attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT,
    upstream TEXT
);

CREATE INDEX usage_records_created ON usage_records (created_at);
CREATE INDEX usage_records_user_created ON usage_records (user_id, created_at);
CREATE INDEX usage_records_pending ON usage_records (settle_status, next_attempt_at)
