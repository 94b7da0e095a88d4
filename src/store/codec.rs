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

/// A chunk's zstd frame compressed a piece at a time, as the writer fills
/// the chunk, so that little is left to compress when the part is
/// finalized. The frame is the same kind [`compress`] makes (content
/// checksum, and its content size in the header, written there when the
/// frame ends), with a window as large as the store's chunk size, so that
/// it compresses as well as a chunk compressed whole.
pub(crate) struct StreamCompressor {
    level: i32,
    window_log: u32,
    ctx: zstd::zstd_safe::CCtx<'static>,
}

/// Idle [`StreamCompressor`]s, for the next frames: a context's tables and
/// window cost more to set up than compressing a small piece.
static STREAMS: Mutex<Vec<StreamCompressor>> = Mutex::new(Vec::new());

/// The window a frame of chunks of `chunk_size` bytes needs: the smallest
/// power of two that holds a chunk (zstd's minimum is 1 KiB).
fn window_log(chunk_size: usize) -> u32 {
    chunk_size
        .max(1)
        .next_power_of_two()
        .trailing_zeros()
        .max(10)
}

impl StreamCompressor {
    /// A context from the idle ones, or a new one, for frames at zstd
    /// `level` of chunks of at most `chunk_size` bytes.
    pub fn take(level: i32, chunk_size: usize) -> StorageResult<StreamCompressor> {
        let window_log = window_log(chunk_size);
        let idle = {
            let mut pool = STREAMS.lock().unwrap_or_else(|p| p.into_inner());
            let at = pool
                .iter()
                .rposition(|s| s.level == level && s.window_log == window_log);
            at.map(|i| pool.swap_remove(i))
        };
        if let Some(s) = idle {
            return Ok(s);
        }
        use zstd::zstd_safe::CParameter;
        let mut ctx = zstd::zstd_safe::CCtx::create();
        for p in [
            CParameter::CompressionLevel(level),
            CParameter::ChecksumFlag(true),
            CParameter::WindowLog(window_log),
        ] {
            ctx.set_parameter(p).map_err(stream_failed)?;
        }
        Ok(StreamCompressor {
            level,
            window_log,
            ctx,
        })
    }

    /// Gives the context back for the next frame (dropped if enough are
    /// idle). Only a context whose frame ended cleanly comes back here.
    pub fn give_back(self) {
        let mut pool = STREAMS.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < pooled_buffers() {
            pool.push(self);
        }
    }

    /// Compresses the next piece of the frame, appending what zstd emits to
    /// `out`.
    pub fn feed(&mut self, raw: &[u8], out: &mut Vec<u8>) -> StorageResult<()> {
        let mut input = zstd::zstd_safe::InBuffer::around(raw);
        while input.pos() < raw.len() {
            out.reserve(zstd::zstd_safe::compress_bound(raw.len() - input.pos()));
            let start = out.len();
            let mut output = zstd::zstd_safe::OutBuffer::around_pos(out, start);
            self.ctx
                .compress_stream2(
                    &mut output,
                    &mut input,
                    zstd::zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_continue,
                )
                .map_err(stream_failed)?;
        }
        Ok(())
    }

    /// Ends the frame of `raw_len` bytes in `out`, writes its content size
    /// into its header, and readies the context for another frame.
    pub fn finish(&mut self, out: &mut Vec<u8>, raw_len: u64) -> StorageResult<()> {
        let mut input = zstd::zstd_safe::InBuffer::around(&[]);
        loop {
            out.reserve(1 << 12);
            let start = out.len();
            let mut output = zstd::zstd_safe::OutBuffer::around_pos(out, start);
            let left = self
                .ctx
                .compress_stream2(
                    &mut output,
                    &mut input,
                    zstd::zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_end,
                )
                .map_err(stream_failed)?;
            if left == 0 {
                break;
            }
        }
        self.ctx
            .reset(zstd::zstd_safe::ResetDirective::SessionOnly)
            .map_err(stream_failed)?;
        declare_content_size(out, raw_len)
    }
}

fn stream_failed(code: usize) -> StorageError {
    StorageError::internal(
        "compress",
        format!(
            "zstd compression failed: {}",
            zstd::zstd_safe::get_error_name(code)
        ),
    )
}

