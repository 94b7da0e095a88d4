//! The one bridge between async callers and synchronous SQLite work.
//!
//! Reads run on Tokio's blocking pool with a connection from an r2d2 pool,
//! taken and returned inside the blocking call, so no pooled connection is
//! ever held across an `.await`. Writes go to one dedicated writer thread
//! that owns the only write connection: writers of this store never contend
//! for SQLite's lock among themselves, and chunk inserts that queue up are
//! committed together in one transaction.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::checkpointer::{Checkpointer, LogCounter};
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::options::{Checkpoints, StoreOptions};
use super::{failpoint, schema, sql};
use crate::error::{from_pool, from_sqlite, StorageError, StorageResult};

/// Chunks committed together at most, and their frame bytes at most.
const BATCH_CHUNKS: usize = 32;
const BATCH_BYTES: usize = 8 << 20;
/// Commands that may wait for the writer thread.
const QUEUE_DEPTH: usize = 64;
/// The size, in bytes, the write connection truncates the write-ahead log
/// back to when it starts the log over after a checkpoint
/// (`PRAGMA journal_size_limit`). The store checkpoints each time the
/// log grows by about 4 MiB ([`super::checkpointer`]), but a batch of
/// chunks may add up to [`BATCH_BYTES`] in one transaction, and a reader
/// holding an old snapshot keeps any checkpoint from catching up, so the
/// log can grow well past that while parts are written; SQLite then reuses
/// the `-wal` file from its start without ever making it smaller. With the
/// limit, the first commit that starts the log over after a checkpoint
/// caught up (a finalize, say) truncates the file back to this size, or to
/// that commit's own frames if they are larger. Set to the checkpoint
/// threshold, it leaves a log that stays below the threshold alone.
const WAL_SIZE_LIMIT: i64 = 4 << 20;
/// How long the writer thread waits without a command, after a write,
/// before it checkpoints the write-ahead log and truncates it to nothing:
/// a store that sits idle keeps all of its data in the database file and no
/// megabytes of log beside it.
const IDLE_TRUNCATE_AFTER: Duration = Duration::from_secs(1);

/// Pages one space-reclamation step gives back at most: with 4 KiB pages,
/// at most 1 MiB of live pages are moved in one short transaction.
pub(crate) const VACUUM_STEP_PAGES: u32 = 256;

type Call = Box<dyn FnOnce(&mut Connection) + Send>;

/// One chunk to store, with where to send the outcome.
pub(crate) struct ChunkInsert {
    pub part_id: i64,
    pub seq: u64,
    pub raw_offset: u64,
    pub raw_len: u64,
    pub frame: Vec<u8>,
    pub ack: oneshot::Sender<StorageResult<()>>,
}

/// A call that runs inside a savepoint of a shared durable transaction:
/// `run` does the work and says whether to keep it; `finish` is told the
/// outcome of the commit (and is called even if `run` never got to run).
struct DurableCall {
    /// Bytes of chunk frames `run` stores, for the log's count.
    frame_bytes: u64,
    run: Box<dyn FnOnce(&Connection) -> bool + Send>,
    finish: Box<dyn FnOnce(Option<StorageError>, CommitTimes) + Send>,
}

/// When a durable group's commit began (its statements were done) and when
/// it had reached the disk (or failed).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CommitTimes {
    pub started: Instant,
    pub done: Instant,
}

/// Durable calls committed together at most (one fsync for all of them).
const GROUP_CALLS: usize = 64;

enum Command {
    Chunk(ChunkInsert),
    Call(Call),
    Durable(DurableCall),
}

/// The database: a read pool and the writer thread.
pub(crate) struct Db {
    pool: r2d2::Pool<SqliteConnectionManager>,
    queue: Option<mpsc::Sender<Command>>,
    thread: Option<JoinHandle<()>>,
    /// Staged parts whose writers were dropped; discarded by the writer
    /// thread before its next command.
    discards: std::sync::Arc<Mutex<Vec<i64>>>,
    /// Set when deletes left free pages: the writer thread gives them back
    /// in short steps whenever it has nothing else to do.
    reclaim: std::sync::Arc<AtomicBool>,
    /// The file's identity when it was opened, to notice it was removed or
    /// replaced underneath the store (writes would go to a deleted file).
    file: Option<(PathBuf, FileId)>,
    /// Chunks that found the queue full, oldest first, and whether a task
    /// on the blocking pool is forwarding them ([`Db::queue_chunk`]).
    overflow: Arc<Mutex<Overflow>>,
    /// Opened read-only: no writer thread, and every write is refused.
    read_only: bool,
    /// The thread that checkpoints the log beside the writer, if the store
    /// does its own checkpoints; dropped after the writer thread ends.
    checkpointer: Option<Checkpointer>,
}

