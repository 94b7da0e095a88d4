//! The SQL statements, as plain synchronous functions over a connection.
//!
//! No policy lives here: callers decide transactions, fencing and error
//! categories. Every function is usable on an in-memory database, which is
//! how the unit tests below run them.

use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};

use super::digest::DigestAlgorithm;
use crate::key::ExportPartKey;

/// Maps a u64 fencing token into SQLite's i64 so that order is kept across
/// the whole u64 range (`0 → i64::MIN`, `u64::MAX → i64::MAX`).
pub fn token_to_sql(token: u64) -> i64 {
    (token ^ (1 << 63)) as i64
}

/// The inverse of [`token_to_sql`].
pub fn token_from_sql(v: i64) -> u64 {
    (v as u64) ^ (1 << 63)
}

/// The time rows record (`created_at_ms`, `finalized_at_ms`, a staged
/// part's last chunk, fence marks): Unix milliseconds, 0 before 1970.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A finished part's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartRow {
    /// Row id (never reused).
    pub id: i64,
    /// The part's fencing token.
    pub fencing_token: u64,
    /// Lines recorded at finalize.
    pub line_count: u64,
    /// Uncompressed bytes.
    pub byte_count: u64,
    /// Compressed payload bytes.
    pub stored_bytes: u64,
    /// Number of chunk rows.
    pub chunk_count: u64,
    /// Lowercase hex content digest.
    pub digest: String,
    /// The digest's algorithm.
    pub digest_algorithm: DigestAlgorithm,
    /// Unix milliseconds of the finalize commit.
    pub finalized_at_ms: i64,
}

/// One stored chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRow {
    /// Offset of the chunk's first raw byte within the part.
    pub raw_offset: u64,
    /// Raw (uncompressed) length.
    pub raw_len: u64,
    /// The zstd frame.
    pub frame: Vec<u8>,
}

const SLOT: &str = "tenant_id = ?1 AND job_id = ?2 AND file_type = ?3 \
                    AND resource_type = ?4 AND part_index = ?5";

fn slot_params(key: &ExportPartKey) -> (&str, &str, &str, &str, i64) {
    (
        &key.tenant_id,
        key.job_id.as_str(),
        &key.file_type,
        &key.resource_type,
        key.part_index as i64,
    )
}

/// The highest fencing token of any part, staged or finished, in the key's
/// slot (the key without its token).
pub fn max_token_in_slot(conn: &Connection, key: &ExportPartKey) -> rusqlite::Result<Option<u64>> {
    let (t, j, f, r, p) = slot_params(key);
    let v: Option<i64> = conn
        .prepare_cached(&format!(
            "SELECT max(fencing_token) FROM parts WHERE {SLOT}"
        ))?
        .query_row(params![t, j, f, r, p], |row| row.get(0))?;
    Ok(v.map(token_from_sql))
}

/// Deletes the staged (unfinished) version of exactly this key, if any.
pub fn discard_staged(conn: &Connection, key: &ExportPartKey) -> rusqlite::Result<usize> {
    let (t, j, f, r, p) = slot_params(key);
    conn.prepare_cached(&format!(
        "DELETE FROM parts WHERE {SLOT} AND fencing_token = ?6 AND finalized = 0"
    ))?
    .execute(params![t, j, f, r, p, token_to_sql(key.fencing_token)])
}

/// Inserts a staged part row and returns its id.
pub fn insert_staged(conn: &Connection, key: &ExportPartKey, now_ms: i64) -> rusqlite::Result<i64> {
    let (t, j, f, r, p) = slot_params(key);
    conn.prepare_cached(
        "INSERT INTO parts (tenant_id, job_id, file_type, resource_type, part_index,
             fencing_token, finalized, created_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7)",
    )?
    .execute(params![
        t,
        j,
        f,
        r,
        p,
        token_to_sql(key.fencing_token),
        now_ms
    ])?;
    Ok(conn.last_insert_rowid())
}

/// Whether a part row exists, and if so whether it is finished.
pub fn part_state(conn: &Connection, id: i64) -> rusqlite::Result<Option<bool>> {
    conn.prepare_cached("SELECT finalized FROM parts WHERE id = ?1")?
        .query_row([id], |r| r.get::<_, i64>(0).map(|f| f == 1))
        .optional()
}

/// Stores one chunk of a staged part.
pub fn insert_chunk(
    conn: &Connection,
    part_id: i64,
    seq: u64,
    raw_offset: u64,
    raw_len: u64,
    frame: &[u8],
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO chunks (part_id, seq, raw_offset, raw_len, frame) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        part_id,
        seq as i64,
        raw_offset as i64,
        raw_len as i64,
        frame
    ])?;
    Ok(())
}

/// What a staged part holds: raw bytes, stored bytes, chunk count, and
/// whether its chunks are exactly `0..n` with contiguous offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagedTotals {
    /// Sum of raw lengths.
    pub raw_bytes: u64,
    /// Sum of frame lengths.
    pub stored_bytes: u64,
    /// Number of chunks.
    pub chunks: u64,
    /// Sequence numbers run 0..chunks and each chunk starts where the
    /// previous one ended.
    pub contiguous: bool,
}

