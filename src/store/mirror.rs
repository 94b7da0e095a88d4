//! Mirroring: keeping a store's finished parts equal to those of another
//! store's file, part by part, for a replica that serves downloads.
//!
//! The other file (the source) may be rewritten underneath by something
//! that does not go through SQLite's journal: `litestream restore -f`
//! (Litestream 0.5) writes each replicated page into its copy in place,
//! holding SQLite's lock bytes while it writes, and tells other
//! connections by the header's change counter only when page 1 is among
//! the pages. A connection that kept its page cache across such a write
//! could mix old pages with new ones. So every read of the source is one
//! short read transaction on a connection opened for it alone and closed
//! after it, and every part is checked (frames decode to their recorded
//! lengths, offsets follow on, sizes and digest match the part's row)
//! before it is published in this store, in the same durable transaction
//! as its last chunks. A part that fails the check is reported and not
//! copied; a part deleted from the source while it is copied is skipped.
//!
//! Only finished parts are copied: a part the source still stages is
//! never visible here, and a part finished there appears here whole.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::check::PartCheck;
use super::db::open_checked_read_only;
use super::maintenance::VerifyProblem;
use super::sql::{self, ChunkRow, PartRow, Publish};
use super::SqliteOutputStore;
use crate::error::{from_sqlite, StorageError, StorageResult};
use crate::key::ExportPartKey;

/// The most frame bytes one read of the source takes, and one write
/// carries to the writer thread: the mirror's memory bound, whatever the
/// parts' sizes.
pub const MIRROR_BATCH_BYTES: usize = 8 << 20;

/// Finished parts listed per query of the source.
const LIST_PAGE: u32 = 512;

/// What one [`SqliteOutputStore::mirror_from`] pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MirrorReport {
    /// Finished parts of the source at the pass's start.
    pub source_parts: u64,
    /// Parts copied into this store (new, or replacing a different part
    /// under the same key).
    pub parts_added: u64,
    /// Uncompressed bytes of the parts copied.
    pub bytes_added: u64,
    /// Stored (compressed) bytes of the parts copied.
    pub stored_bytes_added: u64,
    /// Parts deleted from this store because the source no longer has them
    /// in that version (a part replaced there counts here and in
    /// `parts_added`).
    pub parts_removed: u64,
    /// Parts already here, left as they were.
    pub parts_unchanged: u64,
    /// Parts deleted from the source while this pass copied them: skipped.
    pub parts_vanished: u64,
    /// Parts of the source that failed their check: not copied (a
    /// later pass tries them again).
    pub problems: Vec<VerifyProblem>,
    /// The pass, from start to its last commit.
    pub elapsed: Duration,
}

impl MirrorReport {
    /// Whether the pass changed this store.
    pub fn changed(&self) -> bool {
        self.parts_added > 0 || self.parts_removed > 0
    }
}

