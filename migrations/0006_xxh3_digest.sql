-- Parts may record an XXH3-128 content digest (`xxh3-128`, what
-- `xxhsum -H2` prints), the store's default from this version on: BLAKE3
-- cost 13-15% of compression's CPU when writing and more than half of
-- decompression's when reading. Parts already finished keep their digest
-- and its algorithm.
--
-- SQLite cannot change a CHECK constraint in place, so `parts` is rebuilt
-- as in 0005_file_types (create, copy, drop, rename; foreign keys off and
-- checked before the commit; ids and the AUTOINCREMENT counter kept; the
-- triggers on `chunks` dropped first and made again; chunks untouched).

DROP TRIGGER chunks_of_finished_parts_are_immutable;
DROP TRIGGER no_chunks_into_finished_parts;

CREATE TABLE parts_new (
    id            INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused: a reader that outlives a part can not meet a newcomer
    tenant_id     TEXT    NOT NULL,
    job_id        TEXT    NOT NULL,
    file_type     TEXT    NOT NULL CHECK (length(file_type) BETWEEN 1 AND 32
        AND file_type GLOB '[a-z]*' AND NOT file_type GLOB '*[^a-z0-9_-]*'),
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
    digest_algorithm TEXT NOT NULL DEFAULT 'sha256'
        CHECK (digest_algorithm IN ('sha256', 'blake3', 'xxh3-128')),
    touched_at_ms INTEGER,
    CHECK (finalized = 0 OR (finalized_at_ms IS NOT NULL AND line_count IS NOT NULL
        AND byte_count IS NOT NULL AND stored_bytes IS NOT NULL
        AND chunk_count IS NOT NULL AND digest IS NOT NULL))
);

INSERT INTO parts_new (id, tenant_id, job_id, file_type, resource_type, part_index,
        fencing_token, finalized, created_at_ms, finalized_at_ms, line_count, byte_count,
        stored_bytes, chunk_count, digest, digest_algorithm, touched_at_ms)
    SELECT id, tenant_id, job_id, file_type, resource_type, part_index,
        fencing_token, finalized, created_at_ms, finalized_at_ms, line_count, byte_count,
        stored_bytes, chunk_count, digest, digest_algorithm, touched_at_ms
    FROM parts;

-- The counter of `parts` (which may be past the largest id left, when the
-- newest parts were deleted) becomes the new table's; the rename below
-- carries it to the name `parts`.
DELETE FROM sqlite_sequence WHERE name = 'parts_new';
UPDATE sqlite_sequence SET name = 'parts_new' WHERE name = 'parts';

DROP TABLE parts;
ALTER TABLE parts_new RENAME TO parts;

-- At most one staged and one finished version per key.
CREATE UNIQUE INDEX parts_by_key ON parts
    (tenant_id, job_id, file_type, resource_type, part_index, fencing_token, finalized);

-- Abandoned staging is found by its writer's last activity.
CREATE INDEX parts_staged_by_activity ON parts (coalesce(touched_at_ms, created_at_ms))
    WHERE finalized = 0;

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
