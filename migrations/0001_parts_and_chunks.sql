-- One row per part version. A part is staged (finalized = 0) while its
-- writer runs and becomes immutable when finalize flips the flag.
--
-- fencing_token holds the u64 token mapped order-preservingly into SQLite's
-- signed 64-bit integers (token XOR 2^63, i.e. token - 2^63), so that
-- comparisons between tokens stay correct for the whole u64 range.
CREATE TABLE parts (
    id            INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused: a reader that outlives a part can not meet a newcomer
    tenant_id     TEXT    NOT NULL,
    job_id        TEXT    NOT NULL,
    file_type     TEXT    NOT NULL CHECK (file_type IN ('output', 'error')),
    resource_type TEXT    NOT NULL,
    part_index    INTEGER NOT NULL CHECK (part_index BETWEEN 0 AND 4294967295),
    fencing_token INTEGER NOT NULL,
    finalized     INTEGER NOT NULL DEFAULT 0 CHECK (finalized IN (0, 1)),
    created_at_ms INTEGER NOT NULL,
    finalized_at_ms INTEGER,
    line_count    INTEGER,
    byte_count    INTEGER,
    stored_bytes  INTEGER,
    chunk_count   INTEGER,
    digest        TEXT,
    CHECK (finalized = 0 OR (finalized_at_ms IS NOT NULL AND line_count IS NOT NULL
        AND byte_count IS NOT NULL AND stored_bytes IS NOT NULL
        AND chunk_count IS NOT NULL AND digest IS NOT NULL))
);

-- At most one staged and one finished version per key.
CREATE UNIQUE INDEX parts_by_key ON parts
    (tenant_id, job_id, file_type, resource_type, part_index, fencing_token, finalized);

-- Abandoned staging is found by age.
CREATE INDEX parts_staged_by_age ON parts (created_at_ms) WHERE finalized = 0;

-- One row per chunk: an independent zstd frame of raw_len bytes of NDJSON
-- that start at raw_offset within the part.
CREATE TABLE chunks (
    id         INTEGER PRIMARY KEY,
    part_id    INTEGER NOT NULL REFERENCES parts (id) ON DELETE CASCADE,
    seq        INTEGER NOT NULL CHECK (seq >= 0),
    raw_offset INTEGER NOT NULL CHECK (raw_offset >= 0),
    raw_len    INTEGER NOT NULL CHECK (raw_len >= 0),
    frame      BLOB    NOT NULL,
    UNIQUE (part_id, seq)
);

-- A finished part is immutable in the database itself: its rows may be
-- deleted, never changed, and no chunk may be added to it.
CREATE TRIGGER parts_finished_are_immutable
BEFORE UPDATE ON parts WHEN OLD.finalized = 1
BEGIN
    SELECT RAISE(ABORT, 'a finalized part is immutable');
END;

CREATE TRIGGER chunks_of_finished_parts_are_immutable
BEFORE UPDATE ON chunks
WHEN (SELECT finalized FROM parts WHERE id = OLD.part_id) = 1
  OR (SELECT finalized FROM parts WHERE id = NEW.part_id) = 1
BEGIN
    SELECT RAISE(ABORT, 'a finalized part is immutable');
END;

CREATE TRIGGER no_chunks_into_finished_parts
BEFORE INSERT ON chunks
WHEN (SELECT finalized FROM parts WHERE id = NEW.part_id) = 1
BEGIN
    SELECT RAISE(ABORT, 'a finalized part is immutable');
END;
