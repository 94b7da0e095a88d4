//! `StoreOptions::with_checkpoints`: with the store's own checkpoints an
//! idle store truncates its `-wal` to nothing; with
//! `Checkpoints::External` it leaves every frame of the log where it is
//! (neither SQLite's automatic checkpoint nor the idle truncation starts the
//! log over), for a replicator such as Litestream to read and checkpoint.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sqlite_export_store::{
    Checkpoints, ExportJobId, ExportOutputStore, ExportPartKey, SqliteOutputStore, StoreOptions,
};
use tokio::io::AsyncWriteExt;

/// Bytes zstd cannot shrink, so that each part adds about this much log.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        // Printable, so every line stays NDJSON-shaped text.
        out.extend(s.to_le_bytes().iter().map(|b| b'A' + b % 26));
        if out.len() % 800 < 8 {
            out.push(b'\n');
        }
    }
    out.push(b'\n');
    out
}

async fn put(store: &SqliteOutputStore, index: u32, bytes: &[u8]) {
    let key = ExportPartKey::output("acme", ExportJobId::from("job"), "Binary", index, 1);
    let mut w = store.open_writer(&key).await.unwrap();
    w.writer.write_all(bytes).await.unwrap();
    w.byte_count = bytes.len() as u64;
    w.line_count = bytes.iter().filter(|&&b| b == b'\n').count() as u64;
    store.finalize_part(&key, w).await.unwrap();
}

fn wal_len(db: &Path) -> u64 {
    let wal = PathBuf::from(format!("{}-wal", db.display()));
    std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_truncates_its_idle_log() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store.db");
    let store =
        SqliteOutputStore::open_with(&db, "http://hfs.test", StoreOptions::default()).unwrap();
    assert_eq!(store.options().checkpoints(), Checkpoints::Store);
    put(&store, 0, &noise(1, 2 << 20)).await;
    assert!(
        wal_len(&db) > 0,
        "a finalized part leaves frames in the log"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while wal_len(&db) > 0 {
        assert!(
            Instant::now() < deadline,
            "the idle store kept {} bytes of log",
            wal_len(&db)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_checkpoints_leave_the_log_alone() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store.db");
    let options = StoreOptions::default().with_checkpoints(Checkpoints::External);
    let store = SqliteOutputStore::open_with(&db, "http://hfs.test", options).unwrap();
    // Four parts of 3 MiB (about 7 MiB of frames after compression): past
    // SQLite's automatic checkpoint (1,000 pages, 4 MiB) and past
    // journal_size_limit (4 MiB), with idle spells longer than the store's
    // idle truncation (1 s) between them. Nothing here can be awaited: the
    // test shows that something does not happen.
    let mut before = 0;
    for i in 0..4 {
        put(&store, i, &noise(i as u64 + 7, 3 << 20)).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let wal = wal_len(&db);
        assert!(
            wal > before,
            "after part {i}: {wal} bytes of log, {before} before it: the store checkpointed"
        );
        before = wal;
    }
    assert!(
        before > 5 << 20,
        "{before} bytes of log: the store checkpointed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_never_pauses_keeps_a_bounded_log() {
    // The store's checkpoints run beside the writer (no commit waits for
    // one); a writer that never pauses must still see the log start over.
    // Twelve parts of 3 MiB back to back, no idle spell: about 20 MiB of
    // frames. Without any checkpoint the log would hold all of them.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store.db");
    let store =
        SqliteOutputStore::open_with(&db, "http://hfs.test", StoreOptions::default()).unwrap();
    let mut largest = 0;
    for i in 0..12 {
        put(&store, i, &noise(i as u64 + 31, 3 << 20)).await;
        largest = largest.max(wal_len(&db));
    }
    let stored = std::fs::metadata(&db).unwrap().len();
    assert!(
        stored > 12 << 20,
        "{stored} bytes in the database file: the frames were checkpointed into it"
    );
    assert!(
        largest < 12 << 20,
        "the log reached {largest} bytes while the parts were written"
    );
}
