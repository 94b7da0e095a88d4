//! Behaviour specific to the SQLite store: the file, URLs, part facts, and
//! the real Synthea export round-tripping through it.

use std::time::Duration;

use tokio::io::AsyncWriteExt;

mod faultkit;

use sqlite_export_store::__test_support::sample;
use sqlite_export_store::testkit::conformance::read_all;
use sqlite_export_store::{
    DigestAlgorithm, ExportJobId, ExportOutputStore, ExportPartKey, SqliteOutputStore, StoreOptions,
};

/// One file of the Synthea sample vendored in the repository.
fn synthea(file: &str) -> Vec<u8> {
    sample::synthea_file(file).unwrap_or_else(|e| panic!("{e}"))
}

/// Asserts that a part of `bytes` written with the default 1 MiB chunks
/// has one chunk per started MiB, or one more: at finalize the last chunk
/// is cut in two when more than 256 KiB of it was still to compress, or
/// the one before gives its waiting pieces to the last (lines arrived
/// faster than one chunk worker compresses them), which moves a boundary
/// and adds no chunk.
fn assert_default_chunks(chunks: u64, bytes: usize, what: &str) {
    let whole = (bytes as u64).div_ceil(1 << 20);
    assert!(
        chunks == whole || chunks == whole + 1,
        "{what}: {chunks} chunks for {bytes} bytes"
    );
}

/// The plain hash of `bytes` by an implementation of `algorithm` other than
/// the store's path: what `b3sum` or `xxhsum -H2` prints.
fn reference_digest(algorithm: DigestAlgorithm, bytes: &[u8]) -> String {
    match algorithm {
        DigestAlgorithm::Blake3 => blake3::hash(bytes).to_hex().to_string(),
        DigestAlgorithm::Xxh3_128 => faultkit::digest_hex(bytes),
        other => panic!("no reference for {other}"),
    }
}

async fn put(store: &SqliteOutputStore, key: &ExportPartKey, data: &[u8]) {
    let mut w = store.open_writer(key).await.unwrap();
    for line in data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        w.write_line(std::str::from_utf8(line).unwrap())
            .await
            .unwrap();
    }
    store.finalize_part(key, w).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn synthea_export_round_trips_file_by_file() {
    let store = SqliteOutputStore::temporary("http://127.0.0.1:8080").unwrap();
    let job = ExportJobId::new();
    let (mut raw, mut stored, mut files) = (0u64, 0u64, 0);
    for file in sample::synthea().unwrap_or_else(|e| panic!("{e}")) {
        let (data, ty) = (file.ndjson, file.resource_type);
        let key = ExportPartKey::output("default", job.clone(), ty.clone(), 0, 1);
        put(&store, &key, &data).await;
        let back = read_all(&store, &key).await.unwrap();
        assert!(back == data, "{ty}: bytes differ after the round trip");
        let info = store.part_info(&key).await.unwrap();
        assert_eq!(info.size_bytes, data.len() as u64, "{ty}");
        assert_eq!(
            info.line_count,
            data.iter().filter(|b| **b == b'\n').count() as u64,
            "{ty}"
        );
        let want = reference_digest(DigestAlgorithm::Xxh3_128, &data);
        assert_eq!(
            (info.digest.as_str(), info.digest_algorithm),
            (want.as_str(), DigestAlgorithm::Xxh3_128),
            "{ty}: digest is the XXH3-128 of the NDJSON (what xxhsum -H2 prints)"
        );
        assert_default_chunks(info.chunk_count, data.len(), &ty);
        raw += info.size_bytes;
        stored += info.stored_bytes;
        files += 1;
    }
    assert_eq!(files, 13, "every resource file of the sample");
    let ratio = raw as f64 / stored as f64;
    println!(
        "synthea: {files} files, {raw} bytes of NDJSON stored in {stored} bytes ({ratio:.1}x)"
    );
    assert!(
        ratio >= 12.0,
        "compression ratio {ratio:.1} below 12x on the Synthea sample"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_written_at_once_read_back_whole_at_every_size() {
    // As HFS's export worker writes a batch: every line at once, then
    // `finalize_part`, so that the finalize finds chunks still being
    // compressed and redistributes what is left among the chunk workers.
    // Sizes around the chunk size and its multiples, and far from them.
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteOutputStore::open(dir.path().join("s.db"), "http://h").unwrap();
    let corpus = synthea("Encounter.000.ndjson");
    let lines: Vec<&str> = std::str::from_utf8(&corpus)
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty())
        .collect();
    let sizes = [
        (1 << 20) - 100,
        (1 << 20) + 1_000,
        1_100_000,
        1_350_000,
        1_800_000,
        (2 << 20) + 5_000,
        2_900_000,
        4_500_000,
    ];
    // Which chunks a finalize finds still being compressed depends on
    // timing: each size is written several times.
    let rounds = 6;
    for (i, size) in (0..rounds).flat_map(|_| sizes).enumerate() {
        // The lines are made before the writer is opened, as HFS makes a
        // batch: the first that reach `size` bytes, newlines included.
        let mut made: Vec<String> = Vec::new();
        let mut bytes = 0;
        for line in lines.iter().cycle() {
            if bytes >= size {
                break;
            }
            bytes += line.len() + 1;
            made.push(line.to_string());
        }
        let want: Vec<u8> = made
            .iter()
            .flat_map(|l| [l.as_bytes(), b"\n"].concat())
            .collect();
        let key = ExportPartKey::output("t", ExportJobId::from("j"), "Observation", i as u32, 1);
        let mut w = store.open_writer(&key).await.unwrap();
        for line in &made {
            w.write_line(line).await.unwrap();
        }
        store.finalize_part(&key, w).await.unwrap();
        assert!(
            read_all(&store, &key).await.unwrap() == want,
            "a part of {} bytes read back differently",
            want.len()
        );
        let info = store.part_info(&key).await.unwrap();
        assert_eq!(info.size_bytes, want.len() as u64);
        assert_default_chunks(info.chunk_count, want.len(), "written at once");
    }
    let report = store.verify().await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.parts_checked, (rounds * sizes.len()) as u64);
}

