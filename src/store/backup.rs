//! Online backup: a consistent copy of the store's file, taken while
//! writers keep writing, and published only once it is checked.
//!
//! How: SQLite's online backup API copies the database page by page from a
//! connection of the read pool into a temporary file beside the
//! destination, in steps of a few thousand pages with a short pause between
//! them. The source connection holds one read transaction across every
//! step, so the copy is the database exactly as it was when the backup
//! began, and a commit made meanwhile does not restart it (a backup whose
//! source changes between steps starts over: with HFS finalizing a part
//! every few milliseconds it would never end). The store's file is in WAL
//! mode, where a reader never blocks the writer: writers commit as usual
//! while the copy runs; only checkpoints cannot move past the backup's
//! snapshot, so the write-ahead log grows by what is written meanwhile and
//! shrinks back afterwards.
//!
//! Then, in the copy and before anyone can see it: staged parts (writers at
//! work when the backup began) are deleted and their pages given back; the
//! copy is opened as a store and verified like `export-store verify`
//! (every finished part read back and checked, `PRAGMA integrity_check`);
//! it is set back to a single file (rollback journal, no `-wal` beside it),
//! synced, renamed to the destination, and the folder is synced. A copy
//! that fails any step is removed; the destination is never half-written.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};

use super::maintenance::{VerifyProgress, VerifyReport};
use super::options::StoreOptions;
use super::{sql, SqliteOutputStore};
use crate::error::{from_sqlite, StorageError, StorageResult};

/// Pages a backup step copies by default: 4 MiB at the store's page size.
pub const DEFAULT_BACKUP_STEP_PAGES: u32 = 1024;

/// The default pause between two backup steps.
pub const DEFAULT_BACKUP_PAUSE: Duration = Duration::from_millis(5);

/// How long a step that finds the copy busy is retried, in total.
const BUSY_RETRY_FOR: Duration = Duration::from_secs(30);

/// How a backup runs (see [`SqliteOutputStore::backup_to`]).
///
/// Build it with [`BackupOptions::default`] and the `with_` methods.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackupOptions {
    /// Replace an existing destination file (default: refuse).
    pub overwrite: bool,
    /// Pages copied per step (default [`DEFAULT_BACKUP_STEP_PAGES`]).
    pub pages_per_step: u32,
    /// Pause between two steps (default [`DEFAULT_BACKUP_PAUSE`]): spares
    /// the disk for the store's writers on a busy machine.
    pub pause: Duration,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            overwrite: false,
            pages_per_step: DEFAULT_BACKUP_STEP_PAGES,
            pause: DEFAULT_BACKUP_PAUSE,
        }
    }
}

impl BackupOptions {
    /// Replace an existing destination file.
    pub fn with_overwrite(mut self, overwrite: bool) -> Self {
        self.overwrite = overwrite;
        self
    }

    /// Pages copied per step (at least 1).
    pub fn with_pages_per_step(mut self, pages: u32) -> Self {
        self.pages_per_step = pages;
        self
    }

    /// Pause between two steps.
    pub fn with_pause(mut self, pause: Duration) -> Self {
        self.pause = pause;
        self
    }
}

/// Where a backup is (see [`SqliteOutputStore::backup_with_progress`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackupProgress {
    /// Copying pages.
    Copying {
        /// Pages copied.
        pages_done: u64,
        /// Pages of the database when the backup began.
        pages_total: u64,
    },
    /// Verifying the copy (as [`SqliteOutputStore::verify`] reports it).
    Verifying(VerifyProgress),
}

/// What a backup did (see [`SqliteOutputStore::backup_to`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackupReport {
    /// Pages copied (the database's size when the backup began).
    pub pages: u64,
    /// Bytes per page.
    pub page_size: u64,
    /// Steps the copy took.
    pub steps: u64,
    /// The longest single step: the longest the copy held anything at once.
    pub longest_step: Duration,
    /// Time spent copying pages, pauses included.
    pub copy_time: Duration,
    /// Staged parts (writers at work when the backup began) deleted from
    /// the copy.
    pub staged_parts_dropped: u64,
    /// The copy's verification: finished parts, chunks and bytes checked
    /// (never with a problem: a copy with one is not published).
    pub verify: VerifyReport,
    /// Time spent verifying the copy.
    pub verify_time: Duration,
    /// The copy's size in bytes once published.
    pub file_bytes: u64,
    /// The whole backup, from start to the synced rename.
    pub total_time: Duration,
}

