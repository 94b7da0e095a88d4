//! Bytes in, bytes out: one chunk of NDJSON to one zstd frame and back, and
//! lowercase hex. Content digests are in [`super::digest`].
//!
//! Each chunk is an independent zstd frame with its content size and content
//! checksum in it, so frames can be decoded one at a time (a Range read can
//! start at any frame) and concatenated frames are a valid zstd stream (a
//! download can send them untouched with `Content-Encoding: zstd`).

use std::cell::RefCell;
use std::sync::{Condvar, Mutex, OnceLock};

use crate::error::{StorageError, StorageResult};

thread_local! {
    // A decompression context (a few hundred KiB) per thread, reused.
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// Chunk-sized buffers given back by writers and readers that are done
/// with them, for the next ones. A fresh chunk buffer is a fresh mapping
/// of a MiB that page-faults on first touch and is unmapped when freed:
/// measured on an HFS-sized part (1.6 MB), that cost 0.9 ms of a 1.2 ms
/// write whenever other work had run in between. Writers keep no buffers
/// of their own but the one they fill: a chunk's buffer comes back here as
/// soon as it is compressed. At most [`pooled_buffers`] buffers wait here.
static BUFFERS: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// Buffers [`BUFFERS`] keeps at most: four per core, as many as the
/// writers' chunks being compressed (three per core) and then some.
fn pooled_buffers() -> usize {
    4 * cores()
}

/// The largest buffer worth keeping (a 4 MiB chunk and its slack byte).
const POOLED_CAPACITY: usize = (4 << 20) + 1;

/// An empty buffer with room for at least `capacity` bytes: a pooled one
/// if there is one, else a new one.
pub(crate) fn take_buffer(capacity: usize) -> Vec<u8> {
    let pooled = {
        let mut pool = BUFFERS.lock().unwrap_or_else(|p| p.into_inner());
        // The most recently given back first: it is the likeliest to be
        // still in a cache.
        let at = pool.iter().rposition(|b| b.capacity() >= capacity);
        at.map(|i| pool.swap_remove(i))
    };
    pooled.unwrap_or_else(|| Vec::with_capacity(capacity))
}

/// Gives a buffer back for [`take_buffer`] (dropped if the pool is full or
/// the buffer is too large to be worth keeping).
pub(crate) fn recycle_buffer(mut buf: Vec<u8>) {
    if buf.capacity() == 0 || buf.capacity() > POOLED_CAPACITY {
        return;
    }
    buf.clear();
    let mut pool = BUFFERS.lock().unwrap_or_else(|p| p.into_inner());
    if pool.len() < pooled_buffers() {
        pool.push(buf);
    }
}

type Compressor = zstd::bulk::Compressor<'static>;

/// One thread's compression context: chunks compressed one after another
/// into frames with content size and content checksum, reusing its zstd
/// context (creating one costs more than compressing a small chunk) and
/// its room for one frame (a frame is compressed there, then copied out
/// at its exact size: zstd's own `compress` hands out a buffer as large as
/// the chunk, a fresh mapping per frame). About a MiB each.
pub struct FrameCompressor {
    level: i32,
    ctx: Compressor,
    scratch: Vec<u8>,
}

impl FrameCompressor {
    /// A context for frames at zstd `level`.
    pub fn new(level: i32) -> StorageResult<FrameCompressor> {
        let mut ctx = Compressor::new(level).map_err(compress_failed)?;
        ctx.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
            .map_err(compress_failed)?;
        ctx.include_contentsize(true).map_err(compress_failed)?;
        Ok(FrameCompressor {
            level,
            ctx,
            scratch: Vec::new(),
        })
    }

    /// Compresses `raw` as one frame.
    pub fn compress(&mut self, raw: &[u8]) -> StorageResult<Vec<u8>> {
        self.scratch.clear();
        self.scratch
            .reserve(zstd::zstd_safe::compress_bound(raw.len()));
        let n = self
            .ctx
            .compress_to_buffer(raw, &mut self.scratch)
            .map_err(compress_failed)?;
        let frame = self.scratch[..n].to_vec();
        if self.scratch.capacity() > POOLED_CAPACITY * 2 {
            self.scratch = Vec::new();
        }
        Ok(frame)
    }
}

fn compress_failed(e: std::io::Error) -> StorageError {
    StorageError::internal("compress", "zstd compression failed").with_source(e)
}

/// Compression contexts for [`compress`] callers, shared by every thread:
/// they take turns (one per core), so few contexts exist however many
/// callers there are. The chunk workers keep a context each instead
/// ([`compress_now`]).
struct Contexts {
    idle: Vec<FrameCompressor>,
    busy: usize,
}

static CONTEXTS: Mutex<Contexts> = Mutex::new(Contexts {
    idle: Vec::new(),
    busy: 0,
});
static CONTEXT_FREED: Condvar = Condvar::new();

thread_local! {
    // A chunk worker's own context: it stays on the worker's core, and the
    // workers share nothing but their job queue. Workers are one per core,
    // so contexts stay few however many parts are written (a context per
    // blocking-pool thread once peaked at 143 to 166 MiB of RSS with 16
    // parts written at once).
    static WORKER_CONTEXT: RefCell<Option<FrameCompressor>> = const { RefCell::new(None) };
}

fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
}