impl SqliteOutputStore {
    /// Makes this store's finished parts those of the store file at
    /// `source`, once: copies each finished part the source has and this
    /// store lacks (or holds in another version under the same key),
    /// deletes each finished part this store has and the source does not,
    /// and leaves the rest.
    ///
    /// What a caller may rely on:
    ///
    /// - `source` is only read, through read-only connections, each used
    ///   for one short read transaction and closed: the source may be
    ///   written meanwhile by its own writers or rewritten in place by
    ///   `litestream restore -f`. A source in a folder this process may
    ///   not write needs its `-wal` and `-shm` beside it when its header
    ///   says WAL mode, as [`SqliteOutputStore::open_read_only`] does.
    /// - A part appears here whole and checked, or not at all: its chunks'
    ///   frames decode to their recorded lengths, their offsets follow on,
    ///   and the part's size, stored size, chunk count and content digest
    ///   match the source's row. It is published in one durable
    ///   transaction with its last chunks and keeps the source's figures,
    ///   digest and finalize time. A part that fails is listed in
    ///   [`MirrorReport::problems`] and not copied; the pass goes on.
    /// - A part the source holds in another version under the same key
    ///   (deleted and written again there) is deleted here first, then
    ///   copied: in between it is not found, and it is never served in a
    ///   version the source no longer has.
    /// - Staged parts of the source are never copied.
    /// - Memory stays within about [`MIRROR_BATCH_BYTES`] plus one
    ///   chunk's decompressed bytes, whatever the parts' sizes.
    /// - Errors: the source missing, not a store, or of another schema
    ///   version fail the pass with that reason and change nothing; so
    ///   does `source` being this store's own file. This store open
    ///   read-only refuses the call.
    ///
    /// The store should have no other writer: the mirror owns its parts,
    /// and deletes whatever the source does not hold. Parts left staged by
    /// an interrupted pass are replaced by the next pass that copies the
    /// same key; `reclaim_abandoned` removes the others.
    pub async fn mirror_from(&self, source: impl AsRef<Path>) -> StorageResult<MirrorReport> {
        let op = "mirror";
        self.db().check_writable(op)?;
        let source = source.as_ref().to_path_buf();
        if self.db().is_same_file(&source) {
            return Err(StorageError::invalid(
                op,
                "the source is this store's own file; mirror from another store's file",
            ));
        }
        let started = Instant::now();
        let busy = self.options().busy_timeout;
        let src = source.clone();
        let theirs = self
            .db()
            .blocking(op, move || list_source(&src, busy))
            .await?;
        let ours = self
            .db()
            .read(op, |c| list_finished(c).map_err(|e| from_sqlite(op, e)))
            .await?;
        let mut report = MirrorReport {
            source_parts: theirs.len() as u64,
            ..MirrorReport::default()
        };
        let wanted: HashMap<&ExportPartKey, &PartRow> =
            theirs.iter().map(|(k, r)| (k, r)).collect();
        let gone: Vec<ExportPartKey> = ours
            .iter()
            .filter(|(k, r)| !wanted.get(k).is_some_and(|t| same_version(t, r)))
            .map(|(k, _)| k.clone())
            .collect();
        let held: HashMap<&ExportPartKey, &PartRow> = ours.iter().map(|(k, r)| (k, r)).collect();
        let mut copy = Vec::new();
        for (key, row) in &theirs {
            match held.get(key) {
                Some(mine) if same_version(row, mine) => report.parts_unchanged += 1,
                _ => copy.push((key.clone(), row.clone())),
            }
        }
        drop(held);
        if !gone.is_empty() {
            let n = gone.len() as u64;
            self.db()
                .write_durable(op, move |c| {
                    for key in &gone {
                        sql::delete_finished(c, key).map_err(|e| from_sqlite(op, e))?;
                    }
                    Ok(())
                })
                .await?;
            report.parts_removed += n;
            self.db().reclaim_space_soon();
        }
        for (key, row) in copy {
            match self.copy_part(&source, key.clone(), row.clone()).await {
                Ok(true) => {
                    report.parts_added += 1;
                    report.bytes_added += row.byte_count;
                    report.stored_bytes_added += row.stored_bytes;
                }
                Ok(false) => report.parts_vanished += 1,
                Err(e) if e.is_corrupt() => report.problems.push(VerifyProblem {
                    part: Some(key.display().to_string()),
                    kind: e.kind(),
                    message: e.message().to_string(),
                }),
                Err(e) => return Err(e),
            }
        }
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// Copies one finished part of the source, batch by batch, checking it
    /// as it goes; publishes it with the last batch. `Ok(false)`: the part
    /// left the source meanwhile (nothing of it stays here).
    async fn copy_part(
        &self,
        source: &Path,
        key: ExportPartKey,
        row: PartRow,
    ) -> StorageResult<bool> {
        let op = "mirror";
        let busy = self.options().busy_timeout;
        let mut check = PartCheck::new(op, &row);
        let mut staged: Option<i64> = None;
        let mut next_seq = 0_u64;
        loop {
            let src = source.to_path_buf();
            let (id, from, count) = (row.id, next_seq, row.chunk_count);
            let batch = self
                .db()
                .blocking(op, move || read_batch(&src, busy, id, from, count))
                .await?;
            let Some(chunks) = batch else {
                if let Some(id) = staged {
                    self.discard_staged_copy(id).await?;
                }
                return Ok(false);
            };
            if chunks.is_empty() && next_seq < row.chunk_count {
                if let Some(id) = staged {
                    self.discard_staged_copy(id).await?;
                }
                return Err(StorageError::corrupt(
                    op,
                    format!("chunk {next_seq} of the part is missing in the source"),
                ));
            }
            let checked = chunks.iter().try_for_each(|c| check.push_frame(c));
            next_seq += chunks.len() as u64;
            let last = next_seq >= row.chunk_count;
            let finished = if last {
                checked.and_then(|()| check.finish(check.pushed()))
            } else {
                checked
            };
            if let Err(e) = finished {
                if let Some(id) = staged {
                    self.discard_staged_copy(id).await?;
                }
                return Err(e);
            }
            let first_seq = next_seq - chunks.len() as u64;
            if !last {
                let k = key.clone();
                staged = Some(
                    self.db()
                        .write(op, move |c| {
                            let tx = super::immediate(c, op)?;
                            let id = stage(&tx, &k, staged, first_seq, &chunks)?;
                            tx.commit().map_err(|e| from_sqlite(op, e))?;
                            Ok(id)
                        })
                        .await?,
                );
                continue;
            }
            let k = key.clone();
            let r = row.clone();
            self.db()
                .write_durable(op, move |c| {
                    let id = stage(c, &k, staged, first_seq, &chunks)?;
                    sql::delete_finished(c, &k).map_err(|e| from_sqlite(op, e))?;
                    let published = sql::publish(
                        c,
                        id,
                        &Publish {
                            line_count: r.line_count,
                            byte_count: r.byte_count,
                            stored_bytes: r.stored_bytes,
                            chunk_count: r.chunk_count,
                            digest: &r.digest,
                            digest_algorithm: r.digest_algorithm,
                            now_ms: r.finalized_at_ms,
                        },
                    )
                    .map_err(|e| from_sqlite(op, e))?;
                    if published != 1 {
                        return Err(StorageError::internal(
                            op,
                            "the part's staged copy went away before it was published",
                        ));
                    }
                    Ok(())
                })
                .await?;
            return Ok(true);
        }
    }

    async fn discard_staged_copy(&self, id: i64) -> StorageResult<()> {
        let op = "mirror";
        self.db()
            .write(op, move |c| {
                sql::discard_staged_by_id(c, id).map_err(|e| from_sqlite(op, e))?;
                Ok(())
            })
            .await
    }
}

/// Whether two finished parts under one key are the same version.
fn same_version(a: &PartRow, b: &PartRow) -> bool {
    a.digest == b.digest
        && a.digest_algorithm == b.digest_algorithm
        && a.byte_count == b.byte_count
        && a.line_count == b.line_count
        && a.chunk_count == b.chunk_count
        && a.finalized_at_ms == b.finalized_at_ms
}

/// Inserts the part's staged row when `staged` is `None` (replacing any
/// staged leftover under the key), then `chunks` from `first_seq` on.
fn stage(
    c: &Connection,
    key: &ExportPartKey,
    staged: Option<i64>,
    first_seq: u64,
    chunks: &[ChunkRow],
) -> StorageResult<i64> {
    let op = "mirror";
    let sql = |e| from_sqlite(op, e);
    let id = match staged {
        Some(id) => id,
        None => {
            sql::discard_staged(c, key).map_err(sql)?;
            sql::insert_staged(c, key, sql::now_ms()).map_err(sql)?
        }
    };
    for (i, chunk) in chunks.iter().enumerate() {
        sql::insert_chunk(
            c,
            id,
            first_seq + i as u64,
            chunk.raw_offset,
            chunk.raw_len,
            &chunk.frame,
        )
        .map_err(sql)?;
    }
    Ok(id)
}

/// Runs `f` in one read transaction on a connection of its own to the
/// source, closed afterwards.
fn with_source<T>(
    path: &Path,
    busy: Duration,
    f: impl FnOnce(&Connection) -> StorageResult<T>,
) -> StorageResult<T> {
    let op = "mirror";
    let conn = open_checked_read_only(path, busy, op).map_err(|e| {
        StorageError::new(e.kind(), op, format!("the source: {}", e.message())).with_source(e)
    })?;
    let tx = conn
        .unchecked_transaction()
        .map_err(|e| from_sqlite(op, e))?;
    let out = f(&tx)?;
    tx.finish().map_err(|e| from_sqlite(op, e))?;
    Ok(out)
}

/// Every finished part of the source, in id order: one read transaction.
fn list_source(path: &Path, busy: Duration) -> StorageResult<Vec<(ExportPartKey, PartRow)>> {
    with_source(path, busy, |c| {
        list_finished(c).map_err(|e| from_sqlite("mirror", e))
    })
}

/// Every finished part of the database, in id order.
fn list_finished(c: &Connection) -> rusqlite::Result<Vec<(ExportPartKey, PartRow)>> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = sql::finished_after(c, after, LIST_PAGE)?;
        let Some((_, last)) = page.last() else {
            return Ok(all);
        };
        after = last.id;
        all.extend(page);
    }
}