/// Totals of a part's chunks (see [`StagedTotals`]).
pub fn chunk_totals(conn: &Connection, part_id: i64) -> rusqlite::Result<StagedTotals> {
    let (raw, stored, n, max_seq): (i64, i64, i64, Option<i64>) = conn
        .prepare_cached(
            "SELECT coalesce(sum(raw_len), 0), coalesce(sum(length(frame)), 0), count(*), max(seq)
             FROM chunks WHERE part_id = ?1",
        )?
        .query_row([part_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?;
    // A chunk whose offset differs from the sum of the raw lengths before it.
    let gaps: i64 = conn
        .prepare_cached(
            "SELECT count(*) FROM (
                 SELECT raw_offset, sum(raw_len) OVER (ORDER BY seq ROWS BETWEEN UNBOUNDED PRECEDING
                     AND 1 PRECEDING) AS before FROM chunks WHERE part_id = ?1)
             WHERE raw_offset != coalesce(before, 0)",
        )?
        .query_row([part_id], |r| r.get(0))?;
    Ok(StagedTotals {
        raw_bytes: raw as u64,
        stored_bytes: stored as u64,
        chunks: n as u64,
        contiguous: gaps == 0 && max_seq.map_or(n == 0, |m| m + 1 == n),
    })
}

/// Deletes the finished version of exactly this key, if any.
pub fn delete_finished(conn: &Connection, key: &ExportPartKey) -> rusqlite::Result<usize> {
    let (t, j, f, r, p) = slot_params(key);
    conn.prepare_cached(&format!(
        "DELETE FROM parts WHERE {SLOT} AND fencing_token = ?6 AND finalized = 1"
    ))?
    .execute(params![t, j, f, r, p, token_to_sql(key.fencing_token)])
}

/// The figures recorded when a part is published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish<'a> {
    /// Lines, as the writer counted them.
    pub line_count: u64,
    /// Raw bytes.
    pub byte_count: u64,
    /// Compressed bytes.
    pub stored_bytes: u64,
    /// Chunk rows.
    pub chunk_count: u64,
    /// Lowercase hex content digest.
    pub digest: &'a str,
    /// The digest's algorithm.
    pub digest_algorithm: DigestAlgorithm,
    /// Unix milliseconds.
    pub now_ms: i64,
}

/// Flips a staged part to finished with its figures. Returns rows changed
/// (0 if the row is gone or already finished).
pub fn publish(conn: &Connection, id: i64, p: &Publish<'_>) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "UPDATE parts SET finalized = 1, finalized_at_ms = ?2, line_count = ?3, byte_count = ?4,
             stored_bytes = ?5, chunk_count = ?6, digest = ?7,
             digest_algorithm = ?8
         WHERE id = ?1 AND finalized = 0",
    )?
    .execute(params![
        id,
        p.now_ms,
        p.line_count as i64,
        p.byte_count as i64,
        p.stored_bytes as i64,
        p.chunk_count as i64,
        p.digest,
        p.digest_algorithm.as_str()
    ])
}

const PART_COLUMNS: &str = "id, fencing_token, line_count, byte_count, stored_bytes, chunk_count, \
                            digest, finalized_at_ms, digest_algorithm";

/// The number of columns in [`PART_COLUMNS`].
const PART_COLUMN_COUNT: usize = 9;

fn part_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PartRow> {
    Ok(PartRow {
        id: r.get(0)?,
        fencing_token: token_from_sql(r.get(1)?),
        line_count: r.get::<_, i64>(2)? as u64,
        byte_count: r.get::<_, i64>(3)? as u64,
        stored_bytes: r.get::<_, i64>(4)? as u64,
        chunk_count: r.get::<_, i64>(5)? as u64,
        digest: r.get(6)?,
        finalized_at_ms: r.get(7)?,
        digest_algorithm: {
            let name: String = r.get(8)?;
            DigestAlgorithm::from_name(&name).ok_or_else(|| {
                rusqlite::Error::FromSqlConversionFailure(
                    8,
                    rusqlite::types::Type::Text,
                    format!("unknown digest algorithm {name:?}").into(),
                )
            })?
        },
    })
}

/// The finished version of exactly this key.
pub fn find_finished(conn: &Connection, key: &ExportPartKey) -> rusqlite::Result<Option<PartRow>> {
    let (t, j, f, r, p) = slot_params(key);
    conn.prepare_cached(&format!(
        "SELECT {PART_COLUMNS} FROM parts WHERE {SLOT} AND fencing_token = ?6 AND finalized = 1"
    ))?
    .query_row(
        params![t, j, f, r, p, token_to_sql(key.fencing_token)],
        part_row,
    )
    .optional()
}

/// The finished part with the highest token in the key's slot (the key's
/// own token is ignored).
pub fn find_latest_in_slot(
    conn: &Connection,
    key: &ExportPartKey,
) -> rusqlite::Result<Option<PartRow>> {
    let (t, j, f, r, p) = slot_params(key);
    conn.prepare_cached(&format!(
        "SELECT {PART_COLUMNS} FROM parts WHERE {SLOT} AND finalized = 1
         ORDER BY fencing_token DESC LIMIT 1"
    ))?
    .query_row(params![t, j, f, r, p], part_row)
    .optional()
}

/// One chunk of a part by sequence number.
pub fn chunk(conn: &Connection, part_id: i64, seq: u64) -> rusqlite::Result<Option<ChunkRow>> {
    conn.prepare_cached(
        "SELECT raw_offset, raw_len, frame FROM chunks WHERE part_id = ?1 AND seq = ?2",
    )?
    .query_row(params![part_id, seq as i64], |r| {
        Ok(ChunkRow {
            raw_offset: r.get::<_, i64>(0)? as u64,
            raw_len: r.get::<_, i64>(1)? as u64,
            frame: r.get(2)?,
        })
    })
    .optional()
}

/// Deletes every part (all tokens, staged and finished) of one tenant's job.
pub fn delete_job(conn: &Connection, tenant: &str, job: &str) -> rusqlite::Result<usize> {
    conn.prepare_cached("DELETE FROM parts WHERE tenant_id = ?1 AND job_id = ?2")?
        .execute(params![tenant, job])
}

/// How many parts (staged or finished, under any token) one tenant's job
/// holds.
pub fn count_job_parts(conn: &Connection, tenant: &str, job: &str) -> rusqlite::Result<u64> {
    conn.prepare_cached("SELECT count(*) FROM parts WHERE tenant_id = ?1 AND job_id = ?2")?
        .query_row(params![tenant, job], |r| r.get::<_, i64>(0))
        .map(|n| n.max(0) as u64)
}

/// Deletes every staged (unfinished) part with its chunks. Returns how many
/// went.
pub fn delete_all_staged(conn: &Connection) -> rusqlite::Result<usize> {
    conn.prepare_cached("DELETE FROM parts WHERE finalized = 0")?
        .execute([])
}

