-- Managed-key operations in progress (provision or rotate through OpenRouter's key API).
-- A row is written BEFORE the upstream key is created and removed only once the new key
-- is in `provider_keys` and the replaced one is deleted upstream, so a crash at any step
-- leaves a record from which the next start (or the next operation on that user)
-- completes or rolls back the change: no key is orphaned upstream or lost locally.
-- `phase`: creating (upstream create sent, hash unknown) → created (new key's hash and
-- ciphertext known) → swapped (new key in provider_keys; the old one still to delete).

CREATE TABLE managed_key_operations (
    user_id TEXT PRIMARY KEY,
    operation TEXT NOT NULL,
    phase TEXT NOT NULL,
    upstream_name TEXT NOT NULL,
    old_hash TEXT,
    new_hash TEXT,
    new_ciphertext TEXT,
    new_label TEXT,
    new_last4 TEXT,
    limit_usd TEXT,
    started_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
)
