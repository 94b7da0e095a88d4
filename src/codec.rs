//! Bytes in, bytes out: one chunk of NDJSON to one zstd frame and back, and
//! lowercase hex. Content digests are in [`crate::digest`].
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

type Compressor = zstd::bulk::Compressor<'static>;

/// Compression contexts, shared by every thread: creating one costs more
/// than compressing a small chunk, and each holds about a MiB. At most one
/// compression per core runs at a time, so at most that many contexts
/// exist, however many writers and blocking threads there are (measured: 16
/// parts written at once peaked at 93 MiB of RSS instead of 143 to 166 MiB
/// with a context per thread, at the same throughput).
struct Contexts {
    idle: Vec<(i32, Compressor)>,
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
struct Turn;

impl Turn {
    fn wait() -> Turn {
        let mut c = contexts();
        while c.busy >= cores() {
            c = CONTEXT_FREED.wait(c).unwrap_or_else(|p| p.into_inner());
        }
        c.busy += 1;
        Turn
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
    let fail = |e: std::io::Error| {
        StorageError::internal("compress", "zstd compression failed").with_source(e)
    };
    let _turn = Turn::wait();
    let reused = {
        let mut c = contexts();
        let at = c.idle.iter().position(|(l, _)| *l == level);
        at.map(|i| c.idle.swap_remove(i).1)
    };
    let mut ctx = match reused {
        Some(ctx) => ctx,
        None => {
            let mut ctx = Compressor::new(level).map_err(fail)?;
            ctx.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
                .map_err(fail)?;
            ctx.include_contentsize(true).map_err(fail)?;
            ctx
        }
    };
    let frame = ctx.compress(raw).map_err(fail)?;
    let mut c = contexts();
    if c.idle.len() < cores() {
        c.idle.push((level, ctx));
    }
    Ok(frame)
}

/// Decompresses one stored frame that must hold exactly `raw_len` bytes.
/// A damaged frame, a checksum mismatch or a length mismatch is corrupt.
pub fn decompress(frame: &[u8], raw_len: usize) -> StorageResult<Vec<u8>> {
    let mut out = Vec::new();
    decompress_into(frame, raw_len, &mut out)?;
    Ok(out)
}

/// [`decompress`] into `out` (cleared first), reusing its allocation: a
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
}
