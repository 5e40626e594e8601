-- The user's own account view: OpenRouter credits as last synced, and preferences
-- applied on the proxy path. Money is TEXT holding an exact decimal; times are ISO-8601 UTC.

CREATE TABLE account_credits (
    user_id TEXT PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    total_credits TEXT,
    total_usage TEXT,
    source TEXT,
    synced_at TEXT,
    error TEXT,
    error_at TEXT
);

CREATE TABLE user_settings (
    user_id TEXT PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    settings TEXT NOT NULL DEFAULT '{}',
    updated_at TEXT NOT NULL
);
