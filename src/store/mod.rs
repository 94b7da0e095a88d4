//! The store: [`SqliteOutputStore`], the `ExportOutputStore` over one
//! SQLite file, and everything it is made of.
//!
//! From the top down:
//!
//! - orchestration: this file (opening a store, and the trait's methods:
//!   validation, then SQL from [`sql`] run through the bridge in [`db`],
//!   with writers and readers from [`writer`] and [`reader`]),
//!   `finalize.rs` (sealing writers and publishing their parts, one at a
//!   time or several in one transaction), `maintenance.rs` (the operator's
//!   methods: reclaim, prune, verify, space), `backup.rs` (the online
//!   copy), `mirror.rs` (a replica's parts kept equal to another store
//!   file's, part by part, checked) and `check.rs` (one finished part's
//!   chunks checked against its row, for verify and the mirror);
//! - the streams: `writer.rs` (the staging `AsyncWrite`), `reader.rs`
//!   (the verifying `AsyncRead`) and `chunk.rs` (one stored chunk read
//!   back, for the reader, verify and downloads);
//! - the bridge: `db.rs` (the read pool and the writer thread: the one place
//!   async callers meet blocking SQLite work; a store opened read-only has
//!   the read pool alone, and `db.rs` refuses its writes),
//!   `checkpointer.rs` (the thread that checkpoints the log beside the
//!   writer thread) and `compressor.rs` (the chunk workers, one per core);
//! - synchronous SQLite: `sql.rs` (every statement) and `schema.rs`
//!   (connection set-up, migrations);
//! - plain values and bytes: `codec.rs` (chunk ⇄ zstd frame), `digest.rs`
//!   (the content digest, chunk by chunk), `url.rs` (download URLs, signed
//!   URLs), `options.rs` (`StoreOptions`), `failpoint.rs` (the crash-test
//!   seam).
//!
//! Each layer uses the layers below it, never one above: the writer thread's
//! idle work (space reclamation, truncating the log) is in `db.rs` and the
//! clock rows record is in `sql.rs`, not in the orchestration. The store
//! uses the crate's contract (`contract.rs`, `key.rs`, `error.rs`) and
//! nothing of the server, the test kit or the HFS adapter.

pub(crate) mod backup;
pub(crate) mod check;
pub(crate) mod checkpointer;
pub(crate) mod chunk;
pub(crate) mod codec;
mod compressor;
pub(crate) mod db;
pub(crate) mod digest;
pub(crate) mod failpoint;
pub(crate) mod finalize;
pub(crate) mod listing;
pub(crate) mod maintenance;
pub(crate) mod mirror;
pub(crate) mod options;
mod reader;
pub(crate) mod schema;
pub(crate) mod sql;
pub(crate) mod url;
pub(crate) mod writer;

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rusqlite::{Connection, TransactionBehavior};
use tokio::io::AsyncRead;
use tokio::runtime::Handle;

use crate::contract::{DownloadUrl, ExportOutputStore, ExportPartWriter, FinalizedPart};
use crate::error::{from_sqlite, StorageError, StorageResult};
use crate::key::{check_id, ExportJobId, ExportPartKey, TenantContext};
use db::Db;
use digest::DigestAlgorithm;
use options::StoreOptions;
use reader::{Output, PartReader};
use sql::{now_ms, PartRow};
use url::UrlMinter;
use writer::{PartSink, Registry, SinkConfig};

/// What the store knows about a finished part.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartInfo {
    /// Lines (resources), as the writer counted them.
    pub line_count: u64,
    /// Uncompressed NDJSON bytes.
    pub size_bytes: u64,
    /// Compressed payload bytes (sum of the stored zstd frames).
    pub stored_bytes: u64,
    /// Number of chunks (zstd frames).
    pub chunk_count: u64,
    /// Lowercase hex digest of the uncompressed content, in
    /// [`digest_algorithm`](Self::digest_algorithm): the algorithm of the
    /// store that finished it ([`StoreOptions::with_digest`](crate::StoreOptions::with_digest)): by default
    /// XXH3-128 (what `xxhsum -H2` prints for the NDJSON), or BLAKE3 (what
    /// `b3sum` prints; every part finished under schemas 2 to 5); for parts
    /// finished under schema 1, SHA-256. It never changes once finished.
    pub digest: String,
    /// The algorithm of [`digest`](Self::digest).
    pub digest_algorithm: DigestAlgorithm,
    /// When the part was finalized.
    pub finalized_at: SystemTime,
    /// The part's fencing token (useful after a slot look-up).
    pub fencing_token: u64,
}

