//! Faults a deployment meets: a full disk, a database held busy by another
//! process, damaged data, and files that are read-only, gone, too new or not
//! a database. Each test breaks things for real (SQLite's page cap, a second
//! connection holding the write lock, bytes flipped in the file, file
//! permissions) and checks what a caller sees: a clear error of the right
//! category, nothing partial ever readable, and a store that works again.

mod faultkit;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use faultkit::{content, key, lines, noisy_lines, read_part, tenant, write_part};
use sqlite_export_store::{
    ExportJobId, ExportOutputStore, ExportPartKey, SqliteOutputStore, StorageError, StoreOptions,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BASE: &str = "http://hfs.test";

// ------------------------------------------------------------- disk full

async fn write_lines(
    store: &SqliteOutputStore,
    key: &ExportPartKey,
    lines: &[String],
) -> Result<(), StorageError> {
    let mut w = store.open_writer(key).await?;
    for l in lines {
        w.write_line(l)
            .await
            .map_err(|e| StorageError::from_io("write_line", e))?;
    }
    store.finalize_part(key, w).await.map(|_| ())
}

fn joined(lines: &[String]) -> Vec<u8> {
    lines
        .iter()
        .flat_map(|l| [l.as_bytes(), b"\n"].concat())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_database_fails_clearly_publishes_nothing_and_recovers_once_space_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("full.db");
    let store = SqliteOutputStore::open_with(
        &db,
        BASE,
        StoreOptions::default()
            .with_chunk_size(16 << 10)
            .with_max_database_size(Some(2 << 20)),
    )
    .unwrap();
    let kept_key = key("acme", "kept", "Binary", 0, 1);
    let kept = noisy_lines(1000, 20, 2000);
    write_lines(&store, &kept_key, &kept).await.unwrap();
    // Fill the 2 MiB cap with parts of 0.5 MiB until one does not fit.
    let mut stored = Vec::new();
    let mut failure = None;
    for i in 0..12u32 {
        let k = key("acme", "filler", "Binary", i, 1);
        let ls = noisy_lines(i as u64 + 1, 250, 2000);
        match write_lines(&store, &k, &ls).await {
            Ok(()) => stored.push((k, joined(&ls))),
            Err(e) => {
                failure = Some((k, e));
                break;
            }
        }
    }
    let (failed_key, e) = failure.expect("the 2 MiB cap was never reached");
    assert!(stored.len() >= 2, "only {} parts fit", stored.len());
    assert!(e.is_internal(), "{e}");
    assert!(e.to_string().contains("full"), "the message says why: {e}");
    println!("disk full after {} parts of 0.5 MiB: {e}", stored.len());
    // Nothing of the failed part is visible; what was finalized is intact.
    let gone = read_part(&store, &failed_key).await.unwrap_err();
    assert!(gone.is_not_found(), "{gone}");
    for (k, want) in &stored {
        assert!(&read_part(&store, k).await.unwrap() == want);
    }
    // While full, the same part fails again, clearly, instead of hanging.
    let again = write_lines(&store, &failed_key, &noisy_lines(99, 250, 2000))
        .await
        .unwrap_err();
    assert!(
        again.is_internal() && again.to_string().contains("full"),
        "{again}"
    );

    // Deleting a job frees space; the same store, not reopened, works again.
    store
        .delete_job_outputs(&tenant("acme"), &ExportJobId::from("filler"))
        .await
        .unwrap();
    assert!(read_part(&store, &stored[0].0)
        .await
        .unwrap_err()
        .is_not_found());
    // The deleted job is fenced at the token it had: the next claim (a
    // higher token) writes it again.
    let retry = ExportPartKey {
        fencing_token: failed_key.fencing_token + 1,
        ..failed_key.clone()
    };
    let ls = noisy_lines(99, 250, 2000);
    write_lines(&store, &retry, &ls).await.unwrap();
    assert!(read_part(&store, &retry).await.unwrap() == joined(&ls));
    assert!(read_part(&store, &kept_key).await.unwrap() == joined(&kept));
    let report = store.verify().await.unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.staged_parts, 0, "failed staging was discarded");
    drop(store);
    assert_eq!(faultkit::integrity_check(&db), "ok");
}

// ------------------------------------------------------------------ busy

