//! Serving a part over the wire: resolve a download route to a finished
//! part, then stream it as plain NDJSON (whole, or one byte range), or as
//! its stored zstd frames untouched.
//!
//! Every chunk is fetched by one short query on the blocking pool, with a
//! pooled connection taken and returned inside it, so a slow client holds no
//! connection; fetches of all downloads share a semaphore sized to the read
//! pool, and each download keeps at most `read_ahead` (but no more than
//! [`DOWNLOAD_READ_AHEAD`](crate::DOWNLOAD_READ_AHEAD)) chunks ahead of its
//! consumer, so memory is bounded by a few chunks per download whatever the
//! part's size. A stream ends in an error, never early and never with mixed
//! data, when the part is deleted or replaced under it or a check fails: a
//! whole identity stream checks the part's length and digest *before* it
//! yields its last bytes; every stream checks each chunk's place and length.

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use r2d2_sqlite::SqliteConnectionManager;
use tokio::sync::Semaphore;

use crate::error::{from_sqlite, StorageError, StorageResult};
use crate::key::{ExportJobId, ExportPartKey};
use crate::store::chunk::missing_chunk;
use crate::store::codec;
use crate::store::db::read_blocking;
use crate::store::digest::{hash_chunk, ChunkHash, ContentDigest, DigestAlgorithm, PartHasher};
use crate::store::sql::{self, ChunkRow, PartRow};
use crate::SqliteOutputStore;

type Pool = r2d2::Pool<SqliteConnectionManager>;

/// The operation name errors of a download carry.
const OP: &str = "download";

/// Chunk fetches of one store's downloads.
#[derive(Clone)]
pub(crate) struct Reads {
    pool: Pool,
    permits: Arc<Semaphore>,
    read_ahead: usize,
}

impl Reads {
    /// Fetches for `store`: as many at once as its read pool has
    /// connections, `read_ahead` chunks ahead per download.
    pub fn new(store: &SqliteOutputStore) -> Self {
        let o = store.options();
        Reads {
            pool: store.db().pool(),
            permits: Arc::new(Semaphore::new(o.pool_size as usize)),
            read_ahead: o.read_ahead.min(crate::store::options::DOWNLOAD_READ_AHEAD),
        }
    }

    /// Runs `f` with a pooled connection on the blocking pool, once a
    /// fetch permit is free. The permit goes with the blocking work, so it
    /// is released when the work ends, whoever waits for the result.
    async fn blocking<T, F>(&self, f: F) -> StorageResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Pool) -> StorageResult<T> + Send + 'static,
    {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StorageError::unavailable(OP, "the server is shutting down"))?;
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f(&pool)
        })
        .await
        .map_err(join_error)?
    }

    /// [`blocking`](Self::blocking) in a task of its own: it queues for a
    /// permit and runs even while the download's consumer is stalled (a
    /// waiter that is never polled would otherwise sit on a permit the
    /// semaphore handed it), and is aborted when the download is dropped.
    fn spawned<T, F>(&self, f: F) -> Spawned<T>
    where
        T: Send + 'static,
        F: FnOnce(&Pool) -> StorageResult<T> + Send + 'static,
    {
        let reads = self.clone();
        Spawned(tokio::spawn(async move { reads.blocking(f).await }))
    }

    /// The part a download route names: the finished part with the highest
    /// token in the slot `(tenant, job, resource_type, part_index)` of file
    /// type `output`, or else of file type `error`: the route does not name
    /// a file type, so an output part shadows an error part of the same
    /// resource type and index. `None` when neither exists.
    pub async fn resolve(
        &self,
        tenant: &str,
        job: &str,
        resource_type: &str,
        part_index: u32,
    ) -> StorageResult<Option<PartRow>> {
        let output =
            ExportPartKey::output(tenant, ExportJobId::from(job), resource_type, part_index, 0);
        output.validate(OP)?;
        self.blocking(move |pool| {
            read_blocking(pool, OP, |c| {
                let found = match sql::find_latest_in_slot(c, &output) {
                    Ok(Some(row)) => Some(row),
                    Ok(None) => {
                        let mut error = output.clone();
                        error.file_type = "error".into();
                        sql::find_latest_in_slot(c, &error).map_err(|e| from_sqlite(OP, e))?
                    }
                    Err(e) => return Err(from_sqlite(OP, e)),
                };
                Ok(found)
            })
            .map_err(|e| e.or_part(output.display()))
        })
        .await
    }

    /// The chunks holding raw bytes `range` of `part` (non-empty, within
    /// the part): the first and the last sequence number. Binary search
    /// over the chunk index, reading no frame.
    async fn locate(&self, part: &PartRow, range: &Range<u64>) -> StorageResult<(u64, u64)> {
        if range.start == 0 && range.end == part.byte_count {
            return Ok((0, part.chunk_count.saturating_sub(1)));
        }
        let (id, n, at) = (part.id, part.chunk_count, (range.start, range.end - 1));
        self.blocking(move |pool| {
            read_blocking(pool, OP, |c| {
                Ok((
                    chunk_holding(c, id, n, at.0)?,
                    chunk_holding(c, id, n, at.1)?,
                ))
            })
        })
        .await
    }

    /// Fetches chunk `seq` of part `part_id` as stored.
    fn frame(&self, part_id: i64, seq: u64) -> Spawned<ChunkRow> {
        self.spawned(move |pool| fetch_row(pool, part_id, seq))
    }

    /// Fetches chunk `seq` and decodes it: `(raw_offset, bytes, hash)`,
    /// the chunk's share of the digest computed only if `hash` names the
    /// part's algorithm (a whole-part download, which is verified).
    fn decoded(
        &self,
        part_id: i64,
        seq: u64,
        hash: Option<DigestAlgorithm>,
    ) -> Spawned<(u64, Vec<u8>, ChunkHash)> {
        self.spawned(move |pool| {
            let row = fetch_row(pool, part_id, seq)?;
            let bytes =
                codec::decompress(&row.frame, row.raw_len as usize).map_err(|e| e.in_op(OP))?;
            let share = hash.map_or_else(ChunkHash::default, |a| {
                hash_chunk(a, row.raw_offset, &bytes)
            });
            Ok((row.raw_offset, bytes, share))
        })
    }
}