impl From<&PartRow> for PartInfo {
    fn from(r: &PartRow) -> Self {
        PartInfo {
            line_count: r.line_count,
            size_bytes: r.byte_count,
            stored_bytes: r.stored_bytes,
            chunk_count: r.chunk_count,
            digest: r.digest.clone(),
            digest_algorithm: r.digest_algorithm,
            finalized_at: UNIX_EPOCH + Duration::from_millis(r.finalized_at_ms.max(0) as u64),
            fencing_token: r.fencing_token,
        }
    }
}

/// Shared by every clone of a store and by its live writers and readers.
struct Core {
    db: Arc<Db>,
    registry: Arc<Registry>,
    options: StoreOptions,
    urls: UrlMinter,
    path: PathBuf,
    /// Where recent finalizes spent their time, if the options ask.
    timings: finalize::TimingLog,
    // Dropped last: the database is closed before its folder is removed.
    _temp: Option<tempfile::TempDir>,
}

/// An `ExportOutputStore` that keeps parts as zstd-compressed chunk rows in
/// one SQLite file.
///
/// Cheap to clone (clones share one database, one writer thread and one
/// read pool); `Send + Sync`. What a caller may rely on:
///
/// - nothing of a part is readable until `finalize_part` returns `Ok`, and
///   once it has, the part survives a crash of the process or the machine;
/// - finished parts never change; finalizing a key again swaps the new
///   version in atomically;
/// - with fencing on (the default), a part cannot be opened or finalized
///   while a part in its slot carries a higher token;
/// - deleting a job's outputs (`delete_job_outputs`, or
///   `delete_tenant_outputs` for each of the tenant's jobs) records the
///   highest token the job's parts carried, its *fence mark*, in the same
///   transaction; with fencing on, a part of that job can then be opened or
///   finalized only under a higher token (a later claim), so a worker that
///   lost its lease cannot bring a deleted job back. A job that had no
///   parts when it was deleted gets no mark (the store has seen none of its
///   tokens). A delete works on a database at its size cap: writing its
///   marks may take the file a few pages past the cap. Marks are kept
///   whatever the fencing option, and dropped by
///   [`reclaim_abandoned`](Self::reclaim_abandoned) once older than
///   [`JOB_FENCE_MIN_AGE`](crate::JOB_FENCE_MIN_AGE) (or the
///   age it is given, if longer);
/// - a reader returns the exact bytes written, or an error: never short or
///   mixed data;
/// - memory per writer and reader is bounded by a few chunks;
/// - a writer keeps the database open on its own: after every clone of its
///   store is dropped it still accepts bytes, but only the store that opened
///   it can finalize it. A store opened anew on the same file refuses it as
///   invalid input, and dropping the writer discards its staging;
/// - a store opened read-only ([`open_read_only`](Self::open_read_only))
///   reads like any other and refuses every write at once.
#[derive(Clone)]
pub struct SqliteOutputStore {
    core: Arc<Core>,
    access_token_required: bool,
}

impl std::fmt::Debug for SqliteOutputStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteOutputStore")
            .field("path", &self.core.path)
            .field("urls", &self.core.urls)
            .field("access_token_required", &self.access_token_required)
            .field("options", &self.core.options)
            .finish()
    }
}

impl SqliteOutputStore {
    /// Opens (or creates) the store at `path` with default options. URLs are
    /// minted under `base_url` (`http://` or `https://`).
    pub fn open(path: impl AsRef<Path>, base_url: &str) -> StorageResult<Self> {
        Self::open_with(path, base_url, StoreOptions::default())
    }