impl SqliteOutputStore {
    /// Copies the store into the file `dest`, online: writers of this
    /// store (and of other processes) keep writing while it runs.
    ///
    /// What a caller may rely on:
    ///
    /// - the copy holds the database as it was at one moment, when the
    ///   backup began: every part finished before this call, none of the
    ///   parts finished afterwards, and no staged part (writers at work then
    ///   are left out, as if they had not started);
    /// - writers are never made to wait: the copy reads one snapshot
    ///   through a read connection (see the module docs), in steps of
    ///   [`pages_per_step`](BackupOptions::pages_per_step) pages with a
    ///   pause between them, and never takes the write lock of the store's
    ///   file;
    /// - `dest` appears only once the copy is complete, verified (every
    ///   finished part read back and checked, `integrity_check`) and synced
    ///   to disk, by a rename in its folder; it is a single SQLite file
    ///   (no `-wal` beside it) that opens as a store. On any error nothing
    ///   is left at `dest` and the temporary copy is removed; the copy a
    ///   killed backup to `dest` left behind is removed by the next one
    ///   (a copy whose backup still runs is locked, and left alone);
    /// - an existing `dest` is a conflict unless
    ///   [`overwrite`](BackupOptions::overwrite) is set (checked again,
    ///   atomically, at the rename); `dest` naming the store's own file
    ///   (or its `-wal`, `-shm` or `-journal`) is invalid input; a copy
    ///   that fails verification is a corrupt error.
    ///
    /// The copy needs free space beside `dest` for the whole database; the
    /// write-ahead log of the store grows by what is written during the
    /// backup.
    pub async fn backup_to(
        &self,
        dest: impl AsRef<Path>,
        options: &BackupOptions,
    ) -> StorageResult<BackupReport> {
        self.backup_with_progress(dest, options, |_| {}).await
    }

    /// [`backup_to`](Self::backup_to), calling `progress` after every step
    /// and, while the copy is verified, after every chunk (on a blocking
    /// thread: keep it quick).
    pub async fn backup_with_progress<F>(
        &self,
        dest: impl AsRef<Path>,
        options: &BackupOptions,
        mut progress: F,
    ) -> StorageResult<BackupReport>
    where
        F: FnMut(&BackupProgress) + Send + 'static,
    {
        let op = "backup";
        let started = Instant::now();
        if options.pages_per_step == 0 {
            return Err(StorageError::invalid(
                op,
                "pages per step must be at least 1",
            ));
        }
        let dest = dest.as_ref().to_path_buf();
        check_destination(op, self.path(), &dest, options.overwrite)?;
        let temp = TempCopy::beside(op, &dest)?;

        let (pages, pause) = (options.pages_per_step, options.pause);
        let path = temp.path.clone();
        let (copied, mut progress) = self
            .db()
            .read(op, move |src| {
                let copied = copy_snapshot(op, src, &path, pages, pause, &mut progress)?;
                Ok((copied, progress))
            })
            .await?;

        let verify_started = Instant::now();
        let verify = verify_copy(self, op, &temp.path, move |p| {
            progress(&BackupProgress::Verifying(*p))
        })
        .await?;
        let verify_time = verify_started.elapsed();

        let overwrite = options.overwrite;
        // The copy gets the store file's permissions: a store readable by
        // its operator's group gives a backup the group can read too.
        let permissions = std::fs::metadata(self.path()).ok().map(|m| m.permissions());
        let file_bytes = self
            .db()
            .blocking(op, move || temp.publish(op, &dest, overwrite, permissions))
            .await?;
        Ok(BackupReport {
            pages: copied.pages,
            page_size: copied.page_size,
            steps: copied.steps,
            longest_step: copied.longest_step,
            copy_time: copied.time,
            staged_parts_dropped: copied.staged_dropped,
            verify,
            verify_time,
            file_bytes,
            total_time: started.elapsed(),
        })
    }
}