/// Holds SQLite's write lock from a connection of its own for `hold`;
/// returns once the lock is held.
fn hold_write_lock(db: &Path, hold: Duration) -> std::thread::JoinHandle<()> {
    let (tx, rx) = mpsc::channel();
    let db = db.to_path_buf();
    let t = std::thread::spawn(move || {
        let c = rusqlite::Connection::open(db).unwrap();
        c.execute_batch("BEGIN IMMEDIATE").unwrap();
        tx.send(()).unwrap();
        std::thread::sleep(hold);
        c.execute_batch("COMMIT").unwrap();
    });
    rx.recv().unwrap();
    t
}

fn busy_store(db: &Path, staging_retry: Duration) -> SqliteOutputStore {
    SqliteOutputStore::open_with(
        db,
        BASE,
        StoreOptions::default()
            .with_chunk_size(1024)
            .with_busy_timeout(Duration::from_millis(50))
            .with_staging_retry(staging_retry),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_rides_out_a_lock_held_by_another_process() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("busy.db");
    let store = busy_store(&db, Duration::from_secs(10));
    let k = key("acme", "busy", "Encounter", 0, 1);
    let mut w = store.open_writer(&k).await.unwrap();
    let started = Instant::now();
    let holder = hold_write_lock(&db, Duration::from_millis(600));
    for l in lines(&k) {
        // Every write succeeds: the lock (12x the busy timeout) is retried.
        w.write_line(&l).await.unwrap();
    }
    let f = store.finalize_part(&k, w).await.unwrap();
    holder.join().unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(550),
        "the writes did wait for the lock ({:?})",
        started.elapsed()
    );
    assert_eq!(f.size_bytes, content(&k).len() as u64);
    assert!(read_part(&store, &k).await.unwrap() == content(&k));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_held_up_by_a_lock_does_not_hold_up_another_store() {
    // Compression workers are shared by every store of the process. One
    // store whose file another process keeps locked stops taking chunks;
    // its writers' chunks must wait without holding the workers.
    let dir = tempfile::tempdir().unwrap();
    let locked_db = dir.path().join("locked.db");
    let free_db = dir.path().join("free.db");
    let locked = busy_store(&locked_db, Duration::from_secs(20));
    let free = busy_store(&free_db, Duration::from_secs(20));
    // Enough writers that their chunks overflow the locked store's queue,
    // opened before the lock is taken.
    let mut writers = Vec::new();
    for i in 0..8 {
        let k = key("acme", "stuck", "Encounter", i, 1);
        writers.push((locked.open_writer(&k).await.unwrap(), k));
    }
    let hold = Duration::from_millis(2500);
    let holder = hold_write_lock(&locked_db, hold);
    let started = Instant::now();
    let mut stuck = Vec::new();
    for (mut w, k) in writers {
        let s = locked.clone();
        stuck.push(tokio::spawn(async move {
            for _ in 0..3 {
                for l in lines(&k) {
                    w.write_line(&l).await.unwrap();
                }
            }
            s.finalize_part(&k, w).await.unwrap();
            k
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let k = key("acme", "free", "Encounter", 0, 1);
    write_part(&free, &k).await.unwrap();
    let free_done = started.elapsed();
    assert!(
        free_done < hold - Duration::from_millis(500),
        "the free store finished at {free_done:?}, with the other store's lock held for {hold:?}"
    );
    assert!(read_part(&free, &k).await.unwrap() == content(&k));
    for t in stuck {
        let k = t.await.unwrap();
        let want = content(&k).repeat(3);
        assert!(read_part(&locked, &k).await.unwrap() == want);
    }
    holder.join().unwrap();
    assert!(started.elapsed() >= hold - Duration::from_millis(100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_held_past_every_retry_fails_finalize_as_unavailable_and_a_retry_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("busy.db");
    let store = busy_store(&db, Duration::from_millis(300));
    let k = key("acme", "busy", "Encounter", 0, 1);
    let mut w = store.open_writer(&k).await.unwrap();
    let holder = hold_write_lock(&db, Duration::from_millis(1500));
    for l in lines(&k) {
        // HFS fails the job at once on a write error: none may surface here.
        w.write_line(&l).await.unwrap();
    }
    let e = store.finalize_part(&k, w).await.unwrap_err();
    assert!(e.is_unavailable(), "{e}");
    assert!(e.to_string().contains("busy"), "{e}");
    assert!(read_part(&store, &k).await.unwrap_err().is_not_found());
    holder.join().unwrap();
    // HFS retries the whole part (the job) and it goes through.
    write_part(&store, &k).await.unwrap();
    assert!(read_part(&store, &k).await.unwrap() == content(&k));
    assert_eq!(
        faultkit::census(&db).staged_parts,
        0,
        "the failed staging was discarded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_held_during_the_finalize_commit_is_unavailable_and_publishes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("busy.db");
    let store = busy_store(&db, Duration::from_millis(300));
    let k = key("acme", "busy", "Encounter", 1, 1);
    let mut w = store.open_writer(&k).await.unwrap();
    for l in lines(&k) {
        w.write_line(&l).await.unwrap();
    }
    // Store every chunk first, so that only the publishing transaction meets
    // the lock (finalize_part shuts the writer down itself otherwise).
    w.writer.shutdown().await.unwrap();
    let holder = hold_write_lock(&db, Duration::from_millis(800));
    let started = Instant::now();
    let e = store.finalize_part(&k, w).await.unwrap_err();
    assert!(e.is_unavailable(), "{e}");
    assert!(
        started.elapsed() < Duration::from_millis(750),
        "it gave up after the busy timeout"
    );
    assert!(read_part(&store, &k).await.unwrap_err().is_not_found());
    holder.join().unwrap();
    write_part(&store, &k).await.unwrap();
    assert!(read_part(&store, &k).await.unwrap() == content(&k));
}

// ------------------------------------------------------------ corruption

/// Runs `damage` on a raw connection to the store's file, with the
/// immutability triggers lifted for the length of the call (damage is
/// what they exist to prevent; bit rot and hostile edits ignore them).
fn tamper(db: &Path, damage: &str) {
    faultkit::with_triggers_lifted(db, |c| c.execute_batch(damage).unwrap());
}

fn part_id(db: &Path, k: &ExportPartKey) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row(
        "SELECT id FROM parts WHERE job_id = ?1 AND part_index = ?2 AND finalized = 1",
        rusqlite::params![k.job_id.as_str(), k.part_index],
        |r| r.get(0),
    )
    .unwrap()
}

/// Flips one byte in the middle of chunk `seq`'s frame, in the file itself
/// (in every copy of it there: b-tree page splits leave stale copies behind).
fn flip_byte_in_file(db: &Path, id: i64, seq: i64) {
    let c = rusqlite::Connection::open(db).unwrap();
    // Everything into the main file first: a connection of the dropped store
    // may still be closing, so closing is not relied on to checkpoint.
    let busy: i64 = c
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
        .unwrap();
    assert_eq!(busy, 0, "the checkpoint completed");
    let frame: Vec<u8> = c
        .query_row(
            "SELECT frame FROM chunks WHERE part_id = ?1 AND seq = ?2",
            [id, seq],
            |r| r.get(0),
        )
        .unwrap();
    drop(c);
    let mut file = std::fs::read(db).unwrap();
    let copies: Vec<usize> = file
        .windows(frame.len())
        .enumerate()
        .filter(|(_, w)| *w == frame.as_slice())
        .map(|(at, _)| at)
        .collect();
    assert!(
        !copies.is_empty(),
        "the frame is stored contiguously in the file"
    );
    for at in copies {
        file[at + frame.len() / 2] ^= 0x20;
    }
    std::fs::write(db, file).unwrap();
}

/// Reads as a downloader does; returns the bytes handed out and the error.
async fn read_until_error(store: &SqliteOutputStore, k: &ExportPartKey) -> (Vec<u8>, StorageError) {
    let mut r = store.open_reader(k).await.unwrap();
    let mut got = Vec::new();
    let e = r
        .read_to_end(&mut got)
        .await
        .expect_err("a damaged part must not read as success");
    (got, StorageError::from_io("read", e))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_parts_fail_as_corrupt_before_the_stream_ends_and_never_return_wrong_bytes() {
    let dir = tempfile::tempdir().unwrap();
    type Damage = Box<dyn Fn(&Path, i64)>;
    let cases: Vec<(&str, Damage)> = vec![
        (
            "a flipped byte inside a stored frame",
            Box::new(|db, id| flip_byte_in_file(db, id, 2)),
        ),
        (
            "a flipped byte in the last frame",
            Box::new(|db, id| {
                let last: i64 = rusqlite::Connection::open(db)
                    .unwrap()
                    .query_row(
                        "SELECT max(seq) FROM chunks WHERE part_id = ?1",
                        [id],
                        |r| r.get(0),
                    )
                    .unwrap();
                flip_byte_in_file(db, id, last)
            }),
        ),
        (
            "a deleted middle chunk",
            Box::new(|db, id| {
                tamper(
                    db,
                    &format!("DELETE FROM chunks WHERE part_id = {id} AND seq = 2"),
                )
            }),
        ),
        (
            "a truncated frame",
            Box::new(|db, id| {
                tamper(
                    db,
                    &format!(
                        "UPDATE chunks SET frame = substr(frame, 1, length(frame) - 9)
                 WHERE part_id = {id} AND seq = 1"
                    ),
                )
            }),
        ),
        (
            "a digest that does not match",
            Box::new(|db, id| {
                tamper(
                    db,
                    &format!(
                        "UPDATE parts SET digest = '{}' WHERE id = {id}",
                        faultkit::digest_hex(b"other")
                    ),
                )
            }),
        ),
        (
            "a recorded length that does not match",
            Box::new(|db, id| {
                tamper(
                    db,
                    &format!("UPDATE parts SET byte_count = byte_count - 1 WHERE id = {id}"),
                )
            }),
        ),
        (
            "two frames swapped",
            Box::new(|db, id| {
                tamper(
                    db,
                    &format!(
                        "UPDATE chunks SET seq = 1000000 WHERE part_id = {id} AND seq = 1;
                 UPDATE chunks SET seq = 1 WHERE part_id = {id} AND seq = 3;
                 UPDATE chunks SET seq = 3 WHERE part_id = {id} AND seq = 1000000;"
                    ),
                )
            }),
        ),
    ];
    for (n, (what, damage)) in cases.iter().enumerate() {
        let db = dir.path().join(format!("damaged{n}.db"));
        let opts = StoreOptions::default().with_chunk_size(4096);
        // A part of many chunks beside an intact neighbour.
        let bad = key("acme", "job", "Encounter", 0, 1);
        let good = key("acme", "job", "Encounter", 1, 1);
        let want = faultkit::content(&bad);
        {
            let store = SqliteOutputStore::open_with(&db, BASE, opts.clone()).unwrap();
            write_part(&store, &bad).await.unwrap();
            write_part(&store, &good).await.unwrap();
            assert!(
                store.part_info(&bad).await.unwrap().chunk_count >= 5,
                "{what}"
            );
        }
        damage(&db, part_id(&db, &bad));
        let store = SqliteOutputStore::open_with(&db, BASE, opts).unwrap();
        let (got, e) = read_until_error(&store, &bad).await;
        assert!(e.is_corrupt(), "{what}: {e}");
        assert!(
            got.len() < want.len(),
            "{what}: the stream did not end as complete"
        );
        assert!(
            want.starts_with(&got),
            "{what}: wrong bytes were handed out"
        );
        // The neighbour is untouched; verify names exactly the damaged part.
        assert!(
            read_part(&store, &good).await.unwrap() == content(&good),
            "{what}"
        );
        let report = store.verify().await.unwrap();
        assert_eq!(report.problems.len(), 1, "{what}: {:?}", report.problems);
        assert_eq!(
            report.problems[0].part.as_deref(),
            Some(bad.display().to_string().as_str())
        );
        assert_eq!(report.parts_checked, 1, "{what}");
        println!("{what}: {e}");
    }
}

// ----------------------------------------------------------------- files

const RO_CHILD: &str = "EXPORT_STORE_RO_CHILD";

#[test]
fn a_read_only_database_file_is_refused_at_open_and_left_unchanged() {
    if let Some(path) = std::env::var_os(RO_CHILD) {
        // As an unprivileged user, to whom the permissions apply.
        let e = SqliteOutputStore::open(Path::new(&path), BASE).unwrap_err();
        assert!(e.is_internal(), "{e}");
        assert!(e.to_string().contains("read-only"), "{e}");
        println!("refused: {e}");
        std::process::exit(0);
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ro.db");
    let k = key("acme", "job", "Patient", 0, 1);
    rt.block_on(async {
        let store = SqliteOutputStore::open(&db, BASE).unwrap();
        write_part(&store, &k).await.unwrap();
    });
    faultkit::settle(&db);
    let before = std::fs::read(&db).unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o444)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
    // Root ignores file permissions: run the child as `nobody`. `nobody`
    // may not reach this test binary (a checkout in a private folder, such
    // as one `mktemp -d` made), so it runs a copy from a folder anyone may
    // enter.
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid() == 0
    });
    let exe_dir = tempfile::tempdir().unwrap();
    let mut exe = std::env::current_exe().unwrap();
    if root {
        std::fs::set_permissions(exe_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let copy = exe_dir.path().join("faults");
        std::fs::copy(&exe, &copy).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        exe = copy;
    }
    let mut child = std::process::Command::new(&exe);
    child
        .args([
            "--exact",
            "a_read_only_database_file_is_refused_at_open_and_left_unchanged",
        ])
        .args(["--nocapture", "--test-threads", "1"])
        .env(RO_CHILD, &db);
    if root {
        use std::os::unix::process::CommandExt;
        child.uid(65534).gid(65534);
    }
    let out = child.output().unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("refused: open: internal error: the database file is read-only"),
        "{said}"
    );
    assert!(
        std::fs::read(&db).unwrap() == before,
        "the file was changed"
    );
    rt.block_on(async {
        let store = SqliteOutputStore::open(&db, BASE).unwrap();
        assert!(read_part(&store, &k).await.unwrap() == content(&k));
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_file_that_vanishes_under_the_store_fails_every_call_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gone.db");
    let store =
        SqliteOutputStore::open_with(&db, BASE, StoreOptions::default().with_chunk_size(2048))
            .unwrap();
    let done = key("acme", "job", "Patient", 0, 1);
    write_part(&store, &done).await.unwrap();
    // A writer mid-part when the file goes: its part must not be "finalized"
    // into a deleted file that disappears with the process.
    let k = key("acme", "job", "Patient", 1, 1);
    let mut w = store.open_writer(&k).await.unwrap();
    w.write_line(&lines(&k)[0]).await.unwrap();
    for f in ["gone.db", "gone.db-wal", "gone.db-shm"] {
        let _ = std::fs::remove_file(dir.path().join(f));
    }
    for l in &lines(&k)[1..] {
        let _ = w.write_line(l).await;
    }
    let e = store.finalize_part(&k, w).await.unwrap_err();
    assert!(
        e.is_internal() && e.to_string().contains("removed or replaced"),
        "{e}"
    );
    let e = read_part(&store, &done).await.unwrap_err();
    assert!(
        e.is_internal() && e.to_string().contains("reopen the store"),
        "{e}"
    );
    let e = store.open_writer(&k).await.unwrap_err();
    assert!(e.is_internal(), "{e}");
    assert!(!db.exists(), "no empty database appeared in its place");
    // Opening where no folder exists is refused, and says so.
    let e = SqliteOutputStore::open(dir.path().join("no-such-dir/x.db"), BASE).unwrap_err();
    assert!(
        e.is_internal() && e.to_string().contains("cannot be opened"),
        "{e}"
    );
    assert!(
        !e.to_string().contains("no-such-dir"),
        "no path in the message: {e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_from_a_newer_schema_is_refused_with_a_message_that_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("new.db");
    let k = key("acme", "job", "Patient", 0, 1);
    {
        let store = SqliteOutputStore::open(&db, BASE).unwrap();
        write_part(&store, &k).await.unwrap();
    }
    let newer = sqlite_export_store::__test_support::schema::SCHEMA_VERSION + 1;
    rusqlite::Connection::open(&db)
        .unwrap()
        .pragma_update(None, "user_version", newer)
        .unwrap();
    faultkit::settle(&db);
    let before = std::fs::read(&db).unwrap();
    let e = SqliteOutputStore::open(&db, BASE).unwrap_err();
    assert!(e.is_invalid_input(), "{e}");
    let shown = e.to_string();
    assert!(
        shown.contains("newer") && shown.contains(&format!("version {newer}")),
        "{shown}"
    );
    assert!(shown.contains("upgrade"), "{shown}");
    assert!(
        std::fs::read(&db).unwrap() == before,
        "a refused file is left as it was"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_is_not_a_database_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in [
        ("text.db", faultkit::synthea("Patient.000.ndjson")),
        ("zeros.db", vec![0u8; 64 << 10]),
        ("short.db", b"SQLite format 3\0".to_vec()),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        let e = SqliteOutputStore::open(&path, BASE).unwrap_err();
        assert!(e.is_internal() || e.is_corrupt(), "{name}: {e}");
        assert!(
            e.to_string().contains("not a SQLite database"),
            "{name}: {e}"
        );
        assert!(std::fs::read(&path).unwrap() == bytes, "{name} was changed");
    }
}
