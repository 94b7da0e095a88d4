//! Settings of a [`SqliteOutputStore`](crate::SqliteOutputStore).

use std::time::Duration;

use super::digest::DigestAlgorithm;
use crate::error::{StorageError, StorageResult};

/// The default raw (uncompressed) size of one chunk: 1 MiB. Measured on the
/// Synthea sample: 14.6× compression at 1 MiB versus 8.9× at 64 KiB, and a
/// 1 MiB zstd window is safe for HTTP clients.
pub const DEFAULT_CHUNK_SIZE: usize = 1 << 20;

/// The largest chunk size accepted: 64 MiB (a chunk is held in memory a few
/// times over while it is compressed and stored).
pub const MAX_CHUNK_SIZE: usize = 64 << 20;

/// Chunks one download keeps ahead of its client at most, whatever
/// [`StoreOptions::with_read_ahead`] says.
pub const DOWNLOAD_READ_AHEAD: usize = 2;

/// Who checkpoints a store's write-ahead log (`-wal`): copies its frames
/// back into the database file and starts the log over. Set with
/// [`StoreOptions::with_checkpoints`]; it applies to the store's write
/// connection, so every process that writes the file should use the same
/// setting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Checkpoints {
    /// The store checkpoints (the default): a thread of its own, with its
    /// own connection, checkpoints passively each time the writer has
    /// logged about 4 MiB (SQLite's automatic checkpoint threshold, 1,000
    /// pages), beside the writer, so that no commit (no finalize) waits for
    /// a checkpoint; if the writer never pauses long enough for those to
    /// catch up, the writer checkpoints itself once per 16 MiB of log (if
    /// that thread cannot start, SQLite's automatic checkpoint stays on);
    /// after a write, once the writer has had nothing to do for 1 s, a
    /// checkpoint that truncates the `-wal` to zero bytes (given up at once
    /// while a reader or another writer is in the way, and tried again at
    /// the next idle spell); and `journal_size_limit`, which shrinks a
    /// `-wal` that grew past 4 MiB back to 4 MiB when the log starts over.
    /// An idle store keeps all its data in the database file.
    #[default]
    Store,
    /// Another program checkpoints: the store never does. Its write
    /// connection runs with SQLite's automatic checkpoint off
    /// (`wal_autocheckpoint = 0`), the writer never truncates the log when
    /// idle, and space reclamation does not checkpoint after its last
    /// step. `journal_size_limit` stays (it only shrinks the file when the
    /// log starts over, after a checkpoint the other program made).
    ///
    /// The `-wal` is then bounded only by the other program's checkpoints:
    /// if it stops checkpointing (or is not running), the log grows by
    /// everything written, and reads slow down as it grows. What a caller
    /// may rely on: the store's own connections never start the log over
    /// or truncate it before the other program has read it.
    ///
    /// Use it when a replicator that reads the log (Litestream) runs beside
    /// the store and checkpoints on its own schedule: Litestream 0.5 takes
    /// a passive checkpoint once the log reaches 1,000 pages and every
    /// minute, after it has copied the frames. With the store's own
    /// checkpoints, the store starts the log over before Litestream has
    /// read it, and Litestream then uploads the whole database again: in
    /// `tests/litestream.rs` (three writer processes, 36 parts, a 52 MB
    /// store) 10 to 14 full snapshots and about 200 MiB uploaded, against
    /// one snapshot and 52 MiB with `External`. The log stayed below
    /// 8.5 MiB there, and no finalize waited longer than 0.2 s for
    /// Litestream's checkpoints.
    External,
}

/// The zstd level a store compresses at unless told otherwise: 2.
///
/// Measured on the Synthea sample as HFS writes it (`export-store bench
/// --groups small,ratio --level N`). On a 2-core AMD EPYC: level 2 stores
/// it 17.0–17.2× smaller (the file 15.3–15.5×), level 3 16.8–16.9×
/// (15.2–15.3×), level 1 16.5–16.7×, level −1 11.3×; what is left to
/// compress when HFS finalizes a part (p50) takes 1.9 ms at level 2 against
/// 3.0 ms at level 3, and one large part is written about 15% faster. On a
/// 2-core Intel Xeon, after the finalize moved its compression onto both
/// cores: the file 15.4× smaller at level 2, 10.7× at −1, 9.7× at −5, and
/// a finalize of 1.2–1.3 ms (p50) at all three, since the faster levels'
/// bigger frames make a longer commit. Level 3 bought nothing on FHIR
/// NDJSON for the time it costs on the path HFS waits on; the fast levels
/// buy no time there either.
pub const DEFAULT_COMPRESSION_LEVEL: i32 = 2;