    /// Opens (or creates) the store at `path`: checks the options, sets the
    /// database up and applies pending migrations. A database written by a
    /// newer schema version is refused. With
    /// [`StoreOptions::with_read_only`], opens an existing store read-only
    /// instead (see there): nothing is created, migrated or written.
    pub fn open_with(
        path: impl AsRef<Path>,
        base_url: &str,
        options: StoreOptions,
    ) -> StorageResult<Self> {
        Self::build(path.as_ref().to_path_buf(), base_url, options, None)
    }

    /// Opens the existing store at `path` read-only, with default options:
    /// `open_with(path, base_url, StoreOptions::default().with_read_only(true))`.
    /// For a copy of the file that another process or node writes (a
    /// replica kept current by Litestream, say), or a file this process may
    /// not write. What a caller may rely on is listed at
    /// [`StoreOptions::with_read_only`]; in short: a path with no file is
    /// not found and stays absent, a file at another schema version is
    /// invalid input naming both versions, every write is refused at once
    /// (see [`is_read_only`](Self::is_read_only)), and reads see committed
    /// data only.
    pub fn open_read_only(path: impl AsRef<Path>, base_url: &str) -> StorageResult<Self> {
        Self::open_with(path, base_url, StoreOptions::default().with_read_only(true))
    }

    /// Whether the store was opened read-only: then every call that writes
    /// fails at once with an internal error saying so, and writes nothing.
    pub fn is_read_only(&self) -> bool {
        self.core.db.is_read_only()
    }

    /// A store in a fresh temporary file, removed when the last clone is
    /// dropped (writers and readers that outlive every clone may then fail).
    /// For test fixtures.
    pub fn temporary(base_url: &str) -> StorageResult<Self> {
        Self::temporary_with(base_url, StoreOptions::default())
    }

    /// [`temporary`](Self::temporary) with options.
    pub fn temporary_with(base_url: &str, options: StoreOptions) -> StorageResult<Self> {
        let dir = tempfile::Builder::new()
            .prefix("export-store-")
            .tempdir()
            .map_err(|e| {
                StorageError::internal("open", "cannot create a temporary folder").with_source(e)
            })?;
        let path = dir.path().join("export-store.db");
        Self::build(path, base_url, options, Some(dir))
    }

    fn build(
        path: PathBuf,
        base_url: &str,
        options: StoreOptions,
        temp: Option<tempfile::TempDir>,
    ) -> StorageResult<Self> {
        options.validate()?;
        let urls = UrlMinter::new(base_url, options.signing_key.clone())?;
        let db = Db::open(&path, &options)?;
        let access_token_required = options.access_token_required;
        Ok(SqliteOutputStore {
            core: Arc::new(Core {
                db: Arc::new(db),
                registry: Arc::default(),
                timings: finalize::TimingLog::new(options.finalize_timings),
                options,
                urls,
                path,
                _temp: temp,
            }),
            access_token_required,
        })
    }

    /// Where each recent [`finalize_part`](ExportOutputStore::finalize_part)
    /// spent its time, oldest first, if the store was opened with
    /// [`StoreOptions::with_finalize_timings`]; the store forgets them as
    /// they are taken. Empty otherwise. At most
    /// [`FINALIZE_TIMINGS_KEPT`](crate::FINALIZE_TIMINGS_KEPT) are kept:
    /// older ones are dropped as new ones come. Shared by every clone of
    /// the store.
    pub fn take_finalize_timings(&self) -> Vec<finalize::FinalizeTiming> {
        self.core.timings.take()
    }

    /// This handle with `requires_access_token` set as given for the URLs it
    /// mints (other clones keep theirs).
    pub fn with_access_token_required(mut self, required: bool) -> Self {
        self.access_token_required = required;
        self
    }

    /// The base URL download URLs are minted under (no trailing slash).
    pub fn base_url(&self) -> &str {
        self.core.urls.base()
    }