fn contexts() -> std::sync::MutexGuard<'static, Contexts> {
    CONTEXTS.lock().unwrap_or_else(|p| p.into_inner())
}

/// One core's turn at compressing, given back on drop (even on a panic).
struct Turn(());

impl Turn {
    /// Waits until fewer turns than cores are taken, and takes one.
    fn wait() -> Turn {
        let mut c = contexts();
        while c.busy >= cores() {
            c = CONTEXT_FREED.wait(c).unwrap_or_else(|p| p.into_inner());
        }
        c.busy += 1;
        Turn(())
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        contexts().busy -= 1;
        CONTEXT_FREED.notify_one();
    }
}

/// Compresses `raw` as one zstd frame at `level`, with content size and
/// content checksum. Waits while every core is already compressing.
pub fn compress(raw: &[u8], level: i32) -> StorageResult<Vec<u8>> {
    let _turn = Turn::wait();
    let reused = {
        let mut c = contexts();
        let at = c.idle.iter().position(|f| f.level == level);
        at.map(|i| c.idle.swap_remove(i))
    };
    let mut ctx = match reused {
        Some(ctx) => ctx,
        None => FrameCompressor::new(level)?,
    };
    let frame = ctx.compress(raw)?;
    let mut c = contexts();
    if c.idle.len() < cores() {
        c.idle.push(ctx);
    }
    Ok(frame)
}

/// [`compress`] with the calling thread's own context, without waiting for
/// a turn: for the chunk workers, which are themselves one per core.
pub(crate) fn compress_now(raw: &[u8], level: i32) -> StorageResult<Vec<u8>> {
    WORKER_CONTEXT.with(|cell| {
        let mut slot = cell.borrow_mut();
        let ctx = match slot.as_mut() {
            Some(ctx) if ctx.level == level => ctx,
            _ => slot.insert(FrameCompressor::new(level)?),
        };
        ctx.compress(raw)
    })
}

/// Decompresses one stored frame that must hold exactly `raw_len` bytes.
/// A damaged frame, a checksum mismatch or a length mismatch is corrupt.
// Only the download route (feature `server`) needs it.
#[cfg_attr(not(feature = "server"), allow(dead_code))]
pub fn decompress(frame: &[u8], raw_len: usize) -> StorageResult<Vec<u8>> {
    let mut out = Vec::new();
    decompress_into(frame, raw_len, &mut out)?;
    Ok(out)
}

