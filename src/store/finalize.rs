//! Finalizing: sealing writers and publishing their staged parts, one part
//! (`finalize_part`) or several at once, all in one durable transaction
//! ([`finalize_parts`](SqliteOutputStore::finalize_parts),
//! [`finalize_new_job`](SqliteOutputStore::finalize_new_job)).
//!
//! Every part goes through the same two steps whichever call publishes it:
//! [`seal`] shuts its writer down and checks that the store received every
//! byte the writer reports; [`publish`], inside the write transaction,
//! stores the last chunk if the writer held it (`finalize_part` only),
//! checks again what the database holds (the staged row, its chunks' byte
//! total and contiguity, fencing) and flips the part to finished with its
//! digest. A batch runs [`publish`] for each of its parts inside one
//! durable call: the first part that fails rolls the whole call back, so a
//! batch is published whole or not at all.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::io::AsyncWriteExt;

use super::db::CommitTimes;
use super::writer::{check_opened_for, sink_address, Sealed};
use super::{check_fence, sql, SqliteOutputStore};
use crate::contract::{ExportPartWriter, FinalizedPart};
use crate::error::{from_sqlite, StorageError, StorageResult};
use crate::key::ExportPartKey;

/// How many [`FinalizeTiming`]s a store keeps (the most recent ones) when
/// [`StoreOptions::with_finalize_timings`](crate::StoreOptions::with_finalize_timings)
/// is on.
pub const FINALIZE_TIMINGS_KEPT: usize = 4096;

/// Where one [`finalize_part`](crate::ExportOutputStore::finalize_part)
/// spent its time, from the call to its return, in consecutive stages that
/// add up to [`total`](Self::total).
///
/// What a producer that finalizes each part before it goes on (HFS's
/// export worker) waits for. Recorded only when the store was opened with
/// [`StoreOptions::with_finalize_timings`](crate::StoreOptions::with_finalize_timings),
/// and only for `finalize_part` calls that returned `Ok`; read with
/// [`SqliteOutputStore::take_finalize_timings`](crate::SqliteOutputStore::take_finalize_timings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FinalizeTiming {
    /// Until the writer's last chunk was compressed (by a chunk worker, or
    /// on the finalizing thread): the part's remainder still to compress
    /// when the finalize began. Zero if every chunk was compressed before.
    pub compress: Duration,
    /// Then until the writer was shut down: chunks queued for the writer
    /// thread before the finalize began, stored and acknowledged, and the
    /// wake-up of the finalizing task.
    pub store_chunks: Duration,
    /// Then until the publishing transaction began on the writer thread:
    /// the hand-off, and whatever the writer thread was doing before
    /// (other parts' chunks, other finalizes).
    pub hand_off: Duration,
    /// Then until its commit began: the statements that store the held
    /// chunks, check the part and publish it (with those of other
    /// finalizes committed in the same group).
    pub statements: Duration,
    /// The durable commit: the log's new frames written and synced.
    pub commit: Duration,
    /// Then until `finalize_part` returned: the reply's hand-off back.
    pub reply: Duration,
    /// The whole call.
    pub total: Duration,
}

/// The timings a store keeps, if it keeps any.
#[derive(Debug, Default)]
pub(crate) struct TimingLog(Option<Mutex<VecDeque<FinalizeTiming>>>);

impl TimingLog {
    pub(crate) fn new(on: bool) -> Self {
        TimingLog(on.then(Mutex::default))
    }

    pub(crate) fn is_on(&self) -> bool {
        self.0.is_some()
    }

    fn log(&self) -> Option<std::sync::MutexGuard<'_, VecDeque<FinalizeTiming>>> {
        self.0
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub(crate) fn record(&self, t: FinalizeTiming) {
        if let Some(mut log) = self.log() {
            if log.len() == FINALIZE_TIMINGS_KEPT {
                log.pop_front();
            }
            log.push_back(t);
        }
    }

    pub(crate) fn take(&self) -> Vec<FinalizeTiming> {
        self.log()
            .map(|mut l| l.drain(..).collect())
            .unwrap_or_default()
    }
}