#[tokio::test(flavor = "multi_thread")]
async fn reopening_the_file_keeps_finished_parts_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let key = ExportPartKey::output("t", ExportJobId::new(), "Patient", 0, 4);
    let staged = ExportPartKey::output("t", key.job_id.clone(), "Patient", 1, 4);
    {
        let store = SqliteOutputStore::open(&path, "http://h").unwrap();
        put(&store, &key, b"{\"a\":1}\n{\"b\":2}\n").await;
        let mut w = store.open_writer(&staged).await.unwrap();
        w.write_line("{\"staged\":true}").await.unwrap();
        std::mem::forget(w); // a writer that never finishes nor cleans up
    }
    let store = SqliteOutputStore::open(&path, "http://h").unwrap();
    assert_eq!(
        read_all(&store, &key).await.unwrap(),
        b"{\"a\":1}\n{\"b\":2}\n"
    );
    assert!(read_all(&store, &staged).await.unwrap_err().is_not_found());
    let info = store.part_info(&key).await.unwrap();
    assert_eq!(
        (info.line_count, info.size_bytes, info.fencing_token),
        (2, 16, 4)
    );
}

#[tokio::test]
async fn urls_follow_the_hfs_route() {
    let store = SqliteOutputStore::temporary("https://fhir.example.org/r4/").unwrap();
    let key = ExportPartKey::output("t", ExportJobId::from("job-1"), "Patient", 12, 1);
    let u = store
        .download_url(&key, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        u.url,
        "https://fhir.example.org/r4/export-file/job-1/Patient-12"
    );
    assert!(u.requires_access_token);
    let open = store.clone().with_access_token_required(false);
    assert!(
        !open
            .download_url(&key, Duration::ZERO)
            .await
            .unwrap()
            .requires_access_token
    );
    // The flag is per handle: the original still requires a token.
    assert!(
        store
            .download_url(&key, Duration::ZERO)
            .await
            .unwrap()
            .requires_access_token
    );
    let opts = StoreOptions::default().with_access_token_required(false);
    let s2 = SqliteOutputStore::temporary_with("http://h", opts).unwrap();
    assert!(
        !s2.download_url(&key, Duration::ZERO)
            .await
            .unwrap()
            .requires_access_token
    );
}

#[tokio::test]
async fn signed_urls_carry_expiry_and_signature() {
    let opts = StoreOptions::default().with_signing_key(b"a very secret signing key".to_vec());
    let store = SqliteOutputStore::temporary_with("http://h", opts).unwrap();
    let key = ExportPartKey::output("t", ExportJobId::from("j"), "Patient", 0, 1);
    let u = store
        .download_url(&key, Duration::from_secs(3600))
        .await
        .unwrap();
    assert!(!u.requires_access_token);
    let (path, query) = u
        .url
        .strip_prefix("http://h")
        .unwrap()
        .split_once('?')
        .unwrap();
    assert_eq!(path, "/export-file/j/Patient-0");
    let expires: u64 = query
        .split('&')
        .next()
        .unwrap()
        .strip_prefix("expires=")
        .unwrap()
        .parse()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        (now + 3590..=now + 3610).contains(&expires),
        "expiry honours the ttl"
    );
    let sig = query.split("signature=").nth(1).unwrap();
    sqlite_export_store::__test_support::url::verify(
        b"a very secret signing key",
        "GET",
        "t",
        path,
        expires,
        sig,
        now,
    )
    .unwrap();
}

