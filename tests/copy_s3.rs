//! `export-store copy --to s3://…`: the real binary against a real
//! S3-compatible server (moto's standalone server on a loopback port,
//! installed by `.ci/moto.sh`; without it these tests fail and say so).
//!
//! What they prove: every finished part lands under exactly HFS's
//! `S3OutputStore` key, byte for byte, with HFS's content type, a big part
//! in a multipart upload; a second run uploads nothing (moto's request log
//! shows no write); `--force` rewrites; `--dry-run` writes nothing;
//! `--tenant`/`--job` and a prefix; an object of another size is left
//! alone; a copy killed in the middle of a multipart upload shows nothing
//! under that key and the next run finishes without sending again what was
//! done; and bad input is refused quickly, with a message and the
//! documented exit status.
//!
//! `cargo test --features s3-tests --test copy_s3` (after `bash .ci/moto.sh`).
#![cfg(feature = "s3-tests")]

mod faultkit;
mod s3_support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use s3_support::{bin, keys, objects, put, summary, Moto};
use serde_json::Value;
use sqlite_export_store::testkit::synthetic::Generator;
use sqlite_export_store::{ExportJobId, ExportPartKey, SqliteOutputStore};

const BUCKET: &str = "hfs-exports";
/// The smallest piece S3 takes, so that a 12 MiB part goes up in three.
const PART_SIZE: &str = "5MiB";

/// A part of the test store: its key, and the object key HFS would use,
/// written out by hand from helios-persistence 0.2.7's
/// `S3OutputStore::object_key`.
struct Part {
    key: ExportPartKey,
    object: String,
    bytes: Vec<u8>,
}

fn ndjson(seed: u64, size: usize) -> Vec<u8> {
    Generator::new(seed).ndjson_of_size(size)
}

fn part(key: ExportPartKey, object: &str, bytes: Vec<u8>) -> Part {
    Part {
        key,
        object: object.to_string(),
        bytes,
    }
}

/// Several tenants and jobs, both file types, two tokens of one slot, an
/// empty part, a part of 12 MiB (three 5 MiB pieces), and one staged part
/// that must not be copied.
fn sample_parts() -> Vec<Part> {
    let job = |s: &str| ExportJobId::from_string(s);
    vec![
        part(
            ExportPartKey::output("default", job("job-a"), "Patient", 0, 1),
            "default/exports/job-a/output-Patient-0-1.ndjson",
            ndjson(1, 40_000),
        ),
        part(
            ExportPartKey::output("default", job("job-a"), "Observation", 0, 1),
            "default/exports/job-a/output-Observation-0-1.ndjson",
            ndjson(2, 12 << 20),
        ),
        part(
            ExportPartKey::error("default", job("job-a"), "OperationOutcome", 0, 1),
            "default/exports/job-a/error-OperationOutcome-0-1.ndjson",
            br#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"processing"}]}
"#
            .to_vec(),
        ),
        part(
            ExportPartKey::output("acme", job("job-b"), "Condition", 0, 2),
            "acme/exports/job-b/output-Condition-0-2.ndjson",
            ndjson(3, 300_000),
        ),
        part(
            ExportPartKey::output("acme", job("job-b"), "Condition", 0, 3),
            "acme/exports/job-b/output-Condition-0-3.ndjson",
            ndjson(4, 310_000),
        ),
        part(
            ExportPartKey::output("acme", job("job-b"), "Encounter", 1, 3),
            "acme/exports/job-b/output-Encounter-1-3.ndjson",
            Vec::new(),
        ),
        part(
            ExportPartKey::output("acme/research", job("job-c"), "Patient", 0, 1),
            "acme/research/exports/job-c/output-Patient-0-1.ndjson",
            ndjson(5, 5_000),
        ),
    ]
}