/// Sets the journal mode (`DELETE`, `WAL`, ...) and returns the mode now in
/// force, which SQLite keeps unchanged when it cannot switch.
pub fn set_journal_mode(conn: &Connection, mode: &str) -> rusqlite::Result<String> {
    conn.query_row(&format!("PRAGMA journal_mode = {mode}"), [], |r| r.get(0))
}

/// Opens a read transaction and takes its snapshot at once (a deferred
/// transaction reads nothing until its first statement).
pub fn begin_snapshot(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("BEGIN DEFERRED")?;
    match conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| {
        r.get::<_, i64>(0)
    }) {
        Ok(_) => Ok(()),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// Ends the read transaction [`begin_snapshot`] opened.
pub fn end_snapshot(conn: &Connection) -> rusqlite::Result<()> {
    if conn.is_autocommit() {
        return Ok(());
    }
    conn.execute_batch("ROLLBACK")
}

/// Deletes every part of exactly one tenant.
pub fn delete_tenant(conn: &Connection, tenant: &str) -> rusqlite::Result<usize> {
    conn.prepare_cached("DELETE FROM parts WHERE tenant_id = ?1")?
        .execute(params![tenant])
}

/// The highest fencing token among the parts (staged or finished) of each
/// job of `tenant` (only `job`, if given) that has parts, in job id order:
/// the fence marks a delete of those jobs records. Read them before the
/// delete, and raise the marks after it (see [`raise_job_fence`]).
pub fn highest_tokens(
    conn: &Connection,
    tenant: &str,
    job: Option<&str>,
) -> rusqlite::Result<Vec<(String, u64)>> {
    let sql = if job.is_some() {
        "SELECT job_id, max(fencing_token) FROM parts WHERE tenant_id = ?1 AND job_id = ?2
         GROUP BY job_id ORDER BY job_id"
    } else {
        "SELECT job_id, max(fencing_token) FROM parts WHERE tenant_id = ?1 AND ?2 IS NULL
         GROUP BY job_id ORDER BY job_id"
    };
    conn.prepare_cached(sql)?
        .query_map(params![tenant, job], |r| {
            Ok((r.get::<_, String>(0)?, token_from_sql(r.get(1)?)))
        })?
        .collect()
}

/// Records that one tenant's job was deleted when its highest token was
/// `token`, stamped `now_ms`: inserts the job's fence mark, or raises an
/// existing one (never lowering its token; its time moves forward only).
/// Returns rows written (1).
///
/// Run it in the delete's transaction, after the delete: on a database at
/// its size cap, the pages the delete freed are what the mark is written
/// into.
pub fn raise_job_fence(
    conn: &Connection,
    tenant: &str,
    job: &str,
    token: u64,
    now_ms: i64,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "INSERT INTO job_fences (tenant_id, job_id, fencing_token, recorded_at_ms)
         VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (tenant_id, job_id) DO UPDATE SET
             fencing_token = max(fencing_token, excluded.fencing_token),
             recorded_at_ms = max(recorded_at_ms, excluded.recorded_at_ms)",
    )?
    .execute(params![tenant, job, token_to_sql(token), now_ms])
}

/// The size cap in force on this connection, in pages (`PRAGMA
/// max_page_count`; SQLite's own limit when no cap was set).
pub fn size_cap(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row("PRAGMA max_page_count", [], |r| r.get::<_, i64>(0))
        .map(|v| v.max(0) as u64)
}

/// Sets this connection's size cap to `pages` (clamped to SQLite's limit);
/// returns the cap now in force, which SQLite raises to the database's
/// current page count if it is larger.
pub fn set_size_cap(conn: &Connection, pages: u64) -> rusqlite::Result<u64> {
    let pages = pages.clamp(1, SQLITE_MAX_PAGES);
    conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| {
        r.get::<_, i64>(0)
    })
    .map(|v| v.max(0) as u64)
}

/// Runs `f` with the connection's busy timeout at zero, so that nothing in
/// it waits for a lock held elsewhere, then restores the timeout.
pub fn without_waiting<T>(conn: &Connection, f: impl FnOnce(&Connection) -> T) -> T {
    let configured = conn
        .query_row("PRAGMA busy_timeout", [], |r| r.get::<_, i64>(0))
        .unwrap_or(0);
    let _ = conn.busy_timeout(std::time::Duration::ZERO);
    let out = f(conn);
    let _ = conn.busy_timeout(std::time::Duration::from_millis(configured.max(0) as u64));
    out
}

/// Checkpoints the whole write-ahead log into the database and truncates
/// the log file to zero bytes, without waiting for any lock: returns whether
/// it did (a reader on an old snapshot, or a writer of another process,
/// makes it give up at once).
pub fn truncate_wal_now(conn: &Connection) -> bool {
    without_waiting(conn, |c| {
        // The row is (busy, log frames, checkpointed frames); busy = 0 when
        // the checkpoint ran to the end and the log was truncated.
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            r.get::<_, i64>(0)
        })
        .is_ok_and(|busy| busy == 0)
    })
}

/// Copies the write-ahead log into the database without waiting for
/// anyone; the database file is truncated to its size once all of it is in.
pub fn checkpoint(conn: &Connection) -> rusqlite::Result<()> {
    checkpoint_caught_up(conn).map(|_| ())
}

/// [`checkpoint`], saying whether it copied every frame of the log (so
/// that the next write starts the log over).
pub fn checkpoint_caught_up(conn: &Connection) -> rusqlite::Result<bool> {
    // The row is (busy, log frames, checkpointed frames).
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok(r.get::<_, i64>(0)? == 0 && r.get::<_, i64>(1)? == r.get::<_, i64>(2)?)
    })
}

/// SQLite's largest page count (`SQLITE_MAX_PAGE_COUNT` of the bundled
/// build): a cap this high is no cap.
pub const SQLITE_MAX_PAGES: u64 = 0xffff_fffe;

/// The fence mark of one tenant's job: the highest token it had when its
/// parts were last deleted, if a mark is kept.
pub fn job_fence(conn: &Connection, tenant: &str, job: &str) -> rusqlite::Result<Option<u64>> {
    conn.prepare_cached(
        "SELECT fencing_token FROM job_fences WHERE tenant_id = ?1 AND job_id = ?2",
    )?
    .query_row(params![tenant, job], |r| r.get::<_, i64>(0))
    .optional()
    .map(|v| v.map(token_from_sql))
}