/// Options for opening a store. Build with [`StoreOptions::default`] and the
/// `with_*` methods; [`SqliteOutputStore::open_with`](crate::SqliteOutputStore::open_with)
/// checks them and answers invalid input for values it cannot honour.
#[derive(Clone)]
pub struct StoreOptions {
    pub(crate) chunk_size: usize,
    pub(crate) compression_level: i32,
    pub(crate) pool_size: u32,
    pub(crate) access_token_required: bool,
    pub(crate) fencing: bool,
    pub(crate) busy_timeout: Duration,
    pub(crate) staging_retry: Duration,
    pub(crate) in_flight_chunks: usize,
    pub(crate) read_ahead: usize,
    pub(crate) signing_key: Option<Vec<u8>>,
    pub(crate) max_database_size: Option<u64>,
    pub(crate) digest: DigestAlgorithm,
    pub(crate) read_only: bool,
    pub(crate) checkpoints: Checkpoints,
    pub(crate) finalize_timings: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            compression_level: DEFAULT_COMPRESSION_LEVEL,
            pool_size: 8,
            access_token_required: true,
            fencing: true,
            busy_timeout: Duration::from_secs(5),
            staging_retry: Duration::from_secs(60),
            in_flight_chunks: 4,
            read_ahead: 4,
            signing_key: None,
            max_database_size: None,
            digest: DigestAlgorithm::CURRENT,
            read_only: false,
            checkpoints: Checkpoints::Store,
            finalize_timings: false,
        }
    }
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("chunk_size", &self.chunk_size)
            .field("compression_level", &self.compression_level)
            .field("pool_size", &self.pool_size)
            .field("access_token_required", &self.access_token_required)
            .field("fencing", &self.fencing)
            .field("busy_timeout", &self.busy_timeout)
            .field("staging_retry", &self.staging_retry)
            .field("in_flight_chunks", &self.in_flight_chunks)
            .field("read_ahead", &self.read_ahead)
            .field("signing_key", &self.signing_key.as_ref().map(|_| "<set>"))
            .field("max_database_size", &self.max_database_size)
            .field("digest", &self.digest)
            .field("read_only", &self.read_only)
            .field("checkpoints", &self.checkpoints)
            .field("finalize_timings", &self.finalize_timings)
            .finish()
    }
}

