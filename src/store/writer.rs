//! The part writer: an `AsyncWrite` that turns any byte stream into staged,
//! compressed chunk rows.
//!
//! Bytes are buffered up to the chunk size; each full chunk is hashed into
//! the part's digest as it is handed off (XXH3-128 by default, in content
//! order; a BLAKE3 store hashes each chunk beside its compression instead,
//! see [`super::digest`]), compressed by a compression worker (one per
//! core, see [`super::compressor`]) and queued for the writer thread,
//! while the producer goes on filling the next one: the producer's own
//! thread only copies and checksums bytes. At most
//! `in_flight_chunks` chunks per writer are being compressed, each in one
//! of a few slots per core that every writer of the process takes in turn
//! ([`compressor::writer_slots`]), and at most [`MAX_QUEUED`] compressed
//! chunks wait to be stored: beyond that `poll_write` returns `Pending`
//! (backpressure), so memory stays bounded by a few chunks whatever the
//! part's size, and by one chunk per writer plus a few per core however
//! many parts are written at once (a chunk's buffer goes back to the
//! shared pool as soon as it is compressed). Queued frames are what lets
//! compression go on while SQLite checkpoints its WAL (measured: +14%
//! write throughput on a 1 GiB part). A writer looks at its chunks'
//! outcomes without asking to be woken, and is woken only for what it
//! waits for.
//!
//! A producer slower than compression (HFS's export worker serializes each
//! resource before it writes it) would otherwise leave a whole chunk to
//! compress when it finalizes, and HFS waits for every finalize. So while
//! none of a writer's chunks is being compressed, each [`PIECE`] it fills
//! is handed to a chunk worker at once and compressed into the chunk's
//! frame as a streamed zstd frame ([`codec::StreamCompressor`]); at
//! finalize only the last piece is left. `finalize_part` compresses that
//! piece on its own thread (at most [`INLINE_LAST`] bytes). When more is
//! left, because the producer wrote faster than one job compresses (HFS
//! writes each batch at once, after making it), the chunk is cut in two:
//! the frame's job ends it with the pieces at the front of its queue and
//! a second chunk worker compresses the rest as one more chunk, both at
//! once ([`PartSink::split_last`]). `finalize_part` keeps the part's last
//! chunk for its publishing transaction, which
//! stores it beside the flip to finished: one commit and one fsync per
//! part, and no hand-off to a worker or the writer thread but the commit's
//! own. The frame is the same as a chunk
//! compressed whole: one frame per chunk, its content size in its header,
//! its checksum, a window of the chunk's size (measured: within 1% of its
//! size). A producer that outpaces compression (a bulk load) keeps the
//! workers busy with whole chunks instead, which cost less. A part whose
//! digest hashes whole chunks apart (BLAKE3 with subtree-sized chunks) is
//! always compressed chunk by chunk.
//!
//! Transient trouble (SQLite busy past every retry) is never surfaced from
//! `poll_write`: it is deferred to shutdown, so that `finalize_part` reports
//! it as unavailable. A permanent failure (the part was deleted meanwhile, the
//! disk is full) fails a later write, at most [`MAX_QUEUED`] chunks on.
//!
//! Nothing written here is readable until `finalize_part` publishes it.
//! Dropping a writer without finalizing asks the store to discard its staging.
//! A writer holds the database (not the store) alive: used after its store
//! is dropped, it still stages bytes, but only the store that opened it can
//! finalize it, so such a part is never published.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{ready, Context, Poll};
use std::time::Instant;

use tokio::io::AsyncWrite;
use tokio::runtime::Handle;
use tokio::sync::{oneshot, AcquireError, OwnedSemaphorePermit};

use super::codec;
use super::compressor;
use super::db::{ChunkInsertArgs, Db};
use super::digest::{self, ChunkHash, DigestAlgorithm, PartHasher};
use crate::error::{ErrorKind, StorageError, StorageResult};
use crate::key::ExportPartKey;

/// What a writer reports about itself after a clean shutdown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sealed {
    pub bytes: u64,
    pub stored_bytes: u64,
    pub chunks: u64,
    pub digest: String,
    pub digest_algorithm: DigestAlgorithm,
    /// The last chunk (the last two, when the finalize cut it in two:
    /// [`PartSink::split_last`]), compressed but not stored, when the
    /// writer was shut down by `finalize_part`
    /// ([`Registry::hold_last_chunk`]): the finalize stores them inside its
    /// own durable transaction.
    pub held: Vec<Arc<HeldChunk>>,
    /// When the writer's last chunk was compressed, if it has any.
    pub compressed_at: Option<Instant>,
}

/// A compressed chunk kept for the transaction that publishes its part.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct HeldChunk {
    pub seq: u64,
    pub raw_offset: u64,
    pub raw_len: u64,
    pub frame: Vec<u8>,
}

/// The store's record of one live writer.
#[derive(Debug)]
pub(crate) struct SinkRecord {
    pub part_id: i64,
    pub key: ExportPartKey,
    pub sealed: Option<Sealed>,
    pub published: bool,
    /// Set by `finalize_part` before it shuts the writer down: every chunk
    /// whose compression ends from then on, the last one included, is kept
    /// for the publishing transaction rather than stored on its own
    /// ([`Sealed::held`]).
    pub hold_last: bool,
}

/// Live writers of a store, by the address of their heap allocation. A
/// writer is identified at finalize by the address behind the caller's
/// `Pin<Box<dyn AsyncWrite>>`: a sink swapped for another is not found.
#[derive(Debug, Default)]
pub(crate) struct Registry(Mutex<HashMap<usize, SinkRecord>>);