/// `decompress` into `out` (cleared first), reusing its allocation: a
/// reader that recycles its buffers allocates nothing per chunk.
pub fn decompress_into(frame: &[u8], raw_len: usize, out: &mut Vec<u8>) -> StorageResult<()> {
    out.clear();
    // One byte of slack: a frame that holds more than it should fails the
    // length check below instead of a generic "too small" error.
    out.reserve(raw_len + 1);
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            let d = zstd::bulk::Decompressor::new().map_err(|e| {
                StorageError::internal("decompress", "cannot create a zstd context").with_source(e)
            })?;
            *slot = Some(d);
        }
        let d = slot.as_mut().expect("set above");
        d.decompress_to_buffer(frame, out).map_err(|e| {
            StorageError::corrupt("decompress", "a stored zstd frame is damaged").with_source(e)
        })
    })?;
    if out.len() != raw_len {
        return Err(StorageError::corrupt(
            "decompress",
            format!(
                "a stored frame holds {} bytes where {raw_len} were recorded",
                out.len()
            ),
        ));
    }
    Ok(())
}

/// Lowercase hex of bytes.
pub fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_concatenate_into_one_stream() {
        let a = b"{\"resourceType\":\"Patient\"}\n".repeat(1000);
        let b = b"{\"resourceType\":\"Encounter\"}\n".repeat(10);
        let fa = compress(&a, 3).unwrap();
        let fb = compress(&b, 3).unwrap();
        assert!(fa.len() < a.len() / 10);
        assert_eq!(decompress(&fa, a.len()).unwrap(), a);
        let mut stream = fa.clone();
        stream.extend_from_slice(&fb);
        let whole = zstd::stream::decode_all(&stream[..]).unwrap();
        assert_eq!(whole, [a, b].concat());
    }

    #[test]
    fn damage_is_corrupt_never_wrong_bytes() {
        let raw = b"0123456789abcdef".repeat(4096);
        let frame = compress(&raw, 3).unwrap();
        for i in [frame.len() / 2, frame.len() - 2] {
            let mut bad = frame.clone();
            bad[i] ^= 0x40;
            let e = decompress(&bad, raw.len()).unwrap_err();
            assert!(e.is_corrupt(), "flip at {i}: {e}");
        }
        let e = decompress(&frame[..frame.len() - 5], raw.len()).unwrap_err();
        assert!(e.is_corrupt());
        assert!(decompress(&frame, raw.len() - 1).unwrap_err().is_corrupt());
        assert!(decompress(&frame, raw.len() + 1).unwrap_err().is_corrupt());
    }

    #[test]
    fn empty_chunk_and_levels() {
        let f = compress(b"", 3).unwrap();
        assert_eq!(decompress(&f, 0).unwrap(), b"");
        let raw = b"abc".repeat(100);
        for level in [-5, 1, 19, 3] {
            assert_eq!(
                decompress(&compress(&raw, level).unwrap(), 300).unwrap(),
                raw
            );
        }
    }

    #[test]
    fn pooled_buffers_come_back_empty_and_large_enough() {
        let mut b = take_buffer(1 << 20);
        assert!(b.capacity() >= 1 << 20 && b.is_empty());
        b.extend_from_slice(b"stale bytes");
        recycle_buffer(b);
        // Other tests share the pool: whatever comes back must be empty
        // and hold what was asked for.
        for want in [1, 4096, 1 << 20, (1 << 20) + 1] {
            let b = take_buffer(want);
            assert!(b.is_empty() && b.capacity() >= want, "{want}");
            recycle_buffer(b);
        }
        // An oversized buffer is not kept.
        let huge = Vec::<u8>::with_capacity(POOLED_CAPACITY + 1);
        recycle_buffer(huge);
        let pool = BUFFERS.lock().unwrap();
        assert!(pool
            .iter()
            .all(|b| b.capacity() <= POOLED_CAPACITY && b.is_empty()));
        assert!(pool.len() <= pooled_buffers());
    }
}