/// The clock readings of one finalize, turned into its stages.
pub(crate) struct FinalizeClock {
    pub began: Instant,
    pub sealed: Instant,
    pub published: Instant,
    pub commit: CommitTimes,
    pub returned: Instant,
}

impl FinalizeClock {
    /// The stages, each from the end of the one before; `compressed_at`
    /// is when the writer's last chunk was compressed.
    pub(crate) fn timing(&self, compressed_at: Option<Instant>) -> FinalizeTiming {
        let compressed = compressed_at
            .unwrap_or(self.began)
            .clamp(self.began, self.sealed);
        let published = self.published.clamp(self.sealed, self.commit.started);
        FinalizeTiming {
            compress: compressed - self.began,
            store_chunks: self.sealed - compressed,
            hand_off: published - self.sealed,
            statements: self.commit.started - published,
            commit: self
                .commit
                .done
                .saturating_duration_since(self.commit.started),
            reply: self.returned.saturating_duration_since(self.commit.done),
            total: self.returned - self.began,
        }
    }
}

/// A part whose writer is shut down and checked, ready to publish.
pub(crate) struct Staged {
    key: ExportPartKey,
    part_id: i64,
    /// The writer's address in the store's registry.
    addr: usize,
    sealed: Sealed,
    lines: u64,
    bytes: u64,
}

impl Staged {
    /// Bytes of the chunk frames the writer held for the publishing
    /// transaction.
    pub(crate) fn held_bytes(&self) -> u64 {
        self.sealed.held.iter().map(|h| h.frame.len() as u64).sum()
    }

    /// When the writer's last chunk was compressed.
    pub(crate) fn compressed_at(&self) -> Option<Instant> {
        self.sealed.compressed_at
    }

    /// Once the part is published: marks its writer so that dropping it
    /// discards nothing, and says what was finalized.
    pub(crate) fn finished(&self, store: &SqliteOutputStore) -> FinalizedPart {
        store.registry().mark_published(self.addr);
        FinalizedPart {
            key: self.key.clone(),
            resource_type: self.key.resource_type.clone(),
            line_count: self.lines,
            size_bytes: self.bytes,
        }
    }
}

/// Shuts `writer` down and checks that this store opened it for `key` and
/// stored every byte it reports. A writer that fails either way publishes
/// nothing.
///
/// With `hold_last`, a writer not yet shut down keeps its last chunk,
/// compressed, for [`publish`] to store inside the publishing transaction:
/// for a caller that publishes right away.
pub(crate) async fn seal(
    store: &SqliteOutputStore,
    op: &'static str,
    key: &ExportPartKey,
    writer: &mut ExportPartWriter,
    hold_last: bool,
) -> StorageResult<Staged> {
    let fail = |e| {
        StorageError::from_io(op, e)
            .in_op(op)
            .or_part(key.display())
    };
    // This store's own sink stores everything it holds on shutdown, so it
    // is only shut down: flushing it first would wait for the chunks in
    // flight before the last one starts compressing (measured: a third of
    // an HFS-sized part's finalize latency). A foreign sink is flushed
    // first, as HFS's stores do, so that its own failure is what is
    // reported.
    let addr = sink_address(&*writer.writer);
    if store.registry().lookup(addr).is_none() {
        writer.writer.flush().await.map_err(fail)?;
    } else if hold_last {
        store.registry().hold_last_chunk(addr);
    }
    writer.writer.shutdown().await.map_err(fail)?;
    let found = store.registry().lookup(addr);
    check_opened_for(op, key, found.as_ref().map(|(_, k, _)| k))?;
    let (part_id, _, sealed) = found.expect("checked above");
    let sealed = sealed.expect("a shut-down sink is sealed");
    if writer.byte_count != sealed.bytes {
        return Err(StorageError::invalid(
            op,
            format!(
                "the part is incomplete: the writer reports {} bytes but the store received {}",
                writer.byte_count, sealed.bytes
            ),
        )
        .with_part(key.display()));
    }
    Ok(Staged {
        key: key.clone(),
        part_id,
        addr,
        sealed,
        lines: writer.line_count,
        bytes: writer.byte_count,
    })
}

