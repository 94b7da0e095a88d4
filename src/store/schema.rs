//! The database's shape: per-connection set-up and append-only migrations.
//!
//! Migrations are the files in `migrations/`, embedded at build time, applied
//! in order, each in one `BEGIN IMMEDIATE` transaction that also records the
//! new version in `PRAGMA user_version`. A database whose version is newer
//! than this build knows is refused. PRAGMAs are connection set-up and never
//! part of a migration; the two that shape a new file (page size and
//! incremental auto-vacuum) are set before its first table.

use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior};

use crate::error::{from_sqlite, StorageError, StorageResult};

/// The migrations, in order; the database's `user_version` counts how many
/// are applied.
pub const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_parts_and_chunks",
        include_str!("../../migrations/0001_parts_and_chunks.sql"),
    ),
    (
        "0002_digest_algorithm",
        include_str!("../../migrations/0002_digest_algorithm.sql"),
    ),
    (
        "0003_job_fences",
        include_str!("../../migrations/0003_job_fences.sql"),
    ),
    (
        "0004_staging_activity",
        include_str!("../../migrations/0004_staging_activity.sql"),
    ),
    (
        "0005_file_types",
        include_str!("../../migrations/0005_file_types.sql"),
    ),
    (
        "0006_xxh3_digest",
        include_str!("../../migrations/0006_xxh3_digest.sql"),
    ),
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Page size of a new database file: 4 KiB, the file system's block. Each
/// chunk (a blob of tens of KiB) ends in a partly filled overflow page, and
/// every table and index needs whole pages, so smaller pages keep the file
/// close to the frames' size: the Synthea sample as HFS parts takes 1/15.9
/// of its NDJSON at 4 KiB, 1/12.8 at 16 KiB and 1/7.6 at 64 KiB, while
/// writing and reading 1 MiB chunks measured no slower
/// (`export-store bench --groups ratio`, `--memory-gib 1`).
pub const PAGE_SIZE: u32 = 4 * 1024;

/// Per-connection set-up, run on every connection the store opens.
pub fn configure(conn: &Connection, busy_timeout: Duration) -> rusqlite::Result<()> {
    conn.busy_timeout(busy_timeout)?;
    conn.pragma_update(None, "foreign_keys", true)?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // Chunk frames are read once per download, so caching their pages buys
    // nothing: 2 MiB per connection holds the B-tree's inner pages. (At 8 MiB
    // the read pool's caches alone took a 1 GiB write-then-read past 64 MiB
    // of RSS.)
    conn.pragma_update(None, "cache_size", -2048)?;
    Ok(())
}

/// Caps the database at about `max_bytes` on a connection that writes
/// (`PRAGMA max_page_count`, whole pages of the file's page size); `None`
/// leaves SQLite's own limit. Returns the cap in pages now in force, which
/// SQLite raises to the current page count if the file is already larger.
pub fn limit_size(conn: &Connection, max_bytes: Option<u64>) -> rusqlite::Result<Option<u64>> {
    let Some(max_bytes) = max_bytes else {
        return Ok(None);
    };
    let page_size: u64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    super::sql::set_size_cap(conn, max_bytes / page_size.max(1)).map(Some)
}

/// Shapes a new file (page size, incremental auto-vacuum, WAL) and applies
/// pending migrations. Idempotent.
pub fn prepare(conn: &mut Connection) -> StorageResult<()> {
    let op = "open";
    let sql = |e| from_sqlite(op, e);
    let pages: i64 = conn
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .map_err(sql)?;
    if pages == 0 {
        conn.pragma_update(None, "page_size", PAGE_SIZE)
            .map_err(sql)?;
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
            .map_err(sql)?;
    }
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(sql)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StorageError::internal(
            op,
            format!("the database refused WAL journaling (it is in {mode} mode)"),
        ));
    }
    migrate(conn)
}

/// Applies every migration the database does not have yet.
///
/// A migration may rebuild a table that another references (SQLite's way
/// to change a constraint); with foreign keys enforced, dropping the old
/// table would delete the rows that reference it. So enforcement is off
/// while migrations run (the pragma cannot change inside a transaction) and
/// each migration checks every foreign key before it commits; the
/// connection's setting is restored afterwards.
pub fn migrate(conn: &mut Connection) -> StorageResult<()> {
    let sql = |e| from_sqlite("open", e);
    let enforced: bool = conn
        .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
        .map_err(sql)?;
    if enforced {
        conn.pragma_update(None, "foreign_keys", false)
            .map_err(sql)?;
    }
    let applied = apply_pending(conn);
    if enforced {
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(sql)?;
    }
    applied
}