/// A store at `dir/export-store.db` holding `parts`, finished, and one
/// staged part of job-a.
fn store_with(dir: &Path, parts: &[Part]) -> PathBuf {
    let db = dir.join("export-store.db");
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = SqliteOutputStore::open(&db, "http://127.0.0.1:1").unwrap();
        for p in parts {
            put(&store, &p.key, &p.bytes).await;
        }
    });
    // Staging as a writer at work leaves it: a staged row and a chunk.
    use sqlite_export_store::__test_support::{codec, sql};
    let c = rusqlite::Connection::open(&db).unwrap();
    let staged = ExportPartKey::output("default", "job-a".into(), "Patient", 1, 1);
    let id = sql::insert_staged(&c, &staged, 0).unwrap();
    let line = b"{\"resourceType\":\"Patient\",\"id\":\"staged\"}\n";
    let frame = codec::compress(line, 3).unwrap();
    sql::insert_chunk(&c, id, 0, 0, line.len() as u64, &frame).unwrap();
    db
}

fn copy(home: &Path, db: &Path, moto: &Moto, to: &str, extra: &[&str]) -> Output {
    bin(home)
        .arg("copy")
        .args([
            "--to",
            to,
            "--endpoint",
            &moto.endpoint(),
            "--part-size",
            PART_SIZE,
        ])
        .arg("--db")
        .arg(db)
        .args(extra)
        .output()
        .unwrap()
}

