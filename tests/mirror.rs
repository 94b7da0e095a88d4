//! `SqliteOutputStore::mirror_from` on real store files: one pass makes a
//! replica hold exactly the source's finished parts (byte for byte, with
//! their figures, digest and finalize time; staged parts never), a pass
//! over an unchanged source changes nothing, deletes and rewrites at the
//! source are followed, damaged source parts are reported and not copied
//! (no staged leftover either), broken sources and a read-only replica fail
//! the pass and leave the replica as it was, and a source written while
//! passes run never makes the replica serve content that was not written.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlite_export_store::__test_support::schema::MIGRATIONS;
use sqlite_export_store::testkit::conformance::read_all;
use sqlite_export_store::testkit::synthetic::Generator;
use sqlite_export_store::{
    BackupOptions, DigestAlgorithm, ErrorKind, ExportJobId, ExportOutputStore, ExportPartKey,
    ExportPartWriter, MirrorReport, PartFilter, PartSummary, SqliteOutputStore, StoreOptions,
    TenantContext, TenantId, MIRROR_BATCH_BYTES,
};

const BASE: &str = "http://127.0.0.1:8080";

type Contents = HashMap<ExportPartKey, Vec<u8>>;

fn key(job: &str, resource_type: &str, index: u32, token: u64) -> ExportPartKey {
    ExportPartKey::output("acme", ExportJobId::from(job), resource_type, index, token)
}

async fn write_lines(w: &mut ExportPartWriter, data: &[u8]) {
    for line in data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let line = std::str::from_utf8(line).unwrap();
        w.write_line(line).await.unwrap();
    }
}

/// Writes `data` (whole lines, or nothing) as the part `key` and finalizes it.
async fn put(store: &SqliteOutputStore, key: &ExportPartKey, data: &[u8]) {
    let mut w = store.open_writer(key).await.unwrap();
    write_lines(&mut w, data).await;
    store.finalize_part(key, w).await.unwrap();
}

async fn delete_job(store: &SqliteOutputStore, job: &str) {
    let tenant = TenantContext::new(TenantId::new("acme"));
    let job = ExportJobId::from(job);
    store.delete_job_outputs(&tenant, &job).await.unwrap();
}

async fn assert_absent(store: &SqliteOutputStore, key: &ExportPartKey) {
    let e = read_all(store, key).await.unwrap_err();
    assert!(e.is_not_found(), "{}: {e}", key.display());
}

/// NDJSON of at least `bytes` bytes that zstd can hardly shrink: long
/// strings drawn from 93 printable characters (about 6.5 bits a byte).
fn noise_ndjson(seed: u64, bytes: usize) -> Vec<u8> {
    let alphabet: Vec<u8> = (0x20..0x7f_u8).filter(|c| !b"\"\\".contains(c)).collect();
    let mut x = seed;
    let mut out = Vec::with_capacity(bytes + 8192);
    while out.len() < bytes {
        out.extend_from_slice(b"{\"resourceType\":\"Binary\",\"data\":\"");
        for _ in 0..4000 {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            out.push(alphabet[((x >> 32) % alphabet.len() as u64) as usize]);
        }
        out.extend_from_slice(b"\"}\n");
    }
    out
}

/// Finished parts of jobs `job-a` and `job-b` of tenant `acme`: several
/// types, an error part, an empty part, a multi-chunk part, and with `big`
/// one whose stored frames exceed [`MIRROR_BATCH_BYTES`]. Job `b` is
/// written through a second store object on the file that records BLAKE3.
async fn two_jobs(source: &SqliteOutputStore, big: bool) -> Contents {
    let mut gen = Generator::new(7);
    let mut parts: Contents = HashMap::new();
    parts.insert(key("job-a", "Patient", 0, 1), gen.ndjson("Patient", 300));
    let multi = gen.ndjson_of_size(3 << 20);
    parts.insert(key("job-a", "Observation", 0, 1), multi);
    parts.insert(key("job-a", "Observation", 1, 1), Vec::new());
    let err = ExportPartKey::error("acme", "job-a".into(), "OperationOutcome", 0, 1);
    parts.insert(err, gen.ndjson("OperationOutcome", 3));
    for (key, data) in &parts {
        put(source, key, data).await;
    }
    let blake = StoreOptions::default().with_digest(DigestAlgorithm::Blake3);
    let blake = SqliteOutputStore::open_with(source.path(), BASE, blake).unwrap();
    let encounters = gen.ndjson("Encounter", 200);
    let mut more = vec![(key("job-b", "Encounter", 0, 2), encounters)];
    if big {
        let noise = noise_ndjson(1, MIRROR_BATCH_BYTES * 3 / 2);
        more.push((key("job-b", "Binary", 0, 2), noise));
    }
    for (key, data) in more {
        put(&blake, &key, &data).await;
        parts.insert(key, data);
    }
    parts
}