impl Registry {
    fn with<R>(&self, f: impl FnOnce(&mut HashMap<usize, SinkRecord>) -> R) -> R {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut map)
    }

    /// The record of the writer at `addr`, if it is one of ours.
    pub fn lookup(&self, addr: usize) -> Option<(i64, ExportPartKey, Option<Sealed>)> {
        self.with(|m| {
            m.get(&addr)
                .map(|r| (r.part_id, r.key.clone(), r.sealed.clone()))
        })
    }

    /// Asks the writer at `addr`, if it is not shut down yet, to keep its
    /// last chunk for the publishing transaction rather than store it in a
    /// transaction of its own: one commit and one round trip to the writer
    /// thread fewer while the finalize waits. Only a caller that publishes
    /// the part right after shutting it down asks this (a writer that waits
    /// shut down for a batch keeps nothing in memory).
    pub fn hold_last_chunk(&self, addr: usize) {
        self.with(|m| {
            if let Some(r) = m.get_mut(&addr) {
                r.hold_last = true;
            }
        })
    }

    /// Marks the writer at `addr` as published, so its drop discards nothing.
    pub fn mark_published(&self, addr: usize) {
        self.with(|m| {
            if let Some(r) = m.get_mut(&addr) {
                r.published = true;
            }
        })
    }

    /// The staged part ids of the live writers.
    pub fn live_part_ids(&self) -> Vec<i64> {
        self.with(|m| m.values().map(|r| r.part_id).collect())
    }

    /// Live writers.
    pub fn len(&self) -> usize {
        self.with(|m| m.len())
    }
}

/// The address that identifies a boxed writer.
pub(crate) fn sink_address(w: &(dyn AsyncWrite + Send)) -> usize {
    w as *const (dyn AsyncWrite + Send) as *const () as usize
}

/// Checks at finalize that a writer's sink is one a store opened (its
/// registry record was found) and that it was opened for `key`.
pub(crate) fn check_opened_for(
    op: &'static str,
    key: &ExportPartKey,
    opened_for: Option<&ExportPartKey>,
) -> StorageResult<()> {
    let Some(opened_for) = opened_for else {
        return Err(StorageError::invalid(
            op,
            "this writer's sink was not opened by this store (was it replaced?)",
        )
        .with_part(key.display()));
    };
    if opened_for != key {
        return Err(StorageError::invalid(
            op,
            format!(
                "the writer was opened for another part ({})",
                opened_for.display()
            ),
        )
        .with_part(key.display()));
    }
    Ok(())
}

/// A chunk being compressed (and hashed). Closed without a value if the
/// job panicked.
type ChunkTask = oneshot::Receiver<Compressed>;

/// What the job of one chunk gives back.
struct Compressed {
    /// Where the outcome of storing the chunk will arrive, or the chunk
    /// itself when it is held for the publishing transaction.
    queued: StorageResult<Stage>,
    /// The chunk's length.
    len: u64,
    /// The chunk's share of the part's digest, if the job hashed it apart
    /// (a BLAKE3 subtree); otherwise the writer hashed it when it handed
    /// the chunk off.
    hash: ChunkHash,
    /// When the job was done with the chunk.
    done_at: Instant,
}

/// A compressed chunk queued for the writer thread: its frame's size and
/// where the outcome of storing it will arrive.
type Queued = (u64, oneshot::Receiver<StorageResult<()>>);

/// Where a compressed chunk went.
enum Stage {
    Queued(Queued),
    Held(HeldChunk),
}

/// Compressed chunks one writer may have queued but not yet stored. They
/// cost only their frames (tens of KiB each for NDJSON).
pub(crate) const MAX_QUEUED: usize = 16;

/// A writer's wait for one of the process's chunk slots
/// ([`compressor::writer_slots`]).
type SlotWait = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// Bytes of a chunk handed to the chunk workers at a time while the chunk
/// fills (zstd's largest block: a piece fills one block, which zstd then
/// compresses at once). A chunk whose earlier pieces were compressed while
/// the producer wrote leaves at most this much to compress when the part
/// is finalized.
const PIECE: usize = 128 << 10;

/// The most raw bytes a finalize compresses on its own thread rather than
/// hand to a chunk worker: a last piece (and a little), which zstd
/// compresses in a fraction of a millisecond, less than the two hand-offs
/// between threads it saves while the finalize waits.
const INLINE_LAST: usize = 2 * PIECE;

/// Idle piece buffers, for the next pieces.
static PIECES: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// The largest piece buffer worth keeping.
const PIECE_CAPACITY: usize = 4 * PIECE;

/// A buffer with room for `len` bytes: an idle one, or a new one.
fn take_piece(len: usize) -> Vec<u8> {
    let idle = {
        let mut idle = PIECES.lock().unwrap_or_else(|p| p.into_inner());
        let at = idle.iter().rposition(|b| b.capacity() >= len);
        at.map(|i| idle.swap_remove(i))
    };
    idle.unwrap_or_else(|| Vec::with_capacity(len.max(2 * PIECE)))
}

/// Gives a piece's buffer back: a piece buffer to the idle pieces (dropped
/// when enough are idle), a chunk buffer (a frame's last piece) to the
/// chunk buffers.
fn recycle_piece(mut piece: Vec<u8>) {
    if piece.capacity() > PIECE_CAPACITY {
        return codec::recycle_buffer(piece);
    }
    piece.clear();
    let mut idle = PIECES.lock().unwrap_or_else(|p| p.into_inner());
    if idle.len() < 2 * MAX_QUEUED {
        idle.push(piece);
    }
}

/// A chunk whose zstd frame is compressed piece by piece on the chunk
/// workers while the producer fills it ([`PartSink::hand_off_piece`]). Its
/// pieces are compressed in the order they were handed off, by one job at
/// a time; the job that compresses the last one ends the frame and queues
/// the chunk for the store, as a whole chunk's job does.
struct OpenFrame {
    level: i32,
    chunk_size: usize,
    state: Mutex<FrameState>,
}