#[tokio::test]
async fn bad_options_and_base_urls_are_invalid_input() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.db");
    for opts in [
        StoreOptions::default().with_chunk_size(0),
        StoreOptions::default().with_compression_level(99),
        StoreOptions::default().with_pool_size(0),
    ] {
        let e = SqliteOutputStore::open_with(&p, "http://h", opts).unwrap_err();
        assert!(e.is_invalid_input(), "{e}");
    }
    let e = SqliteOutputStore::open(&p, "not a url").unwrap_err();
    assert!(e.is_invalid_input(), "{e}");
    assert!(!p.exists(), "nothing is created for invalid options");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_temporary_store_is_removed_with_its_last_clone() {
    let store = SqliteOutputStore::temporary("http://h").unwrap();
    let path = store.path().to_path_buf();
    let key = ExportPartKey::output("t", ExportJobId::new(), "Patient", 0, 1);
    put(&store, &key, b"{}\n").await;
    let clone = store.clone();
    drop(store);
    assert!(path.exists(), "a clone keeps the file");
    assert_eq!(read_all(&clone, &key).await.unwrap(), b"{}\n");
    drop(clone);
    assert!(
        !path.exists() && !path.parent().unwrap().exists(),
        "the file and its folder are gone"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn finished_parts_report_their_facts() {
    let store = SqliteOutputStore::temporary_with(
        "http://h",
        StoreOptions::default().with_chunk_size(1000),
    )
    .unwrap();
    let key = ExportPartKey::error("t", ExportJobId::new(), "OperationOutcome", 0, 1);
    let line = format!(
        "{{\"resourceType\":\"OperationOutcome\",\"issue\":[{}]}}",
        "{\"severity\":\"error\"},".repeat(20).trim_end_matches(',')
    );
    let data = format!("{line}\n").repeat(30);
    put(&store, &key, data.as_bytes()).await;
    let info = store.part_info(&key).await.unwrap();
    assert_eq!(info.size_bytes, data.len() as u64);
    assert_eq!(info.line_count, 30);
    assert_eq!(info.chunk_count, (data.len() as u64).div_ceil(1000));
    assert!(info.stored_bytes > 0 && info.stored_bytes < info.size_bytes);
    let age = std::time::SystemTime::now()
        .duration_since(info.finalized_at)
        .unwrap();
    assert!(age < Duration::from_secs(60));
    let staged = ExportPartKey::error("t", key.job_id.clone(), "OperationOutcome", 1, 1);
    assert!(store.part_info(&staged).await.unwrap_err().is_not_found());
    let latest = store
        .latest_in_slot(&ExportPartKey {
            fencing_token: 0,
            ..key.clone()
        })
        .await
        .unwrap();
    assert_eq!(latest, info);
}

/// A database written under schema 1, whose finished parts carry SHA-256
/// digests: built here as that version laid it out (its migration, then
/// rows as its writer stored them), with the crate's own codec for frames.
fn schema_1_file(path: &std::path::Path, parts: &[(&str, &[u8], &str)]) {
    use sqlite_export_store::__test_support::{codec, schema};
    let c = rusqlite::Connection::open(path).unwrap();
    c.execute_batch("PRAGMA journal_mode = WAL;").unwrap();
    c.execute_batch(schema::MIGRATIONS[0].1).unwrap();
    c.pragma_update(None, "user_version", 1).unwrap();
    for (ty, data, digest) in parts {
        c.execute(
            "INSERT INTO parts (tenant_id, job_id, file_type, resource_type, part_index,
                 fencing_token, created_at_ms) VALUES ('default', 'old-job', 'output', ?1, 0,
                 1 - 9223372036854775807 - 1, 1)",
            [ty],
        )
        .unwrap();
        let id = c.last_insert_rowid();
        let (mut stored, mut count) = (0, 0);
        for (seq, chunk) in data.chunks(4096).enumerate() {
            let frame = codec::compress(chunk, 3).unwrap();
            stored += frame.len();
            count += 1;
            c.execute(
                "INSERT INTO chunks (part_id, seq, raw_offset, raw_len, frame)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                rusqlite::params![id, seq, seq * 4096, chunk.len(), frame],
            )
            .unwrap();
        }
        c.execute(
            "UPDATE parts SET finalized = 1, finalized_at_ms = 2, line_count = ?2,
                 byte_count = ?3, stored_bytes = ?4, chunk_count = ?5, digest = ?6 WHERE id = ?1",
            rusqlite::params![
                id,
                data.iter().filter(|b| **b == b'\n').count(),
                data.len(),
                stored,
                count,
                digest
            ],
        )
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn parts_finished_under_schema_1_keep_and_check_their_sha256_digests() {
    use sha2::{Digest, Sha256};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("old.db");
    let data = synthea("Condition.000.ndjson");
    let good = Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    // The same bytes under a digest that is not theirs.
    let bad = good.replace(&good[..2], if &good[..2] == "00" { "11" } else { "00" });
    schema_1_file(
        &db,
        &[("Condition", &data, &good), ("Damaged", &data, &bad)],
    );

    let store = SqliteOutputStore::open(&db, "http://127.0.0.1:8080").unwrap();
    let key =
        |ty: &str| ExportPartKey::output("default", ExportJobId::from_string("old-job"), ty, 0, 1);
    let info = store.part_info(&key("Condition")).await.unwrap();
    assert_eq!(
        (info.digest.as_str(), info.digest_algorithm),
        (good.as_str(), DigestAlgorithm::Sha256)
    );
    assert!(read_all(&store, &key("Condition")).await.unwrap() == data);
    let e = read_all(&store, &key("Damaged")).await.unwrap_err();
    assert!(e.to_string().contains("SHA-256"), "{e}");
    let report = store.verify().await.unwrap();
    assert_eq!(report.parts_checked, 1, "the intact part");
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    let problem = &report.problems[0];
    assert!(
        problem.part.as_deref().unwrap().contains("Damaged"),
        "{problem:?}"
    );
    assert!(problem.message.contains("SHA-256"), "{problem:?}");

    // New parts in the migrated file carry XXH3-128.
    let fresh = ExportPartKey::output("default", ExportJobId::new(), "Condition", 0, 1);
    put(&store, &fresh, &data).await;
    let info = store.part_info(&fresh).await.unwrap();
    assert_eq!(info.digest_algorithm, DigestAlgorithm::Xxh3_128);
    assert_eq!(
        info.digest,
        reference_digest(DigestAlgorithm::Xxh3_128, &data)
    );
    assert!(read_all(&store, &fresh).await.unwrap() == data);
}

/// A store opened with BLAKE3 records BLAKE3 (what `b3sum` prints), one
/// opened with the default records XXH3-128, on the same file; every part
/// reads back and verifies with its own algorithm, whoever reads it, and a
/// damaged part of either kind is named with its algorithm.
#[tokio::test]
async fn parts_keep_the_digest_they_were_written_with() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("mixed.db");
    // Three chunks and a piece: BLAKE3 parts are hashed chunk by chunk.
    let mut data = Vec::new();
    for i in 0.. {
        if data.len() > 3 * (1 << 20) + 12_345 {
            break;
        }
        let line = format!(
            r#"{{"resourceType":"Patient","id":"p{i}","n":{}}}"#,
            i * 7919 % 1013
        );
        data.extend_from_slice(line.as_bytes());
        data.push(b'\n');
    }
    let job = ExportJobId::new();
    let key = |ty: &str| ExportPartKey::output("default", job.clone(), ty, 0, 1);
    let blake3_store = |chunk_size: usize| {
        let options = StoreOptions::default()
            .with_digest(DigestAlgorithm::Blake3)
            .with_chunk_size(chunk_size);
        SqliteOutputStore::open_with(&db, "http://127.0.0.1:8080", options).unwrap()
    };
    let blake = blake3_store(1 << 20);
    put(&blake, &key("Patient"), &data).await;
    // A part of one short chunk, and an empty part, are hashed in order.
    let end = data[..50_000].iter().rposition(|b| *b == b'\n').unwrap() + 1;
    let small = &data[..end];
    put(&blake, &key("Encounter"), small).await;
    put(&blake, &key("Claim"), b"").await;
    let chunked = blake3_store(1_000_000);
    put(&chunked, &key("Condition"), &data).await;
    // 3 KiB chunks: not a subtree's size, though some of them start where
    // a subtree of 4 KiB could; hashed in order all the same.
    let odd = blake3_store(3072);
    let cut = data[..200_000].iter().rposition(|b| *b == b'\n').unwrap() + 1;
    let procedure = &data[..cut];
    put(&odd, &key("Procedure"), procedure).await;
    drop((blake, chunked, odd));
    let store = SqliteOutputStore::open(&db, "http://127.0.0.1:8080").unwrap();
    put(&store, &key("Observation"), &data).await;

    let b3 = reference_digest(DigestAlgorithm::Blake3, &data);
    let xxh = reference_digest(DigestAlgorithm::Xxh3_128, &data);
    for (ty, algorithm, want) in [
        ("Patient", DigestAlgorithm::Blake3, &b3),
        ("Condition", DigestAlgorithm::Blake3, &b3),
        ("Observation", DigestAlgorithm::Xxh3_128, &xxh),
    ] {
        let info = store.part_info(&key(ty)).await.unwrap();
        assert_eq!(
            (info.digest_algorithm, info.digest.as_str()),
            (algorithm, want.as_str()),
            "{ty}"
        );
        assert!(read_all(&store, &key(ty)).await.unwrap() == data, "{ty}");
    }
    for (ty, bytes) in [
        ("Encounter", small),
        ("Claim", &b""[..]),
        ("Procedure", procedure),
    ] {
        let info = store.part_info(&key(ty)).await.unwrap();
        assert_eq!(
            (info.digest_algorithm, info.digest),
            (
                DigestAlgorithm::Blake3,
                reference_digest(DigestAlgorithm::Blake3, bytes)
            ),
            "{ty}"
        );
        assert!(read_all(&store, &key(ty)).await.unwrap() == bytes, "{ty}");
    }
    let report = store.verify().await.unwrap();
    assert_eq!(report.parts_checked, 6);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    drop(store);

    // The same bytes under a digest that is not theirs, for one part of
    // each kind: named as a mismatch of that algorithm, on read and verify.
    faultkit::with_triggers_lifted(&db, |c| {
        for (ty, wrong) in [("Patient", "0".repeat(64)), ("Observation", "0".repeat(32))] {
            assert!(wrong != b3 && wrong != xxh);
            let n = c
                .execute(
                    "UPDATE parts SET digest = ?1 WHERE resource_type = ?2",
                    [wrong.as_str(), ty],
                )
                .unwrap();
            assert_eq!(n, 1);
        }
    });
    let store = SqliteOutputStore::open(&db, "http://127.0.0.1:8080").unwrap();
    for (ty, label) in [("Patient", "BLAKE3"), ("Observation", "XXH3-128")] {
        let e = read_all(&store, &key(ty)).await.unwrap_err();
        assert!(e.to_string().contains(label), "{ty}: {e}");
    }
    let report = store.verify().await.unwrap();
    assert_eq!(report.parts_checked, 4);
    assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
}

/// A writer of `key` holding `lines` small resources, not finalized.
async fn staged(
    store: &SqliteOutputStore,
    key: &ExportPartKey,
    lines: usize,
) -> sqlite_export_store::ExportPartWriter {
    let mut w = store.open_writer(key).await.unwrap();
    for i in 0..lines {
        w.write_line(&format!(
            r#"{{"resourceType":"{}","id":"r{i}"}}"#,
            key.resource_type
        ))
        .await
        .unwrap();
    }
    w
}

async fn finished_of(store: &SqliteOutputStore, job: &str) -> Vec<(String, bool)> {
    store
        .list_parts(&sqlite_export_store::PartFilter::all().job(ExportJobId::from(job)))
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.key.display().to_string(), p.finished))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn finalize_parts_publishes_all_or_nothing() {
    let store = SqliteOutputStore::temporary("http://127.0.0.1:8080").unwrap();
    let k = |ty: &str, i: u32, t: u64| {
        ExportPartKey::output("default", ExportJobId::from("j"), ty, i, t)
    };

    // Three parts of two jobs at once.
    let other = ExportPartKey::output("default", ExportJobId::from("other"), "Patient", 0, 1);
    let parts = vec![
        (
            k("Patient", 0, 1),
            staged(&store, &k("Patient", 0, 1), 3).await,
        ),
        (
            k("Patient", 1, 1),
            staged(&store, &k("Patient", 1, 1), 2).await,
        ),
        (other.clone(), staged(&store, &other, 1).await),
    ];
    let done = store.finalize_parts(parts).await.unwrap();
    assert_eq!(
        done.iter().map(|p| p.line_count).collect::<Vec<_>>(),
        [3, 2, 1]
    );
    assert_eq!(
        read_all(&store, &k("Patient", 1, 1)).await.unwrap(),
        b"{\"resourceType\":\"Patient\",\"id\":\"r0\"}\n{\"resourceType\":\"Patient\",\"id\":\"r1\"}\n"
    );

    // One part fenced out (its slot holds token 5): none is published.
    // (The stale writer opened before the newer claim finalized.)
    let stale = staged(&store, &k("Encounter", 0, 4), 1).await;
    let live = staged(&store, &k("Encounter", 0, 5), 1).await;
    store
        .finalize_part(&k("Encounter", 0, 5), live)
        .await
        .unwrap();
    let parts = vec![
        (
            k("Encounter", 2, 1),
            staged(&store, &k("Encounter", 2, 1), 4).await,
        ),
        (k("Encounter", 0, 4), stale),
    ];
    let e = store.finalize_parts(parts).await.unwrap_err();
    assert!(e.is_conflict(), "{e}");
    assert!(e.to_string().contains("Encounter-0"), "names the part: {e}");
    assert!(store
        .part_info(&k("Encounter", 2, 1))
        .await
        .unwrap_err()
        .is_not_found());
    // Refused before any I/O: nothing, the same key twice.
    assert!(store
        .finalize_parts(vec![])
        .await
        .unwrap_err()
        .is_invalid_input());
    let twice = vec![
        (
            k("Device", 0, 1),
            staged(&store, &k("Device", 0, 1), 1).await,
        ),
        (
            k("Device", 0, 1),
            staged(&store, &k("Device", 1, 1), 1).await,
        ),
    ];
    assert!(store
        .finalize_parts(twice)
        .await
        .unwrap_err()
        .is_invalid_input());
    assert!(store
        .part_info(&k("Device", 1, 1))
        .await
        .unwrap_err()
        .is_not_found());
    // The writers of failed calls are dropped with their staging.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let staged_left: Vec<_> = finished_of(&store, "j")
        .await
        .into_iter()
        .filter(|(_, f)| !f)
        .collect();
    assert_eq!(staged_left, vec![]);
}

#[tokio::test(flavor = "multi_thread")]
async fn finalize_new_job_refuses_to_join_a_job_that_has_parts() {
    let store = SqliteOutputStore::temporary("http://127.0.0.1:8080").unwrap();
    let k = |job: &str, i: u32| {
        ExportPartKey::output("default", ExportJobId::from(job), "Patient", i, 1)
    };
    let parts = vec![
        (k("new", 0), staged(&store, &k("new", 0), 2).await),
        (k("new", 1), staged(&store, &k("new", 1), 2).await),
    ];
    assert_eq!(store.finalize_new_job(parts).await.unwrap().len(), 2);

    // The job exists now: another batch of it is a conflict, even of
    // other part indexes, and publishes nothing.
    let parts = vec![(k("new", 2), staged(&store, &k("new", 2), 1).await)];
    let e = store.finalize_new_job(parts).await.unwrap_err();
    assert!(e.is_conflict(), "{e}");
    assert!(store
        .part_info(&k("new", 2))
        .await
        .unwrap_err()
        .is_not_found());
    // So is a job another writer is staging.
    let _busy = staged(&store, &k("busy", 9), 1).await;
    let parts = vec![(k("busy", 0), staged(&store, &k("busy", 0), 1).await)];
    assert!(store
        .finalize_new_job(parts)
        .await
        .unwrap_err()
        .is_conflict());
    // Parts of two jobs are invalid input.
    let parts = vec![
        (k("a", 0), staged(&store, &k("a", 0), 1).await),
        (k("b", 0), staged(&store, &k("b", 0), 1).await),
    ];
    assert!(store
        .finalize_new_job(parts)
        .await
        .unwrap_err()
        .is_invalid_input());
    assert_eq!(finished_of(&store, "new").await.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_to_copies_finished_parts_only_and_refuses_to_overwrite() {
    use sqlite_export_store::BackupOptions;
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteOutputStore::open(dir.path().join("s.db"), "http://127.0.0.1:8080").unwrap();
    let k = |i: u32| ExportPartKey::output("default", ExportJobId::from("j"), "Patient", i, 1);
    let data = synthea("Patient.000.ndjson");
    put(&store, &k(0), &data).await;
    let _writer = staged(&store, &k(1), 5).await;
    let dest = dir.path().join("copy.db");
    let report = store
        .backup_to(&dest, &BackupOptions::default().with_pages_per_step(2))
        .await
        .unwrap();
    assert_eq!(report.staged_parts_dropped, 1);
    assert_eq!(report.verify.parts_checked, 1);
    assert!(report.steps > 1);
    assert_eq!(report.file_bytes, std::fs::metadata(&dest).unwrap().len());
    let e = store
        .backup_to(&dest, &BackupOptions::default())
        .await
        .unwrap_err();
    assert!(e.is_conflict(), "{e}");
    let e = store
        .backup_to(store.path(), &BackupOptions::default().with_overwrite(true))
        .await
        .unwrap_err();
    assert!(e.is_invalid_input(), "{e}");
    let copy = SqliteOutputStore::open(&dest, "http://127.0.0.1:8080").unwrap();
    assert!(read_all(&copy, &k(0)).await.unwrap() == data);
    assert!(copy.part_info(&k(1)).await.unwrap_err().is_not_found());
    assert_eq!(finished_of(&copy, "j").await.len(), 1);
}

/// Whatever the chunk size and the part's length, the recorded digest is
/// the plain hash of the NDJSON (BLAKE3 as `b3sum` prints it, XXH3-128 as
/// `xxhsum -H2` prints it): chunk sizes that are BLAKE3 subtrees and sizes
/// that are not, parts shorter than a chunk, of whole chunks, and between.
#[tokio::test]
async fn every_chunk_size_gives_the_plain_digest() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sizes.db");
    // Lines of 31 bytes with their newline: part lengths land anywhere.
    let line = |i: usize| format!(r#"{{"resourceType":"P","id":"{i:05}"}}"#);
    let job = ExportJobId::new();
    let mut n = 0;
    for chunk in [1000, 1024, 3072, 4096, 6144, 8192] {
        for algorithm in [DigestAlgorithm::Blake3, DigestAlgorithm::Xxh3_128] {
            let store = SqliteOutputStore::open_with(
                &db,
                "http://127.0.0.1:8080",
                StoreOptions::default()
                    .with_chunk_size(chunk)
                    .with_digest(algorithm),
            )
            .unwrap();
            for lines in [0, 1, 33, 34, 66, 67, 132, 133, 270, 1000] {
                let mut data = Vec::new();
                for i in 0..lines {
                    data.extend_from_slice(line(i).as_bytes());
                    data.push(b'\n');
                }
                let key = ExportPartKey::output("default", job.clone(), "P", n, 1);
                n += 1;
                put(&store, &key, &data).await;
                let want = reference_digest(algorithm, &data);
                let info = store.part_info(&key).await.unwrap();
                assert_eq!(
                    (info.digest_algorithm, info.digest.as_str()),
                    (algorithm, want.as_str()),
                    "{algorithm} with chunks of {chunk}, {} bytes",
                    data.len()
                );
                assert!(read_all(&store, &key).await.unwrap() == data);
            }
        }
    }
    let store = SqliteOutputStore::open(&db, "http://127.0.0.1:8080").unwrap();
    let report = store.verify().await.unwrap();
    assert_eq!(report.parts_checked, n as u64);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// A producer slower than compression (as HFS's export worker, which
/// serializes each resource) has its chunks compressed piece by piece while
/// it writes: every part still reads back byte for byte, records the plain
/// digest of its bytes, and stores frames that declare their own length,
/// whatever the chunk size (a power of two or not), the part's length
/// (under a piece, a piece and a line, several chunks) and the digest.
/// `finalize_part` keeps a part's last chunk for its publishing
/// transaction: compressed on the finalizing thread when little is left
/// (a last piece, a part smaller than a piece), by a chunk worker when
/// more is (a fast producer's last chunk), and nothing when the part ends
/// on a chunk boundary. Every way stores exactly the part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_chunk_published_with_its_part_reads_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("last.db");
    let job = ExportJobId::new();
    let lines = faultkit::noisy_lines(11, 30_000, 120);
    let text: Vec<u8> = lines
        .iter()
        .flat_map(|l| [l.as_bytes(), b"\n"].concat())
        .collect();
    let chunk = 1 << 20;
    let store = SqliteOutputStore::open_with(
        &db,
        "http://127.0.0.1:8080",
        StoreOptions::default().with_chunk_size(chunk),
    )
    .unwrap();
    // How the bytes arrive: in one write (no piece is compressed before
    // the finalize); a line at a time without a pause, as HFS's worker
    // writes a batch it made before (pieces pile up behind the frame's
    // job, and the finalize splits what is left over two workers); a line
    // at a time with pauses (the pieces are compressed as they come).
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Arrive {
        AtOnce,
        Lines,
        Slowly,
    }
    use Arrive::*;
    let mut cases = vec![
        (0, AtOnce),
        (1, AtOnce),
        (100 << 10, AtOnce),
        ((256 << 10) + 17, AtOnce),
        (chunk, AtOnce),
        (2 * chunk, AtOnce),
        (chunk + (700 << 10), AtOnce),
    ];
    // Whether a finalize finds more than 256 KiB still to compress depends
    // on timing: the one-chunk cases come three times each.
    for _ in 0..3 {
        cases.extend([(chunk - 3000, Lines), ((chunk / 2) + 1000, Lines)]);
    }
    cases.extend([
        (2 * chunk - 5, Lines),
        (chunk + 5, Slowly),
        (chunk + (300 << 10), Slowly),
        (2 * chunk + (64 << 10), Slowly),
    ]);
    let mut split = 0;
    for (n, &(len, arrive)) in cases.iter().enumerate() {
        let data = &text[..len];
        let key = ExportPartKey::output("default", job.clone(), "P", n as u32, 1);
        let mut w = store.open_writer(&key).await.unwrap();
        match arrive {
            AtOnce => {
                w.writer.write_all(data).await.unwrap();
                w.byte_count += data.len() as u64;
            }
            Lines => {
                for line in data.split_inclusive(|&b| b == b'\n') {
                    w.writer.write_all(line).await.unwrap();
                    w.byte_count += line.len() as u64;
                }
            }
            Slowly => {
                for (i, piece) in data.chunks(4 << 10).enumerate() {
                    w.writer.write_all(piece).await.unwrap();
                    w.byte_count += piece.len() as u64;
                    if i % 16 == 15 {
                        // Slower than zstd (built without optimisation, too).
                        tokio::time::sleep(Duration::from_millis(15)).await;
                    }
                }
                // As HFS's worker, which serializes the last resources while
                // the pieces handed off are compressed.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        store.finalize_part(&key, w).await.unwrap();
        let what = format!("{len} bytes, {arrive:?}");
        let info = store.part_info(&key).await.unwrap();
        assert_eq!(info.size_bytes, len as u64, "{what}");
        let whole_chunks = len.div_ceil(chunk) as u64;
        if arrive == Lines && info.chunk_count == whole_chunks + 1 {
            split += 1;
        } else {
            assert_eq!(info.chunk_count, whole_chunks, "{what}");
        }
        assert_eq!(
            info.digest,
            reference_digest(DigestAlgorithm::Xxh3_128, data),
            "{what}"
        );
        assert!(read_all(&store, &key).await.unwrap() == data, "{what}");
    }
    // Lines arrive faster than one worker compresses them (this build has
    // no optimisation): at least one finalize split its last chunk.
    assert!(split > 0, "no finalize split its last chunk");
    stored_frames_declare_their_lengths(&db);
    let report = store.verify().await.unwrap();
    assert_eq!(report.parts_checked, cases.len() as u64);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[tokio::test(flavor = "multi_thread")]
async fn chunks_compressed_while_a_slow_producer_writes_read_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("pieces.db");
    let job = ExportJobId::new();
    let lines = faultkit::noisy_lines(7, 40_000, 90);
    let mut n = 0;
    for (chunk, algorithm) in [
        (1 << 20, DigestAlgorithm::Xxh3_128),
        (300_000, DigestAlgorithm::Xxh3_128),
        (300_000, DigestAlgorithm::Blake3),
        ((256 << 10) + 1, DigestAlgorithm::Xxh3_128),
    ] {
        let store = SqliteOutputStore::open_with(
            &db,
            "http://127.0.0.1:8080",
            StoreOptions::default()
                .with_chunk_size(chunk)
                .with_digest(algorithm),
        )
        .unwrap();
        for count in [100, 1_500, 1_600, 12_000, 40_000] {
            let key = ExportPartKey::output("default", job.clone(), "P", n, 1);
            n += 1;
            let mut w = store.open_writer(&key).await.unwrap();
            let mut data = Vec::new();
            for (i, line) in lines[..count].iter().enumerate() {
                w.write_line(line).await.unwrap();
                data.extend_from_slice(line.as_bytes());
                data.push(b'\n');
                if i % 500 == 499 {
                    // Slower than zstd: the pieces handed off get compressed.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            store.finalize_part(&key, w).await.unwrap();
            let what = format!("{algorithm}, chunks of {chunk}, {} bytes", data.len());
            let info = store.part_info(&key).await.unwrap();
            assert_eq!(info.digest, reference_digest(algorithm, &data), "{what}");
            assert!(read_all(&store, &key).await.unwrap() == data, "{what}");
        }
    }
    let frames = stored_frames_declare_their_lengths(&db);
    assert!(frames > 20, "{frames} frames");
    let store = SqliteOutputStore::open(&db, "http://127.0.0.1:8080").unwrap();
    let report = store.verify().await.unwrap();
    assert_eq!(report.parts_checked, n as u64);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// Checks that every chunk stored in the file at `db` is a zstd frame that
/// declares the raw length its row records; returns how many there are.
fn stored_frames_declare_their_lengths(db: &std::path::Path) -> usize {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn.prepare("SELECT raw_len, frame FROM chunks").unwrap();
    let frames: Vec<(u64, Vec<u8>)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (raw_len, frame) in &frames {
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(frame).ok(),
            Some(Some(*raw_len))
        );
    }
    frames.len()
}