/// Chunks waiting for room in a store's queue.
#[derive(Default)]
struct Overflow {
    chunks: std::collections::VecDeque<Command>,
    forwarding: bool,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("pool", &self.pool.state())
            .finish()
    }
}

fn open_flags() -> OpenFlags {
    OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI
}

impl Db {
    /// Opens (creating if needed) and migrates the database at `path`, then
    /// starts the writer thread and the read pool; with
    /// [`StoreOptions::with_read_only`], [`Db::open_read_only`] instead.
    pub fn open(path: &Path, options: &StoreOptions) -> StorageResult<Db> {
        if options.read_only {
            return Self::open_read_only(path, options);
        }
        let op = "open";
        let busy = options.busy_timeout;
        let mut conn =
            Connection::open_with_flags(path, open_flags()).map_err(|e| from_sqlite(op, e))?;
        // SQLite quietly opens a write-protected file read-only; the store
        // must write, so it says so now rather than at the first export.
        if conn
            .is_readonly(rusqlite::DatabaseName::Main)
            .map_err(|e| from_sqlite(op, e))?
        {
            return Err(StorageError::internal(
                op,
                "the database file is read-only (check its permissions and file system)",
            ));
        }
        schema::configure(&conn, busy).map_err(|e| from_sqlite(op, e))?;
        // This is the store's only connection that writes, so the only one
        // that starts the log over and truncates it: the read pool needs no
        // limit.
        conn.pragma_update_and_check(None, "journal_size_limit", WAL_SIZE_LIMIT, |r| {
            r.get::<_, i64>(0)
        })
        .map_err(|e| from_sqlite(op, e))?;
        // With another program checkpointing (a replicator that must read
        // every frame first), this connection never checkpoints on its own.
        let store_checkpoints = options.checkpoints == Checkpoints::Store;
        if !store_checkpoints {
            conn.pragma_update_and_check(None, "wal_autocheckpoint", 0, |r| r.get::<_, i64>(0))
                .map_err(|e| from_sqlite(op, e))?;
        }
        schema::prepare(&mut conn)?;
        schema::limit_size(&conn, options.max_database_size).map_err(|e| from_sqlite(op, e))?;
        // The store's own checkpoints run on a thread of their own, so
        // that no commit waits for one; without that thread, SQLite's
        // automatic checkpoint stays on.
        let (checkpointer, log) = match store_checkpoints {
            true => Checkpointer::start(path, busy, WAL_SIZE_LIMIT as u64).unzip(),
            false => (None, None),
        };
        if log.is_some() {
            conn.pragma_update_and_check(None, "wal_autocheckpoint", 0, |r| r.get::<_, i64>(0))
                .map_err(|e| from_sqlite(op, e))?;
        }
        // Free pages left by a reclamation that a crash interrupted.
        let (_, _, free) = sql::pages(&conn).map_err(|e| from_sqlite(op, e))?;
        let reclaim = std::sync::Arc::new(AtomicBool::new(free > 0));

        // Read connections never create the file: one that vanished must not
        // come back empty under the store.
        let pool = read_pool(
            path,
            open_flags() - OpenFlags::SQLITE_OPEN_CREATE,
            options,
            op,
        )?;

        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let discards = std::sync::Arc::new(Mutex::new(Vec::new()));
        let staging_retry = options.staging_retry;
        let thread_discards = discards.clone();
        let thread_reclaim = reclaim.clone();
        let thread = std::thread::Builder::new()
            .name("export-store-writer".into())
            .spawn(move || {
                writer_thread(
                    conn,
                    rx,
                    thread_discards,
                    thread_reclaim,
                    staging_retry,
                    store_checkpoints,
                    log,
                )
            })
            .map_err(|e| {
                StorageError::internal(op, "cannot start the writer thread").with_source(e)
            })?;
        Ok(Db {
            pool,
            queue: Some(tx),
            thread: Some(thread),
            discards,
            reclaim,
            file: file_id(path).map(|id| (path.to_path_buf(), id)),
            overflow: Default::default(),
            read_only: false,
            checkpointer,
        })
    }

