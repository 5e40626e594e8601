-- Managed keys a rotation replaced: still valid upstream for `keys.rotation_grace_s` (requests in
-- flight hold them), deleted upstream once `delete_after` has passed; stored, so a restart finishes it.
CREATE TABLE retired_keys (
    upstream_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    delete_after TEXT NOT NULL
)