/// Chunks `from..count` of source part `id`, as many as fit in
/// [`MIRROR_BATCH_BYTES`] of frames (at least one), in one read
/// transaction, stopping at the first missing one; `None` when the part is
/// no longer a finished part of the source.
fn read_batch(
    path: &Path,
    busy: Duration,
    id: i64,
    from: u64,
    count: u64,
) -> StorageResult<Option<Vec<ChunkRow>>> {
    let op = "mirror";
    with_source(path, busy, |c| {
        if sql::part_state(c, id).map_err(|e| from_sqlite(op, e))? != Some(true) {
            return Ok(None);
        }
        let mut chunks = Vec::new();
        let mut bytes = 0;
        for seq in from..count {
            if bytes >= MIRROR_BATCH_BYTES {
                break;
            }
            let chunk = match sql::chunk(c, id, seq) {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                // A column of the wrong type or out of range: the row is
                // damaged, not the database.
                Err(
                    e @ (rusqlite::Error::InvalidColumnType(..)
                    | rusqlite::Error::FromSqlConversionFailure(..)
                    | rusqlite::Error::IntegralValueOutOfRange(..)),
                ) => {
                    return Err(StorageError::corrupt(
                        op,
                        format!("chunk {seq} of the part is not a well-formed chunk row"),
                    )
                    .with_source(e))
                }
                Err(e) => return Err(from_sqlite(op, e)),
            };
            bytes += chunk.frame.len();
            chunks.push(chunk);
        }
        Ok(Some(chunks))
    })
}