    /// Opens the existing database at `path` read-only: checks that it holds
    /// a store of this build's schema (migrating nothing) and starts the read
    /// pool, with no writer thread. Every connection is opened
    /// `SQLITE_OPEN_READ_ONLY`, so nothing this store does can write the
    /// file; a write asked of it is refused by [`Db::sender`].
    pub fn open_read_only(path: &Path, options: &StoreOptions) -> StorageResult<Db> {
        let op = "open";
        open_checked_read_only(path, options.busy_timeout, op)?;
        let flags = read_only_flags();
        let pool = read_pool(path, flags, options, op)?;
        Ok(Db {
            pool,
            queue: None,
            thread: None,
            discards: Default::default(),
            reclaim: Default::default(),
            file: file_id(path).map(|id| (path.to_path_buf(), id)),
            overflow: Default::default(),
            read_only: true,
            checkpointer: None,
        })
    }

    /// Whether `path` names this database's own file (the same device and
    /// inode, whatever the path's spelling).
    pub fn is_same_file(&self, path: &Path) -> bool {
        matches!((&self.file, file_id(path)), (Some((_, id)), Some(other)) if *id == other)
    }

    /// Whether the database was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Refuses a write on a database opened read-only.
    pub fn check_writable(&self, op: &'static str) -> StorageResult<()> {
        if self.read_only {
            Err(read_only_refusal(op))
        } else {
            Ok(())
        }
    }

    /// Fails if the database file was removed or replaced since it was
    /// opened: the store's connections would go on using the old file.
    fn check_file(&self, op: &'static str) -> StorageResult<()> {
        match &self.file {
            Some((path, id)) if file_id(path).as_ref() != Some(id) => Err(StorageError::internal(
                op,
                "the database file was removed or replaced while the store was open; \
                 reopen the store",
            )),
            _ => Ok(()),
        }
    }

    /// Runs `f` with a pooled connection on the blocking pool.
    pub async fn read<T, F>(&self, op: &'static str, f: F) -> StorageResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StorageResult<T> + Send + 'static,
    {
        self.check_file(op)?;
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || read_blocking(&pool, op, f))
            .await
            .map_err(|e| join_error(op, e))?
    }

    /// Runs blocking work `f` (file I/O, a connection of its own) on the
    /// runtime's blocking pool.
    pub async fn blocking<T, F>(&self, op: &'static str, f: F) -> StorageResult<T>
    where
        T: Send + 'static,
        F: FnOnce() -> StorageResult<T> + Send + 'static,
    {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| join_error(op, e))?
    }

    /// A clone of the read pool, for blocking tasks that read on their own.
    pub fn pool(&self) -> r2d2::Pool<SqliteConnectionManager> {
        self.pool.clone()
    }