/// A source at `dir/source.db` holding [`two_jobs`] (not big), and a
/// replica at `dir/replica.db` after one clean pass.
async fn mirrored(
    dir: &Path,
    options: StoreOptions,
) -> (SqliteOutputStore, SqliteOutputStore, Contents) {
    let source = SqliteOutputStore::open_with(dir.join("source.db"), BASE, options).unwrap();
    let parts = two_jobs(&source, false).await;
    let replica = SqliteOutputStore::open(dir.join("replica.db"), BASE).unwrap();
    assert_clean(&replica.mirror_from(source.path()).await.unwrap());
    assert_mirrors(&replica, &source, &parts).await;
    (source, replica, parts)
}

async fn listing(store: &SqliteOutputStore, filter: &PartFilter) -> Vec<PartSummary> {
    let mut parts = store.list_parts(filter).await.unwrap();
    parts.sort_by_key(|p| p.key.display().to_string());
    parts
}

/// The finished parts as a copy must reproduce them: everything but when
/// the row was created and last took chunks here.
async fn finished(store: &SqliteOutputStore) -> Vec<PartSummary> {
    let mut parts = listing(store, &PartFilter::all().finished_only()).await;
    for p in &mut parts {
        (p.created_at_ms, p.touched_at_ms) = (0, None);
    }
    parts
}

/// The replica holds exactly the source's finished parts, nothing staged,
/// each reading back as `contents` says with the source's `part_info`.
async fn assert_mirrors(
    replica: &SqliteOutputStore,
    source: &SqliteOutputStore,
    contents: &Contents,
) {
    let mine = finished(replica).await;
    assert_eq!(mine, finished(source).await, "finished parts differ");
    assert_eq!(mine.len(), contents.len(), "parts expected on the replica");
    let all = listing(replica, &PartFilter::all()).await;
    assert!(all.iter().all(|p| p.finished), "replica holds staged rows");
    for (key, data) in contents {
        let back = read_all(replica, key).await.unwrap();
        assert!(back == *data, "{}: bytes differ", key.display());
        let (mine, theirs) = (replica.part_info(key), source.part_info(key));
        let (mine, theirs) = (mine.await.unwrap(), theirs.await.unwrap());
        assert_eq!(mine, theirs, "{}", key.display());
    }
}

/// (parts added, removed, unchanged).
fn counts(r: &MirrorReport) -> (u64, u64, u64) {
    (r.parts_added, r.parts_removed, r.parts_unchanged)
}

fn of_job(parts: &Contents, job: &str) -> Vec<ExportPartKey> {
    parts
        .keys()
        .filter(|k| k.job_id.as_str() == job)
        .cloned()
        .collect()
}

