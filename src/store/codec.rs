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
/// write whenever other work had run in between. At most
/// [`POOLED_BUFFERS`] buffers wait here.
static BUFFERS: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// Buffers [`BUFFERS`] keeps at most.
const POOLED_BUFFERS: usize = 8;

/// The largest buffer worth keeping (a 4 MiB chunk and its slack byte).
const POOLED_CAPACITY: usize = (4 << 20) + 1;

/// An empty buffer with room for at least `capacity` bytes: a pooled one
/// if there is one, else a new one.
pub(crate) fn take_buffer(capacity: usize) -> Vec<u8> {
    let pooled = {
        let mut pool = BUFFERS.lock().unwrap_or_else(|p| p.into_inner());
        let at = pool.iter().position(|b| b.capacity() >= capacity);
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
    if pool.len() < POOLED_BUFFERS {
        pool.push(buf);
    }
}

type Compressor = zstd::bulk::Compressor<'static>;

/// Compression contexts, shared by every thread: creating one costs more
/// than compressing a small chunk, and each holds about a MiB. Chunks are
/// compressed by the compression workers (one per core) and [`compress`]
/// callers take turns (one per core), so few contexts exist however many
/// writers there are (measured: 16 parts written at once peaked at 93 MiB
/// of RSS instead of 143 to 166 MiB with a context per thread, at the same
/// throughput).
struct Contexts {
    /// Idle contexts by level, each with room for one frame: a frame is
    /// compressed there, then copied out at its exact size (zstd's own
    /// `compress` hands out a buffer as large as the chunk, a fresh
    /// mapping per frame).
    idle: Vec<(i32, Compressor, Vec<u8>)>,
    busy: usize,
}

static CONTEXTS: Mutex<Contexts> = Mutex::new(Contexts {
    idle: Vec::new(),
    busy: 0,
});
static CONTEXT_FREED: Condvar = Condvar::new();

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
    compress_now(raw, level)
}

/// [`compress`] without waiting for a turn: for the compression workers,
/// which are themselves one per core.
pub(crate) fn compress_now(raw: &[u8], level: i32) -> StorageResult<Vec<u8>> {
    let fail = |e: std::io::Error| {
        StorageError::internal("compress", "zstd compression failed").with_source(e)
    };
    let reused = {
        let mut c = contexts();
        let at = c.idle.iter().position(|(l, _, _)| *l == level);
        at.map(|i| {
            let (_, ctx, scratch) = c.idle.swap_remove(i);
            (ctx, scratch)
        })
    };
    let (mut ctx, mut scratch) = match reused {
        Some(reused) => reused,
        None => {
            let mut ctx = Compressor::new(level).map_err(fail)?;
            ctx.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
                .map_err(fail)?;
            ctx.include_contentsize(true).map_err(fail)?;
            (ctx, Vec::new())
        }
    };
    scratch.clear();
    scratch.reserve(zstd::zstd_safe::compress_bound(raw.len()));
    let n = ctx.compress_to_buffer(raw, &mut scratch).map_err(fail)?;
    let frame = scratch[..n].to_vec();
    if scratch.capacity() > POOLED_CAPACITY * 2 {
        scratch = Vec::new();
    }
    let mut c = contexts();
    if c.idle.len() < cores() {
        c.idle.push((level, ctx, scratch));
    }
    Ok(frame)
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
        assert!(pool.len() <= POOLED_BUFFERS);
    }
}