    /// Runs `f` on the writer thread with the write connection.
    pub async fn write<T, F>(&self, op: &'static str, f: F) -> StorageResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> StorageResult<T> + Send + 'static,
    {
        self.check_file(op)?;
        let (ack, done) = oneshot::channel();
        let call: Call = Box::new(move |c| {
            let _ = ack.send(f(c));
        });
        self.sender(op)?
            .send(Command::Call(call))
            .await
            .map_err(|_| writer_gone(op))?;
        done.await.map_err(|_| writer_gone(op))?
    }

    /// Runs `f` on the writer thread inside a transaction whose commit
    /// reaches the disk before this returns `Ok`. Durable calls that queue up
    /// together share one transaction and one fsync (group commit); each
    /// runs in its own savepoint, so an `Err` from one rolls back only its
    /// own work. A failed commit fails every call of the group.
    pub async fn write_durable<T, F>(&self, op: &'static str, f: F) -> StorageResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StorageResult<T> + Send + 'static,
    {
        self.write_durable_storing(op, 0, f).await.map(|(v, _)| v)
    }

    /// [`write_durable`](Self::write_durable) for a call that stores about
    /// `frame_bytes` of chunk frames (a finalize's held chunks), which the
    /// writer thread counts towards its next checkpoint; also says when
    /// the group's commit began and ended.
    pub async fn write_durable_storing<T, F>(
        &self,
        op: &'static str,
        frame_bytes: u64,
        f: F,
    ) -> StorageResult<(T, CommitTimes)>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StorageResult<T> + Send + 'static,
    {
        self.check_file(op)?;
        let (ack, done) = oneshot::channel();
        let slot = Arc::new(Mutex::new(None));
        let out = slot.clone();
        let call = DurableCall {
            frame_bytes,
            run: Box::new(move |c| {
                let r = f(c);
                let keep = r.is_ok();
                *out.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
                keep
            }),
            finish: Box::new(move |commit_error, times| {
                let ran = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
                let _ = ack.send(match (ran, commit_error) {
                    (Some(Err(e)), _) => Err(e),
                    (_, Some(e)) => Err(e),
                    (Some(Ok(v)), None) => Ok((v, times)),
                    (None, None) => Err(StorageError::internal(op, "the call did not run")),
                });
            }),
        };
        self.sender(op)?
            .send(Command::Durable(call))
            .await
            .map_err(|_| writer_gone(op))?;
        done.await.map_err(|_| writer_gone(op))?
    }

    /// Queues one chunk for the writer thread without ever blocking the
    /// caller (a compression worker shared by every store of the process),
    /// and returns where the outcome of storing it will arrive: the caller
    /// goes on compressing while SQLite stores (and checkpoints). When the
    /// queue is full (this store's writer thread is slow: a checkpoint, a
    /// database locked by another process), the chunk waits in the store's
    /// overflow list, which one task on `runtime`'s blocking pool forwards
    /// in order as room comes, so one slow store never holds the workers
    /// that other stores' chunks need, and a store's waiting chunks take
    /// one thread, not one each. Once chunks wait there, later ones queue
    /// behind them. The list holds no more than the writers' own limit of
    /// unacknowledged chunks ([`super::writer::MAX_QUEUED`] each). The
    /// outcome arrives the same way; if the writer thread is gone
    /// meanwhile, the receiver closes.
    pub fn queue_chunk(
        &self,
        insert: ChunkInsertArgs,
        runtime: &tokio::runtime::Handle,
    ) -> StorageResult<oneshot::Receiver<StorageResult<()>>> {
        let op = "write_chunk";
        let (ack, done) = oneshot::channel();
        let cmd = Command::Chunk(ChunkInsert {
            part_id: insert.part_id,
            seq: insert.seq,
            raw_offset: insert.raw_offset,
            raw_len: insert.raw_len,
            frame: insert.frame,
            ack,
        });
        let queue = self.sender(op)?;
        let mut overflow = self.overflow.lock().unwrap_or_else(|p| p.into_inner());
        let cmd = if overflow.chunks.is_empty() {
            match queue.try_send(cmd) {
                Ok(()) => return Ok(done),
                Err(mpsc::error::TrySendError::Full(cmd)) => cmd,
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(writer_gone(op)),
            }
        } else {
            cmd
        };
        overflow.chunks.push_back(cmd);
        if !overflow.forwarding {
            overflow.forwarding = true;
            let forwarder = Forwarder {
                queue: queue.clone(),
                list: self.overflow.clone(),
                ran: false,
            };
            runtime.spawn_blocking(move || forwarder.run());
        }
        Ok(done)
    }

    /// Asks the writer thread to discard a staged part soon, without
    /// waiting (used from `Drop`).
    pub fn discard_later(&self, part_id: i64) {
        if let Ok(mut d) = self.discards.lock() {
            d.push(part_id);
        }
        // Wake the thread if it is idle; a full queue will get to it anyway.
        if let Some(q) = &self.queue {
            let _ = q.try_send(Command::Call(Box::new(|_| {})));
        }
    }

    /// Asks the writer thread to give free pages back to the file system in
    /// short steps ([`vacuum_step`]) when it is idle, without waiting.
    /// Writes keep priority: each step is one short transaction.
    pub fn reclaim_space_soon(&self) {
        self.reclaim.store(true, Ordering::SeqCst);
        if let Some(q) = &self.queue {
            let _ = q.try_send(Command::Call(Box::new(|_| {})));
        }
    }

    fn sender(&self, op: &'static str) -> StorageResult<&mpsc::Sender<Command>> {
        self.check_writable(op)?;
        self.queue.as_ref().ok_or_else(|| writer_gone(op))
    }
}

/// Sends a store's overflow chunks to its queue, oldest first, waiting for
/// room, until none is left. A closed queue drops them with their acks: the
/// writers see the writer thread gone. So does a forwarder dropped without
/// running (its runtime was shutting down).
struct Forwarder {
    queue: mpsc::Sender<Command>,
    list: Arc<Mutex<Overflow>>,
    ran: bool,
}

impl Forwarder {
    fn overflow(&self) -> std::sync::MutexGuard<'_, Overflow> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(mut self) {
        self.ran = true;
        loop {
            let next = {
                let mut overflow = self.overflow();
                let next = overflow.chunks.pop_front();
                if next.is_none() {
                    overflow.forwarding = false;
                }
                next
            };
            let Some(cmd) = next else { return };
            if self.queue.blocking_send(cmd).is_err() {
                let mut overflow = self.overflow();
                overflow.chunks.clear();
                overflow.forwarding = false;
                return;
            }
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if !self.ran {
            let mut overflow = self.overflow();
            overflow.chunks.clear();
            overflow.forwarding = false;
        }
    }
}

/// The fields of a chunk to stage (the ack channel is made by [`Db`]).
pub(crate) struct ChunkInsertArgs {
    pub part_id: i64,
    pub seq: u64,
    pub raw_offset: u64,
    pub raw_len: u64,
    pub frame: Vec<u8>,
}

impl Drop for Db {
    fn drop(&mut self) {
        // Closing the queue lets the thread finish what is queued and exit.
        self.queue.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Then the checkpointer, which no one asks any more.
        drop(self.checkpointer.take());
    }
}

/// The read pool of the database at `path`: connections opened with
/// `flags`, configured as every connection of the store is, up to
/// `options`' pool size.
fn read_pool(
    path: &Path,
    flags: OpenFlags,
    options: &StoreOptions,
    op: &'static str,
) -> StorageResult<r2d2::Pool<SqliteConnectionManager>> {
    let busy = options.busy_timeout;
    let manager = SqliteConnectionManager::file(path)
        .with_flags(flags)
        .with_init(move |c| schema::configure(c, busy));
    r2d2::Pool::builder()
        .max_size(options.pool_size)
        .min_idle(Some(0))
        .connection_timeout(busy.max(Duration::from_secs(1)) * 2)
        .build(manager)
        .map_err(|e| from_pool(op, e))
}

/// Runs `f` with a pooled connection on the current (blocking) thread.
pub(crate) fn read_blocking<T>(
    pool: &r2d2::Pool<SqliteConnectionManager>,
    op: &'static str,
    f: impl FnOnce(&Connection) -> StorageResult<T>,
) -> StorageResult<T> {
    let conn = pool.get().map_err(|e| from_pool(op, e))?;
    f(&conn)
}

/// A file's device and inode (where the platform has them).
type FileId = (u64, u64);

#[cfg(unix)]
fn file_id(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_id(_path: &Path) -> Option<FileId> {
    None
}

/// One connection, read-only, to the store file at `path`, checked as a
/// read-only open checks it: a file (not a folder) that exists, holds a
/// store, and has this build's schema version. Failures explain
/// themselves, as [`Db::open_read_only`]'s do.
pub(crate) fn open_checked_read_only(
    path: &Path,
    busy: Duration,
    op: &'static str,
) -> StorageResult<Connection> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => {
            return Err(StorageError::invalid(
                op,
                "the path is a folder, not a store's database file",
            ))
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StorageError::not_found(
                op,
                "there is no database file at this path (a read-only open never creates one)",
            )
            .with_source(e))
        }
        Err(e) => {
            return Err(StorageError::internal(
                op,
                format!("the database file cannot be examined ({})", e.kind()),
            )
            .with_source(e))
        }
    }
    let checked = Connection::open_with_flags(path, read_only_flags())
        .map_err(|e| from_sqlite(op, e))
        .and_then(|conn| {
            schema::configure(&conn, busy).map_err(|e| from_sqlite(op, e))?;
            schema::check_read_only(&conn)?;
            Ok(conn)
        });
    checked.map_err(|e| explain_read_only_failure(path, e))
}