    /// The database file's path.
    pub fn path(&self) -> &Path {
        &self.core.path
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &StoreOptions {
        &self.core.options
    }

    /// Facts about the finished part under exactly `key`.
    pub async fn part_info(&self, key: &ExportPartKey) -> StorageResult<PartInfo> {
        let row = self.finished(key, "part_info").await?;
        Ok(PartInfo::from(&row))
    }

    /// The finished part with the highest fencing token in `key`'s slot
    /// (the key's own token is ignored): what a download route serves. Its
    /// token is [`PartInfo::fencing_token`].
    pub async fn latest_in_slot(&self, key: &ExportPartKey) -> StorageResult<PartInfo> {
        let row = self
            .find_part(key, "latest_in_slot", sql::find_latest_in_slot)
            .await?;
        Ok(PartInfo::from(&row))
    }

    /// The finished part under exactly `key` as its stored zstd frames,
    /// concatenated as they are: one valid zstd stream (what a `.zst` file
    /// holds, and what `zstd -d` turns back into the part's NDJSON),
    /// [`PartInfo::stored_bytes`] long. Verified as `open_reader` is: each
    /// frame is decoded and checked, and the part's length, frame bytes and
    /// digest are checked before its last frame is handed out, so a damaged
    /// part ends in an error. Must be called inside a Tokio runtime.
    pub async fn open_frames(
        &self,
        key: &ExportPartKey,
    ) -> StorageResult<Pin<Box<dyn AsyncRead + Send>>> {
        self.reader(key, "open_frames", Output::Frames).await
    }

    async fn reader(
        &self,
        key: &ExportPartKey,
        op: &'static str,
        output: Output,
    ) -> StorageResult<Pin<Box<dyn AsyncRead + Send>>> {
        let runtime = Handle::try_current().map_err(|_| {
            StorageError::internal(op, format!("{op} must be called inside a Tokio runtime"))
        })?;
        let row = self.finished(key, op).await?;
        Ok(Box::pin(PartReader::new(
            self.core.db.pool(),
            runtime,
            row,
            key.display().to_string(),
            self.core.options.read_ahead,
            output,
        )))
    }

    /// The database bridge, for the crate's other modules.
    pub(crate) fn db(&self) -> &Arc<Db> {
        &self.core.db
    }

    /// The registry of this store's live writers, for the crate's other modules.
    pub(crate) fn registry(&self) -> &Arc<Registry> {
        &self.core.registry
    }

    /// Live (not yet finalized or dropped) writers of this store.
    pub fn live_writers(&self) -> usize {
        self.core.registry.len()
    }

    async fn finished(&self, key: &ExportPartKey, op: &'static str) -> StorageResult<PartRow> {
        self.find_part(key, op, sql::find_finished).await
    }

    /// Deletes parts with `delete` in one transaction; the space comes back
    /// in short steps once the writer is idle, after this call has returned.
    /// `delete` records the deleted jobs' fence marks in that transaction
    /// too, so a delete and its marks commit together or not at all.
    async fn delete_parts(
        &self,
        op: &'static str,
        delete: impl FnOnce(&Connection) -> rusqlite::Result<usize> + Send + 'static,
    ) -> StorageResult<()> {
        self.core
            .db
            .write(op, move |c| {
                let tx = immediate(c, op)?;
                delete(&tx).map_err(|e| from_sqlite(op, e))?;
                failpoint::hit("delete.before_commit");
                tx.commit().map_err(|e| from_sqlite(op, e))?;
                failpoint::hit("delete.after_commit");
                Ok(())
            })
            .await?;
        self.core.db.reclaim_space_soon();
        Ok(())
    }

    /// Validates `key`, then looks a finished part up with `find`; none is
    /// not found.
    async fn find_part(
        &self,
        key: &ExportPartKey,
        op: &'static str,
        find: fn(&Connection, &ExportPartKey) -> rusqlite::Result<Option<PartRow>>,
    ) -> StorageResult<PartRow> {
        key.validate(op)?;
        let k = key.clone();
        let row = self
            .core
            .db
            .read(op, move |c| find(c, &k).map_err(|e| from_sqlite(op, e)))
            .await
            .map_err(|e| e.or_part(key.display()))?;
        row.ok_or_else(|| {
            StorageError::not_found(op, "no finished part under this key").with_part(key.display())
        })
    }
}

/// Refuses `key` when fencing is on and either its slot holds a higher
/// token or its job's outputs were deleted when the job had reached a token
/// at least as high as the key's (the job's fence mark, which outlives the
/// delete).
fn check_fence(
    fencing: bool,
    c: &Connection,
    key: &ExportPartKey,
    op: &'static str,
) -> StorageResult<()> {
    if !fencing {
        return Ok(());
    }
    let max = sql::max_token_in_slot(c, key).map_err(|e| from_sqlite(op, e))?;
    if let Some(t) = max.filter(|t| *t > key.fencing_token) {
        return Err(StorageError::conflict(
            op,
            format!(
                "fenced out: a part in this slot carries token {t}, higher than {}",
                key.fencing_token
            ),
        ));
    }
    let mark =
        sql::job_fence(c, &key.tenant_id, key.job_id.as_str()).map_err(|e| from_sqlite(op, e))?;
    match mark {
        Some(m) if m >= key.fencing_token => Err(StorageError::conflict(
            op,
            format!(
                "fenced out: the job was deleted or reclaimed under a newer claim (its outputs \
                 were deleted at token {m}, and token {} is not higher)",
                key.fencing_token
            ),
        )),
        _ => Ok(()),
    }
}

/// Deletes one tenant's job (or, with `job` `None`, all its jobs) with
/// `delete`, and records the fence mark of every job that had parts: the
/// highest token among them, read before the delete and written after it,
/// into the pages the delete freed where it freed any. Returns what
/// `delete` returned.
///
/// A delete must work on a database at its size cap (it is how space comes
/// back), yet a delete that empties no whole page may still need a page or
/// two for its marks. So while the marks are written, the cap (if one is
/// set) is raised by [`mark_headroom`] pages, then set back: the file may
/// end up that many pages past the cap, and the cap in force on the
/// writer's connection grows with it until the store is reopened.
fn delete_fenced(
    tx: &Connection,
    tenant: &str,
    job: Option<&str>,
    delete: impl FnOnce(&Connection) -> rusqlite::Result<usize>,
) -> rusqlite::Result<usize> {
    let marks = sql::highest_tokens(tx, tenant, job)?;
    let deleted = delete(tx)?;
    if marks.is_empty() {
        return Ok(deleted);
    }
    let cap = sql::size_cap(tx)?;
    let (page_size, _, _) = sql::pages(tx)?;
    let headroom = mark_headroom(tenant, &marks, page_size);
    let capped = cap.saturating_add(headroom) < sql::SQLITE_MAX_PAGES;
    if capped {
        sql::set_size_cap(tx, cap + headroom)?;
    }
    let now = now_ms();
    let written = marks
        .iter()
        .try_for_each(|(job, token)| sql::raise_job_fence(tx, tenant, job, *token, now).map(drop));
    if capped {
        sql::set_size_cap(tx, cap)?;
    }
    written.map(|()| deleted)
}

/// Pages that writing `marks` may take at most: each mark's ids stored
/// twice (its row and its key's index), with room for half-empty pages
/// after splits, plus a few for splits up the trees.
fn mark_headroom(tenant: &str, marks: &[(String, u64)], page_size: u64) -> u64 {
    let bytes: u64 = marks
        .iter()
        .map(|(job, _)| 2 * (tenant.len() + job.len()) as u64 + 96)
        .sum();
    8 + 2 * bytes.div_ceil(page_size.max(512))
}

/// Begins a write transaction that takes the lock at once.
pub(crate) fn immediate<'c>(
    c: &'c mut Connection,
    op: &'static str,
) -> StorageResult<rusqlite::Transaction<'c>> {
    c.transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| from_sqlite(op, e))
}