fn apply_pending(conn: &mut Connection) -> StorageResult<()> {
    let op = "open";
    let sql = |e| from_sqlite(op, e);
    loop {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        let version: u32 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sql)?;
        if version > SCHEMA_VERSION {
            return Err(too_new(op, version));
        }
        if version == SCHEMA_VERSION {
            return Ok(());
        }
        let (name, migration) = MIGRATIONS[version as usize];
        tx.execute_batch(migration).map_err(sql)?;
        let broken = tx
            .prepare("PRAGMA foreign_key_check")
            .and_then(|mut st| st.query([])?.next().map(|row| row.is_some()))
            .map_err(sql)?;
        if broken {
            return Err(StorageError::internal(
                op,
                format!("migration {name} would leave rows whose foreign keys point nowhere"),
            ));
        }
        tx.pragma_update(None, "user_version", version + 1)
            .map_err(sql)?;
        tx.commit().map_err(sql)?;
    }
}

/// Checks, without writing, that a database opened read-only holds a store
/// of exactly this build's schema: a read-only store never migrates, so a
/// file at another version (older or newer) is refused as invalid input
/// with both versions named, and so is a file that holds no store at all
/// (an empty file, or a SQLite database without the store's tables).
/// Reading the header is also where SQLite first touches the file, so a
/// file that is not a database fails here.
pub fn check_read_only(conn: &Connection) -> StorageResult<()> {
    let op = "open";
    let sql = |e| from_sqlite(op, e);
    let pages: i64 = conn
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .map_err(sql)?;
    let version: u32 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql)?;
    if pages == 0 {
        return Err(StorageError::invalid(
            op,
            "the file is empty: it holds no store (a read-only open never creates one)",
        ));
    }
    if version == 0 {
        return Err(StorageError::invalid(
            op,
            "the file is a SQLite database but not a store (it has no schema version)",
        ));
    }
    if version > SCHEMA_VERSION {
        return Err(too_new(op, version));
    }
    if version < SCHEMA_VERSION {
        return Err(StorageError::invalid(
            op,
            format!(
                "the database has schema version {version}, older than the {SCHEMA_VERSION} \
                 this build of sqlite-export-store reads, and a read-only open never \
                 migrates; open it read-write once (where it may be written) to migrate it"
            ),
        ));
    }
    Ok(())
}

