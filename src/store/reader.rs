//! The part reader: an `AsyncRead` of plain NDJSON over a finished part.
//!
//! Chunks are fetched one short query at a time (a pooled connection is
//! taken and returned inside each job), decompressed and hashed (their
//! share of the part's digest, see [`super::digest`]) by the chunk workers
//! (one per core, see [`super::compressor`]), `read_ahead` chunks ahead of
//! the consumer. Each chunk's
//! frame checksum, length and offset are checked as it arrives; the part's
//! length and digest are checked when the last chunk arrives, *before* any
//! of its bytes are handed out. So a damaged part, or one deleted or
//! replaced while it is read, ends in an error, never in short, mixed or
//! wrong data reported as success.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use r2d2_sqlite::SqliteConnectionManager;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

use super::chunk::{decode, fetch_row};
use super::codec;
use super::compressor;
use super::db::read_blocking;
use super::digest::{hash_chunk, ChunkHash, PartHasher};
use super::sql::{ChunkRow, PartRow};
use crate::error::{StorageError, StorageResult};

type Pool = r2d2::Pool<SqliteConnectionManager>;

/// One decoded chunk: its raw offset, bytes and share of the digest.
struct Decoded {
    raw_offset: u64,
    bytes: Vec<u8>,
    hash: ChunkHash,
}

/// The reader behind `open_reader`.
pub(crate) struct PartReader {
    pool: Pool,
    runtime: Handle,
    part: PartRow,
    label: String,
    read_ahead: usize,
    next_fetch: u64,
    /// Chunks being fetched and decoded, in order; a closed channel means
    /// the job panicked.
    pending: VecDeque<oneshot::Receiver<StorageResult<Decoded>>>,
    current: Vec<u8>,
    /// Consumed chunk buffers, handed to the next fetches: allocating a
    /// fresh chunk buffer per fetch, on whichever blocking thread ran it,
    /// left the allocator holding tens of MiB after a long read.
    spare: Vec<Vec<u8>>,
    pos: usize,
    received: u64,
    /// The part's digest so far; `None` once checked.
    digest: Option<PartHasher>,
    failed: Option<(crate::ErrorKind, String)>,
}

impl PartReader {
    pub fn new(
        pool: Pool,
        runtime: Handle,
        part: PartRow,
        label: String,
        read_ahead: usize,
    ) -> Self {
        let algorithm = part.digest_algorithm;
        PartReader {
            pool,
            runtime,
            part,
            label,
            read_ahead,
            next_fetch: 0,
            pending: VecDeque::new(),
            current: Vec::new(),
            spare: Vec::new(),
            pos: 0,
            received: 0,
            digest: Some(PartHasher::new(algorithm)),
            failed: None,
        }
    }

    fn fill_queue(&mut self) {
        while self.pending.len() < self.read_ahead && self.next_fetch < self.part.chunk_count {
            let (pool, id, seq) = (self.pool.clone(), self.part.id, self.next_fetch);
            let algorithm = self.part.digest_algorithm;
            let buf = self
                .spare
                .pop()
                .unwrap_or_else(|| codec::take_buffer(self.chunk_capacity()));
            self.next_fetch += 1;
            let (done, task) = oneshot::channel();
            let finish = move |row: StorageResult<ChunkRow>| {
                let decoded = row
                    .and_then(|row| decode(row, buf))
                    .map(|(raw_offset, bytes)| Decoded {
                        hash: hash_chunk(algorithm, raw_offset, &bytes),
                        raw_offset,
                        bytes,
                    });
                let _ = done.send(decoded);
            };
            // Decoded and hashed by a worker (one per core, see
            // [`super::compressor`]) with a connection that is free at
            // once; when every connection is taken, the wait for one goes
            // to the blocking pool, never to a worker.
            let runtime = self.runtime.clone();
            let job = move || match pool.try_get() {
                Some(c) => {
                    let row = fetch_row(&c, id, seq);
                    drop(c);
                    finish(row);
                }
                None => {
                    runtime.spawn_blocking(move || {
                        finish(read_blocking(&pool, "read", |c| fetch_row(c, id, seq)))
                    });
                }
            };
            compressor::submit(Box::new(job), &self.runtime);
            self.pending.push_back(task);
        }
    }

