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
//!
//! The same reader can hand out the part's stored zstd frames instead of
//! its NDJSON ([`Output::Frames`]): every frame is still decoded and
//! checked, and the whole part verified, before its last frame is handed
//! out.

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

/// One decoded chunk: its raw offset, bytes and share of the digest, and
/// its stored frame when the reader hands frames out.
struct Decoded {
    raw_offset: u64,
    bytes: Vec<u8>,
    hash: ChunkHash,
    frame: Option<Vec<u8>>,
}

/// What a [`PartReader`] hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Output {
    /// The part's NDJSON.
    Ndjson,
    /// The part's stored zstd frames, concatenated as they are: one valid
    /// zstd stream of the NDJSON.
    Frames,
}

/// The reader behind `open_reader`.
pub(crate) struct PartReader {
    pool: Pool,
    runtime: Handle,
    part: PartRow,
    label: String,
    read_ahead: usize,
    output: Output,
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
    /// Frame bytes received (frames only).
    stored: u64,
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
        output: Output,
    ) -> Self {
        let algorithm = part.digest_algorithm;
        PartReader {
            pool,
            runtime,
            part,
            label,
            read_ahead,
            output,
            next_fetch: 0,
            pending: VecDeque::new(),
            current: Vec::new(),
            spare: Vec::new(),
            pos: 0,
            received: 0,
            stored: 0,
            digest: Some(PartHasher::new(algorithm)),
            failed: None,
        }
    }

    fn fill_queue(&mut self) {
        while self.pending.len() < self.read_ahead && self.next_fetch < self.part.chunk_count {
            let (pool, id, seq) = (self.pool.clone(), self.part.id, self.next_fetch);
            let algorithm = self.part.digest_algorithm;
            let keep_frame = self.output == Output::Frames;
            let buf = self
                .spare
                .pop()
                .unwrap_or_else(|| codec::take_buffer(self.chunk_capacity()));
            self.next_fetch += 1;
            let (done, task) = oneshot::channel();
            let finish = move |row: StorageResult<ChunkRow>| {
                let decoded = row.and_then(|row| {
                    let frame = keep_frame.then(|| row.frame.clone());
                    decode(row, buf).map(|(raw_offset, bytes)| Decoded {
                        hash: hash_chunk(algorithm, raw_offset, &bytes),
                        raw_offset,
                        bytes,
                        frame,
                    })
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
        self.stored += d.frame.as_ref().map_or(0, |f| f.len() as u64);
        let digest = self.digest.as_mut().expect("present until the end");
        digest.push(&d.bytes, d.hash)?;
        let last = self.pending.is_empty() && self.next_fetch == self.part.chunk_count;
        if last || self.received > self.part.byte_count {
            self.verify_end()?;
        }
        // Handing frames out, the decoded bytes are done with at once.
        let used = match d.frame {
            Some(frame) => {
                self.current = frame;
                d.bytes
            }
            None => std::mem::replace(&mut self.current, d.bytes),
        };
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
        if self.output == Output::Frames && self.stored != self.part.stored_bytes {
            return Err(StorageError::corrupt(
                "read",
                format!(
                    "the part's frames hold {} bytes where {} were recorded",
                    self.stored, self.part.stored_bytes
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
                // No chunks left; an empty part is verified here. As frames,
                // it is one empty frame: no bytes at all is no zstd stream.
                if this.digest.is_some() {
                    if let Err(e) = this.verify_end() {
                        return Poll::Ready(Err(this.fail(e)));
                    }
                    if this.output == Output::Frames && this.part.chunk_count == 0 {
                        match codec::compress(&[], 1) {
                            Ok(frame) => this.current = frame,
                            Err(e) => return Poll::Ready(Err(this.fail(e))),
                        }
                        this.pos = 0;
                        continue;
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

#[cfg(test)]
mod tests {
    use std::io::Read;

    use tokio::io::AsyncReadExt;

    use crate::contract::ExportOutputStore;
    use crate::{ExportJobId, ExportPartKey, SqliteOutputStore, StoreOptions};

    async fn frames_of(store: &SqliteOutputStore, key: &ExportPartKey) -> Vec<u8> {
        let mut frames = Vec::new();
        let mut r = store.open_frames(key).await.unwrap();
        r.read_to_end(&mut frames).await.unwrap();
        frames
    }

    fn unzstd(frames: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        zstd::stream::read::Decoder::new(frames)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_are_one_zstd_stream_of_the_part() {
        let options = StoreOptions::default().with_chunk_size(4096);
        let store = SqliteOutputStore::temporary_with("http://h", options).unwrap();
        let key = ExportPartKey::output("t", ExportJobId::from("j"), "Patient", 0, 1);
        let mut w = store.open_writer(&key).await.unwrap();
        let mut ndjson = Vec::new();
        for i in 0..2000u64 {
            let line = format!(
                r#"{{"resourceType":"Patient","id":"p{i}","n":{}}}"#,
                i * 7919 % 1013
            );
            w.write_line(&line).await.unwrap();
            ndjson.extend_from_slice(line.as_bytes());
            ndjson.push(b'\n');
        }
        store.finalize_part(&key, w).await.unwrap();
        let info = store.part_info(&key).await.unwrap();
        assert!(info.chunk_count > 3, "{} chunks", info.chunk_count);
        let frames = frames_of(&store, &key).await;
        assert_eq!(frames.len() as u64, info.stored_bytes);
        assert_eq!(unzstd(&frames), ndjson);

        let empty = ExportPartKey::output("t", ExportJobId::from("j"), "Patient", 1, 1);
        let w = store.open_writer(&empty).await.unwrap();
        store.finalize_part(&empty, w).await.unwrap();
        let frames = frames_of(&store, &empty).await;
        assert!(!frames.is_empty(), "an empty part is one empty frame");
        assert!(unzstd(&frames).is_empty());

        let missing = ExportPartKey::output("t", ExportJobId::from("j"), "Patient", 0, 2);
        let Err(e) = store.open_frames(&missing).await else {
            panic!("no part under token 2")
        };
        assert!(e.is_not_found());
    }
}
