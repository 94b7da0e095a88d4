//! The operator's API and CLI: reclaiming abandoned staging, pruning
//! superseded parts, giving space back after deletes, verifying a store,
//! and `export-store gc` / `export-store verify` run as real processes.

mod faultkit;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faultkit::{content, key, lines, noisy_lines, now_ms, read_part, tenant, write_part};
use sqlite_export_store::VerifyProgress;
use sqlite_export_store::{
    ExportJobId, ExportOutputStore, ExportPartKey, SqliteOutputStore, StoreOptions,
};

const BASE: &str = "http://hfs.test";

/// Staging left by a writer that died `age` ago: a staged row and a few
/// chunks, written straight into the file as that writer had.
fn dead_staging(db: &Path, k: &ExportPartKey, age: Duration) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.pragma_update(None, "foreign_keys", true).unwrap();
    let id = sqlite_export_store::__test_support::sql::insert_staged(
        &c,
        k,
        now_ms() - age.as_millis() as i64,
    )
    .unwrap();
    for seq in 0..3 {
        let frame = sqlite_export_store::__test_support::codec::compress(
            b"{\"resourceType\":\"Patient\"}\n",
            3,
        )
        .unwrap();
        sqlite_export_store::__test_support::sql::insert_chunk(&c, id, seq, seq * 27, 27, &frame)
            .unwrap();
    }
}

