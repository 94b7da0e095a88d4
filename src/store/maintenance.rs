//! What an operator runs on a store: reclaiming abandoned staging, pruning
//! superseded parts, giving space back and verifying every finished part.
//!
//! What a caller may rely on is on the `impl` block below, where the
//! store's documentation shows it.

use std::collections::HashSet;
use std::time::Duration;

use r2d2_sqlite::SqliteConnectionManager;

use super::check::{ChunkRows, PartCheck};
use super::chunk::fetch_chunk;
use super::db::{read_blocking, vacuum_step};
use super::failpoint;
use super::immediate;
use super::sql::{self, now_ms, PartRow};
use super::SqliteOutputStore;
use crate::error::{from_sqlite, ErrorKind, StorageError, StorageResult};
use crate::key::{check_id, ExportJobId, ExportPartKey, TenantContext};

/// Staged parts `reclaim_abandoned` deletes per transaction.
const RECLAIM_BATCH: u32 = 64;

/// Fence marks `reclaim_abandoned` drops per transaction.
const FENCE_PRUNE_BATCH: u32 = 1024;

/// The youngest a deleted job's fence mark can be when
/// [`reclaim_abandoned`](SqliteOutputStore::reclaim_abandoned) drops it: a
/// day. A mark stops a worker that lost its lease from writing a job whose
/// outputs were deleted; such a worker notices within one lease renewal
/// (minutes in HFS), and HFS's own retention of finished jobs is 24 h, so a
/// mark older than a day guards against nothing that is still running.
pub const JOB_FENCE_MIN_AGE: Duration = Duration::from_secs(24 * 60 * 60);

/// Finished parts `verify` lists per query.
const VERIFY_PAGE: u32 = 64;

/// Lines of `PRAGMA integrity_check` that `verify` reports at most.
const MAX_INTEGRITY_LINES: u32 = 100;

/// The outcome of [`SqliteOutputStore::verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Finished parts read end to end.
    pub parts_checked: u64,
    /// Chunks (zstd frames) decompressed and checked.
    pub chunks_checked: u64,
    /// Uncompressed bytes checked.
    pub bytes_checked: u64,
    /// Finished parts deleted or replaced while they were being checked
    /// (not a problem: a delete won the race).
    pub parts_skipped: u64,
    /// Staged parts (writers at work, or abandoned: see
    /// [`SqliteOutputStore::reclaim_abandoned`]). Not a problem.
    pub staged_parts: u64,
    /// Everything found wrong: damaged parts and database-level findings.
    pub problems: Vec<VerifyProblem>,
}

impl VerifyReport {
    /// No problem was found.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// One thing [`SqliteOutputStore::verify`] found wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyProblem {
    /// The part concerned, in a key's display form; `None` for a finding
    /// about the database as a whole.
    pub part: Option<String>,
    /// Usually [`ErrorKind::Corrupt`].
    pub kind: ErrorKind,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for VerifyProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut e = StorageError::new(self.kind, "verify", self.message.clone());
        if let Some(p) = &self.part {
            e = e.with_part(p);
        }
        e.fmt(f)
    }
}

/// Where [`SqliteOutputStore::verify_with_progress`] is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyProgress {
    /// Finished parts done (checked, skipped or found damaged).
    pub parts_done: u64,
    /// Finished parts when the walk began.
    pub parts_total: u64,
    /// Uncompressed bytes done.
    pub bytes_done: u64,
    /// Uncompressed bytes of the finished parts when the walk began.
    pub bytes_total: u64,
}

/// The outcome of [`SqliteOutputStore::reclaim_space`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SpaceReport {
    /// Pages given back to the file system.
    pub pages_freed: u64,
    /// The same in bytes.
    pub bytes_freed: u64,
    /// Short transactions it took.
    pub steps: u64,
}

/// The database file's size in pages (see [`SqliteOutputStore::space`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SpaceStats {
    /// Bytes per page.
    pub page_size: u64,
    /// Pages in the database, free ones included.
    pub page_count: u64,
    /// Free pages, waiting to be reused or given back.
    pub free_pages: u64,
}

impl SpaceStats {
    /// The database's size in bytes (the file's size once the write-ahead
    /// log is checkpointed).
    pub fn database_bytes(&self) -> u64 {
        self.page_size * self.page_count
    }
    /// Bytes held by free pages.
    pub fn free_bytes(&self) -> u64 {
        self.page_size * self.free_pages
    }
}