/// Writes `raw_len` into the header of the zstd frame in `frame`, which
/// was compressed without knowing it (RFC 8878, 3.1.1.1: a frame header of
/// magic number, descriptor and window descriptor, no dictionary and no
/// content size). The blocks and the content checksum do not depend on the
/// header, so the frame stays valid; a decoder then checks that the frame
/// holds exactly `raw_len` bytes, and readers can size their buffers.
fn declare_content_size(frame: &mut Vec<u8>, raw_len: u64) -> StorageResult<()> {
    const MAGIC: [u8; 4] = 0xFD2F_B528u32.to_le_bytes();
    let bad = || StorageError::internal("compress", "zstd wrote an unexpected frame header");
    if frame.len() < 6 || frame[..4] != MAGIC {
        return Err(bad());
    }
    let descriptor = frame[4];
    // Content size flag 0, single segment 0, no dictionary id: the window
    // descriptor follows, and nothing else before the first block.
    if descriptor & 0b1110_0011 != 0 {
        return Err(bad());
    }
    let size = u32::try_from(raw_len).map_err(|_| bad())?;
    // Content size flag 2: four bytes, little-endian, after the window
    // descriptor.
    frame[4] = descriptor | 0b1000_0000;
    frame.splice(6..6, size.to_le_bytes());
    Ok(())
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

    /// NDJSON-like bytes that compress about as real resources do.
    fn ndjson(len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 200);
        let mut i = 0u64;
        while out.len() < len {
            i += 1;
            let line = format!(
                "{{\"resourceType\":\"Observation\",\"id\":\"obs-{i}\",\"valueQuantity\":{{\"value\":{}.{},\"unit\":\"mmHg\"}},\"subject\":{{\"reference\":\"Patient/{}\"}}}}\n",
                i * 7919 % 211,
                i % 10,
                i % 97
            );
            out.extend_from_slice(line.as_bytes());
        }
        out.truncate(len);
        out
    }

    #[test]
    fn a_frame_compressed_in_pieces_is_a_whole_frame_with_its_size() {
        let chunk = 1 << 20;
        for (len, piece) in [
            (1 << 20, 128 << 10),
            ((1 << 20) - 1, 128 << 10),
            (1_000_000, 100_000),
            (300_000, 1),
            (128 << 10, 128 << 10),
            (5, 2),
        ] {
            let raw = ndjson(len);
            let mut ctx = StreamCompressor::take(3, chunk).unwrap();
            let mut frame = Vec::new();
            for p in raw
                .chunks(piece.max(1))
                .take(if piece == 1 { 3 } else { usize::MAX })
            {
                ctx.feed(p, &mut frame).unwrap();
            }
            let raw = if piece == 1 { raw[..3].to_vec() } else { raw };
            ctx.finish(&mut frame, raw.len() as u64).unwrap();
            ctx.give_back();
            assert_eq!(
                zstd::zstd_safe::get_frame_content_size(&frame).ok(),
                Some(Some(raw.len() as u64)),
                "{len} in pieces of {piece}"
            );
            assert_eq!(decompress(&frame, raw.len()).unwrap(), raw, "{len}/{piece}");
            // A wrong length is still caught, now by the header too.
            assert!(decompress(&frame, raw.len() + 1).unwrap_err().is_corrupt());
            // As small as the same chunk compressed whole (within 1%), and
            // it concatenates with whole-chunk frames into one stream.
            let whole = compress(&raw, 3).unwrap();
            assert!(
                frame.len() as f64 <= whole.len() as f64 * 1.01 + 16.0,
                "{len}/{piece}: {} bytes in pieces, {} whole",
                frame.len(),
                whole.len()
            );
            let stream = [whole.clone(), frame.clone(), whole].concat();
            let back = zstd::stream::decode_all(&stream[..]).unwrap();
            assert_eq!(back, [&raw[..], &raw[..], &raw[..]].concat());
            // Its content checksum is checked.
            let mut bad = frame.clone();
            let at = bad.len() - 2;
            bad[at] ^= 1;
            assert!(decompress(&bad, raw.len()).unwrap_err().is_corrupt());
        }
    }

    #[test]
    fn a_frame_header_of_another_shape_is_refused_not_rewritten() {
        // A frame that already declares its size (one-shot compression).
        let mut whole = compress(b"abc", 3).unwrap();
        assert!(declare_content_size(&mut whole, 3).is_err());
        assert!(declare_content_size(&mut b"not zstd".to_vec(), 3).is_err());
        assert!(declare_content_size(&mut Vec::new(), 0).is_err());
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
