-- A staged part records when it last received chunks (unix ms), so that
-- reclaiming abandoned staging ages a part by its writer's last activity,
-- not by when it was opened: a writer of another process that has been
-- writing one large part for longer than the reclaim age is not taken for
-- abandoned. NULL: no chunk yet (the part's age is then its creation).
ALTER TABLE parts ADD COLUMN touched_at_ms INTEGER;

DROP INDEX parts_staged_by_age;
CREATE INDEX parts_staged_by_activity ON parts (coalesce(touched_at_ms, created_at_ms))
    WHERE finalized = 0;