/// Maintenance: what an operator runs on a store (`export-store gc`,
/// `export-store verify`).
///
/// What a caller may rely on:
///
/// - every call that writes does so in short transactions on the store's
///   writer thread, so exports keep writing while it runs, and a crash in
///   the middle leaves a sound database (each step commits whole or not at
///   all);
/// - [`reclaim_abandoned`](SqliteOutputStore::reclaim_abandoned) removes
///   staged parts only, never a finished one, and drops deleted jobs' fence
///   marks once they are older than [`JOB_FENCE_MIN_AGE`] (or the age it is
///   given, if longer); [`prune_superseded`](SqliteOutputStore::prune_superseded)
///   keeps, in every slot, the parts under the slot's highest token;
/// - [`verify`](SqliteOutputStore::verify) only reads; it walks every
///   finished part and reports each problem instead of stopping at the first.
///
/// Deletes give their pages back without being asked: after
/// `delete_job_outputs`, `delete_tenant_outputs`, `reclaim_abandoned` or
/// `prune_superseded` commits, the writer thread runs
/// `PRAGMA incremental_vacuum` in short steps (a few hundred pages each)
/// whenever it has no other command, so the call itself does not wait for
/// it and a write waits for at most one step.
/// [`reclaim_space`](SqliteOutputStore::reclaim_space) does the same work at
/// once, for an operator or a test that wants the file small now.
impl SqliteOutputStore {
    /// Deletes staged parts whose writer is gone: those that received no
    /// chunk for more than `older_than` (or, with no chunk yet, were opened
    /// that long ago), except the ones this store's own live writers are
    /// still writing. Returns how many were deleted, with their chunks.
    ///
    /// The store cannot see writers of other processes, so `older_than` must
    /// exceed the longest time a writer may stay idle between two chunks
    /// (HFS writes a part of 1,000 resources in seconds; `export-store gc`
    /// defaults to one hour). A writer that keeps sending chunks is never
    /// taken for abandoned, however long its part takes.
    /// A writer whose staging was reclaimed anyway fails on its next chunk
    /// or at finalize with a not-found error; nothing half-written is ever
    /// published. Works in batches of short transactions.
    ///
    /// It also drops the fence marks of deleted jobs (see
    /// [`SqliteOutputStore`]) recorded more than `older_than` or
    /// [`JOB_FENCE_MIN_AGE`] ago, whichever is longer, so that marks do not
    /// pile up; they are not counted in the returned number. Once a job's
    /// mark is gone, the store no longer refuses its old tokens.
    pub async fn reclaim_abandoned(&self, older_than: Duration) -> StorageResult<u64> {
        let op = "reclaim_abandoned";
        let age = i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX);
        let cutoff = now_ms().saturating_sub(age);
        let (mut after, mut total) = (0_i64, 0_u64);
        loop {
            let live: HashSet<i64> = self.registry().live_part_ids().into_iter().collect();
            let (deleted, last, full) = self
                .db()
                .write(op, move |c| {
                    let fail = |e| from_sqlite(op, e);
                    let tx = immediate(c, op)?;
                    let ids =
                        sql::staged_before(&tx, cutoff, after, RECLAIM_BATCH).map_err(fail)?;
                    let mut deleted = 0;
                    for id in ids.iter().filter(|id| !live.contains(id)) {
                        deleted += sql::discard_staged_by_id(&tx, *id).map_err(fail)? as u64;
                    }
                    failpoint::hit("reclaim.before_commit");
                    tx.commit().map_err(fail)?;
                    failpoint::hit("reclaim.after_commit");
                    Ok((
                        deleted,
                        ids.last().copied(),
                        ids.len() == RECLAIM_BATCH as usize,
                    ))
                })
                .await?;
            total += deleted;
            match last {
                Some(id) if full => after = id,
                _ => break,
            }
        }
        self.prune_job_fences(older_than.max(JOB_FENCE_MIN_AGE))
            .await?;
        if total > 0 {
            self.db().reclaim_space_soon();
        }
        Ok(total)
    }

    /// Drops fence marks recorded more than `older_than` ago, in batches of
    /// short transactions. Returns how many went.
    async fn prune_job_fences(&self, older_than: Duration) -> StorageResult<u64> {
        let op = "reclaim_abandoned";
        let age = i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX);
        let cutoff = now_ms().saturating_sub(age);
        let mut total = 0_u64;
        loop {
            let pruned = self
                .db()
                .write(op, move |c| {
                    let fail = |e| from_sqlite(op, e);
                    let tx = immediate(c, op)?;
                    let n = sql::prune_job_fences(&tx, cutoff, FENCE_PRUNE_BATCH).map_err(fail)?;
                    tx.commit().map_err(fail)?;
                    Ok(n as u64)
                })
                .await?;
            total += pruned;
            if pruned < u64::from(FENCE_PRUNE_BATCH) {
                return Ok(total);
            }
        }
    }

    /// Deletes the parts of one tenant's job that a later claim superseded:
    /// in every slot (tenant, job, file type, resource type, part index),
    /// every part, staged or finished, whose token is lower than the slot's
    /// highest token. The parts under each slot's highest token stay, and so
    /// does a slot that only an earlier claim reached (the store cannot tell
    /// it from a live one; `delete_job_outputs` removes it with the job).
    /// Returns how many parts were deleted. Meant for stores with fencing on,
    /// where tokens grow with every claim; with fencing off a lower token
    /// need not mean an older claim.
    pub async fn prune_superseded(
        &self,
        tenant: &TenantContext,
        job_id: &ExportJobId,
    ) -> StorageResult<u64> {
        let op = "prune_superseded";
        let t = tenant.tenant_id().as_str().to_string();
        check_id(op, "tenant id", &t)?;
        check_id(op, "job id", job_id.as_str())?;
        let j = job_id.as_str().to_string();
        let deleted = self
            .db()
            .write(op, move |c| {
                let fail = |e| from_sqlite(op, e);
                let tx = immediate(c, op)?;
                let n = sql::delete_superseded(&tx, &t, &j).map_err(fail)?;
                failpoint::hit("prune.before_commit");
                tx.commit().map_err(fail)?;
                Ok(n as u64)
            })
            .await?;
        if deleted > 0 {
            self.db().reclaim_space_soon();
        }
        Ok(deleted)
    }

    /// Gives every free page back to the file system now, in the writer
    /// thread's short steps, each its own short write so that other
    /// writes interleave, then checkpoints the write-ahead log without
    /// waiting for readers so that the file itself can shrink. Deletes do
    /// this by themselves when the store is idle; this call is for an
    /// operator (`export-store gc`) or a caller that wants it done before it
    /// goes on.
    pub async fn reclaim_space(&self) -> StorageResult<SpaceReport> {
        let op = "reclaim_space";
        let mut report = SpaceReport::default();
        loop {
            let (freed, left, page_size) = self
                .db()
                .write(op, |c| vacuum_step(c).map_err(|e| from_sqlite(op, e)))
                .await?;
            report.steps += 1;
            report.pages_freed += freed;
            report.bytes_freed += freed * page_size;
            if left == 0 || freed == 0 {
                break;
            }
        }
        self.db()
            .write(op, |c| sql::checkpoint(c).map_err(|e| from_sqlite(op, e)))
            .await?;
        Ok(report)
    }

    /// The database's size and free pages.
    pub async fn space(&self) -> StorageResult<SpaceStats> {
        let op = "space";
        let (page_size, page_count, free_pages) = self
            .db()
            .read(op, move |c| sql::pages(c).map_err(|e| from_sqlite(op, e)))
            .await?;
        Ok(SpaceStats {
            page_size,
            page_count,
            free_pages,
        })
    }

    /// Reads every finished part end to end, as a download would, and checks
    /// it: each chunk's zstd frame (with its content checksum), its length
    /// and offset, the part's chunk count, length and content digest; then
    /// that no chunk row lost its part, and SQLite's `integrity_check`.
    /// Returns what it found; an `Err` means the walk itself could not run.
    /// Only reads, through the read pool, one chunk in memory at a time.
    pub async fn verify(&self) -> StorageResult<VerifyReport> {
        self.verify_with_progress(|_| {}).await
    }

    /// [`verify`](Self::verify), calling `progress` after every chunk and
    /// every part (on a blocking thread: keep it quick).
    pub async fn verify_with_progress<F>(&self, mut progress: F) -> StorageResult<VerifyReport>
    where
        F: FnMut(&VerifyProgress) + Send + 'static,
    {
        let pool = self.db().pool();
        tokio::task::spawn_blocking(move || verify_blocking(&pool, &mut progress))
            .await
            .map_err(|_| StorageError::internal("verify", "the verify task panicked"))?
    }
}