impl StoreOptions {
    /// Raw NDJSON bytes per chunk (one zstd frame, one row). Default 1 MiB;
    /// 1 byte to [`MAX_CHUNK_SIZE`].
    pub fn with_chunk_size(mut self, bytes: usize) -> Self {
        self.chunk_size = bytes;
        self
    }
    /// zstd compression level, any level zstd knows (negative "fast" levels
    /// through 22). Default [`DEFAULT_COMPRESSION_LEVEL`].
    pub fn with_compression_level(mut self, level: i32) -> Self {
        self.compression_level = level;
        self
    }
    /// Connections in the read pool (writes use one dedicated connection).
    /// Default 8; at least 1.
    pub fn with_pool_size(mut self, size: u32) -> Self {
        self.pool_size = size;
        self
    }
    /// What `download_url` advertises as `requires_access_token` for
    /// HFS-served URLs. Default `true`.
    pub fn with_access_token_required(mut self, required: bool) -> Self {
        self.access_token_required = required;
        self
    }
    /// Store-side fencing: refuse to open or finalize a part when a part in
    /// the same slot carries a higher token. Default on; turn off only for a
    /// caller whose tokens do not grow per claim.
    pub fn with_fencing(mut self, on: bool) -> Self {
        self.fencing = on;
        self
    }
    /// How long one SQLite call waits for a lock before it reports busy.
    /// Default 5 s.
    pub fn with_busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }
    /// How long staging a chunk keeps retrying a busy database before the
    /// failure is deferred to `finalize_part` (as unavailable). Default 60 s.
    pub fn with_staging_retry(mut self, timeout: Duration) -> Self {
        self.staging_retry = timeout;
        self
    }
    /// Chunks one writer may have in compression at once before it applies
    /// backpressure (compressed chunks waiting for SQLite are bounded
    /// separately, and cost only their frames). Every writer of the process
    /// also takes turns for a few slots per core, so that chunks in
    /// compression stay a few per core however many parts are written at
    /// once. Default 4, so that one part alone keeps two cores busy; 1 to
    /// 16.
    pub fn with_in_flight_chunks(mut self, n: usize) -> Self {
        self.in_flight_chunks = n;
        self
    }
    /// Chunks a reader fetches, decompresses and hashes ahead of the
    /// consumer (each holds one decoded chunk in memory). Default 4: with
    /// 2, one slow chunk left a core idle (`export-store bench --groups
    /// read --read-ahead N`: 0.55-0.63x of one-thread decompression at 2,
    /// 0.73-0.74x at 4, on the Synthea part). A download served by the
    /// `server` feature keeps at most [`DOWNLOAD_READ_AHEAD`] of them,
    /// since many run at once and a network is slower than this.
    /// 1 to 16.
    pub fn with_read_ahead(mut self, n: usize) -> Self {
        self.read_ahead = n;
        self
    }
    /// Turns on signed download URLs: `download_url` mints an expiring URL
    /// carrying an HMAC-SHA256 over method, path and expiry, honouring the
    /// requested TTL, with `requires_access_token = false`. The key must be
    /// at least 16 bytes.
    pub fn with_signing_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.signing_key = Some(key.into());
        self
    }

    /// Caps the database file at about `bytes` (SQLite's `max_page_count`,
    /// rounded down to whole pages; the write-ahead log comes on top), so
    /// that a runaway export cannot fill the disk. A write that needs more
    /// fails as an internal error saying the database is full, on the next
    /// write or at `finalize_part`; nothing partial becomes readable, and the
    /// same store works again as soon as deletes free space. A cap below the
    /// file's current size stops its growth there. Default: no cap; at least
    /// 1 MiB.
    pub fn with_max_database_size(mut self, bytes: Option<u64>) -> Self {
        self.max_database_size = bytes;
        self
    }

    /// The content digest recorded for the parts this store finishes
    /// ([`PartInfo::digest`](crate::PartInfo::digest), the `ETag` of
    /// downloads). Default [`DigestAlgorithm::Xxh3_128`]: a 128-bit
    /// checksum at a few percent of compression's cost, which detects
    /// damage but not deliberate forgery. [`DigestAlgorithm::Blake3`] is
    /// cryptographic and costs about 13–15% of compression's CPU when
    /// writing and more than half of decompression's when reading. Parts
    /// already finished keep the algorithm they were recorded with and are
    /// verified with it; stores with different settings can share a file.
    pub fn with_digest(mut self, algorithm: DigestAlgorithm) -> Self {
        self.digest = algorithm;
        self
    }

    /// Opens the store read-only, for a copy of the file that something
    /// else keeps current (a replica restored by Litestream on a second
    /// node, say) or a file the process may not write. Default off.
    ///
    /// What a read-only store does and does not do:
    ///
    /// - its connections are opened `SQLITE_OPEN_READ_ONLY`: it never
    ///   creates the file (a path where none exists is not found), never
    ///   migrates it (a file whose schema version is older or newer than
    ///   the one this build writes is refused as invalid input naming both
    ///   versions), and starts no writer thread: no checkpoints, no
    ///   truncation of the write-ahead log, no space reclamation, no
    ///   reclaiming of staging;
    /// - every call that writes (`open_writer`, `finalize_part`,
    ///   `finalize_parts`, the deletes, `reclaim_abandoned`,
    ///   `prune_superseded`, `reclaim_space`) fails at once with an
    ///   internal error whose message says the store is open read-only
    ///   ([`SqliteOutputStore::is_read_only`](crate::SqliteOutputStore::is_read_only)
    ///   tells beforehand); nothing is written;
    /// - reads work as on any store: listing, `part_info`, readers,
    ///   downloads, `verify`, `backup_to`, and `download_url` (which needs
    ///   no write). Another process may write the file meanwhile: every
    ///   read sees committed data only, so a part appears whole once its
    ///   writer finalized it, and not before;
    /// - SQLite still creates the `-wal` and `-shm` files beside a file in
    ///   WAL mode (every store's file is) when they are missing and the
    ///   folder allows it. In a folder it may not write, it needs them to
    ///   exist already (a process that has the store open keeps them); if
    ///   they do not, the open fails with a message saying so. The store
    ///   never falls back to SQLite's `immutable` mode, which would read a
    ///   file that another path to it (the primary, a restore) changes
    ///   without any locking. A file in rollback-journal mode, such as a
    ///   copy [`backup_to`](crate::SqliteOutputStore::backup_to) made,
    ///   needs no companion files and opens read-only anywhere.
    ///
    /// The write settings (chunk size, compression, digest, size cap,
    /// staging retry, fencing) have no effect on a read-only store.
    pub fn with_read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Whether [`with_read_only`](Self::with_read_only) is set.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Who checkpoints the write-ahead log: the store itself (default,
    /// [`Checkpoints::Store`]) or another program that replicates the file
    /// and must see every frame of the log before it is checkpointed away,
    /// such as Litestream ([`Checkpoints::External`]). See [`Checkpoints`]
    /// for what each does, and when to choose `External`.
    pub fn with_checkpoints(mut self, checkpoints: Checkpoints) -> Self {
        self.checkpoints = checkpoints;
        self
    }

    /// Whether the store records where each
    /// [`finalize_part`](crate::ExportOutputStore::finalize_part) spent its
    /// time, for [`SqliteOutputStore::take_finalize_timings`](crate::SqliteOutputStore::take_finalize_timings).
    /// Off by default; when on, the store keeps the last
    /// [`FINALIZE_TIMINGS_KEPT`](crate::FINALIZE_TIMINGS_KEPT) of them (a
    /// few clock readings per finalize, and about 60 bytes each).
    pub fn with_finalize_timings(mut self, on: bool) -> Self {
        self.finalize_timings = on;
        self
    }

    /// What [`with_checkpoints`](Self::with_checkpoints) set.
    pub fn checkpoints(&self) -> Checkpoints {
        self.checkpoints
    }

    pub(crate) fn validate(&self) -> StorageResult<()> {
        let bad = |m: String| Err(StorageError::invalid("open", m));
        if self.chunk_size == 0 || self.chunk_size > MAX_CHUNK_SIZE {
            return bad(format!(
                "chunk size {} is outside 1..={MAX_CHUNK_SIZE}",
                self.chunk_size
            ));
        }
        let levels = zstd::compression_level_range();
        if !levels.contains(&self.compression_level) {
            return bad(format!(
                "zstd does not know compression level {} (it knows {}..={})",
                self.compression_level,
                levels.start(),
                levels.end()
            ));
        }
        if self.pool_size == 0 {
            return bad("pool size must be at least 1".into());
        }
        if !(1..=16).contains(&self.in_flight_chunks) {
            return bad("in-flight chunks must be 1 to 16".into());
        }
        if !(1..=16).contains(&self.read_ahead) {
            return bad("read-ahead must be 1 to 16 chunks".into());
        }
        if matches!(self.max_database_size, Some(b) if b < 1 << 20) {
            return bad("a database size cap must be at least 1 MiB".into());
        }
        if matches!(&self.signing_key, Some(k) if k.len() < 16) {
            return bad("a signing key must be at least 16 bytes".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_invalid_input() {
        StoreOptions::default().validate().unwrap();
        let bad = [
            StoreOptions::default().with_chunk_size(0),
            StoreOptions::default().with_chunk_size(MAX_CHUNK_SIZE + 1),
            StoreOptions::default().with_compression_level(23),
            StoreOptions::default().with_compression_level(-200_000),
            StoreOptions::default().with_pool_size(0),
            StoreOptions::default().with_in_flight_chunks(0),
            StoreOptions::default().with_read_ahead(17),
            StoreOptions::default().with_signing_key(b"short".to_vec()),
            StoreOptions::default().with_max_database_size(Some(4096)),
        ];
        for o in bad {
            let e = o.validate().unwrap_err();
            assert!(e.is_invalid_input(), "{o:?}: {e}");
        }
        StoreOptions::default()
            .with_compression_level(-5)
            .with_chunk_size(1)
            .validate()
            .unwrap();
    }
}