/// Publishes one sealed part inside the caller's write transaction: the
/// staged row must still exist and be unfinished (a last chunk the writer
/// held is stored now), its chunks must hold
/// exactly the sealed bytes in a contiguous run, and the fencing rule must
/// hold; then an older finished version of the key is dropped and the part
/// is flipped to finished with its figures and digest.
pub(crate) fn publish(
    tx: &Connection,
    fencing: bool,
    op: &'static str,
    part: &Staged,
) -> StorageResult<()> {
    let fail = |e| from_sqlite(op, e);
    let sealed = &part.sealed;
    match sql::part_state(tx, part.part_id).map_err(fail)? {
        Some(false) => {}
        Some(true) => return Err(StorageError::invalid(op, "the part was already finalized")),
        None => {
            return Err(StorageError::not_found(
                op,
                "the staged part no longer exists (deleted or superseded)",
            ))
        }
    }
    for held in &sealed.held {
        sql::insert_chunk(
            tx,
            part.part_id,
            held.seq,
            held.raw_offset,
            held.raw_len,
            &held.frame,
        )
        .map_err(fail)?;
    }
    let totals = sql::chunk_totals(tx, part.part_id).map_err(fail)?;
    if totals.raw_bytes != sealed.bytes || totals.chunks != sealed.chunks || !totals.contiguous {
        return Err(StorageError::internal(
            op,
            format!(
                "the part is incomplete: {} bytes in {} chunks are stored where \
                 {} bytes in {} chunks were written",
                totals.raw_bytes, totals.chunks, sealed.bytes, sealed.chunks
            ),
        ));
    }
    check_fence(fencing, tx, &part.key, op)?;
    sql::delete_finished(tx, &part.key).map_err(fail)?;
    let published = sql::publish(
        tx,
        part.part_id,
        &sql::Publish {
            line_count: part.lines,
            byte_count: totals.raw_bytes,
            stored_bytes: totals.stored_bytes,
            chunk_count: totals.chunks,
            digest: &sealed.digest,
            digest_algorithm: sealed.digest_algorithm,
            now_ms: sql::now_ms(),
        },
    )
    .map_err(fail)?;
    debug_assert_eq!(published, 1);
    Ok(())
}

/// Which parts a batch may publish beside the ones a job already holds.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exclusive {
    /// Any: each part replaces the finished version of its own key, as
    /// `finalize_part` does.
    No,
    /// None: every part belongs to one tenant's job, and that job holds no
    /// other part, staged or finished.
    NewJob,
}

impl SqliteOutputStore {
    /// Publishes several parts at once: all of them in one durable
    /// transaction, or none.
    ///
    /// Each part gets every check of
    /// [`finalize_part`](crate::ExportOutputStore::finalize_part): its
    /// writer is shut down and must have been opened by this store for its
    /// key, the store must hold exactly the bytes the writer reports, and
    /// fencing must let it in. Then one transaction checks each staged part
    /// again and publishes them all; the first part that fails a check
    /// fails the call, naming that part, and publishes nothing, so a reader
    /// sees all of the parts or none of them, even across a crash. When it
    /// returns `Ok`, every part survives a crash of the process and of the
    /// machine.
    ///
    /// The parts need not share a job. Two entries with the same key are
    /// invalid input, and so is an empty list. On an error every writer is
    /// dropped and its staging discarded.
    ///
    /// A writer's buffers are released when it is shut down: a caller that
    /// stages many parts before publishing them shuts each one down
    /// (`AsyncWriteExt::shutdown` on [`ExportPartWriter::writer`]) once it
    /// is written, so that memory stays bounded by the part being written.
    /// Staged parts wait unfinished until the call; a
    /// [`reclaim_abandoned`](Self::reclaim_abandoned) of another process
    /// given a shorter age than the staging takes may delete them, and then
    /// this call fails with a not-found error and publishes nothing.
    /// Returns what `finalize_part` returns for each part, in the order
    /// given.
    pub async fn finalize_parts(
        &self,
        parts: Vec<(ExportPartKey, ExportPartWriter)>,
    ) -> StorageResult<Vec<FinalizedPart>> {
        self.finalize_batch("finalize_parts", parts, Exclusive::No)
            .await
    }