/// The flags of a read-only store's connections: never create, never write.
fn read_only_flags() -> OpenFlags {
    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI
}

/// The refusal of a write asked of a store opened read-only.
pub(crate) fn read_only_refusal(op: &'static str) -> StorageError {
    StorageError::internal(
        op,
        "the store is open read-only; writes go to the store's primary copy",
    )
}

/// Turns SQLite's "cannot open" (a read-only file system) or "read-only"
/// (a folder whose permissions forbid creating files) for a read-only open
/// into what the operator can act on when its cause is the one SQLite has
/// for a database in WAL mode (every store's file) in a folder it may not
/// write: it needs the `-wal` and `-shm` files beside the database, and
/// cannot create them there. Other errors pass unchanged.
fn explain_read_only_failure(path: &Path, e: StorageError) -> StorageError {
    use std::io::Read;
    let code = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<rusqlite::Error>())
        .and_then(rusqlite::Error::sqlite_error_code);
    if !matches!(
        code,
        Some(rusqlite::ErrorCode::CannotOpen | rusqlite::ErrorCode::ReadOnly)
    ) {
        return e;
    }
    // Bytes 18 and 19 of the header are 2 for a database in WAL mode.
    let mut header = [0_u8; 20];
    let wal_mode = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .is_ok()
        && header.starts_with(b"SQLite format 3\0")
        && header[18] == 2;
    let companion = |suffix: &str| {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        PathBuf::from(p).exists()
    };
    if !wal_mode || (companion("-wal") && companion("-shm")) {
        return e;
    }
    StorageError::internal(
        "open",
        "the database is in WAL mode and its -wal and -shm files are not both beside it; \
         SQLite cannot read such a file without them and cannot create them here (is its \
         folder read-only?). Let this process write the folder, keep a process that has \
         the store open (it keeps both files), or serve a copy in rollback-journal mode \
         (what a backup writes)",
    )
    .with_source(e)
}