fn options() -> StoreOptions {
    StoreOptions::default().with_chunk_size(2048)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reclaim_abandoned_removes_dead_staging_only() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gc.db");
    let store = SqliteOutputStore::open_with(&db, BASE, options()).unwrap();
    let done = key("acme", "job", "Patient", 0, 1);
    write_part(&store, &done).await.unwrap();
    // Old staging of dead writers, more than one batch of it.
    for i in 0..150 {
        dead_staging(
            &db,
            &key("acme", "dead", "Patient", i, 1),
            Duration::from_secs(7200),
        );
    }
    // Recent staging of a writer in another process, which may be alive.
    let recent = key("acme", "recent", "Patient", 0, 1);
    dead_staging(&db, &recent, Duration::from_secs(600));
    // A live writer of this store, opened "long ago" as far as ZERO goes.
    let live = key("acme", "live", "Encounter", 0, 1);
    let mut w = store.open_writer(&live).await.unwrap();
    w.write_line(&lines(&live)[0]).await.unwrap();

    assert_eq!(
        store
            .reclaim_abandoned(Duration::from_secs(3600))
            .await
            .unwrap(),
        150
    );
    assert_eq!(faultkit::census(&db).staged_parts, 2);
    // With no age limit, only this store's live writer is spared.
    assert_eq!(store.reclaim_abandoned(Duration::ZERO).await.unwrap(), 1);
    let census = faultkit::census(&db);
    assert_eq!((census.staged_parts, census.orphan_chunks), (1, 0));
    for l in &lines(&live)[1..] {
        w.write_line(l).await.unwrap();
    }
    store.finalize_part(&live, w).await.unwrap();
    assert!(read_part(&store, &live).await.unwrap() == content(&live));
    assert!(read_part(&store, &done).await.unwrap() == content(&done));
    assert_eq!(store.reclaim_abandoned(Duration::ZERO).await.unwrap(), 0);
    assert!(store.verify().await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_superseded_keeps_the_highest_token_per_slot() {
    let store = SqliteOutputStore::temporary_with(BASE, options()).unwrap();
    let job = "job";
    // Slot 0: claimed three times, all finished.
    for t in 1..=3 {
        write_part(&store, &key("acme", job, "Patient", 0, t))
            .await
            .unwrap();
    }
    // Slot 1: only the first claim got there.
    write_part(&store, &key("acme", job, "Patient", 1, 1))
        .await
        .unwrap();
    // Slot 2: finished under token 1, being rewritten under token 2.
    write_part(&store, &key("acme", job, "Patient", 2, 1))
        .await
        .unwrap();
    let writing = key("acme", job, "Patient", 2, 2);
    let mut w = store.open_writer(&writing).await.unwrap();
    w.write_line(&lines(&writing)[0]).await.unwrap();
    // The same slots in another job and another tenant.
    let other_job = key("acme", "other", "Patient", 0, 1);
    let other_tenant = key("acme/research", job, "Patient", 0, 1);
    write_part(&store, &other_job).await.unwrap();
    write_part(&store, &other_tenant).await.unwrap();

    let pruned = store
        .prune_superseded(&tenant("acme"), &ExportJobId::from(job))
        .await
        .unwrap();
    assert_eq!(pruned, 3, "tokens 1 and 2 of slot 0, token 1 of slot 2");
    for (k, kept) in [
        (key("acme", job, "Patient", 0, 1), false),
        (key("acme", job, "Patient", 0, 2), false),
        (key("acme", job, "Patient", 0, 3), true),
        (key("acme", job, "Patient", 1, 1), true),
        (key("acme", job, "Patient", 2, 1), false),
        (other_job.clone(), true),
        (other_tenant.clone(), true),
    ] {
        let r = read_part(&store, &k).await;
        if kept {
            assert!(r.unwrap() == content(&k), "{} kept", k.display());
        } else {
            assert!(r.unwrap_err().is_not_found(), "{} pruned", k.display());
        }
    }
    // The writer under the slot's highest token was left alone.
    for l in &lines(&writing)[1..] {
        w.write_line(l).await.unwrap();
    }
    store.finalize_part(&writing, w).await.unwrap();
    assert!(read_part(&store, &writing).await.unwrap() == content(&writing));
    assert_eq!(
        store.latest_in_slot(&writing).await.unwrap().fencing_token,
        2
    );
    assert_eq!(
        store
            .prune_superseded(&tenant("acme"), &ExportJobId::from(job))
            .await
            .unwrap(),
        0,
        "pruning again finds nothing"
    );
}

/// NDJSON that zstd cannot shrink much, so that parts take real space.
async fn write_noisy(store: &SqliteOutputStore, k: &ExportPartKey, n: usize) {
    let mut w = store.open_writer(k).await.unwrap();
    for l in noisy_lines(k.part_index as u64 + 1, n, 1500) {
        w.write_line(&l).await.unwrap();
    }
    store.finalize_part(k, w).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_large_job_shrinks_the_file_in_the_background_without_stalling_writers() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("space.db");
    let store =
        SqliteOutputStore::open_with(&db, BASE, StoreOptions::default().with_chunk_size(64 << 10))
            .unwrap();
    // A large job, then one that stays written after it: giving the large
    // job's space back means moving every page of the one that stays.
    for i in 0..24 {
        write_noisy(&store, &key("acme", "large", "Binary", i, 1), 400).await;
    }
    let mut stays = Vec::new();
    for i in 0..12 {
        let k = key("acme", "stays", "Binary", i, 1);
        write_noisy(&store, &k, 400).await;
        stays.push(k);
    }
    store.reclaim_space().await.unwrap();
    let full = store.space().await.unwrap();
    let (file_full, _) = faultkit::disk_bytes(&db);
    assert!(full.database_bytes() > 10 << 20, "{full:?}");

    let deleted_at = Instant::now();
    store
        .delete_job_outputs(&tenant("acme"), &ExportJobId::from("large"))
        .await
        .unwrap();
    let delete_took = deleted_at.elapsed();
    // Parts written while the writer thread gives space back in steps wait
    // for one step at most.
    let mut slowest = Duration::ZERO;
    let mut written = 0;
    let emptied = loop {
        let t = Instant::now();
        let k = key("acme", "during", "Patient", written, 1);
        write_part(&store, &k).await.unwrap();
        slowest = slowest.max(t.elapsed());
        stays.push(k);
        written += 1;
        let now = store.space().await.unwrap();
        if now.free_pages == 0 {
            break now;
        }
        assert!(
            deleted_at.elapsed() < Duration::from_secs(30),
            "free pages stayed: {now:?}"
        );
    };
    let shrunk = deleted_at.elapsed();
    assert!(
        emptied.database_bytes() * 3 < full.database_bytes() * 2,
        "{full:?} -> {emptied:?}"
    );
    let (file_open, wal_open) = faultkit::disk_bytes(&db);
    drop(store);
    faultkit::settle(&db);
    let (file_after, _) = faultkit::disk_bytes(&db);
    assert!(
        file_after * 3 < file_full * 2,
        "the file itself shrank: {file_full} -> {file_after}"
    );
    println!(
        "space: deleting a 24-part job ({:.1} MiB in the file, 12 parts after it) took {delete_took:?}; all free pages were \
         given back {shrunk:?} after it, by the idle writer thread, while {written} parts were \
         written (slowest {slowest:?}); file {:.1} MiB -> {:.1} MiB (WAL {:.1} MiB while open, \
         {:.1} MiB file once closed)",
        full.database_bytes() as f64 / 1048576.0,
        file_full as f64 / 1048576.0,
        file_open as f64 / 1048576.0,
        wal_open as f64 / 1048576.0,
        file_after as f64 / 1048576.0
    );
    let store = SqliteOutputStore::open_with(&db, BASE, options()).unwrap();
    for k in &stays {
        let want = if k.job_id.as_str() == "stays" {
            noisy_lines(k.part_index as u64 + 1, 400, 1500)
                .iter()
                .flat_map(|l| [l.as_bytes(), b"\n"].concat())
                .collect()
        } else {
            content(k)
        };
        assert!(
            read_part(&store, k).await.unwrap() == want,
            "{}",
            k.display()
        );
    }
    assert!(store.verify().await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_thousand_part_job_returns_at_once_and_reclaim_space_frees_everything() {
    let store =
        SqliteOutputStore::temporary_with(BASE, StoreOptions::default().with_chunk_size(4096))
            .unwrap();
    // 1,000 parts of 1 to 40 resources each, by 16 concurrent workers.
    let next = Arc::new(Mutex::new(0u32));
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (store, next) = (store.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = {
                        let mut n = next.lock().unwrap();
                        *n += 1;
                        *n - 1
                    };
                    if i >= 1000 {
                        break;
                    }
                    write_part(&store, &key("acme", "big", "Encounter", i, 1))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    let t = Instant::now();
    for w in workers {
        w.await.unwrap();
    }
    let wrote = t.elapsed();
    let before = store.space().await.unwrap();
    let t = Instant::now();
    store
        .delete_job_outputs(&tenant("acme"), &ExportJobId::from("big"))
        .await
        .unwrap();
    let delete_took = t.elapsed();
    // Whatever the idle writer thread has not given back yet, this does.
    let report = store.reclaim_space().await.unwrap();
    let reclaimed = t.elapsed();
    let after = store.space().await.unwrap();
    println!(
        "1,000-part job ({:.1} MiB in the file, written in {wrote:?} by 16 workers): \
         delete_job_outputs took {delete_took:?}; every free page was given back \
         {reclaimed:?} after the delete ({:.1} MiB by reclaim_space's {} steps, the rest by \
         the idle writer thread)",
        before.database_bytes() as f64 / 1048576.0,
        report.bytes_freed as f64 / 1048576.0,
        report.steps
    );
    assert_eq!(after.free_pages, 0);
    assert!(
        after.database_bytes() * 3 < before.database_bytes(),
        "{before:?} -> {after:?}"
    );
    // The delete itself is one short transaction, whatever the vacuum does.
    assert!(delete_took < Duration::from_secs(2), "{delete_took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_walks_every_part_and_reports_progress() {
    let store = SqliteOutputStore::temporary_with(BASE, options()).unwrap();
    let keys: Vec<_> = (0..12)
        .map(|i| key("acme", "job", "Encounter", i, 1))
        .collect();
    for k in &keys {
        write_part(&store, k).await.unwrap();
    }
    let staged = key("acme", "job", "Encounter", 99, 1);
    let mut w = store.open_writer(&staged).await.unwrap();
    w.write_line("{}").await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::<VerifyProgress>::new()));
    let log = seen.clone();
    let report = store
        .verify_with_progress(move |p| log.lock().unwrap().push(*p))
        .await
        .unwrap();
    let bytes: u64 = keys.iter().map(|k| content(k).len() as u64).sum();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(
        (
            report.parts_checked,
            report.bytes_checked,
            report.staged_parts
        ),
        (12, bytes, 1)
    );
    let seen = seen.lock().unwrap();
    let last = seen.last().unwrap();
    assert_eq!(
        (
            last.parts_done,
            last.parts_total,
            last.bytes_done,
            last.bytes_total
        ),
        (12, 12, bytes, bytes)
    );
    assert!(
        seen.windows(2).all(|w| w[0].bytes_done <= w[1].bytes_done),
        "progress only grows"
    );
    assert!(
        seen.len() > 12,
        "progress comes per chunk, not only per part"
    );
    drop(w);
}

fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_export-store"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_collects_garbage_and_verifies_with_the_right_exit_status() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("cli.db");
    let path = db.to_str().unwrap();
    let damaged = key("acme", "job", "Encounter", 0, 1);
    {
        let store = SqliteOutputStore::open_with(&db, BASE, options()).unwrap();
        for i in 0..4 {
            write_part(&store, &key("acme", "job", "Encounter", i, 1))
                .await
                .unwrap();
        }
    }
    dead_staging(
        &db,
        &key("acme", "dead", "Patient", 0, 1),
        Duration::from_secs(7200),
    );
    dead_staging(
        &db,
        &key("acme", "dead", "Patient", 1, 1),
        Duration::from_secs(7200),
    );
    dead_staging(
        &db,
        &key("acme", "recent", "Patient", 0, 1),
        Duration::from_secs(60),
    );

    let (code, out, err) = cli(&["verify", "--db", path]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("verified 4 finished parts") && out.contains("no problems found"),
        "{out}"
    );
    assert!(out.contains("3 staged parts"), "{out}");
    assert!(err.is_empty(), "no progress bar when piped: {err}");

    let (code, out, err) = cli(&["gc", "--older-than", "1h", "--db", path]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("reclaimed 2 abandoned staged parts"), "{out}");
    assert_eq!(faultkit::census(&db).staged_parts, 1);
    let (code, out, _) = cli(&["gc", "--older-than", "30s", "--db", path]);
    assert_eq!(code, 0);
    assert!(out.contains("reclaimed 1 abandoned staged part "), "{out}");

    // Damage one part: verify names it and fails.
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute(
        "DELETE FROM chunks WHERE seq = 1 AND part_id =
             (SELECT id FROM parts WHERE part_index = 0 AND finalized = 1)",
        [],
    )
    .unwrap();
    drop(c);
    let (code, out, err) = cli(&["verify", "--db", path]);
    assert_eq!(code, 3, "{out}{err}");
    assert!(
        out.contains(&format!(
            "problem: verify of {}: corrupt: chunk 1 of the part is missing",
            damaged.display()
        )),
        "{out}"
    );
    assert!(out.contains("1 problem found"), "{out}");

    // No store there: refused, nothing created.
    let missing = dir.path().join("missing.db");
    let (code, _, err) = cli(&["verify", "--db", missing.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("no store at"), "{err}");
    assert!(!missing.exists());
    let (code, _, err) = cli(&["gc", "--older-than", "soon", "--db", path]);
    assert_ne!(code, 0);
    assert!(err.contains("not a duration"), "{err}");
}

/// `PRAGMA journal_size_limit` of the store's write connection (the
/// store's `WAL_SIZE_LIMIT`, in src/db.rs).
const WAL_LIMIT: u64 = 4 << 20;
/// What small writes may add after the write-ahead log was truncated back
/// to the limit, before the next checkpoint.
const WAL_SLACK: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_ahead_log_shrinks_back_to_its_limit_after_big_writes() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("wal.db");
    // One 16 MiB chunk is one transaction of about 11 MiB of frames: the log
    // grows well past the limit before any checkpoint.
    let store =
        SqliteOutputStore::open_with(&db, BASE, StoreOptions::default().with_chunk_size(16 << 20))
            .unwrap();
    let data = noise(16 << 20);
    let wal = || faultkit::disk_bytes(&db).1;
    // Small parts 50 ms apart keep the writer from ever idling for the 1 s
    // after which it truncates the log on its own: what brings the log back
    // here is the checkpoint the store runs beside the writer, after which
    // the next commit starts the log over at the limit. Returns the log's
    // size once back within the limit, or `None` after 5 s.
    let busy_until_back = |from: u32| {
        let store = store.clone();
        async move {
            let start = Instant::now();
            let mut i = from;
            while start.elapsed() < Duration::from_secs(5) {
                write_part(&store, &key("acme", "small", "Patient", i, 1))
                    .await
                    .unwrap();
                i += 1;
                let now = wal();
                if now <= WAL_LIMIT + WAL_SLACK {
                    return Some(now);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            None
        }
    };

    // Alone: the big part's log is checkpointed, and a commit after that
    // starts the log over and truncates it.
    write_noise(&store, &key("acme", "big", "Binary", 0, 1), &data).await;
    let big = wal();
    assert!(big > 2 * WAL_LIMIT, "WAL {big} after a big part");
    assert!(
        busy_until_back(0).await.is_some(),
        "WAL {big} -> {} after a big part and 5 s of small ones",
        wal()
    );

    // While a reader holds an old snapshot, no checkpoint can catch up and
    // the log only grows; once the reader is gone, the checkpoints catch up
    // and the log starts over.
    let reader = rusqlite::Connection::open(&db).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let _: i64 = reader
        .query_row("SELECT count(*) FROM parts", [], |r| r.get(0))
        .unwrap();
    write_noise(&store, &key("acme", "big", "Binary", 1, 1), &data).await;
    for i in 0..3 {
        write_part(&store, &key("acme", "pinned", "Patient", i, 1))
            .await
            .unwrap();
    }
    let pinned = wal();
    assert!(pinned > 2 * WAL_LIMIT, "WAL {pinned} behind an open reader");
    drop(reader);
    let after = busy_until_back(1000).await;
    assert!(
        after.is_some(),
        "WAL {pinned} -> {} after the reader left and 5 s of small parts",
        wal()
    );
    println!(
        "WAL: {:.1} MiB behind an open reader, {:.1} MiB once it left",
        pinned as f64 / 1048576.0,
        after.unwrap_or_default() as f64 / 1048576.0
    );
    let back = read_part(&store, &key("acme", "big", "Binary", 1, 1))
        .await
        .unwrap();
    assert!(back == data);
}

/// Polls `f` until it holds, for at most `limit`; returns whether it did.
async fn eventually(limit: Duration, f: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_store_truncates_its_write_ahead_log() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("idle.db");
    let store = SqliteOutputStore::open(&db, BASE).unwrap();
    let wal = || faultkit::disk_bytes(&db).1;
    let data = noise(3 << 20);

    // A reader on an old snapshot keeps every frame in the log: the idle
    // writer tries, gives up without waiting, and tries again later.
    let reader = rusqlite::Connection::open(&db).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let _: i64 = reader
        .query_row("SELECT count(*) FROM parts", [], |r| r.get(0))
        .unwrap();
    write_noise(&store, &key("acme", "idle", "Binary", 0, 1), &data).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let pinned = wal();
    assert!(pinned > 1 << 20, "WAL {pinned} behind an open reader");

    // Once the reader is gone, an idle spell truncates the log to nothing.
    drop(reader);
    let limit = Duration::from_secs(15);
    assert!(
        eventually(limit, || wal() == 0).await,
        "WAL still {} bytes after the store sat idle",
        wal()
    );
    println!("WAL: {pinned} bytes behind an open reader, 0 once idle");

    // Everything is in the database file, and the store goes on working.
    let back = read_part(&store, &key("acme", "idle", "Binary", 0, 1))
        .await
        .unwrap();
    assert!(back == data);
    write_part(&store, &key("acme", "idle", "Patient", 0, 1))
        .await
        .unwrap();
    assert!(
        eventually(limit, || wal() == 0).await,
        "WAL {} after a second write",
        wal()
    );
    drop(store);
    let fresh = SqliteOutputStore::open(&db, BASE).unwrap();
    let again = read_part(&fresh, &key("acme", "idle", "Binary", 0, 1))
        .await
        .unwrap();
    assert!(again == data);
}

async fn write_noise(store: &SqliteOutputStore, k: &ExportPartKey, data: &[u8]) {
    let mut w = store.open_writer(k).await.unwrap();
    for l in data.split_inclusive(|b| *b == b'\n') {
        w.write_line(std::str::from_utf8(&l[..l.len() - 1]).unwrap())
            .await
            .unwrap();
    }
    store.finalize_part(k, w).await.unwrap();
}

/// At least `n` bytes of NDJSON that zstd shrinks by a quarter at most:
/// lines of random letters.
fn noise(n: usize) -> Vec<u8> {
    let mut rng = faultkit::Rng(0x9e37_79b9_7f4a_7c15);
    let mut out = Vec::with_capacity(n + 4096);
    let mut i = 0;
    while out.len() < n {
        out.extend_from_slice(
            format!(r#"{{"resourceType":"Binary","id":"n{i}","data":""#).as_bytes(),
        );
        for _ in 0..256 {
            let mut x = rng.next();
            for _ in 0..8 {
                let c = (x % 52) as u8;
                out.push(if c < 26 { b'A' + c } else { b'a' + c - 26 });
                x >>= 8;
            }
        }
        out.extend_from_slice(b"\"}\n");
        i += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_ages_by_its_writers_last_chunk_not_by_when_it_was_opened() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("activity.db");
    // Two stores on one file: HFS's, and `export-store gc` in another
    // process, which cannot see HFS's live writers.
    let hfs = SqliteOutputStore::open_with(&db, BASE, options()).unwrap();
    let gc = SqliteOutputStore::open_with(&db, BASE, options()).unwrap();
    let line = |i: usize| {
        format!(
            r#"{{"resourceType":"Patient","id":"p{i}","text":"{}"}}"#,
            "x".repeat(3000)
        )
    };
    let busy = key("acme", "long-part", "Patient", 0, 1);
    let idle = key("acme", "stalled", "Patient", 0, 1);
    let mut stalled = hfs.open_writer(&idle).await.unwrap();
    stalled.write_line(&line(0)).await.unwrap();
    stalled.flush().await.unwrap();
    let mut writer = hfs.open_writer(&busy).await.unwrap();
    let mut want = String::new();
    // Opened a second ago, but a chunk has reached the file every 200 ms.
    for i in 0..6 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        writer.write_line(&line(i)).await.unwrap();
        writer.flush().await.unwrap();
        want.push_str(&line(i));
        want.push('\n');
    }
    let reclaimed = gc
        .reclaim_abandoned(Duration::from_millis(600))
        .await
        .unwrap();
    assert_eq!(reclaimed, 1, "only the stalled writer's staging goes");
    hfs.finalize_part(&busy, writer).await.unwrap();
    assert!(read_part(&gc, &busy).await.unwrap() == want.as_bytes());
    let e = hfs.finalize_part(&idle, stalled).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(gc.verify().await.unwrap().is_ok());
}