fn join_error(e: tokio::task::JoinError) -> StorageError {
    if e.is_cancelled() {
        StorageError::unavailable(OP, "the runtime is shutting down")
    } else {
        StorageError::internal(OP, "a read task panicked")
    }
}

/// A fetch running in its own task; dropping it aborts the task.
struct Spawned<T>(tokio::task::JoinHandle<StorageResult<T>>);

impl<T> Future for Spawned<T> {
    type Output = StorageResult<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.map_err(join_error)?)
    }
}

impl<T> Drop for Spawned<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The sequence number of the chunk holding raw byte `pos` of a part with
/// `n` contiguous chunks (offsets grow with `seq`, as finalize checked).
fn chunk_holding(c: &rusqlite::Connection, id: i64, n: u64, pos: u64) -> StorageResult<u64> {
    let span = |seq| {
        sql::chunk_span(c, id, seq)
            .map_err(|e| from_sqlite(OP, e))?
            .ok_or_else(|| missing_chunk(c, OP, "downloaded", id, seq))
    };
    // The last chunk whose offset is at most `pos`.
    let (mut lo, mut hi) = (0, n);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if span(mid)?.0 <= pos {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let (offset, len) = span(lo)?;
    if !(offset..offset + len).contains(&pos) {
        return Err(StorageError::corrupt(
            OP,
            format!("no chunk holds byte {pos} of the part"),
        ));
    }
    Ok(lo)
}

/// Why chunk `seq` of part `id` is not there: the part went away (not
/// found), or the part lost a chunk (corrupt).
fn fetch_row(pool: &Pool, part_id: i64, seq: u64) -> StorageResult<ChunkRow> {
    read_blocking(pool, OP, |c| {
        sql::chunk(c, part_id, seq)
            .map_err(|e| from_sqlite(OP, e))?
            .ok_or_else(|| missing_chunk(c, OP, "downloaded", part_id, seq))
    })
}

/// A body stream of a download.
pub(crate) type ByteStream = BoxStream<'static, StorageResult<Bytes>>;

/// Plain NDJSON bytes `range` of `part` (`range` within the part). Starts
/// at the frame holding `range.start` without decoding the ones before it.
/// A whole-part range is verified against the part's length and digest
/// before its last bytes are yielded.
pub(crate) async fn identity(
    reads: &Reads,
    part: &PartRow,
    range: Range<u64>,
) -> StorageResult<ByteStream> {
    if range.is_empty() {
        if part.byte_count == 0 {
            check_empty(part)?;
        }
        return Ok(stream::empty().boxed());
    }
    let (first, last) = reads.locate(part, &range).await?;
    let whole = range.start == 0 && range.end == part.byte_count;
    let ahead = reads.read_ahead;
    let hash = whole.then_some(part.digest_algorithm);
    let chunks = {
        let (reads, id) = (reads.clone(), part.id);
        stream::iter(first..=last)
            .map(move |seq| reads.decoded(id, seq, hash))
            .buffered(ahead)
    };
    let state = Identity {
        chunks: chunks.boxed(),
        part: part.clone(),
        range,
        next_seq: first,
        last_seq: last,
        expect_offset: None,
        digest: whole.then(|| PartHasher::new(part.digest_algorithm)),
        received: 0,
    };
    Ok(stream::try_unfold(state, Identity::step).boxed())
}

struct Identity {
    chunks: BoxStream<'static, StorageResult<(u64, Vec<u8>, ChunkHash)>>,
    part: PartRow,
    range: Range<u64>,
    next_seq: u64,
    last_seq: u64,
    expect_offset: Option<u64>,
    digest: Option<PartHasher>,
    received: u64,
}

impl Identity {
    async fn step(mut self) -> StorageResult<Option<(Bytes, Self)>> {
        if self.next_seq > self.last_seq {
            return Ok(None);
        }
        let (offset, bytes, share) = match self.chunks.next().await {
            Some(r) => r?,
            None => return Err(StorageError::internal(OP, "the chunk stream ended early")),
        };
        let end = offset + bytes.len() as u64;
        let in_place = match self.expect_offset {
            Some(expected) => offset == expected,
            None => (offset..end).contains(&self.range.start),
        };
        if !in_place {
            return Err(StorageError::corrupt(
                OP,
                format!(
                    "chunk {} of the part is not where its index says",
                    self.next_seq
                ),
            ));
        }
        self.expect_offset = Some(end);
        self.received += bytes.len() as u64;
        self.next_seq += 1;
        if let Some(d) = self.digest.as_mut() {
            d.push(&bytes, share).map_err(|e| e.in_op(OP))?;
            if self.next_seq > self.last_seq || self.received > self.part.byte_count {
                self.verify_whole()?;
            }
        } else if self.next_seq > self.last_seq && end < self.range.end {
            return Err(StorageError::corrupt(
                OP,
                format!(
                    "the part ends at byte {end} where {} were recorded",
                    self.part.byte_count
                ),
            ));
        }
        let from = self
            .range
            .start
            .saturating_sub(offset)
            .min(bytes.len() as u64) as usize;
        let to = (self.range.end.min(end) - offset) as usize;
        let mut bytes = Bytes::from(bytes);
        if (from, to) != (0, bytes.len()) {
            bytes = bytes.slice(from..to.max(from));
        }
        Ok(Some((bytes, self)))
    }

    fn verify_whole(&mut self) -> StorageResult<()> {
        if self.received != self.part.byte_count {
            return Err(StorageError::corrupt(
                OP,
                format!(
                    "the part holds {} bytes where {} were recorded",
                    self.received, self.part.byte_count
                ),
            ));
        }
        let digest = self.digest.take().map(PartHasher::finish_hex);
        if digest.as_deref() != Some(self.part.digest.as_str()) {
            return Err(digest_mismatch(&self.part));
        }
        Ok(())
    }
}

fn digest_mismatch(part: &PartRow) -> StorageError {
    StorageError::corrupt(
        OP,
        format!(
            "the part's content does not match its recorded {} digest",
            part.digest_algorithm.label()
        ),
    )
}

fn check_empty(part: &PartRow) -> StorageResult<()> {
    if part.chunk_count != 0 || ContentDigest::of(part.digest_algorithm).finish_hex() != part.digest
    {
        return Err(digest_mismatch(part));
    }
    Ok(())
}

/// The part's stored zstd frames, concatenated, as they are: one valid
/// zstd stream of the part's NDJSON, `stored_bytes` long. Each frame's
/// place and declared content size are checked against the chunk index;
/// the frames' own checksums are left to the client's decoder.
pub(crate) fn zstd_frames(reads: &Reads, part: &PartRow) -> ByteStream {
    let (id, n, ahead) = (part.id, part.chunk_count, reads.read_ahead);
    let frames = {
        let reads = reads.clone();
        stream::iter(0..n)
            .map(move |seq| reads.frame(id, seq))
            .buffered(ahead)
    };
    let part = part.clone();
    let mut raw = 0u64;
    let mut stored = 0u64;
    frames
        .enumerate()
        .map(move |(seq, row)| {
            let row = row?;
            let declared = zstd::zstd_safe::get_frame_content_size(&row.frame);
            if row.raw_offset != raw || !matches!(declared, Ok(Some(len)) if len == row.raw_len) {
                return Err(StorageError::corrupt(
                    OP,
                    format!("stored frame {seq} does not match the part's chunk index"),
                ));
            }
            raw += row.raw_len;
            stored += row.frame.len() as u64;
            let last = seq as u64 + 1 == n;
            if (last && (raw != part.byte_count || stored != part.stored_bytes))
                || raw > part.byte_count
                || stored > part.stored_bytes
            {
                return Err(StorageError::corrupt(
                    OP,
                    "the part's frames do not add up to its recorded sizes",
                ));
            }
            Ok(Bytes::from(row.frame))
        })
        .boxed()
}