type Pool = r2d2::Pool<SqliteConnectionManager>;

fn verify_blocking(
    pool: &Pool,
    progress: &mut dyn FnMut(&VerifyProgress),
) -> StorageResult<VerifyReport> {
    let op = "verify";
    let census = read_blocking(pool, op, |c| sql::census(c).map_err(|e| from_sqlite(op, e)))?;
    let mut report = VerifyReport {
        staged_parts: census.staged_parts,
        ..VerifyReport::default()
    };
    let mut at = VerifyProgress {
        parts_total: census.finished_parts,
        bytes_total: census.finished_bytes,
        ..VerifyProgress::default()
    };
    progress(&at);
    let mut after = 0;
    loop {
        let page = read_blocking(pool, op, |c| {
            sql::finished_after(c, after, VERIFY_PAGE).map_err(|e| from_sqlite(op, e))
        })?;
        let Some((_, last)) = page.last() else {
            break;
        };
        after = last.id;
        for (key, row) in page {
            let bytes_before = at.bytes_done;
            match check_part(pool, &row, &mut report, &mut at, progress) {
                Ok(true) => report.parts_checked += 1,
                Ok(false) => report.parts_skipped += 1,
                Err(e) => report.problems.push(VerifyProblem {
                    part: Some(key_label(&key)),
                    kind: e.kind(),
                    message: e.message().to_string(),
                }),
            }
            at.parts_done += 1;
            at.bytes_done = bytes_before + row.byte_count;
            progress(&at);
        }
    }
    let census = read_blocking(pool, op, |c| sql::census(c).map_err(|e| from_sqlite(op, e)))?;
    if census.orphan_chunks > 0 {
        report.problems.push(VerifyProblem {
            part: None,
            kind: ErrorKind::Corrupt,
            message: format!("{} chunk rows belong to no part", census.orphan_chunks),
        });
    }
    let lines = read_blocking(pool, op, |c| {
        sql::integrity_problems(c, MAX_INTEGRITY_LINES).map_err(|e| from_sqlite(op, e))
    })?;
    report
        .problems
        .extend(lines.into_iter().map(|line| VerifyProblem {
            part: None,
            kind: ErrorKind::Corrupt,
            message: format!("integrity_check: {line}"),
        }));
    Ok(report)
}