/// Deletes up to `limit` fence marks recorded at or before `cutoff_ms`.
/// Returns how many went.
pub fn prune_job_fences(conn: &Connection, cutoff_ms: i64, limit: u32) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "DELETE FROM job_fences WHERE rowid IN
             (SELECT rowid FROM job_fences WHERE recorded_at_ms <= ?1 LIMIT ?2)",
    )?
    .execute(params![cutoff_ms, limit])
}

/// Deletes a staged part by id; a finished one is left alone.
pub fn discard_staged_by_id(conn: &Connection, id: i64) -> rusqlite::Result<usize> {
    conn.prepare_cached("DELETE FROM parts WHERE id = ?1 AND finalized = 0")?
        .execute([id])
}

/// Where chunk `seq` of a part sits: `(raw_offset, raw_len)`. Reads no
/// frame bytes, so a Range request can locate its first frame cheaply.
// Only the download route (feature `server`) needs it.
#[cfg_attr(not(feature = "server"), allow(dead_code))]
pub fn chunk_span(
    conn: &Connection,
    part_id: i64,
    seq: u64,
) -> rusqlite::Result<Option<(u64, u64)>> {
    conn.prepare_cached("SELECT raw_offset, raw_len FROM chunks WHERE part_id = ?1 AND seq = ?2")?
        .query_row(params![part_id, seq as i64], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
        })
        .optional()
}

/// Records that staged part `id` received chunks at `now_ms` (a finished
/// part is left alone). Returns rows changed.
pub fn touch_staged(conn: &Connection, id: i64, now_ms: i64) -> rusqlite::Result<usize> {
    conn.prepare_cached("UPDATE parts SET touched_at_ms = ?2 WHERE id = ?1 AND finalized = 0")?
        .execute(params![id, now_ms])
}

/// Up to `limit` staged (unfinished) parts last active at or before
/// `cutoff_ms` (their latest chunks, or their creation if they have none),
/// with ids above `after_id`, in id order.
pub fn staged_before(
    conn: &Connection,
    cutoff_ms: i64,
    after_id: i64,
    limit: u32,
) -> rusqlite::Result<Vec<i64>> {
    conn.prepare_cached(
        "SELECT id FROM parts
         WHERE finalized = 0 AND coalesce(touched_at_ms, created_at_ms) <= ?1 AND id > ?2
         ORDER BY id LIMIT ?3",
    )?
    .query_map(params![cutoff_ms, after_id, limit], |r| r.get(0))?
    .collect()
}

/// Deletes every part (staged or finished) of one tenant's job whose slot
/// holds a part with a higher fencing token: what stays is, per slot, the
/// parts under the slot's highest token.
pub fn delete_superseded(conn: &Connection, tenant: &str, job: &str) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "DELETE FROM parts WHERE tenant_id = ?1 AND job_id = ?2 AND fencing_token < (
             SELECT max(s.fencing_token) FROM parts AS s
             WHERE s.tenant_id = parts.tenant_id AND s.job_id = parts.job_id
               AND s.file_type = parts.file_type AND s.resource_type = parts.resource_type
               AND s.part_index = parts.part_index)",
    )?
    .execute(params![tenant, job])
}

/// Up to `limit` finished parts with ids above `after_id`, in id order,
/// each with its key.
pub fn finished_after(
    conn: &Connection,
    after_id: i64,
    limit: u32,
) -> rusqlite::Result<Vec<(ExportPartKey, PartRow)>> {
    conn.prepare_cached(&format!(
        "SELECT {PART_COLUMNS}, tenant_id, job_id, file_type, resource_type, part_index
         FROM parts WHERE finalized = 1 AND id > ?1 ORDER BY id LIMIT ?2"
    ))?
    .query_map(params![after_id, limit], |r| {
        let row = part_row(r)?;
        let key = ExportPartKey {
            tenant_id: r.get(PART_COLUMN_COUNT)?,
            job_id: crate::key::ExportJobId::from_string(
                r.get::<_, String>(PART_COLUMN_COUNT + 1)?,
            ),
            file_type: r.get(PART_COLUMN_COUNT + 2)?,
            resource_type: r.get(PART_COLUMN_COUNT + 3)?,
            part_index: r.get::<_, i64>(PART_COLUMN_COUNT + 4)? as u32,
            fencing_token: row.fencing_token,
        };
        Ok((key, row))
    })?
    .collect()
}

/// What the database holds, in parts and bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Census {
    /// Finished parts.
    pub finished_parts: u64,
    /// Uncompressed bytes of the finished parts.
    pub finished_bytes: u64,
    /// Staged (unfinished) parts.
    pub staged_parts: u64,
    /// Chunk rows whose part row is missing (never expected: deletes cascade).
    pub orphan_chunks: u64,
}

/// Counts parts and orphaned chunks (see [`Census`]).
pub fn census(conn: &Connection) -> rusqlite::Result<Census> {
    let (finished_parts, finished_bytes, staged_parts): (i64, i64, i64) = conn
        .prepare_cached(
            "SELECT coalesce(sum(finalized = 1), 0), coalesce(sum(CASE WHEN finalized = 1
                 THEN byte_count END), 0), coalesce(sum(finalized = 0), 0) FROM parts",
        )?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    let orphan_chunks: i64 = conn
        .prepare_cached(
            "SELECT count(*) FROM chunks WHERE NOT EXISTS
                 (SELECT 1 FROM parts WHERE parts.id = chunks.part_id)",
        )?
        .query_row([], |r| r.get(0))?;
    Ok(Census {
        finished_parts: finished_parts as u64,
        finished_bytes: finished_bytes as u64,
        staged_parts: staged_parts as u64,
        orphan_chunks: orphan_chunks as u64,
    })
}