/// The refusal of a file whose schema `version` is newer than this build's.
fn too_new(op: &'static str, version: u32) -> StorageError {
    StorageError::invalid(
        op,
        format!(
            "the database has schema version {version}, newer than the {SCHEMA_VERSION} \
             this build of sqlite-export-store knows; upgrade the software to open it"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The schema version recorded in a database.
    fn version(conn: &Connection) -> StorageResult<u32> {
        conn.query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| from_sqlite("open", e))
    }

    fn tables(conn: &Connection) -> Vec<String> {
        let mut st = conn
            .prepare("SELECT name FROM sqlite_master WHERE type IN ('table','trigger','index') AND name NOT LIKE 'sqlite_%' ORDER BY name")
            .unwrap();
        st.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn migrations_apply_to_an_empty_database_and_from_every_earlier_version() {
        let dir = tempfile::tempdir().unwrap();
        // From empty.
        let mut fresh = Connection::open(dir.path().join("fresh.db")).unwrap();
        configure(&fresh, Duration::from_secs(1)).unwrap();
        prepare(&mut fresh).unwrap();
        assert_eq!(version(&fresh).unwrap(), SCHEMA_VERSION);
        let want = tables(&fresh);
        for table in ["parts", "chunks", "job_fences"] {
            assert!(
                want.contains(&table.to_string()),
                "{table} missing from {want:?}"
            );
        }
        // From every earlier version: apply the first n by hand, then migrate.
        for n in 0..SCHEMA_VERSION {
            let mut c = Connection::open(dir.path().join(format!("v{n}.db"))).unwrap();
            for (i, (_, m)) in MIGRATIONS.iter().take(n as usize).enumerate() {
                c.execute_batch(m).unwrap();
                c.pragma_update(None, "user_version", i as u32 + 1).unwrap();
            }
            prepare(&mut c).unwrap();
            assert_eq!(version(&c).unwrap(), SCHEMA_VERSION);
            assert_eq!(tables(&c), want, "migrated from version {n}");
        }
        // Running again is a no-op.
        prepare(&mut fresh).unwrap();
    }

    /// Migrations 5 and 6 rebuild `parts` to widen its file-type and digest
    /// checks: rows, chunks, the id counter, the indexes and the
    /// immutability triggers all survive, and enforcement of foreign keys
    /// comes back on.
    #[test]
    fn the_file_type_migration_keeps_every_row_and_rule() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Connection::open(dir.path().join("v4.db")).unwrap();
        configure(&c, Duration::from_secs(1)).unwrap();
        for (i, (_, m)) in MIGRATIONS.iter().take(4).enumerate() {
            c.execute_batch(m).unwrap();
            c.pragma_update(None, "user_version", i as u32 + 1).unwrap();
        }
        c.execute_batch(
            "INSERT INTO parts (tenant_id, job_id, file_type, resource_type, part_index,
                 fencing_token, finalized, created_at_ms) VALUES
                 ('t','j','output','P',0,7,0,1), ('t','j','error','OperationOutcome',0,7,0,1),
                 ('t','j','output','P',1,7,0,1);
             INSERT INTO chunks (part_id, seq, raw_offset, raw_len, frame) VALUES
                 (1,0,0,1,x'00'), (2,0,0,1,x'01');
             UPDATE parts SET finalized = 1, finalized_at_ms = 2, line_count = 1, byte_count = 1,
                 stored_bytes = 1, chunk_count = 1, digest = 'd', digest_algorithm = 'blake3'
                 WHERE id = 1;
             DELETE FROM parts WHERE id = 3;",
        )
        .unwrap();
        let rows = |c: &Connection| -> Vec<(i64, String, i64, Option<String>)> {
            let mut st = c
                .prepare("SELECT id, file_type, finalized, digest_algorithm FROM parts ORDER BY id")
                .unwrap();
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        let before = rows(&c);
        let tables_before = tables(&c);

        migrate(&mut c).unwrap();
        assert_eq!(version(&c).unwrap(), SCHEMA_VERSION);
        assert_eq!(rows(&c), before);
        assert_eq!(tables(&c), tables_before);
        let fk: bool = c
            .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
            .unwrap();
        assert!(fk, "foreign keys are enforced again");
        let chunks: i64 = c
            .query_row("SELECT count(*) FROM chunks", [], |r| r.get(0))
            .unwrap();
        assert_eq!(chunks, 2);

        // The counter moved over: the deleted id 3 is not handed out again.
        c.execute(
            "INSERT INTO parts (tenant_id, job_id, file_type, resource_type, part_index,
                 fencing_token, created_at_ms) VALUES ('t','s','deleted','Bundle',0,1,1)",
            [],
        )
        .unwrap();
        assert_eq!(c.last_insert_rowid(), 4);
        for bad in ["Output", "1x", "a/b", "", &"x".repeat(33)] {
            let e = c
                .execute(
                    "INSERT INTO parts (tenant_id, job_id, file_type, resource_type, part_index,
                         fencing_token, created_at_ms) VALUES ('t','s',?1,'B',1,1,1)",
                    [bad],
                )
                .unwrap_err();
            assert!(e.to_string().contains("CHECK"), "{bad:?}: {e}");
        }
        // XXH3-128 digests are accepted, names the store does not know are not.
        c.execute(
            "UPDATE parts SET digest_algorithm = 'xxh3-128' WHERE id = 4",
            [],
        )
        .unwrap();
        let e = c
            .execute("UPDATE parts SET digest_algorithm = 'md5' WHERE id = 4", [])
            .unwrap_err();
        assert!(e.to_string().contains("CHECK"), "{e}");
        // The rules on finished parts still hold, and deletes still cascade.
        for stmt in [
            "UPDATE parts SET line_count = 5 WHERE id = 1",
            "UPDATE chunks SET frame = x'02' WHERE part_id = 1",
            "INSERT INTO chunks (part_id, seq, raw_offset, raw_len, frame) VALUES (1,1,1,1,x'00')",
        ] {
            let e = c.execute(stmt, []).unwrap_err();
            assert!(e.to_string().contains("immutable"), "{stmt}: {e}");
        }
        let dup = c.execute(
            "INSERT INTO parts (tenant_id, job_id, file_type, resource_type, part_index,
                 fencing_token, finalized, created_at_ms) VALUES ('t','j','error','OperationOutcome',0,7,0,1)",
            [],
        );
        assert!(dup.is_err(), "the unique key index is back");
        c.execute("DELETE FROM parts WHERE id = 1", []).unwrap();
        let chunks: i64 = c
            .query_row("SELECT count(*) FROM chunks", [], |r| r.get(0))
            .unwrap();
        assert_eq!(chunks, 1);
    }

    #[test]
    fn new_files_get_page_size_auto_vacuum_and_wal() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Connection::open(dir.path().join("a.db")).unwrap();
        configure(&c, Duration::from_secs(1)).unwrap();
        prepare(&mut c).unwrap();
        let ps: u32 = c.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
        let av: u32 = c.query_row("PRAGMA auto_vacuum", [], |r| r.get(0)).unwrap();
        let jm: String = c
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!((ps, av, jm.as_str()), (PAGE_SIZE, 2, "wal"));
    }

    #[test]
    fn a_newer_schema_is_refused_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Connection::open(dir.path().join("new.db")).unwrap();
        prepare(&mut c).unwrap();
        c.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let e = prepare(&mut c).unwrap_err();
        assert!(e.is_invalid_input());
        assert!(e.to_string().contains("newer"), "{e}");
    }

    #[test]
    fn a_read_only_check_accepts_only_this_schema_and_writes_nothing() {
        use rusqlite::OpenFlags;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let mut c = Connection::open(&path).unwrap();
        prepare(&mut c).unwrap();
        let ro = |p: &std::path::Path| {
            Connection::open_with_flags(p, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap()
        };
        check_read_only(&ro(&path)).unwrap();
        for (version, word) in [(SCHEMA_VERSION - 1, "older"), (SCHEMA_VERSION + 1, "newer")] {
            c.pragma_update(None, "user_version", version).unwrap();
            let e = check_read_only(&ro(&path)).unwrap_err();
            assert!(e.is_invalid_input(), "{e}");
            let text = e.to_string();
            assert!(text.contains(word), "{text}");
            assert!(
                text.contains(&format!("version {version},"))
                    && text.contains(&format!("the {SCHEMA_VERSION} ")),
                "{text}"
            );
            let now: u32 = c
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .unwrap();
            assert_eq!(now, version, "the check migrated nothing");
        }
        // Not a store: a database without a schema version, an empty file.
        let other = dir.path().join("other.db");
        Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        let e = check_read_only(&ro(&other)).unwrap_err();
        assert!(e.to_string().contains("not a store"), "{e}");
        let empty = dir.path().join("empty.db");
        std::fs::write(&empty, b"").unwrap();
        let e = check_read_only(&ro(&empty)).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
    }

    #[test]
    fn finished_parts_are_immutable_in_the_database() {
        let mut c = Connection::open_in_memory().unwrap();
        configure(&c, Duration::from_secs(1)).unwrap();
        migrate(&mut c).unwrap();
        c.execute_batch(
            "INSERT INTO parts (tenant_id, job_id, file_type, resource_type, part_index,
                 fencing_token, finalized, created_at_ms) VALUES ('t','j','output','P',0,0,0,1);
             INSERT INTO chunks (part_id, seq, raw_offset, raw_len, frame) VALUES (1,0,0,1,x'00');
             UPDATE parts SET finalized = 1, finalized_at_ms = 2, line_count = 1, byte_count = 1,
                 stored_bytes = 1, chunk_count = 1, digest = 'd' WHERE id = 1;",
        )
        .unwrap();
        for stmt in [
            "UPDATE parts SET line_count = 5 WHERE id = 1",
            "UPDATE parts SET finalized = 0 WHERE id = 1",
            "UPDATE chunks SET frame = x'01' WHERE part_id = 1",
            "INSERT INTO chunks (part_id, seq, raw_offset, raw_len, frame) VALUES (1,1,1,1,x'00')",
        ] {
            let e = c.execute(stmt, []).unwrap_err();
            assert!(e.to_string().contains("immutable"), "{stmt}: {e}");
        }
        // Deleting is allowed, and takes the chunks with it.
        c.execute("DELETE FROM parts WHERE id = 1", []).unwrap();
        let n: i64 = c
            .query_row("SELECT count(*) FROM chunks", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0);
    }
}