fn writer_gone(op: &'static str) -> StorageError {
    StorageError::internal(op, "the store's writer has shut down")
}

fn join_error(op: &'static str, e: tokio::task::JoinError) -> StorageError {
    if e.is_cancelled() {
        StorageError::unavailable(op, "the runtime is shutting down")
    } else {
        StorageError::internal(op, "a storage task panicked")
    }
}

/// One step of space reclamation on the writer connection: returns pages
/// freed, free pages left and the page size.
pub(crate) fn vacuum_step(conn: &Connection) -> rusqlite::Result<(u64, u64, u64)> {
    let freed = sql::incremental_vacuum(conn, VACUUM_STEP_PAGES)?;
    failpoint::hit("vacuum.step");
    let (page_size, _, left) = sql::pages(conn)?;
    Ok((freed, left, page_size))
}

/// One idle-time step of space reclamation, run by the writer thread when
/// it has no command. Never waits for a lock held by another process: a
/// busy database ends the idle work until the next delete asks again.
/// Returns whether free pages remain to give back. After the last step it
/// checkpoints, if the store does its own checkpoints (`checkpoint`).
fn idle_vacuum_step(conn: &Connection, checkpoint: bool) -> bool {
    match sql::without_waiting(conn, vacuum_step) {
        Ok((freed, left, _)) if freed > 0 && left > 0 => true,
        Ok(_) => {
            if checkpoint {
                let _ = sql::checkpoint(conn);
            }
            false
        }
        Err(_) => false,
    }
}

