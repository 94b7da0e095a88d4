-- Each finished part records which algorithm its content digest uses.
-- Parts finished under schema 1 carry SHA-256 (the default fills them in);
-- finalize now records BLAKE3, computed chunk by chunk beside compression,
-- and always sets this column itself.
ALTER TABLE parts ADD COLUMN digest_algorithm TEXT NOT NULL DEFAULT 'sha256'
    CHECK (digest_algorithm IN ('sha256', 'blake3'));