    /// The room a decoded chunk of this part needs (its first chunk is its
    /// largest), with the byte of slack decoding asks for.
    fn chunk_capacity(&self) -> usize {
        let largest = self
            .part
            .byte_count
            .min(super::options::MAX_CHUNK_SIZE as u64) as usize;
        if self.part.chunk_count > 1 {
            largest
                .div_ceil(self.part.chunk_count as usize)
                .next_power_of_two()
                + 1
        } else {
            largest + 1
        }
    }

    fn fail(&mut self, e: StorageError) -> io::Error {
        self.pending.clear();
        self.failed = Some((e.kind(), e.message().to_string()));
        e.in_op("read").or_part(&self.label).into()
    }

    /// Accepts the next decoded chunk after checking its place, and at the
    /// last chunk the part's length and digest.
    fn accept(&mut self, d: Decoded) -> Result<(), StorageError> {
        if d.raw_offset != self.received {
            return Err(StorageError::corrupt(
                "read",
                format!(
                    "a chunk starts at byte {} where byte {} was expected",
                    d.raw_offset, self.received
                ),
            ));
        }
        self.received += d.bytes.len() as u64;
        let digest = self.digest.as_mut().expect("present until the end");
        digest.push(&d.bytes, d.hash)?;
        let last = self.pending.is_empty() && self.next_fetch == self.part.chunk_count;
        if last || self.received > self.part.byte_count {
            self.verify_end()?;
        }
        let used = std::mem::replace(&mut self.current, d.bytes);
        if self.spare.len() < self.read_ahead {
            self.spare.push(used);
        } else {
            codec::recycle_buffer(used);
        }
        self.pos = 0;
        Ok(())
    }

    fn verify_end(&mut self) -> Result<(), StorageError> {
        if self.received != self.part.byte_count {
            return Err(StorageError::corrupt(
                "read",
                format!(
                    "the part holds {} bytes where {} were recorded",
                    self.received, self.part.byte_count
                ),
            ));
        }
        let digest = self.digest.take().expect("verified once").finish_hex();
        if digest != self.part.digest {
            return Err(StorageError::corrupt(
                "read",
                format!(
                    "the part's content does not match its recorded {} digest",
                    self.part.digest_algorithm.label()
                ),
            ));
        }
        Ok(())
    }
}

impl AsyncRead for PartReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some((kind, msg)) = &this.failed {
            let e = StorageError::new(*kind, "read", msg.clone()).with_part(&this.label);
            return Poll::Ready(Err(e.into()));
        }
        loop {
            if this.pos < this.current.len() {
                let n = out.remaining().min(this.current.len() - this.pos);
                out.put_slice(&this.current[this.pos..this.pos + n]);
                this.pos += n;
                return Poll::Ready(Ok(()));
            }
            this.fill_queue();
            let Some(task) = this.pending.front_mut() else {
                // No chunks left; an empty part is verified here.
                if this.digest.is_some() {
                    if let Err(e) = this.verify_end() {
                        return Poll::Ready(Err(this.fail(e)));
                    }
                }
                return Poll::Ready(Ok(()));
            };
            let done = ready!(Pin::new(task).poll(cx));
            this.pending.pop_front();
            let result = match done {
                Ok(r) => r,
                Err(_) => Err(StorageError::internal(
                    "read",
                    "a read task panicked or was cancelled",
                )),
            };
            this.fill_queue();
            if let Err(e) = result.and_then(|d| this.accept(d)) {
                return Poll::Ready(Err(this.fail(e)));
            }
        }
    }
}

impl Drop for PartReader {
    fn drop(&mut self) {
        codec::recycle_buffer(std::mem::take(&mut self.current));
        self.spare.drain(..).for_each(codec::recycle_buffer);
    }
}