#[derive(Default)]
struct FrameState {
    /// Handed off, not yet compressed.
    pieces: VecDeque<Vec<u8>>,
    /// A job is compressing this frame's pieces.
    busy: bool,
    ctx: Option<codec::StreamCompressor>,
    /// The frame so far.
    out: Vec<u8>,
    /// Bytes compressed into it so far.
    raw_len: u64,
    /// Set once the last piece is handed off.
    end: Option<FrameEnd>,
    /// The first failure; the chunk then fails.
    failed: Option<StorageError>,
}

/// Whether a writer's finalize asked it to keep its chunks for the
/// publishing transaction ([`Registry::hold_last_chunk`]), shared with its
/// chunk jobs: a chunk whose job ends once it is set is held rather than
/// queued for the writer thread, which saves the finalize a round trip to
/// that thread (and the wait behind whatever it is doing, a checkpoint
/// say) for every chunk still being compressed when the finalize began. A
/// chunk that ended before is queued, and the finalize waits for it to be
/// stored, as before.
#[derive(Clone, Default)]
struct Hold(Arc<AtomicBool>);

impl Hold {
    fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Where a finished frame goes.
struct FrameEnd {
    /// Weak, as every chunk job's: a job left running by a writer dropped
    /// without finalizing must not keep the database open (its staging is
    /// discarded by the writer thread, which ends only once the database
    /// is dropped; a process that exits first would leave it).
    db: Weak<Db>,
    runtime: Handle,
    part_id: i64,
    seq: u64,
    raw_offset: u64,
    /// Set once the part's finalize asked to keep its chunks for the
    /// publishing transaction: the frame is held, not queued, if it ends
    /// after that.
    hold: Hold,
    done: oneshot::Sender<Compressed>,
}

impl OpenFrame {
    fn new(level: i32, chunk_size: usize) -> Arc<OpenFrame> {
        Arc::new(OpenFrame {
            level,
            chunk_size,
            state: Mutex::new(FrameState::default()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FrameState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A chunk worker's job: compresses every piece handed off so far, in
    /// order, unless another job already does; ends the frame once the last
    /// piece is in. The lock is never held while compressing.
    fn compress_pieces(self: Arc<Self>) {
        {
            let mut st = self.state();
            if st.busy {
                return;
            }
            st.busy = true;
        }
        loop {
            let (piece, ctx, mut out) = {
                let mut st = self.state();
                match st.pieces.pop_front() {
                    Some(piece) if st.failed.is_some() => {
                        recycle_piece(piece);
                        continue;
                    }
                    Some(piece) => (piece, st.ctx.take(), std::mem::take(&mut st.out)),
                    None => {
                        st.busy = false;
                        match st.end.take() {
                            Some(end) => {
                                let st = std::mem::take(&mut *st);
                                return self.end(st, end);
                            }
                            None => return,
                        }
                    }
                }
            };
            let len = piece.len() as u64;
            let fed = catch_unwind(AssertUnwindSafe(|| {
                let mut ctx = match ctx {
                    Some(ctx) => ctx,
                    None => codec::StreamCompressor::take(self.level, self.chunk_size)?,
                };
                ctx.feed(&piece, &mut out).map(|()| ctx)
            }))
            .unwrap_or_else(|_| Err(compress_panicked()));
            recycle_piece(piece);
            let mut st = self.state();
            match fed {
                Ok(ctx) if st.failed.is_none() => {
                    st.ctx = Some(ctx);
                    st.out = out;
                    st.raw_len += len;
                }
                Ok(_) => {}
                Err(e) => {
                    st.failed.get_or_insert(e);
                }
            }
        }
    }

    /// Ends the frame and queues the chunk for the store.
    fn end(&self, st: FrameState, end: FrameEnd) {
        let FrameState {
            ctx,
            mut out,
            raw_len,
            failed,
            ..
        } = st;
        let framed = match (failed, ctx) {
            (Some(e), _) => Err(e),
            (None, None) => Err(StorageError::internal(
                "write",
                "a chunk's frame was never started",
            )),
            (None, Some(mut ctx)) => catch_unwind(AssertUnwindSafe(|| {
                ctx.finish(&mut out, raw_len).map(|()| ctx)
            }))
            .unwrap_or_else(|_| Err(compress_panicked()))
            .map(|ctx| ctx.give_back()),
        };
        let queued = framed.and_then(|()| {
            stage_frame(
                &*upgrade(&end.db)?,
                &end.runtime,
                ChunkInsertArgs {
                    part_id: end.part_id,
                    seq: end.seq,
                    raw_offset: end.raw_offset,
                    raw_len,
                    frame: out,
                },
                end.hold.is_set(),
            )
        });
        let _ = end.done.send(Compressed {
            queued,
            len: raw_len,
            hash: ChunkHash::default(),
            done_at: Instant::now(),
        });
    }
}

/// The database a chunk job stores into, unless it was dropped meanwhile
/// (the store and the job's writer are gone: the chunk is not wanted).
fn upgrade(db: &Weak<Db>) -> StorageResult<Arc<Db>> {
    db.upgrade()
        .ok_or_else(|| StorageError::internal("write", "the store was closed"))
}

/// The error of a chunk whose compression panicked.
fn compress_panicked() -> StorageError {
    StorageError::internal("write", "compressing a chunk panicked")
}

/// Queues a compressed chunk for the store's writer thread (its frame's
/// size and where the outcome of storing it will arrive), or, with `hold`,
/// keeps it for the transaction that publishes the part.
fn stage_frame(
    db: &Db,
    runtime: &Handle,
    insert: ChunkInsertArgs,
    hold: bool,
) -> StorageResult<Stage> {
    if hold {
        return Ok(Stage::Held(HeldChunk {
            seq: insert.seq,
            raw_offset: insert.raw_offset,
            raw_len: insert.raw_len,
            frame: insert.frame,
        }));
    }
    let n = insert.frame.len() as u64;
    db.queue_chunk(insert, runtime)
        .map(|ack| Stage::Queued((n, ack)))
}

/// How many pieces at the back of a frame's queue `pieces` move to a chunk
/// that already holds `tail` bytes so that the two are about even, and the
/// chunk's size then. Never the queue's first piece: the frame keeps
/// something to end with.
fn pieces_to_even(pieces: &VecDeque<Vec<u8>>, mut tail: usize) -> (usize, usize) {
    let mut queued: usize = pieces.iter().map(Vec::len).sum();
    let mut take = 0;
    for b in pieces.iter().rev().map(Vec::len) {
        if queued <= tail || tail + b >= queued {
            break;
        }
        queued -= b;
        tail += b;
        take += 1;
    }
    (take, tail)
}

/// Settings a sink needs from the store.
pub(crate) struct SinkConfig {
    pub chunk_size: usize,
    pub level: i32,
    pub in_flight: usize,
    pub digest: DigestAlgorithm,
}

/// The staging writer behind an [`ExportPartWriter`](crate::ExportPartWriter).
pub(crate) struct PartSink {
    db: Arc<Db>,
    registry: Arc<Registry>,
    runtime: Handle,
    part_id: i64,
    part: String,
    cfg: SinkConfig,
    buf: Vec<u8>,
    /// Whether chunks are compressed piece by piece as they fill
    /// ([`PIECE`]): always, unless the part's digest hashes whole chunks
    /// apart (BLAKE3 with subtree-sized chunks) or a chunk is no larger
    /// than a piece.
    streams: bool,
    /// The current chunk's frame, once a piece of it was handed off.
    frame: Option<Arc<OpenFrame>>,
    /// The frame of the chunk just before the current one, once its last
    /// piece was handed off (`None` when the chunk before is not a frame):
    /// its job may still have pieces to compress when the part is
    /// finalized ([`PartSink::rebalance_ended`]), which only the chunk
    /// right after it may take over.
    ended: Option<Arc<OpenFrame>>,
    /// Bytes of the current chunk handed off in pieces (`buf` holds the
    /// rest).
    chunk_fill: usize,
    next_seq: u64,
    dispatched_bytes: u64,
    accepted: u64,
    stored_bytes: u64,
    /// Combines the chunks' digests, in order, as their tasks finish.
    hasher: PartHasher,
    in_flight: VecDeque<ChunkTask>,
    queued: VecDeque<Queued>,
    /// The last chunks, held for the publishing transaction.
    held: Vec<HeldChunk>,
    /// Set while the writer waits its turn for a chunk slot.
    slot_wait: Option<SlotWait>,
    /// Set once the finalize asked for the chunks still to come.
    hold: Hold,
    /// When the last chunk job so far was done (or the last chunk was
    /// compressed on the writer's own thread).
    compressed_at: Option<Instant>,
    /// A transient failure, reported at shutdown (and so by finalize).
    deferred: Option<StorageError>,
    /// A permanent failure, reported by every later call.
    failed: Option<(ErrorKind, String)>,
    shut: bool,
}

impl PartSink {
    /// A sink for staged part `part_id`; the caller registers it once boxed.
    pub fn new(
        db: Arc<Db>,
        registry: Arc<Registry>,
        runtime: Handle,
        part_id: i64,
        key: &ExportPartKey,
        cfg: SinkConfig,
    ) -> Self {
        PartSink {
            db,
            registry,
            runtime,
            part_id,
            part: key.display().to_string(),
            buf: codec::take_buffer(cfg.chunk_size),
            hasher: PartHasher::new(cfg.digest),
            streams: cfg.chunk_size > PIECE
                && !(cfg.digest == DigestAlgorithm::Blake3
                    && digest::tree_compatible(cfg.chunk_size)),
            frame: None,
            ended: None,
            chunk_fill: 0,
            cfg,
            next_seq: 0,
            dispatched_bytes: 0,
            accepted: 0,
            stored_bytes: 0,
            in_flight: VecDeque::new(),
            queued: VecDeque::new(),
            held: Vec::new(),
            slot_wait: None,
            hold: Hold::default(),
            compressed_at: None,
            deferred: None,
            failed: None,
            shut: false,
        }
    }

    /// Records the boxed sink in the registry under its address.
    pub fn register(self: Pin<&mut Self>, key: &ExportPartKey) {
        let addr = sink_address(&*self);
        let record = SinkRecord {
            part_id: self.part_id,
            key: key.clone(),
            sealed: None,
            published: false,
            hold_last: false,
        };
        self.registry.with(|m| m.insert(addr, record));
    }

    fn fail(&mut self, e: StorageError) -> io::Error {
        self.failed = Some((e.kind(), e.message().to_string()));
        e.or_part(&self.part).into()
    }

    fn failure(&self) -> Option<io::Error> {
        self.failed.as_ref().map(|(kind, msg)| {
            StorageError::new(*kind, "write", msg.clone())
                .with_part(&self.part)
                .into()
        })
    }

    /// Bytes of the current chunk so far.
    fn chunk_len(&self) -> usize {
        self.chunk_fill + self.buf.len()
    }

    /// Hashes `bytes` into the part's digest in content order. Hashing in
    /// order cannot fail; were it to, the writer fails rather than record
    /// a wrong digest.
    fn hash_in_order(&mut self, bytes: &[u8]) {
        if let Err(e) = self.hasher.push(bytes, ChunkHash::default()) {
            self.failed
                .get_or_insert((e.kind(), e.message().to_string()));
        }
    }

    /// Hands the buffered bytes to the chunk workers as the next piece of
    /// the current chunk's frame, if a chunk slot is free at once (pieces
    /// need not be of one size: a chunk's first piece may be larger):
    /// compression then goes on while the producer writes, and finalizing
    /// a part has only its last piece left to compress. Without a free slot
    /// the bytes stay buffered for the next piece (or the whole chunk).
    fn hand_off_piece(&mut self) {
        let Ok(slot) = compressor::writer_slots().clone().try_acquire_owned() else {
            return;
        };
        let mut piece = take_piece(self.buf.len());
        piece.extend_from_slice(&self.buf);
        self.buf.clear();
        self.hash_in_order(&piece);
        self.chunk_fill += piece.len();
        let (level, chunk_size) = (self.cfg.level, self.cfg.chunk_size);
        let frame = self
            .frame
            .get_or_insert_with(|| OpenFrame::new(level, chunk_size))
            .clone();
        frame.state().pieces.push_back(piece);
        self.submit_pieces(frame, slot);
    }

    /// Has a chunk worker compress `frame`'s pieces handed off so far;
    /// `slot` is given back once that job ends.
    fn submit_pieces(&self, frame: Arc<OpenFrame>, slot: OwnedSemaphorePermit) {
        let job = move || {
            frame.compress_pieces();
            drop(slot);
        };
        compressor::submit(Box::new(job), &self.runtime);
    }

    /// Sends the buffered bytes off as the end of the current chunk, in
    /// `slot`: the last piece of its frame if pieces of it were handed off,
    /// else the whole chunk.
    fn dispatch(&mut self, slot: OwnedSemaphorePermit) {
        let Some(frame) = self.frame.take() else {
            return self.dispatch_chunk(slot);
        };
        let last = std::mem::replace(&mut self.buf, codec::take_buffer(self.cfg.chunk_size));
        self.hash_in_order(&last);
        let raw_offset = self.dispatched_bytes;
        self.dispatched_bytes += (self.chunk_fill + last.len()) as u64;
        self.chunk_fill = 0;
        let (end, task) = self.frame_end(raw_offset);
        {
            let mut st = frame.state();
            st.pieces.push_back(last);
            st.end = Some(end);
        }
        self.next_seq += 1;
        self.ended = Some(frame.clone());
        self.submit_pieces(frame, slot);
        self.in_flight.push_back(task);
    }

    /// Where the current chunk's frame goes once its job has compressed
    /// every piece: chunk `next_seq`, at `raw_offset`, held or queued as
    /// [`Self::hold`] says when it ends; and the task its outcome arrives on.
    fn frame_end(&self, raw_offset: u64) -> (FrameEnd, ChunkTask) {
        let (done, task) = oneshot::channel();
        let end = FrameEnd {
            db: Arc::downgrade(&self.db),
            runtime: self.runtime.clone(),
            part_id: self.part_id,
            seq: self.next_seq,
            raw_offset,
            hold: self.hold.clone(),
            done,
        };
        (end, task)
    }

    /// Ends the current chunk on this thread and holds it for the
    /// publishing transaction, when little is left to compress: at most
    /// [`INLINE_LAST`] bytes are buffered, and no job is compressing the
    /// chunk's frame (every piece handed off is in it). Returns whether it
    /// did; if not, the chunk goes to a chunk worker as usual. A chunk
    /// whose digest is hashed apart (a BLAKE3 subtree) always goes to a
    /// worker.
    fn hold_last_inline(&mut self) -> io::Result<bool> {
        if self.buf.len() > INLINE_LAST {
            return Ok(false);
        }
        let raw_offset = self.dispatched_bytes;
        // The frame so far: its compressor, its bytes and the raw bytes in
        // it, if pieces of the chunk were handed off.
        let (ctx, out, fed) = match self.frame.clone() {
            Some(frame) => {
                let mut st = frame.state();
                if st.busy || !st.pieces.is_empty() || st.failed.is_some() || st.ctx.is_none() {
                    return Ok(false);
                }
                (st.ctx.take(), std::mem::take(&mut st.out), st.raw_len)
            }
            None => {
                let apart = digest::tree_compatible(self.cfg.chunk_size)
                    && digest::hashes_apart(self.cfg.digest, raw_offset, self.buf.len());
                if apart {
                    return Ok(false);
                }
                (None, Vec::new(), 0)
            }
        };
        self.frame = None;
        let last = std::mem::take(&mut self.buf);
        self.hash_in_order(&last);
        let raw_len = fed + last.len() as u64;
        let (level, chunk_size) = (self.cfg.level, self.cfg.chunk_size);
        let framed = catch_unwind(AssertUnwindSafe(|| {
            let mut out = out;
            let mut ctx = match ctx {
                Some(ctx) => ctx,
                None => codec::StreamCompressor::take(level, chunk_size)?,
            };
            ctx.feed(&last, &mut out)?;
            ctx.finish(&mut out, raw_len)?;
            ctx.give_back();
            Ok(out)
        }))
        .unwrap_or_else(|_| Err(compress_panicked()));
        self.buf = last;
        self.buf.clear();
        let frame = framed.map_err(|e| self.fail(e))?;
        self.compressed_at = Some(Instant::now());
        self.held.push(HeldChunk {
            seq: self.next_seq,
            raw_offset,
            raw_len,
            frame,
        });
        self.next_seq += 1;
        self.ended = None;
        self.dispatched_bytes += raw_len;
        self.chunk_fill = 0;
        Ok(true)
    }

    /// Ends the current chunk early and sends what is left of it to a
    /// second chunk worker as one more chunk, when more than
    /// [`INLINE_LAST`] bytes of the chunk are
    /// still to compress (pieces waiting for the frame's job, and the
    /// buffer): a producer that wrote the part at once (HFS writes a batch
    /// it made before) would otherwise leave the whole remainder to the one
    /// job that compresses the frame while its finalize waits. The pieces
    /// at the back of the frame's queue, and the buffer, go to the new
    /// chunk until both halves are about even; the frame ends with the
    /// rest. Both run at once, on two cores, and both chunks are held for
    /// the publishing transaction. Returns whether it did (it needs two
    /// chunk slots at once); if not, the chunk goes to one worker as usual.
    fn split_last(&mut self) -> bool {
        let Some(frame) = self.frame.clone() else {
            return false;
        };
        let pending: usize =
            frame.state().pieces.iter().map(Vec::len).sum::<usize>() + self.buf.len();
        if pending <= INLINE_LAST {
            return false;
        }
        let slots = compressor::writer_slots();
        let (Ok(a), Ok(b)) = (
            slots.clone().try_acquire_owned(),
            slots.clone().try_acquire_owned(),
        ) else {
            return false;
        };
        // The back of the frame's queue moves to the tail chunk while that
        // evens the two out.
        let moved: VecDeque<Vec<u8>>;
        let mut tail = self.buf.len();
        let (end, task) = self.frame_end(self.dispatched_bytes);
        {
            let mut st = frame.state();
            let take;
            (take, tail) = pieces_to_even(&st.pieces, tail);
            // Too little for a second worker: the frame's job takes it all.
            if tail < PIECE / 2 {
                return false;
            }
            let at = st.pieces.len() - take;
            moved = st.pieces.split_off(at);
            st.end = Some(end);
        }
        let moved_bytes: usize = moved.iter().map(Vec::len).sum();
        let frame_len = self.chunk_fill - moved_bytes;
        self.next_seq += 1;
        self.dispatched_bytes += frame_len as u64;
        self.chunk_fill = 0;
        self.frame = None;
        self.submit_pieces(frame, a);
        self.in_flight.push_back(task);
        self.dispatch_with_buffer(moved, b);
        true
    }

    /// Sends `moved` (pieces taken from the back of a frame's queue,
    /// already hashed into the part's digest) followed by the buffered
    /// bytes off as one whole chunk, in `slot`.
    fn dispatch_with_buffer(&mut self, moved: VecDeque<Vec<u8>>, slot: OwnedSemaphorePermit) {
        let moved_bytes: usize = moved.iter().map(Vec::len).sum();
        let mut raw = codec::take_buffer(moved_bytes + self.buf.len());
        for piece in moved {
            raw.extend_from_slice(&piece);
            recycle_piece(piece);
        }
        raw.extend_from_slice(&self.buf);
        self.buf.clear();
        self.dispatch_raw(raw, moved_bytes, slot);
    }

    /// At finalize, when the part's last chunk is all buffered (none of it
    /// was handed off in pieces: the chunk before was still being
    /// compressed) while the chunk before still has more pieces waiting for
    /// its frame's job than the buffer holds (a producer that wrote the
    /// part at once, as HFS does): the pieces at the back of that frame's
    /// queue move to the front of the last chunk until the two are about
    /// even, and the last chunk goes to a second chunk worker, so that both
    /// cores compress what is left rather than one core most of it. The
    /// earlier chunk ends where its job stops (its sequence number and
    /// offset were fixed when it was ended, and a frame's length is what
    /// its job compressed); the last chunk starts there, and is held.
    /// Returns whether it did (it needs a chunk slot at once); if not, the
    /// last chunk goes off as usual.
    fn rebalance_ended(&mut self) -> bool {
        if self.frame.is_some() || self.buf.is_empty() {
            return false;
        }
        let Some(frame) = self.ended.clone() else {
            return false;
        };
        let (moved, slot) = {
            let mut st = frame.state();
            // Its job has taken the end: it is ending the frame now.
            if st.end.is_none() || st.failed.is_some() {
                return false;
            }
            let (take, _) = pieces_to_even(&st.pieces, self.buf.len());
            if take == 0 {
                return false;
            }
            let Ok(slot) = compressor::writer_slots().clone().try_acquire_owned() else {
                return false;
            };
            let at = st.pieces.len() - take;
            (st.pieces.split_off(at), slot)
        };
        // The earlier chunk is shorter by what moved.
        self.dispatched_bytes -= moved.iter().map(Vec::len).sum::<usize>() as u64;
        self.dispatch_with_buffer(moved, slot);
        true
    }

    /// Sends the buffered bytes off as one whole chunk, in `slot`.
    fn dispatch_chunk(&mut self, slot: OwnedSemaphorePermit) {
        let raw = std::mem::replace(&mut self.buf, codec::take_buffer(self.cfg.chunk_size));
        self.dispatch_raw(raw, 0, slot);
    }

    /// Sends `raw` off as one whole chunk, in `slot`; its first `hashed`
    /// bytes are already in the part's digest (pieces handed off earlier).
    fn dispatch_raw(&mut self, raw: Vec<u8>, hashed: usize, slot: OwnedSemaphorePermit) {
        let args = (self.part_id, self.next_seq, self.dispatched_bytes);
        self.next_seq += 1;
        // The chunk before the next one is this one, not a frame.
        self.ended = None;
        self.dispatched_bytes += raw.len() as u64;
        let db = Arc::downgrade(&self.db);
        let level = self.cfg.level;
        let algorithm = self.cfg.digest;
        let hold = self.hold.clone();
        // Chunk jobs hash their chunks when chunks are BLAKE3 subtrees;
        // otherwise the chunk is hashed here, in content order, while it is
        // still in this core's cache (XXH3-128 takes tens of microseconds
        // for a 1 MiB chunk, against a millisecond or more to compress it).
        // A part is hashed apart only if its chunk size is a subtree's, and
        // then every chunk but a short first one (a part of one chunk) is
        // a subtree: a part never mixes the two ways.
        let apart = hashed == 0
            && digest::tree_compatible(self.cfg.chunk_size)
            && digest::hashes_apart(algorithm, args.2, raw.len());
        if !apart {
            self.hash_in_order(&raw[hashed..]);
        }
        let runtime = self.runtime.clone();
        let (done, task) = oneshot::channel();
        let job = move || {
            let (part_id, seq, raw_offset) = args;
            // Hashed here, by the worker that compresses it, while it is in
            // the cache; the writer only combines the results in order.
            let hash = if apart {
                digest::hash_chunk(algorithm, raw_offset, &raw)
            } else {
                ChunkHash::default()
            };
            let compressed = codec::compress_now(&raw, level);
            drop(slot);
            let len = raw.len() as u64;
            let queued = compressed.and_then(|frame| {
                stage_frame(
                    &*upgrade(&db)?,
                    &runtime,
                    ChunkInsertArgs {
                        part_id,
                        seq,
                        raw_offset,
                        raw_len: len,
                        frame,
                    },
                    hold.is_set(),
                )
            });
            codec::recycle_buffer(raw);
            let _ = done.send(Compressed {
                queued,
                len,
                hash,
                done_at: Instant::now(),
            });
        };
        compressor::submit(Box::new(job), &self.runtime);
        self.in_flight.push_back(task);
    }

    /// Takes in the outcome of one chunk's job (`None`: the job panicked).
    fn take_compressed(&mut self, done: Option<Compressed>) -> io::Result<()> {
        let Some(done) = done else {
            let e = StorageError::internal("write", "a chunk task panicked or was cancelled");
            return Err(self.fail(e));
        };
        let Compressed {
            queued,
            len,
            hash,
            done_at,
        } = done;
        self.compressed_at = self.compressed_at.max(Some(done_at));
        let outcome = match queued {
            Ok(stage) => {
                match stage {
                    Stage::Queued(queued) => self.queued.push_back(queued),
                    Stage::Held(chunk) => self.held.push(chunk),
                }
                if self.deferred.is_none() && hash.is_apart() {
                    self.hasher
                        .push_hashed(len, hash)
                        .map_err(|e| StorageError::internal("write", e.message().to_string()))
                } else {
                    Ok(())
                }
            }
            Err(e) if e.is_unavailable() => {
                self.deferred.get_or_insert(e);
                Ok(())
            }
            Err(e) => Err(e),
        };
        outcome.map_err(|e| self.fail(e))
    }

    /// Takes in the outcome of storing a chunk of `n` frame bytes (`None`:
    /// the writer thread is gone).
    fn take_stored(&mut self, n: u64, outcome: Option<StorageResult<()>>) -> io::Result<()> {
        match outcome {
            Some(Ok(())) => self.stored_bytes += n,
            Some(Err(e)) if e.is_unavailable() => {
                self.deferred.get_or_insert(e);
            }
            Some(Err(e)) => return Err(self.fail(e)),
            None => {
                let e = StorageError::internal("write", "the store's writer has shut down");
                return Err(self.fail(e));
            }
        }
        Ok(())
    }

    /// Takes in every chunk job and every store outcome that has arrived,
    /// in order, without waiting and without asking to be woken: a writer
    /// is woken only for what it must wait for.
    fn collect(&mut self) -> io::Result<()> {
        while let Some(task) = self.in_flight.front_mut() {
            let done = match task.try_recv() {
                Ok(done) => Some(done),
                Err(oneshot::error::TryRecvError::Empty) => break,
                Err(oneshot::error::TryRecvError::Closed) => None,
            };
            self.in_flight.pop_front();
            self.take_compressed(done)?;
        }
        while let Some((n, ack)) = self.queued.front_mut() {
            let (n, outcome) = match ack.try_recv() {
                Ok(outcome) => (*n, Some(outcome)),
                Err(oneshot::error::TryRecvError::Empty) => break,
                Err(oneshot::error::TryRecvError::Closed) => (*n, None),
            };
            self.queued.pop_front();
            self.take_stored(n, outcome)?;
        }
        Ok(())
    }

    /// Waits until at most `limit` chunks are being compressed and at most
    /// `max_queued` wait to be stored.
    fn poll_settle(
        &mut self,
        cx: &mut Context<'_>,
        limit: usize,
        max_queued: usize,
    ) -> Poll<io::Result<()>> {
        loop {
            self.collect()?;
            if self.in_flight.len() > limit {
                let task = self.in_flight.front_mut().expect("more than none");
                let done = ready!(Pin::new(task).poll(cx)).ok();
                self.in_flight.pop_front();
                self.take_compressed(done)?;
            } else if self.queued.len() > max_queued {
                let (n, ack) = self.queued.front_mut().expect("more than none");
                let n = *n;
                let outcome = ready!(Pin::new(ack).poll(cx)).ok();
                self.queued.pop_front();
                self.take_stored(n, outcome)?;
            } else {
                return Poll::Ready(Ok(()));
            }
        }
    }

    /// Waits until every chunk is compressed and stored.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_settle(cx, 0, 0)
    }

    /// Waits for this writer's turn (room among its own chunks in flight
    /// and queued, then one of the process's chunk slots), then sends the
    /// full buffer off. Once in line for a slot, the writer takes the slot
    /// as soon as it is handed one, without looking at its own chunks
    /// again (they may have moved on to the queued meanwhile): a slot handed
    /// to a writer that then waited for its store would be held from every
    /// other writer of the process for as long as that store is held up.
    fn poll_dispatch(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.slot_wait.is_none() {
            ready!(self.poll_settle(cx, self.cfg.in_flight - 1, MAX_QUEUED))?;
            let slots = compressor::writer_slots();
            match slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    self.dispatch(slot);
                    return Poll::Ready(Ok(()));
                }
                Err(_) => self.slot_wait = Some(Box::pin(slots.clone().acquire_owned())),
            }
        }
        let wait = self.slot_wait.as_mut().expect("set above");
        let slot = ready!(wait.as_mut().poll(cx));
        self.slot_wait = None;
        match slot {
            Ok(slot) => {
                self.dispatch(slot);
                Poll::Ready(Ok(()))
            }
            Err(_) => {
                let e = StorageError::internal("write", "the chunk slots were closed");
                Poll::Ready(Err(self.fail(e)))
            }
        }
    }

    /// Sends the full buffer off at once if this writer's turn needs no
    /// waiting; otherwise the next write waits for it. A failure found
    /// meanwhile is recorded for the next call to report: the bytes of this
    /// one were taken.
    fn dispatch_now(&mut self) {
        if self.collect().is_err() {
            return;
        }
        if self.in_flight.len() < self.cfg.in_flight
            && self.queued.len() <= MAX_QUEUED
            && self.slot_wait.is_none()
        {
            if let Ok(slot) = compressor::writer_slots().clone().try_acquire_owned() {
                self.dispatch(slot);
            }
        }
    }

    fn seal(&mut self) -> Sealed {
        Sealed {
            bytes: self.accepted,
            stored_bytes: self.stored_bytes,
            chunks: self.next_seq,
            digest: std::mem::replace(&mut self.hasher, PartHasher::new(self.cfg.digest))
                .finish_hex(),
            digest_algorithm: self.cfg.digest,
            held: std::mem::take(&mut self.held)
                .into_iter()
                .map(Arc::new)
                .collect(),
            compressed_at: self.compressed_at,
        }
    }
}

impl AsyncWrite for PartSink {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.failure() {
            return Poll::Ready(Err(e));
        }
        if this.shut {
            let e = StorageError::invalid("write", "the writer was already shut down");
            return Poll::Ready(Err(e.with_part(&this.part).into()));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.deferred.is_some() {
            // The part can no longer be finalized; accept and drop the bytes
            // so that the producer reaches finalize, which reports why.
            this.accepted += data.len() as u64;
            return Poll::Ready(Ok(data.len()));
        }
        // Finished chunks are collected only when another is dispatched:
        // looking at the tasks on every small write (a line, a newline)
        // cost more than copying the bytes.
        if this.chunk_len() == this.cfg.chunk_size {
            ready!(this.poll_dispatch(cx))?;
        }
        let n = data.len().min(this.cfg.chunk_size - this.chunk_len());
        this.buf.extend_from_slice(&data[..n]);
        this.accepted += n as u64;
        if this.chunk_len() == this.cfg.chunk_size {
            this.dispatch_now();
        } else if this.streams
            && this.buf.len() >= PIECE
            && this.collect().is_ok()
            && this.in_flight.is_empty()
        {
            // Only while none of this writer's chunks is being compressed:
            // a producer that outpaces compression (a bulk load) keeps
            // every worker busy with whole chunks, which costs less than
            // pieces; one that writes slower than zstd compresses (HFS's
            // export worker, serializing each resource) gets its chunk
            // compressed as it goes.
            this.hand_off_piece();
        }
        Poll::Ready(Ok(n))
    }