/// The file's page size, page count and free-list length, in that order.
pub fn pages(conn: &Connection) -> rusqlite::Result<(u64, u64, u64)> {
    let get =
        |pragma: &str| conn.query_row(&format!("PRAGMA {pragma}"), [], |r| r.get::<_, i64>(0));
    Ok((
        get("page_size")? as u64,
        get("page_count")? as u64,
        get("freelist_count")? as u64,
    ))
}

/// Gives up to `max_pages` free pages back to the file system with
/// `PRAGMA incremental_vacuum`, in its own transaction unless one is open.
/// Returns the pages freed. The pragma frees one page per result row, so it
/// is stepped to completion: a single `execute` would free one page at most.
pub fn incremental_vacuum(conn: &Connection, max_pages: u32) -> rusqlite::Result<u64> {
    let mut stmt =
        conn.prepare_cached(&format!("PRAGMA incremental_vacuum({})", max_pages.max(1)))?;
    let mut rows = stmt.query([])?;
    let mut freed = 0;
    while rows.next()?.is_some() {
        freed += 1;
    }
    Ok(freed)
}

/// Lines of `PRAGMA integrity_check` that are not `ok`, at most `max`: empty
/// when the database is sound.
pub fn integrity_problems(conn: &Connection, max: u32) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare(&format!("PRAGMA integrity_check({})", max.max(1)))?;
    let lines = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(lines.into_iter().filter(|l| l != "ok").collect())
}

/// Which parts a listing covers: one tenant, one job id (within the
/// tenant, or in any tenant), finished parts only. The default covers
/// every part.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListScope<'a> {
    /// Only this tenant's parts.
    pub tenant: Option<&'a str>,
    /// Only parts of jobs with this id.
    pub job: Option<&'a str>,
    /// Only finished parts.
    pub finished_only: bool,
}

impl ListScope<'_> {
    /// The condition on `parts AS p`, over parameters `?1` (tenant) and
    /// `?2` (job): both are always named, so the parameter count never
    /// changes, and a given tenant (and job) is an equality the
    /// `parts_by_key` index serves.
    fn condition(&self) -> String {
        let tenant = if self.tenant.is_some() {
            "p.tenant_id = ?1"
        } else {
            "?1 IS NULL"
        };
        let job = if self.job.is_some() {
            "p.job_id = ?2"
        } else {
            "?2 IS NULL"
        };
        let state = if self.finished_only {
            " AND p.finalized = 1"
        } else {
            ""
        };
        format!("{tenant} AND {job}{state}")
    }
}

/// A part's NDJSON bytes, stored bytes and chunks: recorded at finalize for
/// a finished part, summed over the chunks stored so far for a staged one
/// (an index range per staged part; `length` of a blob reads no blob).
const LISTED_FIGURES: &str = "
    CASE WHEN p.finalized = 1 THEN p.byte_count
         ELSE (SELECT coalesce(sum(raw_len), 0) FROM chunks WHERE part_id = p.id) END AS bytes,
    CASE WHEN p.finalized = 1 THEN p.stored_bytes
         ELSE (SELECT coalesce(sum(length(frame)), 0) FROM chunks WHERE part_id = p.id) END
         AS stored,
    CASE WHEN p.finalized = 1 THEN p.chunk_count
         ELSE (SELECT count(*) FROM chunks WHERE part_id = p.id) END AS chunks";

/// One part as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedPart {
    /// The part's key, fencing token included.
    pub key: ExportPartKey,
    /// Finished (readable) rather than staged.
    pub finished: bool,
    /// Lines recorded at finalize; `None` while staged.
    pub line_count: Option<u64>,
    /// NDJSON bytes: recorded at finalize, or stored so far while staged.
    pub byte_count: u64,
    /// Compressed frame bytes (recorded, or stored so far).
    pub stored_bytes: u64,
    /// Chunks (recorded, or stored so far).
    pub chunk_count: u64,
    /// Unix milliseconds the part was opened.
    pub created_at_ms: i64,
    /// Unix milliseconds of the finalize commit.
    pub finalized_at_ms: Option<i64>,
    /// Unix milliseconds a staged part last received chunks.
    pub touched_at_ms: Option<i64>,
    /// Lowercase hex content digest and its algorithm, once finished.
    pub digest: Option<(String, DigestAlgorithm)>,
}

fn digest_algorithm_at(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<DigestAlgorithm> {
    let name: String = r.get(i)?;
    DigestAlgorithm::from_name(&name).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Text,
            format!("unknown digest algorithm {name:?}").into(),
        )
    })
}

/// The parts in `scope`, staged and finished, ordered by tenant, job, file
/// type, resource type, part index, token (a staged version before the
/// finished one of the same key). One query; reads no frame.
pub fn list_parts(conn: &Connection, scope: &ListScope<'_>) -> rusqlite::Result<Vec<ListedPart>> {
    let sql = format!(
        "SELECT p.tenant_id, p.job_id, p.file_type, p.resource_type, p.part_index,
                p.fencing_token, p.finalized, p.line_count, {LISTED_FIGURES},
                p.created_at_ms, p.finalized_at_ms, p.touched_at_ms, p.digest,
                p.digest_algorithm
         FROM parts AS p WHERE {}
         ORDER BY p.tenant_id, p.job_id, p.file_type, p.resource_type, p.part_index,
                  p.fencing_token, p.finalized",
        scope.condition()
    );
    conn.prepare_cached(&sql)?
        .query_map(params![scope.tenant, scope.job], |r| {
            let finished = r.get::<_, i64>(6)? == 1;
            let digest = match r.get::<_, Option<String>>(14)? {
                Some(hex) if finished => Some((hex, digest_algorithm_at(r, 15)?)),
                _ => None,
            };
            Ok(ListedPart {
                key: ExportPartKey {
                    tenant_id: r.get(0)?,
                    job_id: crate::key::ExportJobId::from_string(r.get::<_, String>(1)?),
                    file_type: r.get(2)?,
                    resource_type: r.get(3)?,
                    part_index: r.get::<_, i64>(4)? as u32,
                    fencing_token: token_from_sql(r.get(5)?),
                },
                finished,
                line_count: r.get::<_, Option<i64>>(7)?.map(|n| n as u64),
                byte_count: r.get::<_, i64>(8)? as u64,
                stored_bytes: r.get::<_, i64>(9)? as u64,
                chunk_count: r.get::<_, i64>(10)? as u64,
                created_at_ms: r.get(11)?,
                finalized_at_ms: r.get(12)?,
                touched_at_ms: r.get(13)?,
                digest,
            })
        })?
        .collect()
}