fn writer_thread(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Command>,
    discards: std::sync::Arc<Mutex<Vec<i64>>>,
    reclaim: std::sync::Arc<AtomicBool>,
    staging_retry: Duration,
    store_checkpoints: bool,
    mut log: Option<LogCounter>,
) {
    use mpsc::error::TryRecvError;
    // A clock for waiting on the queue with a timeout; without one (it
    // could not start) the log is only truncated by SQLite's own limit.
    let clock = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .ok();
    let mut wal_written = false;
    let mut next: Option<Command> = None;
    loop {
        let cmd = match next.take() {
            Some(c) => c,
            None => match rx.try_recv() {
                Ok(c) => c,
                Err(TryRecvError::Empty) if reclaim.load(Ordering::SeqCst) => {
                    if !idle_vacuum_step(&conn, store_checkpoints) {
                        reclaim.store(false, Ordering::SeqCst);
                    }
                    wal_written = true;
                    continue;
                }
                Err(TryRecvError::Empty) => {
                    // Another program checkpoints: the log is not the
                    // writer's to truncate, so it just waits for work.
                    let received = match &clock {
                        Some(clock) if wal_written && store_checkpoints => clock.block_on(async {
                            tokio::time::timeout(IDLE_TRUNCATE_AFTER, rx.recv()).await
                        }),
                        _ => Ok(rx.blocking_recv()),
                    };
                    match received {
                        Ok(Some(c)) => c,
                        Ok(None) => break,
                        Err(_idle) => {
                            // Readers still on an old snapshot keep the log;
                            // the next idle spell tries again.
                            wal_written = !sql::truncate_wal_now(&conn);
                            if !wal_written {
                                if let Some(log) = log.as_mut() {
                                    log.emptied();
                                }
                            }
                            continue;
                        }
                    }
                }
                Err(TryRecvError::Disconnected) => break,
            },
        };
        wal_written = true;
        discard_dropped(&conn, &discards);
        match cmd {
            Command::Call(f) => {
                // A panicking call drops its ack, which its caller reports;
                // the thread goes on serving everyone else.
                let _ = std::panic::catch_unwind(AssertUnwindSafe(|| f(&mut conn)));
                count_commit(&conn, &mut log, 0);
            }
            Command::Durable(first) => {
                let mut group = vec![first];
                while group.len() < GROUP_CALLS {
                    match rx.try_recv() {
                        Ok(Command::Durable(c)) => group.push(c),
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let frames = group.iter().map(|c| c.frame_bytes).sum::<u64>();
                commit_durable(&mut conn, group);
                count_commit(&conn, &mut log, frames);
            }
            Command::Chunk(first) => {
                let mut bytes = first.frame.len();
                let mut batch = vec![first];
                while batch.len() < BATCH_CHUNKS && bytes < BATCH_BYTES {
                    match rx.try_recv() {
                        Ok(Command::Chunk(c)) => {
                            bytes += c.frame.len();
                            batch.push(c);
                        }
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                insert_batch(&mut conn, batch, staging_retry);
                count_commit(&conn, &mut log, bytes as u64);
            }
        }
    }
    discard_dropped(&conn, &discards);
}

/// Counts a commit of `frame_bytes` of chunk frames towards the
/// checkpointer's next checkpoint; checkpoints here, between two commits,
/// if the checkpointer has fallen too far behind a writer that never
/// pauses ([`super::checkpointer`]).
fn count_commit(conn: &Connection, log: &mut Option<LogCounter>, frame_bytes: u64) {
    if let Some(log) = log.as_mut() {
        if log.committed(frame_bytes) && sql::checkpoint_caught_up(conn).unwrap_or(false) {
            log.emptied();
        }
    }
}

/// Runs a group of durable calls in one transaction committed with
/// `synchronous = FULL`, each in its own savepoint, then tells each call the
/// commit's outcome.
fn commit_durable(conn: &mut Connection, group: Vec<DurableCall>) {
    let op = "commit";
    let (runs, finishes): (Vec<_>, Vec<_>) = group.into_iter().map(|c| (c.run, c.finish)).unzip();
    let mut started = None;
    let outcome = (|| -> Result<(), StorageError> {
        let sql = |e| from_sqlite(op, e);
        conn.pragma_update(None, "synchronous", failpoint::finalize_sync())
            .map_err(sql)?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        for run in runs {
            tx.execute_batch("SAVEPOINT durable_call").map_err(sql)?;
            // A panicking call keeps nothing; its finish reports it.
            let keep = std::panic::catch_unwind(AssertUnwindSafe(|| run(&tx))).unwrap_or(false);
            let end = if keep {
                "RELEASE durable_call"
            } else {
                "ROLLBACK TO durable_call; RELEASE durable_call"
            };
            tx.execute_batch(end).map_err(sql)?;
        }
        failpoint::hit("finalize.before_commit");
        started = Some(Instant::now());
        tx.commit().map_err(sql)?;
        failpoint::hit("finalize.after_commit");
        Ok(())
    })();
    // Back to cheap commits for chunks; a failure here only costs speed.
    let done = Instant::now();
    let times = CommitTimes {
        started: started.unwrap_or(done),
        done,
    };
    let _ = conn.pragma_update(None, "synchronous", "NORMAL");
    for finish in finishes {
        let e = outcome
            .as_ref()
            .err()
            .map(|e| StorageError::new(e.kind(), e.operation(), e.message().to_string()));
        finish(e, times);
    }
}

fn discard_dropped(conn: &Connection, discards: &Mutex<Vec<i64>>) {
    let ids = match discards.lock() {
        Ok(mut d) if !d.is_empty() => std::mem::take(&mut *d),
        _ => return,
    };
    for id in ids {
        // Best effort: a discard that fails leaves staging for reclaim.
        let _ = sql::discard_staged_by_id(conn, id);
    }
}

/// Commits a batch of chunks in one transaction, retrying while the
/// database is busy (another process holds the lock) until `retry_for` has
/// passed. Chunks of parts that were discarded or finished meanwhile are
/// answered "not found" without failing the rest.
fn insert_batch(conn: &mut Connection, batch: Vec<ChunkInsert>, retry_for: Duration) {
    let op = "write_chunk";
    let deadline = Instant::now() + retry_for;
    let mut pause = Duration::from_millis(5);
    loop {
        match try_insert_batch(conn, &batch) {
            Ok(outcomes) => {
                for (c, outcome) in batch.into_iter().zip(outcomes) {
                    let _ = c.ack.send(outcome);
                }
                return;
            }
            Err(e) if is_busy(&e) && Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(250));
            }
            Err(e) => {
                let busy = is_busy(&e);
                let shown = from_sqlite(op, e);
                for c in batch {
                    let err = if busy {
                        StorageError::unavailable(
                            op,
                            "the database stayed busy; the part cannot be finalized",
                        )
                    } else {
                        StorageError::new(shown.kind(), op, shown.message().to_string())
                    };
                    let _ = c.ack.send(Err(err));
                }
                return;
            }
        }
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

fn try_insert_batch(
    conn: &mut Connection,
    batch: &[ChunkInsert],
) -> rusqlite::Result<Vec<StorageResult<()>>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut states: HashMap<i64, Option<bool>> = HashMap::new();
    let mut outcomes = Vec::with_capacity(batch.len());
    for c in batch {
        let state = match states.get(&c.part_id) {
            Some(s) => *s,
            None => {
                let s = sql::part_state(&tx, c.part_id)?;
                states.insert(c.part_id, s);
                s
            }
        };
        outcomes.push(match state {
            Some(false) => {
                sql::insert_chunk(&tx, c.part_id, c.seq, c.raw_offset, c.raw_len, &c.frame)?;
                failpoint::hit("writer.chunk.inserted");
                Ok(())
            }
            Some(true) => Err(StorageError::invalid(
                "write_chunk",
                "the part was already finalized",
            )),
            None => Err(StorageError::not_found(
                "write_chunk",
                "the staged part was deleted or superseded while it was being written",
            )),
        });
    }
    // The staged parts that received chunks are active now: reclaiming
    // abandoned staging (possibly from another process) ages parts by this.
    let now = sql::now_ms();
    for (id, state) in &states {
        if *state == Some(false) {
            sql::touch_staged(&tx, *id, now)?;
        }
    }
    failpoint::hit("writer.batch.before_commit");
    tx.commit()?;
    failpoint::hit("writer.batch.after_commit");
    Ok(outcomes)
}