    /// Waits until every dispatched chunk is stored. A partly filled chunk
    /// stays buffered: flushing does not cut small frames.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.failure() {
            return Poll::Ready(Err(e));
        }
        // A write given up while it waited for a slot (its future dropped)
        // leaves its place in line: a slot it was handed goes back.
        this.slot_wait = None;
        this.poll_drain(cx)
    }

    /// Stores the last chunk, waits for every chunk, and seals the writer:
    /// after `Ok`, the store knows its byte count and digest.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.failure() {
            return Poll::Ready(Err(e));
        }
        if this.shut {
            return Poll::Ready(Ok(()));
        }
        if !this.hold.is_set() {
            let addr = sink_address(&*this);
            if this
                .registry
                .with(|m| m.get(&addr).is_some_and(|r| r.hold_last))
            {
                this.hold.set();
            }
        }
        if (!this.buf.is_empty() || this.frame.is_some()) && this.deferred.is_none() {
            let done = this.hold.is_set()
                && this.slot_wait.is_none()
                && (this.split_last() || this.rebalance_ended() || this.hold_last_inline()?);
            if !done {
                ready!(this.poll_dispatch(cx))?;
            }
        }
        ready!(this.poll_drain(cx))?;
        if let Some(e) = this.deferred.take() {
            let e = this.fail(e);
            return Poll::Ready(Err(e));
        }
        this.shut = true;
        let sealed = this.seal();
        let addr = sink_address(&*this);
        this.registry.with(|m| {
            if let Some(r) = m.get_mut(&addr) {
                r.sealed = Some(sealed);
            }
        });
        Poll::Ready(Ok(()))
    }
}

impl Drop for PartSink {
    fn drop(&mut self) {
        let addr = sink_address(&*self);
        let record = self.registry.with(|m| m.remove(&addr));
        if !record.is_some_and(|r| r.published) {
            self.db.discard_later(self.part_id);
        }
        codec::recycle_buffer(std::mem::take(&mut self.buf));
    }
}