fn assert_clean(report: &MirrorReport) {
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.parts_vanished, 0, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pass_copies_every_finished_part_exactly_and_no_staged_part() {
    let dir = tempfile::tempdir().unwrap();
    let source = SqliteOutputStore::open(dir.path().join("source.db"), BASE).unwrap();
    let parts = two_jobs(&source, true).await;
    let big = key("job-b", "Binary", 0, 2);
    let info = source.part_info(&big).await.unwrap();
    assert!(info.stored_bytes > MIRROR_BATCH_BYTES as u64, "{info:?}");
    let multi = source.part_info(&key("job-a", "Observation", 0, 1)).await;
    assert!(multi.unwrap().chunk_count >= 3);
    // A part being written: some of its chunks are rows of the source.
    let staged = key("job-a", "Condition", 0, 1);
    let mut w = source.open_writer(&staged).await.unwrap();
    write_lines(&mut w, &Generator::new(3).ndjson_of_size(3 << 20)).await;
    let mut chunks = 0;
    for _ in 0..200 {
        let all = listing(&source, &PartFilter::all()).await;
        chunks = all
            .iter()
            .find(|p| p.key == staged)
            .map_or(0, |p| p.chunk_count);
        if chunks > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(chunks > 0, "the staged part has no chunk rows");

    let replica = SqliteOutputStore::open(dir.path().join("replica.db"), BASE).unwrap();
    let report = replica.mirror_from(source.path()).await.unwrap();
    assert_clean(&report);
    let n = parts.len() as u64;
    let bytes: u64 = parts.values().map(|d| d.len() as u64).sum();
    let stored: u64 = finished(&source).await.iter().map(|p| p.stored_bytes).sum();
    assert_eq!((report.source_parts, counts(&report)), (n, (n, 0, 0)));
    let added = (report.bytes_added, report.stored_bytes_added);
    assert_eq!(added, (bytes, stored), "{report:?}");
    assert!(report.changed());
    assert_mirrors(&replica, &source, &parts).await;
    assert_absent(&replica, &staged).await;
    let blake = replica.part_info(&big).await.unwrap();
    assert_eq!(blake.digest_algorithm, DigestAlgorithm::Blake3);
    let empty = replica.part_info(&key("job-a", "Observation", 1, 1)).await;
    let empty = empty.unwrap();
    let figures = (empty.size_bytes, empty.line_count, empty.chunk_count);
    assert_eq!(figures, (0, 0, 0));
    let verified = replica.verify().await.unwrap();
    assert!(verified.is_ok(), "{:?}", verified.problems);
    assert_eq!(verified.parts_checked, n);
    drop(w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_over_an_unchanged_source_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (source, replica, parts) = mirrored(dir.path(), StoreOptions::default()).await;
    let before = listing(&replica, &PartFilter::all()).await;
    let report = replica.mirror_from(source.path()).await.unwrap();
    assert_clean(&report);
    let n = parts.len() as u64;
    assert_eq!((report.source_parts, counts(&report)), (n, (0, 0, n)));
    assert_eq!(report.bytes_added, 0, "{report:?}");
    assert!(!report.changed(), "{report:?}");
    let after = listing(&replica, &PartFilter::all()).await;
    assert_eq!(after, before, "rows rewritten");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_deleted_at_the_source_is_removed_and_the_other_job_stays() {
    let dir = tempfile::tempdir().unwrap();
    let (source, replica, mut parts) = mirrored(dir.path(), StoreOptions::default()).await;
    let of_b = PartFilter::all().job("job-b");
    let b_before = listing(&replica, &of_b).await;

    delete_job(&source, "job-a").await;
    let gone = of_job(&parts, "job-a");
    parts.retain(|k, _| !gone.contains(k));
    let report = replica.mirror_from(source.path()).await.unwrap();
    assert_clean(&report);
    let want = (0, gone.len() as u64, parts.len() as u64);
    assert_eq!(counts(&report), want, "{report:?}");
    for key in &gone {
        assert_absent(&replica, key).await;
    }
    let b_after = listing(&replica, &of_b).await;
    assert_eq!(b_after, b_before, "job b was touched");
    assert_mirrors(&replica, &source, &parts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_written_again_under_its_key_replaces_the_old_version() {
    let dir = tempfile::tempdir().unwrap();
    // Fencing off: the deleted job's key may be written again, same token.
    let options = StoreOptions::default().with_fencing(false);
    let (source, replica, mut parts) = mirrored(dir.path(), options).await;
    let key = key("job-a", "Patient", 0, 1);
    let n = parts.len() as u64;

    // Finalized again in place: one part out, its new version in.
    let second = Generator::new(99).ndjson("Patient", 120);
    put(&source, &key, &second).await;
    parts.insert(key.clone(), second.clone());
    let report = replica.mirror_from(source.path()).await.unwrap();
    assert_clean(&report);
    assert_eq!(counts(&report), (1, 1, n - 1), "{report:?}");
    assert_eq!(report.bytes_added, second.len() as u64);
    assert_mirrors(&replica, &source, &parts).await;

    // The job deleted, then the key written again with other bytes.
    delete_job(&source, "job-a").await;
    let gone = of_job(&parts, "job-a");
    parts.retain(|k, _| !gone.contains(k));
    let third = Generator::new(100).ndjson("Patient", 80);
    assert_ne!(third, second);
    put(&source, &key, &third).await;
    parts.insert(key.clone(), third.clone());
    let report = replica.mirror_from(source.path()).await.unwrap();
    assert_clean(&report);
    let (added, removed, _) = counts(&report);
    assert_eq!((added, removed), (1, gone.len() as u64), "{report:?}");
    assert_mirrors(&replica, &source, &parts).await;
}

/// Runs `sql` on the file at `db` through a plain connection.
fn tamper(db: &Path, sql: &str) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.execute_batch(sql).unwrap();
}

fn part_id(db: &Path, key: &ExportPartKey) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    let q = "SELECT id FROM parts WHERE resource_type = ?1 AND finalized = 1";
    c.query_row(q, [&key.resource_type], |r| r.get(0)).unwrap()
}

/// Applies `f` to the frame of chunk `seq` of part `id`, keeping its length.
fn damage_frame(db: &Path, id: i64, seq: u64, f: impl FnOnce(&mut [u8])) {
    let c = rusqlite::Connection::open(db).unwrap();
    let q = "SELECT frame FROM chunks WHERE part_id = ?1 AND seq = ?2";
    let mut frame: Vec<u8> = c.query_row(q, (id, seq as i64), |r| r.get(0)).unwrap();
    f(&mut frame);
    let u = "UPDATE chunks SET frame = ?3 WHERE part_id = ?1 AND seq = ?2";
    assert_eq!(c.execute(u, (id, seq as i64, frame)).unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_source_parts_are_reported_and_not_copied() {
    let dir = tempfile::tempdir().unwrap();
    let source = SqliteOutputStore::open(dir.path().join("source.db"), BASE).unwrap();
    let key = |ty: &str| key("job-d", ty, 0, 1);
    let mut gen = Generator::new(5);
    let mut parts: Contents = HashMap::new();
    for ty in ["Patient", "Encounter", "Condition", "Procedure"] {
        parts.insert(key(ty), gen.ndjson(ty, 150));
    }
    parts.insert(key("Binary"), noise_ndjson(2, MIRROR_BATCH_BYTES * 3 / 2));
    for (k, data) in &parts {
        put(&source, k, data).await;
    }
    let damaged = dir.path().join("damaged.db");
    source
        .backup_to(&damaged, &BackupOptions::default())
        .await
        .unwrap();
    tamper(
        &damaged,
        "DROP TRIGGER chunks_of_finished_parts_are_immutable;
         DROP TRIGGER parts_finished_are_immutable;",
    );
    // Condition: its only frame replaced by garbage of the same length.
    damage_frame(&damaged, part_id(&damaged, &key("Condition")), 0, |f| {
        f.fill(0x5a)
    });
    // Binary: bytes flipped in its last frame, past the first batch.
    let binary = source.part_info(&key("Binary")).await.unwrap();
    assert!(binary.stored_bytes > (MIRROR_BATCH_BYTES + (1 << 20)) as u64);
    let last = binary.chunk_count - 1;
    damage_frame(&damaged, part_id(&damaged, &key("Binary")), last, |f| {
        let mid = f.len() / 2;
        f[mid..mid + 16].iter_mut().for_each(|b| *b ^= 0xff);
    });
    // Procedure: its recorded digest changed.
    let id = part_id(&damaged, &key("Procedure"));
    tamper(
        &damaged,
        &format!("UPDATE parts SET digest = '{:032}' WHERE id = {id}", 0),
    );
    let bad = ["Binary", "Condition", "Procedure"];

    let replica = SqliteOutputStore::open(dir.path().join("replica.db"), BASE).unwrap();
    // A later pass tries the damaged parts again, and refuses them again.
    for pass in 0..2 {
        let report = replica.mirror_from(&damaged).await.unwrap();
        let want = (5, (2 - 2 * pass, 0, 2 * pass));
        assert_eq!((report.source_parts, counts(&report)), want, "{report:?}");
        let mut problems = report.problems.clone();
        problems.sort_by(|a, b| a.part.cmp(&b.part));
        let named: Vec<_> = problems.iter().map(|p| p.part.clone().unwrap()).collect();
        let want: Vec<_> = bad.iter().map(|t| key(t).display().to_string()).collect();
        assert_eq!(named, want, "pass {pass}: {problems:?}");
        let corrupt = problems.iter().all(|p| p.kind == ErrorKind::Corrupt);
        assert!(corrupt, "{problems:?}");
        let (binary, condition, procedure) = (&problems[0], &problems[1], &problems[2]);
        assert!(condition.message.starts_with("chunk 0:"), "{condition}");
        let tail = binary.message.starts_with(&format!("chunk {last}:"));
        assert!(tail || binary.message.contains("digest"), "{binary}");
        assert!(procedure.message.contains("digest"), "{procedure}");
    }
    for ty in bad {
        assert_absent(&replica, &key(ty)).await;
    }
    // Not even a staged copy of Binary's first batch is left.
    let all = listing(&replica, &PartFilter::all()).await;
    let held: Vec<_> = all.iter().map(|p| (p.key.clone(), p.finished)).collect();
    assert_eq!(held, [(key("Encounter"), true), (key("Patient"), true)]);
    for ty in ["Encounter", "Patient"] {
        assert!(read_all(&replica, &key(ty)).await.unwrap() == parts[&key(ty)]);
    }
    assert!(replica.verify().await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_sources_fail_the_pass_and_leave_the_replica_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (source, replica, _) = mirrored(d, StoreOptions::default()).await;
    // Every pass below would delete all of these if it went on.
    let before = listing(&replica, &PartFilter::all()).await;
    assert!(!before.is_empty());

    std::fs::create_dir(d.join("folder")).unwrap();
    std::fs::write(d.join("empty.db"), b"").unwrap();
    std::fs::write(d.join("text.db"), "not a database\n".repeat(500)).unwrap();
    tamper(
        &d.join("plain.db"),
        "CREATE TABLE t(x); INSERT INTO t VALUES (1);",
    );
    let newer = d.join("newer.db");
    source
        .backup_to(&newer, &BackupOptions::default())
        .await
        .unwrap();
    tamper(&newer, "PRAGMA user_version = 999;");
    tamper(
        &d.join("older.db"),
        &format!("{} PRAGMA user_version = 1;", MIGRATIONS[0].1),
    );
    std::os::unix::fs::symlink(replica.path(), d.join("link.db")).unwrap();
    std::fs::hard_link(replica.path(), d.join("hard.db")).unwrap();
    use ErrorKind::{Internal, InvalidInput as Invalid, NotFound};
    let cases = [
        ("missing.db", NotFound, "no database file"),
        ("folder", Invalid, "folder"),
        ("empty.db", Invalid, "empty"),
        ("text.db", Internal, "not a SQLite database"),
        ("plain.db", Invalid, "not a store"),
        ("newer.db", Invalid, "schema version 999, newer"),
        ("older.db", Invalid, "schema version 1, older"),
        ("replica.db", Invalid, "own file"),
        ("link.db", Invalid, "own file"),
        ("hard.db", Invalid, "own file"),
    ];
    for (name, kind, words) in cases {
        let path = d.join(name);
        let bytes = std::fs::read(&path).ok();
        let e = replica.mirror_from(&path).await.unwrap_err();
        assert_eq!(e.kind(), kind, "{name}: {e}");
        assert!(e.message().contains(words), "{name}: {e}");
        assert_eq!(std::fs::read(&path).ok(), bytes, "{name}: the file changed");
        let now = listing(&replica, &PartFilter::all()).await;
        assert_eq!(now, before, "{name}: the replica changed");
    }
    assert!(!d.join("missing.db").exists(), "a source was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_replica_refuses_to_mirror_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (source, replica, _) = mirrored(dir.path(), StoreOptions::default()).await;
    let path = replica.path().to_path_buf();
    drop(replica);
    // A pass would now remove job a and add a part.
    delete_job(&source, "job-a").await;
    let new = key("job-c", "Patient", 0, 1);
    put(&source, &new, &Generator::new(1).ndjson("Patient", 2)).await;

    let file = std::fs::read(&path).unwrap();
    let replica = SqliteOutputStore::open_read_only(&path, BASE).unwrap();
    let before = listing(&replica, &PartFilter::all()).await;
    let e = replica.mirror_from(source.path()).await.unwrap_err();
    assert!(e.is_internal() && e.message().contains("read-only"), "{e}");
    assert_eq!(listing(&replica, &PartFilter::all()).await, before);
    assert_absent(&replica, &new).await;
    drop(replica);
    assert!(std::fs::read(&path).unwrap() == file, "the file changed");
}

type Versions = Arc<Mutex<HashMap<ExportPartKey, Vec<Vec<u8>>>>>;

/// Records `data` as a version of `key`, then writes and finalizes it.
async fn put_logged(store: &SqliteOutputStore, log: &Versions, key: &ExportPartKey, data: Vec<u8>) {
    log.lock()
        .unwrap()
        .entry(key.clone())
        .or_default()
        .push(data.clone());
    put(store, key, &data).await;
}

/// Reads every finished part of `replica`; each must be a version written
/// for its key. Parts deleted meanwhile are skipped. Returns parts read.
async fn check_replica(replica: &SqliteOutputStore, log: &Versions) -> usize {
    let mut read = 0;
    for p in listing(replica, &PartFilter::all().finished_only()).await {
        match read_all(replica, &p.key).await {
            Ok(data) => {
                let known = log.lock().unwrap()[&p.key].contains(&data);
                assert!(known, "{}: content never written", p.key.display());
                read += 1;
            }
            Err(e) => assert!(e.is_not_found(), "{}: {e}", p.key.display()),
        }
    }
    read
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_while_the_source_is_written_serve_only_written_content() {
    let dir = tempfile::tempdir().unwrap();
    let src_path = dir.path().join("source.db");
    let options = StoreOptions::default().with_chunk_size(16 * 1024);
    let writer = SqliteOutputStore::open_with(&src_path, BASE, options).unwrap();
    let replica = SqliteOutputStore::open(dir.path().join("replica.db"), BASE).unwrap();
    let written = Versions::default();
    let stop = Arc::new(AtomicBool::new(false));

    // New parts, parts finalized again with other bytes, older jobs deleted.
    let (w, log) = (writer.clone(), written.clone());
    let writing = tokio::spawn(async move {
        let mut gen = Generator::new(11);
        for i in 0..60_u32 {
            let (job, n) = (format!("job-{}", i / 6), i % 6);
            let data = gen.ndjson_of_size(2_000 + (i as usize * 7_919) % 120_000);
            put_logged(&w, &log, &key(&job, "Observation", n, 1), data).await;
            if n == 5 {
                let data = gen.ndjson_of_size(30_000);
                put_logged(&w, &log, &key(&job, "Observation", 0, 1), data).await;
                if i / 6 % 3 == 2 {
                    delete_job(&w, &format!("job-{}", i / 6 - 2)).await;
                }
            }
        }
    });
    // A reader of the replica meanwhile: a part reads whole or not at all.
    let (r, log, halt) = (replica.clone(), written.clone(), stop.clone());
    let reading = tokio::spawn(async move {
        let mut reads = 0;
        while !halt.load(Ordering::SeqCst) {
            reads += check_replica(&r, &log).await;
            tokio::task::yield_now().await;
        }
        reads
    });

    let mut passes = 0;
    while !writing.is_finished() {
        let report = replica.mirror_from(&src_path).await.unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        passes += 1;
        let listed = finished(&replica).await.len();
        assert_eq!(check_replica(&replica, &written).await, listed);
    }
    writing.await.unwrap();
    assert_clean(&replica.mirror_from(&src_path).await.unwrap());
    stop.store(true, Ordering::SeqCst);
    let reads = reading.await.unwrap();
    assert!(passes >= 2 && reads > 0, "passes {passes}, reads {reads}");

    let live = listing(&writer, &PartFilter::all().finished_only()).await;
    let latest: Contents = {
        let log = written.lock().unwrap();
        let last = |k: &ExportPartKey| log[k].last().unwrap().clone();
        live.iter().map(|p| (p.key.clone(), last(&p.key))).collect()
    };
    assert!(latest.len() >= 30, "{} parts left", latest.len());
    assert_mirrors(&replica, &writer, &latest).await;
    let again = replica.mirror_from(&src_path).await.unwrap();
    assert!(!again.changed(), "{again:?}");
    println!("{passes} passes while writing, {reads} reads of the replica meanwhile");
}