/// Refuses a destination that is the store's own file (or one of its
/// companions), a folder, a file in a folder that does not exist, or an
/// existing file without `overwrite`.
fn check_destination(
    op: &'static str,
    store: &Path,
    dest: &Path,
    overwrite: bool,
) -> StorageResult<()> {
    let Some(name) = dest.file_name() else {
        return Err(StorageError::invalid(
            op,
            "the destination must name a file",
        ));
    };
    let folder = folder_of(dest);
    let folder = folder.canonicalize().map_err(|e| {
        StorageError::invalid(
            op,
            format!("the destination's folder cannot be used ({})", e.kind()),
        )
        .with_source(e)
    })?;
    let resolved = folder.join(name);
    let own = store.canonicalize().unwrap_or_else(|_| store.to_path_buf());
    let companions = ["", "-wal", "-shm", "-journal"].map(|suffix| {
        let mut p = own.clone().into_os_string();
        p.push(suffix);
        PathBuf::from(p)
    });
    let same_file = match (file_id(&resolved), file_id(&own)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    };
    if same_file || companions.contains(&resolved) {
        return Err(StorageError::invalid(
            op,
            "the destination is the store's own database file",
        ));
    }
    match std::fs::symlink_metadata(&resolved) {
        Ok(m) if m.is_dir() => Err(StorageError::invalid(
            op,
            "the destination is a folder; name a file",
        )),
        Ok(_) if !overwrite => Err(StorageError::conflict(
            op,
            "the destination already exists (allow replacing it to overwrite)",
        )),
        _ => Ok(()),
    }
}

fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(unix)]
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_id(_path: &Path) -> Option<(u64, u64)> {
    None
}

/// The copy under a temporary name beside the destination; removed (with
/// any journal SQLite left beside it) unless published.
///
/// The backup holds an exclusive `flock` on the copy's file for as long as
/// it runs (SQLite's own locks are `fcntl` locks, which do not interact
/// with it), so that a later backup to the same destination can tell the
/// copy of a backup that was killed (no lock: the kernel dropped it with
/// the process) from one in progress (locked), and removes the former.
struct TempCopy {
    path: PathBuf,
    published: bool,
    /// The open file that holds the lock.
    _lock: File,
}

/// The suffix of a backup's temporary copy.
const PARTIAL_SUFFIX: &str = ".backup-partial";

/// Removes the temporary copies (and their journals) that killed backups
/// to `dest` left in its folder: those whose file no process holds
/// locked. Copies of backups still running are left alone. Returns how
/// many were removed; failures to remove one are not errors (the backup
/// does not need them gone).
fn remove_abandoned_copies(dest: &Path) -> usize {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let prefix = format!(".{name}.");
    let Ok(entries) = std::fs::read_dir(folder_of(dest)) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let file_name = file_name.to_string_lossy();
        if !file_name.starts_with(&prefix) || !file_name.ends_with(PARTIAL_SUFFIX) {
            continue;
        }
        let path = entry.path();
        let Ok(file) = File::options().read(true).write(true).open(&path) else {
            continue;
        };
        // Locked: a backup is writing it. Any other failure: leave it.
        if file.try_lock().is_err() {
            continue;
        }
        for suffix in ["-wal", "-shm", "-journal", ""] {
            let _ = std::fs::remove_file(sibling(&path, suffix));
        }
        removed += 1;
    }
    removed
}

impl TempCopy {
    fn beside(op: &'static str, dest: &Path) -> StorageResult<TempCopy> {
        remove_abandoned_copies(dest);
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let file = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(PARTIAL_SUFFIX)
            .tempfile_in(folder_of(dest))
            .map_err(|e| {
                io_error(
                    op,
                    "cannot create the temporary copy beside the destination",
                    e,
                )
            })?;
        // Locked before anything is written, so that no other backup takes
        // the copy for an abandoned one.
        file.as_file()
            .try_lock()
            .map_err(|e| io_error(op, "cannot lock the temporary copy", e.into()))?;
        // SQLite opens the file by name; the handle kept here holds the lock.
        let (lock, path) = file.into_parts();
        let path = path
            .keep()
            .map_err(|e| io_error(op, "cannot keep the temporary copy", e.error))?;
        Ok(TempCopy {
            path,
            published: false,
            _lock: lock,
        })
    }