#[async_trait]
impl ExportOutputStore for SqliteOutputStore {
    async fn open_writer(&self, key: &ExportPartKey) -> StorageResult<ExportPartWriter> {
        let op = "open_writer";
        self.core.db.check_writable(op)?;
        key.validate(op)?;
        let runtime = Handle::try_current().map_err(|_| {
            StorageError::internal(op, "open_writer must be called inside a Tokio runtime")
        })?;
        let fencing = self.core.options.fencing;
        let k = key.clone();
        let part_id = self
            .core
            .db
            .write(op, move |c| {
                let tx = immediate(c, op)?;
                check_fence(fencing, &tx, &k, op)?;
                sql::discard_staged(&tx, &k).map_err(|e| from_sqlite(op, e))?;
                let id = sql::insert_staged(&tx, &k, now_ms()).map_err(|e| from_sqlite(op, e))?;
                failpoint::hit("open_writer.before_commit");
                tx.commit().map_err(|e| from_sqlite(op, e))?;
                Ok(id)
            })
            .await
            .map_err(|e| e.or_part(key.display()))?;
        let o = &self.core.options;
        let mut sink = Box::pin(PartSink::new(
            self.core.db.clone(),
            self.core.registry.clone(),
            runtime,
            part_id,
            key,
            SinkConfig {
                chunk_size: o.chunk_size,
                level: o.compression_level,
                in_flight: o.in_flight_chunks,
                digest: o.digest,
            },
        ));
        sink.as_mut().register(key);
        Ok(ExportPartWriter::new(sink))
    }

