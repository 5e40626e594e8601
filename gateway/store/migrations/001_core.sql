-- Users, their platform tokens, their OpenRouter keys, and the change feed that keeps
-- every instance's auth cache fresh. Money is TEXT holding an exact decimal; times are
-- ISO-8601 UTC text (lexicographic order = time order).

CREATE TABLE users (
    id TEXT PRIMARY KEY,
    email TEXT,
    tier TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'active',
    overrides TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

CREATE UNIQUE INDEX users_email ON users (email);

CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name TEXT,
    prefix TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    last_used_at TEXT,
    expires_at TEXT,
    revoked_at TEXT
);

CREATE INDEX tokens_user ON tokens (user_id);

CREATE TABLE provider_keys (
    user_id TEXT PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    ciphertext TEXT NOT NULL,
    label TEXT NOT NULL,
    last4 TEXT NOT NULL,
    upstream_hash TEXT,
    limit_usd TEXT,
    disabled INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

CREATE TABLE changes (
    seq {{AUTOINC}},
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    created_at TEXT NOT NULL
);

CREATE TABLE gateway_state (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