    /// [`finalize_parts`](Self::finalize_parts) for the parts of a new job:
    /// every part must belong to the same tenant's job (else invalid
    /// input), and inside the publishing transaction that job must hold no
    /// part other than these, staged or finished, under any token (else a
    /// conflict). So the job appears whole, and never merges into parts a
    /// job of the same id already had. A job that was deleted still has
    /// its fence mark: a part can join it only under a higher token than
    /// the deleted job reached.
    pub async fn finalize_new_job(
        &self,
        parts: Vec<(ExportPartKey, ExportPartWriter)>,
    ) -> StorageResult<Vec<FinalizedPart>> {
        self.finalize_batch("finalize_new_job", parts, Exclusive::NewJob)
            .await
    }

    /// Seals every writer, then publishes every part in one durable call.
    pub(crate) async fn finalize_batch(
        &self,
        op: &'static str,
        parts: Vec<(ExportPartKey, ExportPartWriter)>,
        exclusive: Exclusive,
    ) -> StorageResult<Vec<FinalizedPart>> {
        // A read-only store says so before it touches any writer.
        self.db().check_writable(op)?;
        check_batch(op, &parts, exclusive)?;
        let mut writers = Vec::with_capacity(parts.len());
        let mut staged = Vec::with_capacity(parts.len());
        for (key, mut writer) in parts {
            staged.push(seal(self, op, &key, &mut writer, false).await?);
            writers.push(writer);
        }
        let fencing = self.options().fencing;
        let job = (exclusive == Exclusive::NewJob).then(|| {
            let k = &staged[0].key;
            (k.tenant_id.clone(), k.job_id.as_str().to_string())
        });
        let batch = self
            .db()
            .write_durable(op, move |tx| {
                if let Some((tenant, job)) = &job {
                    let held =
                        sql::count_job_parts(tx, tenant, job).map_err(|e| from_sqlite(op, e))?;
                    // Every staged part of the batch is one of the job's
                    // rows (each is checked to exist below): more rows are
                    // parts the batch does not own.
                    if held > staged.len() as u64 {
                        return Err(StorageError::conflict(
                            op,
                            format!(
                                "the job already has {} part{} in the store; a new job's \
                                 parts cannot join them",
                                held - staged.len() as u64,
                                if held - staged.len() as u64 == 1 {
                                    ""
                                } else {
                                    "s"
                                }
                            ),
                        ));
                    }
                }
                for part in &staged {
                    publish(tx, fencing, op, part).map_err(|e| e.or_part(part.key.display()))?;
                }
                Ok(staged)
            })
            .await?;
        let finished = batch.iter().map(|part| part.finished(self)).collect();
        drop(writers);
        Ok(finished)
    }
}

/// Checks a batch's keys before any I/O: valid, none twice, not empty, and
/// for a new job all of one tenant's job.
fn check_batch(
    op: &'static str,
    parts: &[(ExportPartKey, ExportPartWriter)],
    exclusive: Exclusive,
) -> StorageResult<()> {
    let Some((first, _)) = parts.first() else {
        return Err(StorageError::invalid(op, "no parts to finalize"));
    };
    let mut seen = HashSet::with_capacity(parts.len());
    for (key, _) in parts {
        key.validate(op)?;
        if !seen.insert(key) {
            return Err(
                StorageError::invalid(op, "the same key is given twice").with_part(key.display())
            );
        }
        if exclusive == Exclusive::NewJob
            && (key.tenant_id != first.tenant_id || key.job_id != first.job_id)
        {
            return Err(StorageError::invalid(
                op,
                format!(
                    "a new job's parts must all belong to one tenant's job ({})",
                    first.display()
                ),
            )
            .with_part(key.display()));
        }
    }
    Ok(())
}