/// The totals of a group of parts (a job, a tenant).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListedTotals {
    /// The group's tenant.
    pub tenant: String,
    /// The group's job, when grouped by job.
    pub job: Option<String>,
    /// Distinct jobs in the group.
    pub jobs: u64,
    /// Parts, staged and finished (every token).
    pub parts: u64,
    /// Finished parts.
    pub finished_parts: u64,
    /// Lines of the finished parts.
    pub line_count: u64,
    /// NDJSON bytes: recorded for finished parts, stored so far for staged.
    pub byte_count: u64,
    /// Compressed frame bytes, likewise.
    pub stored_bytes: u64,
    /// Chunks, likewise.
    pub chunk_count: u64,
    /// The earliest part's creation, Unix milliseconds.
    pub first_created_at_ms: i64,
    /// The latest finalize, Unix milliseconds.
    pub last_finalized_at_ms: Option<i64>,
    /// The latest change of any part (opened, received chunks, finished).
    pub last_active_at_ms: i64,
}

/// The totals of the parts in `scope`, one row per tenant (or, with
/// `by_job`, per tenant and job), in tenant (and job) order. One query;
/// reads no frame.
pub fn list_totals(
    conn: &Connection,
    scope: &ListScope<'_>,
    by_job: bool,
) -> rusqlite::Result<Vec<ListedTotals>> {
    // Grouped by exactly the index's leading columns, the groups come in
    // index order and need no sort.
    let (job, group) = if by_job {
        ("p.job_id", "tenant_id, job")
    } else {
        ("NULL", "tenant_id")
    };
    let sql = format!(
        "SELECT tenant_id, job, count(DISTINCT job_id), count(*), sum(finalized),
                coalesce(sum(line_count), 0), sum(bytes), sum(stored), sum(chunks),
                min(created_at_ms), max(finalized_at_ms),
                max(coalesce(finalized_at_ms, touched_at_ms, created_at_ms))
         FROM (SELECT p.tenant_id, {job} AS job, p.job_id, p.finalized,
                      CASE WHEN p.finalized = 1 THEN p.line_count END AS line_count,
                      {LISTED_FIGURES}, p.created_at_ms, p.finalized_at_ms, p.touched_at_ms
               FROM parts AS p WHERE {})
         GROUP BY {group} ORDER BY {group}",
        scope.condition()
    );
    conn.prepare_cached(&sql)?
        .query_map(params![scope.tenant, scope.job], |r| {
            let count = |i| r.get::<_, i64>(i).map(|n| n as u64);
            Ok(ListedTotals {
                tenant: r.get(0)?,
                job: r.get(1)?,
                jobs: count(2)?,
                parts: count(3)?,
                finished_parts: count(4)?,
                line_count: count(5)?,
                byte_count: count(6)?,
                stored_bytes: count(7)?,
                chunk_count: count(8)?,
                first_created_at_ms: r.get(9)?,
                last_finalized_at_ms: r.get(10)?,
                last_active_at_ms: r.get(11)?,
            })
        })?
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::ExportJobId;

    fn db() -> Connection {
        let mut c = Connection::open_in_memory().unwrap();
        crate::store::schema::configure(&c, std::time::Duration::from_secs(1)).unwrap();
        crate::store::schema::migrate(&mut c).unwrap();
        c
    }

    fn key(token: u64) -> ExportPartKey {
        ExportPartKey::output("t", ExportJobId::from("j"), "Patient", 0, token)
    }

    #[test]
    fn token_mapping_keeps_order_over_the_whole_range() {
        let tokens = [0, 1, 2, (1 << 63) - 1, 1 << 63, u64::MAX - 1, u64::MAX];
        for w in tokens.windows(2) {
            assert!(token_to_sql(w[0]) < token_to_sql(w[1]));
        }
        for t in tokens {
            assert_eq!(token_from_sql(token_to_sql(t)), t);
        }
        let c = db();
        for t in [5, u64::MAX, 0] {
            insert_staged(&c, &key(t), 1).unwrap();
        }
        assert_eq!(max_token_in_slot(&c, &key(0)).unwrap(), Some(u64::MAX));
    }

    #[test]
    fn staged_then_published_then_found() {
        let c = db();
        let id = insert_staged(&c, &key(3), 10).unwrap();
        insert_chunk(&c, id, 0, 0, 5, b"abc").unwrap();
        insert_chunk(&c, id, 1, 5, 2, b"de").unwrap();
        let t = chunk_totals(&c, id).unwrap();
        assert_eq!(
            t,
            StagedTotals {
                raw_bytes: 7,
                stored_bytes: 5,
                chunks: 2,
                contiguous: true
            }
        );
        assert_eq!(find_finished(&c, &key(3)).unwrap(), None);
        let p = Publish {
            line_count: 1,
            byte_count: 7,
            stored_bytes: 5,
            chunk_count: 2,
            digest: "d",
            digest_algorithm: DigestAlgorithm::Blake3,
            now_ms: 11,
        };
        assert_eq!(publish(&c, id, &p).unwrap(), 1);
        assert_eq!(publish(&c, id, &p).unwrap(), 0, "already finished");
        let row = find_finished(&c, &key(3)).unwrap().unwrap();
        assert_eq!((row.id, row.byte_count, row.fencing_token), (id, 7, 3));
        assert_eq!(row.digest_algorithm, DigestAlgorithm::Blake3);
        assert_eq!(chunk(&c, id, 1).unwrap().unwrap().frame, b"de");
        assert_eq!(chunk(&c, id, 2).unwrap(), None);
        assert_eq!(chunk_span(&c, id, 1).unwrap(), Some((5, 2)));
        assert_eq!(chunk_span(&c, id, 2).unwrap(), None);
        assert_eq!(find_latest_in_slot(&c, &key(0)).unwrap().unwrap().id, id);
    }

    #[test]
    fn totals_notice_gaps() {
        let c = db();
        let id = insert_staged(&c, &key(1), 0).unwrap();
        insert_chunk(&c, id, 0, 0, 5, b"a").unwrap();
        insert_chunk(&c, id, 2, 5, 5, b"b").unwrap();
        assert!(!chunk_totals(&c, id).unwrap().contiguous);
        let id2 = insert_staged(&c, &key(2), 0).unwrap();
        insert_chunk(&c, id2, 0, 0, 5, b"a").unwrap();
        insert_chunk(&c, id2, 1, 6, 5, b"b").unwrap();
        assert!(!chunk_totals(&c, id2).unwrap().contiguous);
        let id3 = insert_staged(&c, &key(3), 0).unwrap();
        assert!(chunk_totals(&c, id3).unwrap().contiguous);
    }

    #[test]
    fn superseded_parts_go_and_the_highest_token_per_slot_stays() {
        let c = db();
        let slot = |idx: u32, token: u64| {
            ExportPartKey::output("t", ExportJobId::from("j"), "Patient", idx, token)
        };
        let old0 = insert_staged(&c, &slot(0, 1), 0).unwrap();
        let new0 = insert_staged(&c, &slot(0, 2), 0).unwrap();
        let only1 = insert_staged(&c, &slot(1, 1), 0).unwrap();
        let other = insert_staged(
            &c,
            &ExportPartKey::output("t", ExportJobId::from("k"), "Patient", 0, 1),
            0,
        )
        .unwrap();
        insert_staged(&c, &slot(0, 3), 0).unwrap();
        assert_eq!(delete_superseded(&c, "t", "j").unwrap(), 2);
        for (id, kept) in [(old0, false), (new0, false), (only1, true), (other, true)] {
            assert_eq!(part_state(&c, id).unwrap().is_some(), kept, "part {id}");
        }
    }

    #[test]
    fn part_column_count_matches_the_list() {
        assert_eq!(PART_COLUMNS.split(',').count(), PART_COLUMN_COUNT);
    }

    #[test]
    fn staged_listing_census_and_vacuum_step() {
        let c = db();
        let a = insert_staged(&c, &key(1), 100).unwrap();
        let b = insert_staged(&c, &key(2), 200).unwrap();
        assert_eq!(staged_before(&c, 150, 0, 10).unwrap(), vec![a]);
        assert_eq!(staged_before(&c, 250, a, 10).unwrap(), vec![b]);
        insert_chunk(&c, b, 0, 0, 3, b"abc").unwrap();
        publish(
            &c,
            b,
            &Publish {
                line_count: 1,
                byte_count: 3,
                stored_bytes: 3,
                chunk_count: 1,
                digest: "d",
                digest_algorithm: DigestAlgorithm::Blake3,
                now_ms: 1,
            },
        )
        .unwrap();
        let census = census(&c).unwrap();
        assert_eq!(
            (
                census.finished_parts,
                census.finished_bytes,
                census.staged_parts,
                census.orphan_chunks
            ),
            (1, 3, 1, 0)
        );
        let listed = finished_after(&c, 0, 10).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].0.clone(), listed[0].1.id), (key(2), b));
        assert!(integrity_problems(&c, 10).unwrap().is_empty());
        // An in-memory database without auto-vacuum frees nothing, and says so.
        assert_eq!(incremental_vacuum(&c, 10).unwrap(), 0);
    }

    #[test]
    fn fence_marks_keep_the_highest_token_per_job_and_age_out() {
        let c = db();
        let k = |tenant: &str, job: &str, idx: u32, token: u64| {
            ExportPartKey::output(tenant, ExportJobId::from(job), "P", idx, token)
        };
        // No parts: nothing to remember.
        assert!(highest_tokens(&c, "acme", Some("j")).unwrap().is_empty());
        insert_staged(&c, &k("acme", "j", 0, 3), 0).unwrap();
        insert_staged(&c, &k("acme", "j", 1, u64::MAX - 1), 0).unwrap();
        insert_staged(&c, &k("acme", "other", 0, 1), 0).unwrap();
        insert_staged(&c, &k("acme/research", "j", 0, 9), 0).unwrap();
        let j = vec![("j".to_string(), u64::MAX - 1)];
        assert_eq!(highest_tokens(&c, "acme", Some("j")).unwrap(), j);
        assert_eq!(
            highest_tokens(&c, "acme", None).unwrap(),
            vec![("j".to_string(), u64::MAX - 1), ("other".to_string(), 1)]
        );
        assert_eq!(job_fence(&c, "acme", "j").unwrap(), None);
        assert_eq!(
            raise_job_fence(&c, "acme", "j", u64::MAX - 1, 10).unwrap(),
            1
        );
        assert_eq!(job_fence(&c, "acme", "j").unwrap(), Some(u64::MAX - 1));
        assert_eq!(job_fence(&c, "acme", "other").unwrap(), None);
        assert_eq!(job_fence(&c, "acme/research", "j").unwrap(), None);
        // A lower token later never lowers the mark; the time moves on.
        raise_job_fence(&c, "acme", "j", 2, 30).unwrap();
        raise_job_fence(&c, "acme", "other", 1, 30).unwrap();
        raise_job_fence(&c, "acme", "other", 0, 20).unwrap();
        assert_eq!(job_fence(&c, "acme", "j").unwrap(), Some(u64::MAX - 1));
        assert_eq!(job_fence(&c, "acme", "other").unwrap(), Some(1));
        let times: Vec<i64> = c
            .prepare("SELECT recorded_at_ms FROM job_fences ORDER BY job_id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(times, vec![30, 30]);
        assert_eq!(prune_job_fences(&c, 29, 10).unwrap(), 0);
        assert_eq!(prune_job_fences(&c, 30, 1).unwrap(), 1);
        assert_eq!(prune_job_fences(&c, 30, 10).unwrap(), 1);
        assert_eq!(job_fence(&c, "acme", "j").unwrap(), None);
    }

    #[test]
    fn deletes_are_scoped() {
        let c = db();
        let a = ExportPartKey::output("acme", ExportJobId::from("j"), "P", 0, 1);
        let b = ExportPartKey::output("acme/research", ExportJobId::from("j"), "P", 0, 1);
        insert_staged(&c, &a, 0).unwrap();
        insert_staged(&c, &b, 0).unwrap();
        assert_eq!(delete_tenant(&c, "acme").unwrap(), 1);
        assert_eq!(delete_job(&c, "acme/research", "other").unwrap(), 0);
        assert_eq!(delete_job(&c, "acme/research", "j").unwrap(), 1);
    }

    #[test]
    fn listings_show_state_figures_and_order() {
        let c = db();
        let k = |tenant: &str, job: &str, ty: &str, idx: u32, token: u64| {
            ExportPartKey::output(tenant, ExportJobId::from(job), ty, idx, token)
        };
        let finish = |id, bytes, stored, chunks, at| {
            let p = Publish {
                line_count: 2,
                byte_count: bytes,
                stored_bytes: stored,
                chunk_count: chunks,
                digest: "dd",
                digest_algorithm: DigestAlgorithm::Blake3,
                now_ms: at,
            };
            assert_eq!(publish(&c, id, &p).unwrap(), 1);
        };
        let a = insert_staged(&c, &k("acme", "j2", "Patient", 1, 1), 10).unwrap();
        insert_chunk(&c, a, 0, 0, 5, b"abc").unwrap();
        insert_chunk(&c, a, 1, 5, 4, b"de").unwrap();
        finish(a, 9, 5, 2, 20);
        let b = insert_staged(&c, &k("acme", "j1", "Patient", 0, 2), 30).unwrap();
        insert_chunk(&c, b, 0, 0, 7, b"wxyz").unwrap();
        touch_staged(&c, b, 40).unwrap();
        insert_staged(&c, &k("acme", "j1", "Encounter", 0, 1), 50).unwrap();
        let e = ExportPartKey::error("acme/research", ExportJobId::from("j1"), "Patient", 0, 1);
        let e_id = insert_staged(&c, &e, 5).unwrap();
        finish(e_id, 0, 0, 0, 6);
        let top = k("beta", "j1", "Patient", 0, u64::MAX);
        let f = insert_staged(&c, &top, 1).unwrap();
        insert_chunk(&c, f, 0, 0, 3, b"f").unwrap();
        finish(f, 3, 1, 1, 2);

        let all = list_parts(&c, &ListScope::default()).unwrap();
        let keys: Vec<String> = all.iter().map(|p| p.key.display().to_string()).collect();
        assert_eq!(
            keys,
            [
                "acme/j1/output/Encounter-0@1",
                "acme/j1/output/Patient-0@2",
                "acme/j2/output/Patient-1@1",
                "acme/research/j1/error/Patient-0@1",
                &format!("beta/j1/output/Patient-0@{}", u64::MAX),
            ]
        );
        let staged = &all[1];
        assert!(!staged.finished);
        assert_eq!(
            (
                staged.line_count,
                staged.byte_count,
                staged.stored_bytes,
                staged.chunk_count
            ),
            (None, 7, 4, 1)
        );
        assert_eq!(
            (
                staged.created_at_ms,
                staged.touched_at_ms,
                staged.finalized_at_ms
            ),
            (30, Some(40), None)
        );
        assert_eq!(staged.digest, None);
        assert_eq!((all[0].byte_count, all[0].chunk_count), (0, 0));
        let done = &all[2];
        assert!(done.finished);
        assert_eq!(
            (
                done.line_count,
                done.byte_count,
                done.stored_bytes,
                done.chunk_count
            ),
            (Some(2), 9, 5, 2)
        );
        assert_eq!(done.finalized_at_ms, Some(20));
        assert_eq!(
            done.digest,
            Some(("dd".to_string(), DigestAlgorithm::Blake3))
        );
        assert_eq!(all[4].key, top);

        let scoped = |tenant, job, finished_only| {
            let scope = ListScope {
                tenant,
                job,
                finished_only,
            };
            list_parts(&c, &scope)
                .unwrap()
                .iter()
                .map(|p| p.key.display().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(scoped(Some("acme"), None, false).len(), 3);
        assert_eq!(scoped(Some("acme"), Some("j1"), false).len(), 2);
        assert_eq!(scoped(None, Some("j1"), false).len(), 4);
        assert_eq!(scoped(Some("acme"), Some("j1"), true).len(), 0);
        assert_eq!(scoped(None, None, true).len(), 3);
        assert!(scoped(Some("acm"), None, false).is_empty());

        let tenants = list_totals(&c, &ListScope::default(), false).unwrap();
        assert_eq!(tenants.len(), 3);
        assert_eq!(
            tenants[0],
            ListedTotals {
                tenant: "acme".into(),
                job: None,
                jobs: 2,
                parts: 3,
                finished_parts: 1,
                line_count: 2,
                byte_count: 16,
                stored_bytes: 9,
                chunk_count: 3,
                first_created_at_ms: 10,
                last_finalized_at_ms: Some(20),
                last_active_at_ms: 50,
            }
        );
        let jobs = list_totals(
            &c,
            &ListScope {
                tenant: Some("acme"),
                ..ListScope::default()
            },
            true,
        )
        .unwrap();
        let j1 = &jobs[0];
        assert_eq!(
            (
                j1.job.as_deref(),
                j1.parts,
                j1.finished_parts,
                j1.line_count,
                j1.byte_count
            ),
            (Some("j1"), 2, 0, 0, 7)
        );
        assert_eq!((j1.last_finalized_at_ms, j1.last_active_at_ms), (None, 50));
        assert_eq!(jobs[1].job.as_deref(), Some("j2"));
        let finished = ListScope {
            finished_only: true,
            ..ListScope::default()
        };
        let t = list_totals(&c, &finished, false).unwrap();
        assert_eq!(t.iter().map(|t| t.parts).sum::<u64>(), 3);
        assert!(list_totals(
            &c,
            &ListScope {
                tenant: Some("x"),
                ..ListScope::default()
            },
            true
        )
        .unwrap()
        .is_empty());
    }
}
