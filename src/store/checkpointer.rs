//! The checkpointer: a thread with a connection of its own that copies the
//! write-ahead log into the database file once the writer thread has
//! logged enough, so that no commit waits for a checkpoint.
//!
//! SQLite's automatic checkpoint runs inside the commit that takes the log
//! past 1,000 pages, on the connection that commits: with the store's one
//! writer thread, every fortieth or so HFS-sized finalize waited for a
//! whole checkpoint (the log's pages copied into the database and the file
//! synced) before it could return: 4–5 ms instead of 0.3 ms, measured
//! (`export-store bench --groups small`). A passive checkpoint from another
//! connection runs beside the writer instead: SQLite lets one connection
//! append to the log while another copies its older frames into the
//! database, and the next commit after a checkpoint that caught up starts
//! the log over (and `journal_size_limit` shrinks it), as before.
//!
//! The writer thread does not know how many pages a commit logged
//! (SQLite tells only through `sqlite3_wal_hook`, which is not reachable
//! without unsafe code), so it counts the bytes it committed: each chunk's
//! frame, the frames a durable call said it would store, and a few pages
//! per commit. Past [`CHECKPOINT_AFTER_BYTES`] not yet copied it asks the
//! checkpointer after every commit, which never waits for a lock: a
//! checkpoint that finds the log in use (a reader on an old snapshot,
//! another process checkpointing) copies what it can and the next request
//! tries again.
//!
//! The log starts over only after a checkpoint that copied all of it; a
//! writer that never pauses could keep a checkpoint beside it from ever
//! catching up, and the log would grow without end. So once
//! [`CATCH_UP_AFTER_BYTES`] were logged since the checkpointer last caught
//! up, the writer thread checkpoints itself between two commits, as
//! SQLite's automatic checkpoint would have (a bulk load pays that wait
//! once per 16 MiB of log; an HFS export, which pauses between parts,
//! never does).
//!
//! Only a store that does its own checkpoints has one
//! ([`Checkpoints::Store`](super::options::Checkpoints::Store)); a store
//! whose log another program checkpoints (a replicator) never checkpoints.
//! If the checkpointer's connection cannot be opened, the writer
//! connection keeps SQLite's automatic checkpoint.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::{schema, sql};

/// Bytes committed to the log after which the writer thread asks for a
/// checkpoint: SQLite's own threshold for its automatic checkpoint (1,000
/// pages of 4 KiB).
pub(crate) const CHECKPOINT_AFTER_BYTES: u64 = 4 << 20;

/// Log bytes since the checkpointer last copied the whole log after which
/// the writer thread checkpoints on its own.
pub(crate) const CATCH_UP_AFTER_BYTES: u64 = 4 * CHECKPOINT_AFTER_BYTES;

/// Log bytes a commit is counted for beyond the frames it stores: its
/// pages of B-tree and part rows, and the commit frame.
pub(crate) const COMMIT_OVERHEAD_BYTES: u64 = 16 << 10;

#[derive(Default)]
struct State {
    due: bool,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    /// Set by the checkpointer when a checkpoint copied the whole log.
    caught_up: AtomicBool,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The checkpointer thread of one store, stopped when dropped.
pub(crate) struct Checkpointer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// What the writer thread holds: counts what it logs and asks for a
/// checkpoint past the threshold.
pub(crate) struct LogCounter {
    shared: Arc<Shared>,
    /// Logged since the log was last copied whole.
    behind: u64,
    /// The `-wal` file, and the size it is cut back to when the log starts
    /// over (`journal_size_limit`).
    wal: PathBuf,
    wal_limit: u64,
}

impl Checkpointer {
    /// Starts the checkpointer of the database at `path` (which exists: the
    /// writer connection made it), with a connection that never creates
    /// the file. `None` if that connection or the thread cannot be had;
    /// the caller then leaves checkpoints to SQLite.
    pub fn start(
        path: &Path,
        busy_timeout: Duration,
        wal_limit: u64,
    ) -> Option<(Checkpointer, LogCounter)> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        let conn = Connection::open_with_flags(path, flags).ok()?;
        schema::configure(&conn, busy_timeout).ok()?;
        let shared = Arc::new(Shared::default());
        let theirs = shared.clone();
        let thread = std::thread::Builder::new()
            .name("export-store-checkpoint".into())
            .spawn(move || run(conn, &theirs))
            .ok()?;
        let counter = LogCounter {
            shared: shared.clone(),
            behind: 0,
            wal: PathBuf::from(format!("{}-wal", path.display())),
            wal_limit,
        };
        Some((
            Checkpointer {
                shared,
                thread: Some(thread),
            },
            counter,
        ))
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.shared.state().stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl LogCounter {
    /// Counts one commit that stored `frame_bytes` of chunk frames; after
    /// every commit that leaves [`CHECKPOINT_AFTER_BYTES`] or more of the
    /// log not yet copied, or the `-wal` file past the size the log is cut
    /// back to when it starts over (as SQLite's automatic checkpoint does
    /// after every commit that leaves the log past its threshold), asks
    /// for a checkpoint: requests made while one runs are one more run after
    /// it, so a checkpoint that a reader held back is tried again at the
    /// next commit. Returns `true` when the checkpointer has fallen
    /// [`CATCH_UP_AFTER_BYTES`] behind: the caller (the writer thread)
    /// then checkpoints itself, and says so with [`Self::emptied`].
    #[must_use]
    pub fn committed(&mut self, frame_bytes: u64) -> bool {
        if self.shared.caught_up.swap(false, Ordering::AcqRel) {
            self.behind = 0;
        }
        self.behind += frame_bytes + COMMIT_OVERHEAD_BYTES;
        // A log that did not start over after a checkpoint caught up (the
        // next commit began before it ended) grows past the size it is cut
        // back to: checkpoint again until it does.
        let grown = || std::fs::metadata(&self.wal).is_ok_and(|m| m.len() > self.wal_limit);
        if self.behind >= CHECKPOINT_AFTER_BYTES || grown() {
            self.shared.state().due = true;
            self.shared.wake.notify_one();
        }
        self.behind >= CATCH_UP_AFTER_BYTES
    }

    /// The writer thread copied the whole log itself (a checkpoint that
    /// caught up, or the idle truncation).
    pub fn emptied(&mut self) {
        self.behind = 0;
    }
}

fn run(conn: Connection, shared: &Shared) {
    loop {
        {
            let mut st = shared.state();
            while !st.due && !st.stop {
                st = shared.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.stop {
                return;
            }
            st.due = false;
        }
        // Passive: never waits for a reader or a writer; what it could not
        // copy stays in the log for the next one.
        if sql::checkpoint_caught_up(&conn).unwrap_or(false) {
            shared.caught_up.store(true, Ordering::Release);
        }
    }
}