fn expect(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "exit status\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn count(s: &Value, field: &str) -> u64 {
    s[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} in {s}"))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

#[test]
fn copies_under_hfs_keys_then_skips_forces_and_dry_runs() {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let parts = sample_parts();
    let db = store_with(dir.path(), &parts);
    let s3 = moto.client(BUCKET);
    let to = format!("s3://{BUCKET}");
    let expected: BTreeMap<String, Vec<u8>> = parts
        .iter()
        .map(|p| (p.object.clone(), p.bytes.clone()))
        .collect();
    let n = parts.len() as u64;

    // The first run: every finished part, nothing else, byte-exact.
    let out = copy(dir.path(), &db, &moto, &to, &["--json"]);
    expect(&out, 0);
    let s = summary(&out.stdout);
    assert_eq!(count(&s, "uploaded"), n, "{s}");
    assert_eq!(count(&s, "skipped"), 0);
    assert_eq!(count(&s, "failed"), 0);
    assert_eq!(count(&s, "multipart_uploads"), 1, "{s}");
    let total: u64 = parts.iter().map(|p| p.bytes.len() as u64).sum();
    assert_eq!(count(&s, "bytes_uploaded"), total);
    let stored: BTreeMap<String, Vec<u8>> = rt().block_on(objects(&s3, None)).into_iter().collect();
    assert_eq!(
        stored.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "exactly HFS's keys"
    );
    for (k, v) in &expected {
        assert!(
            stored[k] == *v,
            "{k}: the object is not the part, byte for byte"
        );
    }
    let writes = moto.writes();
    let pieces: Vec<_> = writes
        .iter()
        .filter(|w| w.contains("partNumber="))
        .collect();
    assert_eq!(pieces.len(), 3, "12 MiB in 5 MiB pieces: {writes:#?}");
    assert!(pieces
        .iter()
        .all(|w| w.contains("/output-Observation-0-1.ndjson?")));
    assert!(
        moto.open_uploads(BUCKET).is_empty(),
        "every upload completed"
    );
    for p in [&parts[0], &parts[1]] {
        let head = rt()
            .block_on(s3.get_opts(
                &p.object.as_str().into(),
                object_store::GetOptions {
                    head: true,
                    ..Default::default()
                },
            ))
            .unwrap();
        assert_eq!(
            head.attributes
                .get(&object_store::Attribute::ContentType)
                .map(|v| v.as_ref()),
            Some("application/fhir+ndjson"),
            "{}: HFS's content type",
            p.object
        );
    }

    // A second run finds everything there: no write at all.
    let before = moto.writes().len();
    let out = copy(dir.path(), &db, &moto, &to, &["--json"]);
    expect(&out, 0);
    let s = summary(&out.stdout);
    assert_eq!((count(&s, "uploaded"), count(&s, "skipped")), (0, n), "{s}");
    assert_eq!(
        moto.writes().len(),
        before,
        "{:#?}",
        &moto.writes()[before..]
    );

    // --force sends everything again (and the text summary says so).
    let out = copy(dir.path(), &db, &moto, &to, &["--force"]);
    expect(&out, 0);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("copied {n} parts")), "{text}");
    let forced = &moto.writes()[before..];
    assert_eq!(
        forced.iter().filter(|w| w.contains("partNumber=")).count(),
        3
    );
    assert_eq!(
        forced
            .iter()
            .filter(|w| w.starts_with("PUT ") && !w.contains('?'))
            .count() as u64,
        n - 1,
        "one PUT per small part: {forced:#?}"
    );
    assert_eq!(
        rt().block_on(objects(&s3, None))
            .into_iter()
            .collect::<BTreeMap<_, _>>(),
        expected
    );

    // --dry-run: one object gone, one of another size; it lists, writes
    // nothing, and says which would fail.
    rt().block_on(async {
        s3.delete(&parts[0].object.as_str().into()).await.unwrap();
        s3.put(&parts[3].object.as_str().into(), "other".into())
            .await
            .unwrap();
    });
    let before = moto.writes().len();
    let out = copy(dir.path(), &db, &moto, &to, &["--dry-run"]);
    expect(&out, 3);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "would upload: default/job-a/output/Patient-0@1 -> {}",
            parts[0].object
        )),
        "{text}"
    );
    assert!(text.contains("would fail"), "{text}");
    assert!(text.contains("would skip"), "{text}");
    assert_eq!(moto.writes().len(), before, "a dry run writes nothing");
    let out = copy(dir.path(), &db, &moto, &to, &["--dry-run", "--json"]);
    expect(&out, 3);
    let s = summary(&out.stdout);
    let actions: BTreeMap<String, String> = s["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap().to_string(),
                r["action"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(actions[&parts[0].object], "would_upload");
    assert_eq!(actions[&parts[3].object], "failed");
    assert_eq!(actions[&parts[1].object], "would_skip");
    assert_eq!(moto.writes().len(), before);

    // The real run: the missing one goes up, the other-size one is left
    // alone and named, exit status 3.
    let out = copy(dir.path(), &db, &moto, &to, &["--json"]);
    expect(&out, 3);
    let s = summary(&out.stdout);
    assert_eq!(
        (
            count(&s, "uploaded"),
            count(&s, "skipped"),
            count(&s, "failed")
        ),
        (1, n - 2, 1),
        "{s}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("acme/job-b/output/Condition-0@2")
            && stderr.contains("an object of 5 bytes is already there")
            && stderr.contains("--force"),
        "{stderr}"
    );
    let other = rt().block_on(async {
        s3.get(&parts[3].object.as_str().into())
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
    });
    assert_eq!(&other[..], b"other", "left as it was");
    let out = copy(
        dir.path(),
        &db,
        &moto,
        &to,
        &["--force", "--tenant", "acme", "--job", "job-b"],
    );
    expect(&out, 0);
    assert_eq!(
        rt().block_on(objects(&s3, None))
            .into_iter()
            .collect::<BTreeMap<_, _>>(),
        expected
    );
}

#[test]
fn tenant_job_and_prefix_select_and_place() {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let parts: Vec<Part> = sample_parts()
        .into_iter()
        .filter(|p| p.bytes.len() < 1 << 20)
        .collect();
    let db = store_with(dir.path(), &parts);
    let s3 = moto.client(BUCKET);

    let out = copy(
        dir.path(),
        &db,
        &moto,
        &format!("s3://{BUCKET}/archive/2026/"),
        &["--tenant", "acme", "--json"],
    );
    expect(&out, 0);
    assert_eq!(count(&summary(&out.stdout), "uploaded"), 3);
    assert_eq!(
        rt().block_on(keys(&s3, None)),
        vec![
            "archive/2026/acme/exports/job-b/output-Condition-0-2.ndjson",
            "archive/2026/acme/exports/job-b/output-Condition-0-3.ndjson",
            "archive/2026/acme/exports/job-b/output-Encounter-1-3.ndjson",
        ],
        "only acme (not acme/research), under the prefix"
    );

    let out = copy(
        dir.path(),
        &db,
        &moto,
        &format!("s3://{BUCKET}"),
        &["--job", "job-c"],
    );
    expect(&out, 0);
    assert!(rt()
        .block_on(keys(&s3, Some("acme/research")))
        .contains(&"acme/research/exports/job-c/output-Patient-0-1.ndjson".to_string()));

    for filter in [["--tenant", "nobody"], ["--job", "no-such-job"]] {
        let out = copy(dir.path(), &db, &moto, &format!("s3://{BUCKET}"), &filter);
        expect(&out, 4);
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("no finished parts match"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Keys from a profile in the shared credentials file, not the
    // environment.
    let creds = dir.path().join("credentials");
    std::fs::write(
        &creds,
        format!(
            "[ci]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            s3_support::ACCESS_KEY,
            s3_support::SECRET_KEY
        ),
    )
    .unwrap();
    let out = bin(dir.path())
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("AWS_SHARED_CREDENTIALS_FILE", &creds)
        .env("AWS_PROFILE", "ci")
        .args(["copy", "--to", &format!("s3://{BUCKET}/from-profile")])
        .args(["--endpoint", &moto.endpoint(), "--json", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    expect(&out, 0);
    assert_eq!(count(&summary(&out.stdout), "uploaded"), parts.len() as u64);
}

#[test]
fn a_copy_killed_mid_upload_shows_nothing_partial_and_resumes() {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let job = || ExportJobId::from_string("job-k");
    let mut parts = vec![part(
        ExportPartKey::output("default", job(), "Observation", 0, 1),
        "default/exports/job-k/output-Observation-0-1.ndjson",
        ndjson(7, 21 << 20),
    )];
    for i in 0..6u32 {
        parts.push(part(
            ExportPartKey::output("default", job(), "Patient", i, 1),
            &format!("default/exports/job-k/output-Patient-{i}-1.ndjson"),
            ndjson(10 + u64::from(i), 200_000),
        ));
    }
    let db = store_with(dir.path(), &parts);
    let s3 = moto.client(BUCKET);
    let big = parts[0].object.clone();
    let to = format!("s3://{BUCKET}");

    // Paused (then killed) once S3 has acknowledged the second of five
    // pieces of the big part.
    let mut child = bin(dir.path())
        .env("EXPORT_STORE_COPY_FAILPOINT", "copy.piece_uploaded:2")
        .args([
            "copy",
            "--to",
            &to,
            "--endpoint",
            &moto.endpoint(),
            "--part-size",
            PART_SIZE,
        ])
        .arg("--db")
        .arg(&db)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut said = String::new();
    let mut paused = false;
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        if line == "export-store failpoint copy.piece_uploaded paused" {
            paused = true;
            break;
        }
        said.push_str(&line);
        said.push('\n');
    }
    assert!(paused, "the copy never paused: {said}");
    let open = moto.open_uploads(BUCKET);
    assert_eq!(
        open,
        vec![big.clone()],
        "paused inside the big part's upload"
    );
    assert!(
        !rt().block_on(keys(&s3, None)).contains(&big),
        "no object under the big part's key while its upload runs"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let after_kill = rt().block_on(keys(&s3, None));
    assert!(
        !after_kill.contains(&big),
        "nothing partial after the kill: {after_kill:?}"
    );
    let done_before: Vec<&Part> = parts
        .iter()
        .filter(|p| after_kill.contains(&p.object))
        .collect();
    assert_eq!(
        done_before.len(),
        after_kill.len(),
        "only parts' keys: {after_kill:?}"
    );

    // The second run sends only what was not done.
    let before = moto.writes().len();
    let out = copy(dir.path(), &db, &moto, &to, &["--json"]);
    expect(&out, 0);
    let s = summary(&out.stdout);
    assert_eq!(count(&s, "skipped"), done_before.len() as u64, "{s}");
    assert_eq!(
        count(&s, "uploaded"),
        (parts.len() - done_before.len()) as u64,
        "{s}"
    );
    let writes = &moto.writes()[before..];
    for p in &done_before {
        assert!(
            !writes.iter().any(|w| w.contains(&p.object)),
            "{} was sent again: {writes:#?}",
            p.object
        );
    }
    assert_eq!(
        writes.iter().filter(|w| w.contains("partNumber=")).count(),
        5,
        "the big part, 21 MiB in 5 MiB pieces: {writes:#?}"
    );
    let stored: BTreeMap<String, Vec<u8>> = rt().block_on(objects(&s3, None)).into_iter().collect();
    assert_eq!(stored.len(), parts.len());
    for p in &parts {
        assert!(stored[&p.object] == p.bytes, "{}: not byte-exact", p.object);
    }
}

/// Replaces the last chunk of `key`'s part with a valid frame of as many
/// other bytes: every chunk decompresses, the lengths add up, and only the
/// digest checked at the reader's end tells. (The store's triggers keep
/// finished parts immutable; a damaged disk does not ask.)
fn damage_last_chunk(db: &Path, key: &ExportPartKey) {
    use sqlite_export_store::__test_support::codec;
    let c = rusqlite::Connection::open(db).unwrap();
    let (id, seq, len): (i64, i64, usize) = c
        .query_row(
            "SELECT p.id, c.seq, c.raw_len FROM parts p JOIN chunks c ON c.part_id = p.id
             WHERE p.job_id = ?1 AND p.resource_type = ?2 AND p.finalized = 1
             ORDER BY c.seq DESC LIMIT 1",
            [key.job_id.as_str(), key.resource_type.as_str()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    let mut other = vec![b' '; len];
    other[len - 1] = b'\n';
    let frame = codec::compress(&other, 3).unwrap();
    drop(c);
    faultkit::with_triggers_lifted(db, |c| {
        c.execute(
            "UPDATE chunks SET frame = ?1 WHERE part_id = ?2 AND seq = ?3",
            rusqlite::params![frame, id, seq],
        )
        .unwrap();
    });
}

#[test]
fn a_part_that_fails_verification_is_never_published() {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let parts: Vec<Part> = sample_parts().into_iter().take(2).collect();
    let db = store_with(dir.path(), &parts);
    damage_last_chunk(&db, &parts[1].key);
    let s3 = moto.client(BUCKET);

    let out = copy(
        dir.path(),
        &db,
        &moto,
        &format!("s3://{BUCKET}"),
        &["--json"],
    );
    expect(&out, 3);
    let s = summary(&out.stdout);
    assert_eq!((count(&s, "uploaded"), count(&s, "failed")), (1, 1), "{s}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("default/job-a/output/Observation-0@1")
            && stderr.contains("reading the part from the store failed"),
        "{stderr}"
    );
    // Its first two pieces went up, then the upload was aborted, not
    // completed, after they landed: nothing under its key, no upload left
    // open.
    assert!(moto.open_uploads(BUCKET).is_empty());
    let writes = moto.writes();
    let big: Vec<&String> = writes
        .iter()
        .filter(|w| w.contains("/output-Observation-0-1.ndjson?"))
        .collect();
    assert_eq!(
        big.len(),
        4,
        "create, two pieces, abort: {writes:#?}\n{stderr}"
    );
    assert!(big[0].starts_with("POST ") && big[0].contains("?uploads"));
    assert!(big[1].contains("partNumber=") && big[2].contains("partNumber="));
    assert!(
        big[3].starts_with("DELETE ") && big[3].contains("?uploadId="),
        "{big:#?}"
    );
    assert_eq!(
        rt().block_on(keys(&s3, None)),
        vec![parts[0].object.clone()]
    );
}

#[test]
fn bad_input_is_refused_with_a_message_and_its_exit_status() {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let parts: Vec<Part> = sample_parts().into_iter().take(1).collect();
    let db = store_with(dir.path(), &parts);
    let stderr = |o: &Output| String::from_utf8_lossy(&o.stderr).to_string();

    // Not an S3 URL, a bad part size, a bad endpoint: bad arguments.
    for to in [
        BUCKET,
        "https://s3.amazonaws.com/hfs-exports",
        "s3://",
        "s3://Bad_Bucket",
    ] {
        let out = copy(dir.path(), &db, &moto, to, &[]);
        expect(&out, 2);
        assert!(stderr(&out).contains("--to"), "{}", stderr(&out));
    }
    let out = copy(dir.path(), &db, &moto, BUCKET, &[]);
    assert!(
        stderr(&out).contains("expected s3://BUCKET"),
        "{}",
        stderr(&out)
    );
    let out = bin(dir.path())
        .args([
            "copy",
            "--to",
            "s3://hfs-exports",
            "--part-size",
            "1MiB",
            "--db",
        ])
        .arg(&db)
        .output()
        .unwrap();
    expect(&out, 2);
    assert!(stderr(&out).contains("5MiB to 5GiB"), "{}", stderr(&out));

    // No store there: nothing is created.
    let missing = dir.path().join("no-such.db");
    let out = copy(dir.path(), &missing, &moto, "s3://hfs-exports", &[]);
    expect(&out, 1);
    assert!(stderr(&out).contains("no store at"), "{}", stderr(&out));
    assert!(!missing.exists());

    // Nothing listens at the endpoint: one clear error, at once.
    let dead = format!("http://127.0.0.1:{}", s3_support::free_port());
    let started = Instant::now();
    let out = bin(dir.path())
        .args([
            "copy",
            "--to",
            "s3://hfs-exports",
            "--endpoint",
            &dead,
            "--db",
        ])
        .arg(&db)
        .output()
        .unwrap();
    expect(&out, 1);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert!(
        stderr(&out).contains(&format!("cannot list s3://hfs-exports at {dead}")),
        "{}",
        stderr(&out)
    );

    // No such bucket.
    let out = copy(dir.path(), &db, &moto, "s3://no-such-bucket", &[]);
    expect(&out, 1);
    assert!(
        stderr(&out).contains("cannot list s3://no-such-bucket")
            && stderr(&out).contains("NoSuchBucket"),
        "{}",
        stderr(&out)
    );

    // No credentials anywhere (and the instance role off).
    let out = bin(dir.path())
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .args([
            "copy",
            "--to",
            "s3://hfs-exports",
            "--endpoint",
            &moto.endpoint(),
            "--db",
        ])
        .arg(&db)
        .output()
        .unwrap();
    expect(&out, 1);
    assert!(
        stderr(&out).contains("no AWS credentials found"),
        "{}",
        stderr(&out)
    );

    assert!(
        moto.writes()
            .iter()
            .all(|w| w == &format!("PUT /{BUCKET} HTTP/1.1")),
        "{:#?}",
        moto.writes()
    );
}

/// The figure of docs/figures.md: `copy` beside plain uploads of the same
/// NDJSON with the same client and the same settings (object_store, four
/// objects at once, 8 MiB pieces, two in flight per object): from files on
/// disk (what `aws s3 cp` of an exported folder does), and from memory
/// (the server's own ceiling). Each way uploads into a fresh prefix, three
/// rounds, interleaved; the best round of each is printed.
///
/// `cargo test --release --features s3-tests --test copy_s3 -- --ignored --nocapture throughput`
#[test]
#[ignore = "a measurement: run it by name with --ignored --nocapture"]
fn throughput_beside_plain_uploads() {
    use futures::StreamExt;
    use object_store::{ObjectStore, PutPayload, WriteMultipart};

    const PIECE: usize = 8 << 20;
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    // HFS-like parts (about 2 MiB: 1,000 resources) and two big ones.
    let job = ExportJobId::from_string("job-t");
    let mut parts = Vec::new();
    for i in 0..40u32 {
        parts.push(part(
            ExportPartKey::output("default", job.clone(), "Observation", i, 1),
            &format!("default/exports/job-t/output-Observation-{i}-1.ndjson"),
            ndjson(100 + u64::from(i), 2 << 20),
        ));
    }
    for i in 0..2u32 {
        parts.push(part(
            ExportPartKey::output("default", job.clone(), "DocumentReference", i, 1),
            &format!("default/exports/job-t/output-DocumentReference-{i}-1.ndjson"),
            ndjson(200 + u64::from(i), 24 << 20),
        ));
    }
    let db = store_with(dir.path(), &parts);
    let files = dir.path().join("files");
    std::fs::create_dir(&files).unwrap();
    for (i, p) in parts.iter().enumerate() {
        std::fs::write(files.join(format!("{i}.ndjson")), &p.bytes).unwrap();
    }
    let total: u64 = parts.iter().map(|p| p.bytes.len() as u64).sum();
    let mib = total as f64 / (1 << 20) as f64;
    let s3 = moto.client(BUCKET);
    let rt = rt();

    // One object: one PUT up to a piece, else a multipart upload.
    async fn upload(s3: &std::sync::Arc<dyn ObjectStore>, key: String, bytes: bytes::Bytes) {
        let path = object_store::path::Path::from(key);
        if bytes.len() <= PIECE {
            s3.put(&path, PutPayload::from(bytes)).await.unwrap();
        } else {
            let mut w =
                WriteMultipart::new_with_chunk_size(s3.put_multipart(&path).await.unwrap(), PIECE);
            for chunk in bytes.chunks(1 << 20) {
                w.wait_for_capacity(2).await.unwrap();
                w.write(chunk);
            }
            w.finish().await.unwrap();
        }
    }
    let plain = |round: usize, from_disk: bool| -> f64 {
        let started = Instant::now();
        rt.block_on(
            futures::stream::iter(parts.iter().enumerate()).for_each_concurrent(4, |(i, p)| {
                let s3 = s3.clone();
                let file = files.join(format!("{i}.ndjson"));
                let key = format!(
                    "{}{round}/{}",
                    if from_disk { "disk" } else { "memory" },
                    p.object
                );
                let bytes = p.bytes.clone();
                async move {
                    let bytes = if from_disk {
                        tokio::fs::read(file).await.unwrap()
                    } else {
                        bytes
                    };
                    upload(&s3, key, bytes.into()).await;
                }
            }),
        );
        started.elapsed().as_secs_f64()
    };
    let (mut copy_s, mut disk_s, mut memory_s) = (f64::MAX, f64::MAX, f64::MAX);
    for round in 0..3 {
        let started = Instant::now();
        let out = bin(dir.path())
            .args(["copy", "--to", &format!("s3://{BUCKET}/copy{round}")])
            .args(["--endpoint", &moto.endpoint(), "--json", "--db"])
            .arg(&db)
            .output()
            .unwrap();
        expect(&out, 0);
        copy_s = copy_s.min(started.elapsed().as_secs_f64());
        assert_eq!(count(&summary(&out.stdout), "bytes_uploaded"), total);
        disk_s = disk_s.min(plain(round, true));
        memory_s = memory_s.min(plain(round, false));
    }
    for prefix in ["copy0", "disk0", "memory0"] {
        let sizes: u64 = rt.block_on(async {
            use futures::TryStreamExt;
            s3.list(Some(&prefix.into()))
                .map_ok(|m| m.size as u64)
                .try_collect::<Vec<_>>()
                .await
                .unwrap()
                .iter()
                .sum()
        });
        assert_eq!(sizes, total, "{prefix}: every byte arrived");
    }
    println!(
        "{} parts, {mib:.0} MiB of NDJSON into moto_server on 127.0.0.1 (best of 3 rounds):",
        parts.len()
    );
    for (what, s) in [
        (
            "export-store copy (from the store, verified, process included)",
            copy_s,
        ),
        (
            "plain uploads of the same files from disk (object_store)",
            disk_s,
        ),
        ("plain uploads from memory (the server's ceiling)", memory_s),
    ] {
        println!("  {what:<64} {s:6.2} s  {:7.1} MiB/s", mib / s);
    }
}