fn key_label(key: &ExportPartKey) -> String {
    key.display().to_string()
}

/// Reads one finished part end to end. `Ok(false)`: it was deleted or
/// replaced meanwhile; `Err`: the first thing found wrong.
fn check_part(
    pool: &Pool,
    row: &PartRow,
    report: &mut VerifyReport,
    at: &mut VerifyProgress,
    progress: &mut dyn FnMut(&VerifyProgress),
) -> StorageResult<bool> {
    let op = "verify";
    let gone = |e: &StorageError| e.is_not_found();
    let mut check = PartCheck::new(op, row);
    for seq in 0..row.chunk_count {
        let (offset, bytes) = match fetch_chunk(pool, row.id, seq) {
            Ok(chunk) => chunk,
            Err(e) if gone(&e) => return Ok(false),
            Err(e) => return Err(e),
        };
        check.push_content(offset, &bytes)?;
        report.chunks_checked += 1;
        report.bytes_checked += bytes.len() as u64;
        at.bytes_done += bytes.len() as u64;
        progress(at);
    }
    let totals = read_blocking(pool, op, |c| {
        let totals = sql::chunk_totals(c, row.id).map_err(|e| from_sqlite(op, e))?;
        let exists = sql::part_state(c, row.id).map_err(|e| from_sqlite(op, e))?;
        Ok(exists.map(|_| totals))
    })?;
    let Some(totals) = totals else {
        return Ok(false);
    };
    check.finish(ChunkRows {
        count: totals.chunks,
        contiguous: totals.contiguous,
        stored_bytes: totals.stored_bytes,
    })?;
    Ok(true)
}