    /// Sets the verified copy back to a single file (rollback journal, no
    /// `-wal` beside it), syncs it, renames it to `dest` (refusing an
    /// existing `dest` unless `overwrite`, atomically) and syncs the
    /// folder. The copy first gets `permissions` (the store file's), if
    /// known. Returns the copy's size. Blocking.
    fn publish(
        mut self,
        op: &'static str,
        dest: &Path,
        overwrite: bool,
        permissions: Option<std::fs::Permissions>,
    ) -> StorageResult<u64> {
        let fail = |e| from_sqlite(op, e);
        let c = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(fail)?;
        // The store that verified the copy may still be closing its last
        // pooled connection on the pool's own thread for a moment, and
        // leaving WAL mode needs the file to itself: retried until then.
        let deadline = Instant::now() + BUSY_RETRY_FOR;
        let mode = loop {
            match sql::set_journal_mode(&c, "DELETE") {
                Ok(mode) if mode.eq_ignore_ascii_case("delete") || Instant::now() >= deadline => {
                    break mode
                }
                Err(e) if !is_busy(&e) || Instant::now() >= deadline => return Err(fail(e)),
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        c.close().map_err(|(_, e)| fail(e))?;
        if !mode.eq_ignore_ascii_case("delete") || sibling(&self.path, "-wal").exists() {
            return Err(StorageError::internal(
                op,
                format!("the copy cannot be made a single file (it stays in {mode} journal mode)"),
            ));
        }
        let file = File::open(&self.path)
            .map_err(|e| io_error(op, "cannot reopen the copy to sync it", e))?;
        if let Some(p) = permissions {
            file.set_permissions(p)
                .map_err(|e| io_error(op, "cannot give the copy the store's permissions", e))?;
        }
        file.sync_all()
            .map_err(|e| io_error(op, "cannot sync the copy to disk", e))?;
        let bytes = file
            .metadata()
            .map_err(|e| io_error(op, "cannot read the copy's size", e))?
            .len();
        drop(file);
        let path = tempfile::TempPath::try_from_path(&self.path)
            .map_err(|e| io_error(op, "cannot name the copy for its rename", e))?;
        let renamed = if overwrite {
            path.persist(dest)
        } else {
            path.persist_noclobber(dest)
        };
        if let Err(e) = renamed {
            // The copy keeps its temporary name; dropping `self` removes it.
            let _ = e.path.keep();
            return Err(match e.error.kind() {
                std::io::ErrorKind::AlreadyExists => StorageError::conflict(
                    op,
                    "the destination appeared while the backup ran; the copy was not published",
                ),
                _ => io_error(op, "cannot rename the copy to the destination", e.error),
            });
        }
        self.published = true;
        #[cfg(unix)]
        File::open(folder_of(dest))
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error(op, "cannot sync the destination's folder", e))?;
        Ok(bytes)
    }
}

impl Drop for TempCopy {
    fn drop(&mut self) {
        if self.published {
            return;
        }
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let _ = std::fs::remove_file(sibling(&self.path, suffix));
        }
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

fn io_error(op: &'static str, what: &str, e: std::io::Error) -> StorageError {
    StorageError::internal(op, format!("{what} ({})", e.kind())).with_source(e)
}

/// What the copy step did.
struct Copied {
    pages: u64,
    page_size: u64,
    steps: u64,
    longest_step: Duration,
    time: Duration,
    staged_dropped: u64,
}

/// Copies `src`'s database, as of one snapshot, into the empty file at
/// `path` in steps of `pages`, then deletes the copy's staged parts, gives
/// their pages back and closes it as a single file.
fn copy_snapshot(
    op: &'static str,
    src: &Connection,
    path: &Path,
    pages: u32,
    pause: Duration,
    progress: &mut dyn FnMut(&BackupProgress),
) -> StorageResult<Copied> {
    let fail = |e| from_sqlite(op, e);
    let started = Instant::now();
    let mut dst = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(fail)?;
    let snapshot = Snapshot::begin(src).map_err(fail)?;
    let (mut steps, mut longest) = (0_u64, Duration::ZERO);
    let mut busy_since: Option<Instant> = None;
    let per_step = i32::try_from(pages).unwrap_or(i32::MAX);
    {
        let backup = Backup::new(snapshot.conn, &mut dst).map_err(fail)?;
        loop {
            let step_started = Instant::now();
            let outcome = backup.step(per_step).map_err(fail)?;
            longest = longest.max(step_started.elapsed());
            let p = backup.progress();
            let total = p.pagecount.max(0) as u64;
            progress(&BackupProgress::Copying {
                pages_done: total.saturating_sub(p.remaining.max(0) as u64),
                pages_total: total,
            });
            match outcome {
                StepResult::Done => {
                    steps += 1;
                    break;
                }
                StepResult::More => {
                    steps += 1;
                    busy_since = None;
                    std::thread::sleep(pause);
                }
                _ => {
                    let since = *busy_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > BUSY_RETRY_FOR {
                        return Err(StorageError::unavailable(
                            op,
                            "the copy stayed locked; no backup was made",
                        ));
                    }
                    std::thread::sleep(pause.max(Duration::from_millis(10)));
                }
            }
        }
    }
    snapshot.end().map_err(fail)?;
    let time = started.elapsed();

    // The copy carries the source's WAL flag; it is cleaned as one file.
    let mode = sql::set_journal_mode(&dst, "DELETE").map_err(fail)?;
    if !mode.eq_ignore_ascii_case("delete") {
        return Err(StorageError::internal(
            op,
            format!("the copy stayed in {mode} journal mode"),
        ));
    }
    dst.pragma_update(None, "foreign_keys", true)
        .map_err(fail)?;
    let tx = dst.transaction().map_err(fail)?;
    let staged_dropped = sql::delete_all_staged(&tx).map_err(fail)? as u64;
    tx.commit().map_err(fail)?;
    while sql::incremental_vacuum(&dst, u32::MAX).map_err(fail)? > 0 {}
    let (page_size, page_count, _) = sql::pages(&dst).map_err(fail)?;
    dst.close().map_err(|(_, e)| fail(e))?;
    Ok(Copied {
        pages: page_count.max(1),
        page_size,
        steps,
        longest_step: longest,
        time,
        staged_dropped,
    })
}

/// A read transaction held across every step of a backup, so that the copy
/// is one snapshot; ended (rolled back) when dropped, so that a pooled
/// connection goes back to the pool without it.
struct Snapshot<'c> {
    conn: &'c Connection,
    open: bool,
}

impl<'c> Snapshot<'c> {
    fn begin(conn: &'c Connection) -> rusqlite::Result<Snapshot<'c>> {
        sql::begin_snapshot(conn)?;
        Ok(Snapshot { conn, open: true })
    }

    fn end(mut self) -> rusqlite::Result<()> {
        self.open = false;
        sql::end_snapshot(self.conn)
    }
}

impl Drop for Snapshot<'_> {
    fn drop(&mut self) {
        if self.open {
            let _ = sql::end_snapshot(self.conn);
        }
    }
}

/// Opens the copy at `path` as a store, verifies it and closes it. A
/// problem found is a corrupt error; a staged part left is internal.
async fn verify_copy<F>(
    store: &SqliteOutputStore,
    op: &'static str,
    path: &Path,
    progress: F,
) -> StorageResult<VerifyReport>
where
    F: FnMut(&VerifyProgress) + Send + 'static,
{
    let (path, base) = (path.to_path_buf(), store.base_url().to_string());
    let copy = store
        .db()
        .blocking(op, move || {
            SqliteOutputStore::open_with(&path, &base, StoreOptions::default().with_pool_size(2))
                .map_err(|e| e.in_op(op))
        })
        .await?;
    let report = copy
        .verify_with_progress(progress)
        .await
        .map_err(|e| e.in_op(op))?;
    store
        .db()
        .blocking(op, move || {
            drop(copy);
            Ok(())
        })
        .await?;
    if let Some(first) = report.problems.first() {
        return Err(StorageError::corrupt(
            op,
            format!(
                "the copy failed verification ({} problem{}; the first: {first}); it was not \
                 published",
                report.problems.len(),
                if report.problems.len() == 1 { "" } else { "s" }
            ),
        ));
    }
    if report.staged_parts > 0 {
        return Err(StorageError::internal(
            op,
            "the copy still holds staged parts; it was not published",
        ));
    }
    Ok(report)
}