    async fn finalize_part(
        &self,
        key: &ExportPartKey,
        mut writer: ExportPartWriter,
    ) -> StorageResult<FinalizedPart> {
        let op = "finalize_part";
        // Before the writer is touched: a read-only store has no writer of
        // its own, and must not flush or shut down another store's.
        self.core.db.check_writable(op)?;
        key.validate(op)?;
        let began = Instant::now();
        let staged = finalize::seal(self, op, key, &mut writer, true).await?;
        let sealed = Instant::now();
        let fencing = self.core.options.fencing;
        let timed = self.core.timings.is_on();
        let ((staged, published), commit) = self
            .core
            .db
            .write_durable_storing(op, staged.held_bytes(), move |tx| {
                let published = timed.then(Instant::now);
                finalize::publish(tx, fencing, op, &staged)?;
                Ok((staged, published))
            })
            .await
            .map_err(|e| e.or_part(key.display()))?;
        if let Some(published) = published {
            let clock = finalize::FinalizeClock {
                began,
                sealed,
                published,
                commit,
                returned: Instant::now(),
            };
            self.core
                .timings
                .record(clock.timing(staged.compressed_at()));
        }
        Ok(staged.finished(self))
    }

    async fn download_url(&self, key: &ExportPartKey, ttl: Duration) -> StorageResult<DownloadUrl> {
        key.validate("download_url")?;
        Ok(self.core.urls.mint(key, ttl, self.access_token_required))
    }

    async fn open_reader(
        &self,
        key: &ExportPartKey,
    ) -> StorageResult<Pin<Box<dyn AsyncRead + Send>>> {
        self.reader(key, "open_reader", Output::Ndjson).await
    }

    async fn delete_job_outputs(
        &self,
        tenant: &TenantContext,
        job_id: &ExportJobId,
    ) -> StorageResult<()> {
        let op = "delete_job_outputs";
        let t = tenant.tenant_id().as_str().to_string();
        check_id(op, "tenant id", &t)?;
        check_id(op, "job id", job_id.as_str())?;
        let j = job_id.as_str().to_string();
        self.delete_parts(op, move |tx| {
            delete_fenced(tx, &t, Some(&j), |tx| sql::delete_job(tx, &t, &j))
        })
        .await
    }

    async fn delete_tenant_outputs(&self, tenant_id: &str) -> StorageResult<()> {
        let op = "delete_tenant_outputs";
        check_id(op, "tenant id", tenant_id)?;
        let t = tenant_id.to_string();
        self.delete_parts(op, move |tx| {
            delete_fenced(tx, &t, None, |tx| sql::delete_tenant(tx, &t))
        })
        .await
    }
}
