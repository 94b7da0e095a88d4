//! The node-loss drill under HFS and Litestream: `export-store hfs` (HFS
//! 0.2.7 with this crate's store) runs on one data folder while Litestream
//! 0.5 replicates both of its SQLite files, HFS's `fhir.db` and the output
//! store `export-output.db`, into an S3 bucket (moto); then the node is
//! lost and rebuilt from the bucket alone.
//!
//! 1. The vendored Synthea sample is loaded; three exports (system, Patient
//!    compartment, one type) and a bulk submit (from a Bulk Data provider
//!    served by the test) run to completion, and every file and receipt is
//!    downloaded.
//! 2. `litestream sync -wait` on both files: every job complete before that
//!    call counts as complete-and-replicated.
//! 3. One more export is kicked off and, once it has finished a few parts,
//!    the node is lost: Litestream and HFS are SIGKILLed, the data folder
//!    is deleted.
//! 4. Both files are restored into a fresh folder with `litestream
//!    restore`; `export-store verify` must pass on the restored store.
//! 5. HFS starts on the restored folder. Every complete-and-replicated job
//!    must still be complete and serve every file through HFS's own routes
//!    (`/export-file/`, `/bulk-submit-file/`) byte for byte as downloaded
//!    before the loss. The export that was in flight must end one of three
//!    ways: complete, with every listed file served whole and every
//!    resource exactly once; failed; or unknown (its kick-off never reached
//!    the bucket). A manifest that lists a missing or partial file fails the
//!    test, and so does a job that never settles.
//! 6. `export-store verify` passes again once HFS has stopped.
//!
//! With `--nocapture` it prints the figures (never asserted): replication
//! lag of the output store, each finalize's commit to the moment the LTX
//! file holding it was listed in the bucket (p50/p99 over every finalize of
//! the run), and restore time per 100 MB, from the drill's two files and
//! from a store of known size (about 100 MB) restored on its own.
//!
//! ```sh
//! bash .ci/moto.sh && bash .ci/litestream.sh
//! cargo test --features hfs --test litestream_hfs -- --nocapture
//! ```
#![cfg(feature = "hfs")]

mod hfs_support;
mod litestream_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hfs_support::*;
use litestream_support::{quantile, Replication, Settings, BUCKET};
use reqwest::StatusCode;
use serde_json::Value;

/// The sample's types that are loaded and exported: no conditional
/// references among them, 579 resources.
const TYPES: &[&str] = &["Patient", "Condition", "AllergyIntolerance"];
/// Resources per part: small, so that the exports make many parts, and so
/// many finalizes to measure replication lag on.
const BATCH: u32 = 10;
/// Finished parts of the in-flight export (of about 60) before the node
/// may be lost. The whole export takes a few seconds, about as long as its
/// kick-off takes to reach the bucket: the loss comes as soon as both
/// hold, and the export is sometimes complete by then.
const IN_FLIGHT_PARTS: usize = 1;
/// Parts of the store of known size, and NDJSON bytes in each.
const KNOWN_PARTS: usize = 128;
const KNOWN_PART_BYTES: usize = 1 << 20;

fn options(exe: &Path) -> HfsOptions {
    HfsOptions::default()
        .exe(exe)
        .batch_size(BATCH)
        // A claim lapses soon, so that the server on the restored folder
        // takes up a job the lost node held.
        .env("HFS_BULK_EXPORT_LEASE_DURATION", "4")
        .env("HFS_BULK_EXPORT_HEARTBEAT_INTERVAL", "1")
        .env("HFS_BULK_SUBMIT_LEASE_DURATION", "4")
        .env("HFS_BULK_SUBMIT_HEARTBEAT_INTERVAL", "1")
        .env("HFS_BULK_SUBMIT_POLL_RATE_LIMIT", "0")
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

// ---------------------------------------------------------------------------
// Replication lag: finalize commit → the LTX file holding it in the bucket
// ---------------------------------------------------------------------------

/// A finalize the probe saw: when the store stamped it (inside its
/// transaction, just before the commit) and when the probe first read it
/// committed.
#[derive(Clone, Copy, Debug)]
struct Commit {
    finalized_at_ms: i64,
    seen_ms: i64,
}

/// A level-0 LTX file (what one Litestream sync uploaded): when the probe
/// first listed it, and the creation time in its header (taken after
/// Litestream read the WAL it holds).
#[derive(Clone, Copy, Debug)]
struct Ltx {
    listed_ms: i64,
    created_ms: i64,
}

#[derive(Default)]
struct Seen {
    commits: BTreeMap<i64, Commit>,
    ltx: BTreeMap<String, Ltx>,
    errors: Vec<String>,
}

/// Watches one replicated store: a thread reads its finished parts every
/// 10 ms (read-only), another lists the database's LTX files in the bucket
/// every 100 ms and reads the header of each new one.
///
/// A finalize counts as replicated once a level-0 LTX file created after
/// the probe saw the commit is listed: that file was cut from a WAL that
/// held the commit. (A file created between the commit and the probe's
/// read holds it too, and is not counted: the figure errs long, by at most
/// one Litestream sync, and only for commits the probe saw late; the
/// print shows how late it saw them.)
struct LagProbe {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    threads: Vec<JoinHandle<()>>,
}

impl LagProbe {
    fn start(db: &Path, replication: &Replication) -> LagProbe {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut threads = Vec::new();

        let (path, s, st) = (db.to_path_buf(), seen.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let conn = rusqlite::Connection::open_with_flags(
                &path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .unwrap();
            conn.busy_timeout(Duration::from_secs(5)).unwrap();
            let mut stmt = conn
                .prepare("SELECT id, finalized_at_ms FROM parts WHERE finalized = 1")
                .unwrap();
            while !st.load(Ordering::Relaxed) {
                let rows: Result<Vec<(i64, i64)>, _> = stmt
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                    .and_then(|rows| rows.collect());
                let now = unix_ms();
                let mut seen = s.lock().unwrap();
                match rows {
                    Ok(rows) => {
                        for (id, at) in rows {
                            seen.commits.entry(id).or_insert(Commit {
                                finalized_at_ms: at,
                                seen_ms: now,
                            });
                        }
                    }
                    Err(e) => seen.errors.push(format!("reading parts: {e}")),
                }
                drop(seen);
                std::thread::sleep(Duration::from_millis(10));
            }
        }));

        let client = replication.moto().client(BUCKET);
        let prefix = replication.prefix(db);
        let (s, st) = (seen.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut last: Option<object_store::path::Path> = None;
            while !st.load(Ordering::Relaxed) {
                let found = rt.block_on(new_level0(&*client, &prefix, last.as_ref()));
                let listed = unix_ms();
                match found {
                    Ok(found) => {
                        for (key, created_ms) in found {
                            last = Some(object_store::path::Path::from(key.as_str()));
                            s.lock().unwrap().ltx.insert(
                                key,
                                Ltx {
                                    listed_ms: listed,
                                    created_ms,
                                },
                            );
                        }
                    }
                    Err(e) => s.lock().unwrap().errors.push(e),
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }));
        LagProbe {
            stop,
            seen,
            threads,
        }
    }

    /// Finalizes seen so far that no listed LTX file holds yet.
    fn unreplicated(&self) -> usize {
        let seen = self.seen.lock().unwrap();
        seen.commits
            .values()
            .filter(|c| replicated_at(&seen.ltx, c).is_none())
            .count()
    }

    /// Stops both threads; returns, per finalize, its lag and how late the
    /// probe saw it, and how many were not replicated yet.
    fn finish(mut self) -> LagFigures {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        let seen = self.seen.lock().unwrap();
        let mut figures = LagFigures {
            ltx_files: seen.ltx.len(),
            errors: seen.errors.clone(),
            ..LagFigures::default()
        };
        for c in seen.commits.values() {
            figures
                .seen_late
                .push(ms_duration(c.seen_ms - c.finalized_at_ms));
            match replicated_at(&seen.ltx, c) {
                Some(at) => figures.lag.push(ms_duration(at - c.finalized_at_ms)),
                None => figures.unreplicated += 1,
            }
        }
        figures
    }
}

/// When the first LTX file created after the probe saw `c` was listed.
fn replicated_at(ltx: &BTreeMap<String, Ltx>, c: &Commit) -> Option<i64> {
    ltx.values()
        .filter(|l| l.created_ms >= c.seen_ms)
        .map(|l| l.listed_ms)
        .min()
}

fn ms_duration(ms: i64) -> Duration {
    Duration::from_millis(ms.max(0) as u64)
}

/// The level-0 LTX files under `prefix` listed after `after`, with the
/// creation time of each (Unix ms, bytes 32..40 of its 100-byte header, big
/// endian). Keys end `…/<level>/<min txid>-<max txid>.ltx`, the level in
/// hex (`0000`).
async fn new_level0(
    client: &dyn object_store::ObjectStore,
    prefix: &str,
    after: Option<&object_store::path::Path>,
) -> Result<Vec<(String, i64)>, String> {
    use futures::TryStreamExt;
    let prefix = object_store::path::Path::from(prefix);
    let metas: Vec<object_store::ObjectMeta> = match after {
        Some(after) => client.list_with_offset(Some(&prefix), after),
        None => client.list(Some(&prefix)),
    }
    .try_collect()
    .await
    .map_err(|e| format!("listing {prefix}: {e}"))?;
    let mut out = Vec::new();
    for m in metas {
        let key = m.location.to_string();
        let mut parts = key.rsplit('/');
        let (Some(name), Some(level)) = (parts.next(), parts.next()) else {
            continue;
        };
        if !name.ends_with(".ltx") || u32::from_str_radix(level, 16) != Ok(0) {
            continue;
        }
        let header = client
            .get_range(&m.location, 0..100)
            .await
            .map_err(|e| format!("reading the header of {key}: {e}"))?;
        let created = i64::from_be_bytes(header[32..40].try_into().unwrap());
        out.push((key, created));
    }
    Ok(out)
}

#[derive(Debug, Default)]
struct LagFigures {
    lag: Vec<Duration>,
    seen_late: Vec<Duration>,
    unreplicated: usize,
    ltx_files: usize,
    errors: Vec<String>,
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

// ---------------------------------------------------------------------------
// Jobs, files and the bulk submit
// ---------------------------------------------------------------------------

/// A job complete before the replication point: what HFS served for it.
struct Done {
    what: String,
    job: Job,
    /// Every file of its manifest (`output`, `deleted`, `error`): the URL's
    /// path (after the server's base) → bytes.
    files: BTreeMap<String, Vec<u8>>,
}

enum Job {
    /// An export: its status URL's path.
    Export(String),
    /// A submission: the `$bulk-submit-status` request.
    Submit(Value),
}

/// The path of `url` under `base`.
fn path_under(url: &str, base: &str) -> String {
    url.strip_prefix(base)
        .unwrap_or_else(|| panic!("{url} is not under {base}"))
        .to_string()
}

/// Every file a complete manifest lists, downloaded: path → bytes (each
/// must answer 200).
async fn bodies(http: &reqwest::Client, base: &str, manifest: &Value) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for key in ["output", "deleted", "error"] {
        for e in manifest[key].as_array().into_iter().flatten() {
            let url = e["url"].as_str().unwrap();
            let r = http.get(url).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK, "GET {url}");
            out.insert(path_under(url, base), r.bytes().await.unwrap().to_vec());
        }
    }
    out
}

/// One export, run to completion and checked (every resource of `expected`
/// exactly once), with every file's bytes.
async fn run_export(
    http: &reqwest::Client,
    base: &str,
    what: &str,
    path: &str,
    expected: &Ids,
) -> Done {
    let e = export_as(http, base, path, false).await;
    assert_exactly_once(what, expected, &e.got.ids);
    let files = bodies(http, base, &e.manifest).await;
    note(format_args!(
        "{what}: complete, {} files, job {}",
        files.len(),
        job_of(&e.status_url)
    ));
    Done {
        what: what.to_string(),
        job: Job::Export(path_under(&e.status_url, base)),
        files,
    }
}

/// `$bulk-submit` of `types` of the sample (served by a provider of the
/// test); returns the `$bulk-submit-status` request.
async fn submit(http: &reqwest::Client, base: &str, sample: &Sample, types: &[&str]) -> Value {
    let (manifest_url, data) = serve_sample(sample, types).await;
    let submission = Submission::completed("node-loss", "node-loss-1", &manifest_url, &data);
    let (code, body) = submission
        .kick_off(http, &format!("{base}/$bulk-submit"))
        .await;
    assert_eq!(code, StatusCode::OK, "$bulk-submit: {body}");
    submission.status_request
}

/// `$bulk-submit-status`, then its status URL polled until it settles:
/// the final status and body.
async fn submission_status(
    http: &reqwest::Client,
    base: &str,
    request: &Value,
    timeout: Duration,
) -> (StatusCode, Vec<u8>) {
    let r = http
        .post(format!("{base}/$bulk-submit-status"))
        .header("content-type", "application/fhir+json")
        .body(request.to_string())
        .send()
        .await
        .unwrap();
    let code = r.status();
    let location = r
        .headers()
        .get("content-location")
        .map(|v| v.to_str().unwrap().to_string());
    let body = r.bytes().await.unwrap_or_default().to_vec();
    match location {
        Some(url) if code == StatusCode::ACCEPTED || code == StatusCode::OK => {
            let (status, _, body) = poll(http, &url, timeout).await;
            (status, body)
        }
        _ => (code, body),
    }
}

/// The bulk submit, run to completion, with every receipt's bytes. It
/// writes types no export running beside it reads: an HFS 0.2.7 export
/// of a type that is being written lists some of its resources twice.
async fn run_submit(http: &reqwest::Client, base: &str, sample: &Sample) -> Done {
    let types = &["Patient", "AllergyIntolerance"];
    let request = submit(http, base, sample, types).await;
    let (code, body) = submission_status(http, base, &request, JOB_TIMEOUT).await;
    let text = String::from_utf8_lossy(&body).to_string();
    assert_eq!(code, StatusCode::OK, "the submission: {text}");
    let m: Value = serde_json::from_slice(&body).unwrap();
    assert!(
        m["outcome"].as_array().is_none_or(Vec::is_empty),
        "the submission reported errors: {m}"
    );
    let written: u64 = m["output"]
        .as_array()
        .unwrap_or_else(|| panic!("no output receipts: {m}"))
        .iter()
        .filter_map(|e| e["count"].as_u64())
        .sum();
    assert_eq!(written as usize, sample.count(types), "receipts: {m}");
    let files = bodies(http, base, &m).await;
    for path in files.keys() {
        assert!(
            path.starts_with("/bulk-submit-file/"),
            "receipt {path} is not on HFS's /bulk-submit-file/ route"
        );
    }
    note(format_args!(
        "bulk submit: complete, {} receipts",
        files.len()
    ));
    Done {
        what: "bulk submit".into(),
        job: Job::Submit(request),
        files,
    }
}

/// Asks the server on the restored folder about a job complete before the
/// loss: it must be complete, list exactly the same files, and serve each
/// byte for byte. Returns what is wrong.
async fn check_done(http: &reqwest::Client, base: &str, done: &Done) -> Vec<String> {
    let (code, body) = match &done.job {
        Job::Export(path) => {
            let (code, _, body) =
                poll(http, &format!("{base}{path}"), Duration::from_secs(60)).await;
            (code, body)
        }
        Job::Submit(request) => {
            submission_status(http, base, request, Duration::from_secs(60)).await
        }
    };
    if code != StatusCode::OK {
        return vec![format!(
            "{}: complete before the loss, answers {code} after it: {}",
            done.what,
            String::from_utf8_lossy(&body)
                .chars()
                .take(300)
                .collect::<String>()
        )];
    }
    let m: Value = serde_json::from_slice(&body).unwrap();
    let mut problems = Vec::new();
    let mut listed = BTreeSet::new();
    for key in ["output", "deleted", "error"] {
        for e in m[key].as_array().into_iter().flatten() {
            let url = e["url"].as_str().unwrap();
            let path = path_under(url, base);
            listed.insert(path.clone());
            let r = http.get(url).send().await.unwrap();
            let status = r.status();
            let got = r.bytes().await.unwrap_or_default();
            match done.files.get(&path) {
                None => problems.push(format!("{}: lists {path}, not listed before", done.what)),
                Some(before) if status != StatusCode::OK || got.as_ref() != before.as_slice() => {
                    problems.push(format!(
                        "{}: {path}: {status}, {} bytes{} (before: {} bytes)",
                        done.what,
                        got.len(),
                        if status == StatusCode::OK {
                            ", other bytes"
                        } else {
                            ""
                        },
                        before.len()
                    ))
                }
                Some(_) => {}
            }
        }
    }
    for path in done.files.keys().filter(|p| !listed.contains(*p)) {
        problems.push(format!("{}: {path} is no longer listed", done.what));
    }
    problems
}

/// How the export in flight at the loss ended on the restored folder, and
/// what is wrong: a complete manifest must list only files served whole
/// (200, as many lines as its count) holding every resource exactly once;
/// otherwise the job must be failed or unknown.
async fn settle_in_flight(
    http: &reqwest::Client,
    base: &str,
    status_path: &str,
    expected: &Ids,
) -> (String, Vec<String>) {
    let url = format!("{base}{status_path}");
    let (code, _, body) = poll(http, &url, Duration::from_secs(180)).await;
    let text = String::from_utf8_lossy(&body)
        .chars()
        .take(300)
        .collect::<String>();
    match code {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND | StatusCode::GONE => {
            return (format!("unknown after the restore ({code})"), Vec::new())
        }
        c if c.is_client_error() || c.is_server_error() => {
            return (format!("failed ({code}): {text}"), Vec::new())
        }
        c => {
            return (
                format!("answered {c}"),
                vec![format!("the in-flight export answers {c}: {text}")],
            )
        }
    }
    let m: Value = serde_json::from_slice(&body).unwrap();
    let mut problems = Vec::new();
    let mut ids: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut files = 0;
    for key in ["output", "deleted", "error"] {
        for e in m[key].as_array().into_iter().flatten() {
            files += 1;
            let url = e["url"].as_str().unwrap();
            let r = http.get(url).send().await.unwrap();
            let status = r.status();
            let got = r.bytes().await.unwrap_or_default();
            let lines: Vec<&[u8]> = got
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .collect();
            let count = e["count"].as_u64();
            if status != StatusCode::OK || count.is_some_and(|c| c != lines.len() as u64) {
                problems.push(format!(
                    "the in-flight export lists {url}: {status}, {} lines where {count:?} were \
                     listed",
                    lines.len()
                ));
                continue;
            }
            if key == "output" {
                for l in lines {
                    let v: Value = serde_json::from_slice(l).unwrap_or_default();
                    if let (Some(t), Some(id)) = (v["resourceType"].as_str(), v["id"].as_str()) {
                        ids.entry(t.to_string()).or_default().push(id.to_string());
                    }
                }
            }
        }
    }
    if problems.is_empty() {
        if let Err(e) =
            std::panic::catch_unwind(|| assert_exactly_once("the in-flight export", expected, &ids))
        {
            problems.push(
                e.downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| "not every resource exactly once".into()),
            );
        }
    }
    (
        format!("complete after the restart, {files} files"),
        problems,
    )
}

/// A copy of this build's `export-store` in `dir`, which the drill runs
/// throughout (HFS and `verify`): a rebuild of the binary while the drill
/// runs does not change what runs. It must have the `hfs` command.
fn binary_copy(dir: &Path) -> std::path::PathBuf {
    let built = env!("CARGO_BIN_EXE_export-store");
    let exe = dir.join("export-store");
    std::fs::copy(built, &exe).unwrap_or_else(|e| panic!("copy {built}: {e}"));
    let o = std::process::Command::new(&exe)
        .args(["hfs", "--help"])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{built} has no `hfs` command (built without the `hfs` feature?): {}",
        String::from_utf8_lossy(&o.stderr)
    );
    exe
}

/// `export-store verify` on a store file: passed, and what it printed.
fn verify(exe: &Path, db: &Path) -> (bool, String) {
    let o = std::process::Command::new(exe)
        .args(["verify", "--db"])
        .arg(db)
        .output()
        .unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// HFS's record of an export in its own database (read-only): status,
/// fencing token, attempts; `None` when it does not know the job.
fn job_row(fhir_db: &Path, job: &str) -> Option<(String, i64, i64)> {
    let c = rusqlite::Connection::open_with_flags(
        fhir_db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .unwrap();
    c.query_row(
        "SELECT status, fencing_token, attempts FROM bulk_export_jobs WHERE id = ?1",
        [job],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .ok()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Seconds per 100 MB (10^8 bytes).
fn per_100_mb(t: Duration, bytes: u64) -> f64 {
    t.as_secs_f64() * 1e8 / bytes.max(1) as f64
}

// ---------------------------------------------------------------------------
// Restore time of a store of known size
// ---------------------------------------------------------------------------

/// Builds a store of about `KNOWN_PARTS` × `KNOWN_PART_BYTES` (finished
/// parts of random base64 NDJSON, which zstd barely shrinks), replicates it
/// with Litestream, restores it into a fresh file and times that. Returns
/// the restored file's size and the time.
fn restore_known_size() -> (u64, Duration) {
    use sqlite_export_store::{ExportJobId, ExportPartKey, SqliteOutputStore};
    let dir = tempfile::Builder::new()
        .prefix("export-store-litestream-known-")
        .tempdir()
        .unwrap();
    let db = dir.path().join("known.db");
    drop(SqliteOutputStore::open(&db, "http://127.0.0.1:8080").unwrap());
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut ndjson = Vec::with_capacity(KNOWN_PART_BYTES + 200);
    let mut lines = 0;
    while ndjson.len() < KNOWN_PART_BYTES {
        ndjson.extend_from_slice(b"{\"resourceType\":\"Binary\",\"data\":\"");
        for _ in 0..4000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ndjson.push(B64[(s & 63) as usize]);
        }
        ndjson.extend_from_slice(b"\"}\n");
        lines += 1;
    }
    let keys = (0..KNOWN_PARTS as u32).map(|i| {
        ExportPartKey::output(
            "default",
            ExportJobId::from(format!("known-{}", i / 16)),
            "Binary",
            i % 16,
            1,
        )
    });
    sqlite_export_store::__test_support::bulk::insert_finished(
        &db,
        keys,
        &ndjson,
        lines,
        unix_ms(),
    )
    .unwrap();
    let replication = Replication::start(&[db.as_path()]);
    replication.sync_wait(&db);
    let dest = dir.path().join("restored.db");
    let started = Instant::now();
    replication.restore(&db, &dest, &[]);
    let took = started.elapsed();
    let size = std::fs::metadata(&dest).unwrap().len();
    (size, took)
}

// ---------------------------------------------------------------------------
// The drill
// ---------------------------------------------------------------------------

#[test]
fn node_loss_restores_every_replicated_job_from_litestream() {
    let started = Instant::now();
    let sample = Sample::load();
    let root = tempfile::Builder::new()
        .prefix("export-store-litestream-hfs-")
        .tempdir()
        .unwrap();
    let (node_a, node_b) = (root.path().join("node-a"), root.path().join("node-b"));
    let (data_a, data_b) = (node_a.join("data"), node_b.join("data"));
    std::fs::create_dir_all(&data_a).unwrap();
    std::fs::create_dir_all(&data_b).unwrap();
    let exe = binary_copy(root.path());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let http = http();

    // The node: HFS, and Litestream on both of its files.
    let mut hfs = Hfs::start_in(&node_a, &data_a, options(&exe));
    let (fhir_a, output_a) = (data_a.join("fhir.db"), hfs.output_db.clone());
    let settings = Settings::default();
    let mut replication =
        Replication::start_with(&[fhir_a.as_path(), output_a.as_path()], settings.clone());
    note(format_args!(
        "HFS and Litestream up, {:.0?} (monitor-interval {:?}, sync-interval {:?})",
        started.elapsed(),
        settings.monitor_interval,
        settings.sync_interval
    ));
    let probe = LagProbe::start(&output_a, &replication);

    // 1. The sample, three exports and a bulk submit, all complete.
    let all_patients: BTreeSet<String> = sample.ids(&["Patient"])["Patient"].clone();
    let done: Vec<Done> = rt.block_on(async {
        load(&http, &hfs.base, &sample, TYPES, LoadMode::Transaction).await;
        let base = hfs.base.as_str();
        let system = format!("/$export?_type={}", TYPES.join(","));
        let compartment_types = ["Patient", "Condition"];
        let compartment = sample.compartment_ids(&compartment_types, &all_patients);
        let (every, conditions) = (sample.ids(TYPES), sample.ids(&["Condition"]));
        let (a, b) = tokio::join!(
            run_export(&http, base, "system export", &system, &every),
            run_export(
                &http,
                base,
                "Patient export",
                "/Patient/$export?_type=Patient,Condition",
                &compartment,
            ),
        );
        let (c, d) = tokio::join!(
            run_export(
                &http,
                base,
                "Condition export",
                "/$export?_type=Condition",
                &conditions,
            ),
            run_submit(&http, base, &sample),
        );
        vec![a, b, c, d]
    });

    // 2. The replication point. The lag probe first gets the LTX files of
    // every finalize it saw (bounded: what is still missing is reported),
    // then `litestream sync -wait` on both files.
    let deadline = Instant::now() + Duration::from_secs(20);
    while probe.unreplicated() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let lag = probe.finish();
    let synced_fhir = replication.sync_wait(&fhir_a);
    let synced_output = replication.sync_wait(&output_a);
    let complete_and_replicated: Vec<String> = done.iter().map(|d| d.what.clone()).collect();
    note(format_args!(
        "replicated: fhir.db txid {} (replica {}), export-output.db txid {} (replica {}); \
         complete and replicated: {complete_and_replicated:?}, {:.0?}",
        synced_fhir.txid,
        synced_fhir.replicated_txid,
        synced_output.txid,
        synced_output.replicated_txid,
        started.elapsed()
    ));
    assert!(
        synced_fhir.replicated_txid >= synced_fhir.txid
            && synced_output.replicated_txid >= synced_output.txid,
        "litestream sync -wait left the replica behind: {synced_fhir:?} {synced_output:?}"
    );

    // 3. One more export in flight, then the node is lost: once it has
    // finished a few parts and its kick-off has reached the bucket (a
    // level-0 LTX file of fhir.db cut after it), so that the restored HFS
    // usually finds it claimed, not yet complete, with some of its parts
    // replicated and some not.
    let in_flight_path = format!("/$export?_type={}", TYPES.join(","));
    let kicked_off_ms = unix_ms();
    let in_flight_status = rt.block_on(kickoff(&http, &hfs.url(&in_flight_path)));
    let in_flight_job = job_of(&in_flight_status);
    let in_flight_status = path_under(&in_flight_status, &hfs.base);
    let fhir_client = replication.moto().client(BUCKET);
    let fhir_prefix = replication.prefix(&fhir_a);
    let (mut kickoff_replicated, mut after) = (false, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut finished_before = 0;
    while Instant::now() < deadline {
        if !kickoff_replicated {
            let found = rt
                .block_on(new_level0(&*fhir_client, &fhir_prefix, after.as_ref()))
                .unwrap_or_else(|e| panic!("{e}"));
            if let Some((key, _)) = found.last() {
                after = Some(object_store::path::Path::from(key.as_str()));
            }
            kickoff_replicated = found.iter().any(|(_, created)| *created >= kicked_off_ms);
        }
        finished_before = parts_of(&output_a, &in_flight_job)
            .iter()
            .filter(|p| p.finalized)
            .count();
        if kickoff_replicated && finished_before >= IN_FLIGHT_PARTS {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let in_flight_at_loss = job_row(&fhir_a, &in_flight_job);
    replication.kill();
    hfs.kill();
    let snapshots_fhir = replication.snapshot_syncs_of(&fhir_a).len();
    let snapshots_output = replication.snapshot_syncs_of(&output_a).len();
    std::fs::remove_dir_all(&data_a).unwrap();
    note(format_args!(
        "node lost: Litestream and HFS killed with the in-flight export {in_flight_job} at \
         {in_flight_at_loss:?} (status, token, attempts), {finished_before} parts finished, its \
         kick-off replicated: {kickoff_replicated}; data folder deleted, {:.0?}",
        started.elapsed()
    ));

    // 4. Both files restored into a fresh folder.
    let (fhir_b, output_b) = (data_b.join("fhir.db"), data_b.join("export-output.db"));
    let mut restores = Vec::new();
    for (from, to) in [(&fhir_a, &fhir_b), (&output_a, &output_b)] {
        let t = Instant::now();
        replication.restore(from, to, &[]);
        restores.push((
            to.file_name().unwrap().to_string_lossy().to_string(),
            std::fs::metadata(to).unwrap().len(),
            t.elapsed(),
        ));
    }
    let mut problems: Vec<String> = Vec::new();
    let (ok, out) = verify(&exe, &output_b);
    if !ok {
        problems.push(format!("export-store verify on the restored store:\n{out}"));
    }
    let restored_job = job_row(&fhir_b, &in_flight_job);
    let restored_parts = parts_of(&output_b, &in_flight_job);
    let in_flight_restored = format!(
        "HFS's record {restored_job:?} (status, token, attempts); the store holds {} parts \
         of it, {} finished, tokens {:?}",
        restored_parts.len(),
        restored_parts.iter().filter(|p| p.finalized).count(),
        restored_parts
            .iter()
            .map(|p| p.fencing_token)
            .collect::<BTreeSet<_>>()
    );
    note(format_args!(
        "restored {restores:?}, verify passed: {ok}; in-flight export: {in_flight_restored}, \
         {:.0?}",
        started.elapsed()
    ));

    // 5. HFS on the restored folder.
    let mut hfs = Hfs::start_in(&node_b, &data_b, options(&exe));
    let in_flight_outcome = rt.block_on(async {
        for d in &done {
            problems.extend(check_done(&http, &hfs.base, d).await);
        }
        note(format_args!(
            "checked {} complete jobs ({} files), {:.0?}",
            done.len(),
            done.iter().map(|d| d.files.len()).sum::<usize>(),
            started.elapsed()
        ));
        let (outcome, wrong) =
            settle_in_flight(&http, &hfs.base, &in_flight_status, &sample.ids(TYPES)).await;
        problems.extend(wrong);
        outcome
    });
    note(format_args!(
        "in-flight export: {in_flight_outcome}, {:.0?}",
        started.elapsed()
    ));

    // 6. The store once HFS has stopped.
    let status = hfs.shut_down();
    if !status.success() {
        problems.push(format!(
            "HFS on the restored folder exited {status}\n{}",
            hfs.log_tail()
        ));
    }
    let (ok, out) = verify(&exe, &output_b);
    if !ok {
        problems.push(format!(
            "export-store verify after HFS ran on the restored store:\n{out}"
        ));
    }
    drop(replication);
    let drill = started.elapsed();

    // Restore time of a store of known size.
    let (known_bytes, known_took) = restore_known_size();

    println!(
        "node-loss drill under HFS and Litestream {} (monitor-interval {:?}, sync-interval \
         {:?}), drill {:.0?}, total {:.0?}:",
        litestream_support::LITESTREAM_VERSION,
        settings.monitor_interval,
        settings.sync_interval,
        drill,
        started.elapsed()
    );
    println!(
        "  replication lag of export-output.db, finalize commit → its LTX file listed in the \
         bucket: p50 {}, p99 {}, longest {} over {} finalizes ({} level-0 LTX files; {} not \
         replicated within 20 s; the probe saw commits p50 {} / p99 {} after their stamp)",
        ms(quantile(&lag.lag, 0.5)),
        ms(quantile(&lag.lag, 0.99)),
        ms(quantile(&lag.lag, 1.0)),
        lag.lag.len(),
        lag.ltx_files,
        lag.unreplicated,
        ms(quantile(&lag.seen_late, 0.5)),
        ms(quantile(&lag.seen_late, 0.99)),
    );
    if !lag.errors.is_empty() {
        println!(
            "  lag probe errors: {:?}",
            &lag.errors[..lag.errors.len().min(5)]
        );
    }
    for (name, bytes, t) in &restores {
        println!(
            "  restore of {name}: {:.1} MiB in {:.2} s ({:.2} s per 100 MB)",
            mib(*bytes),
            t.as_secs_f64(),
            per_100_mb(*t, *bytes)
        );
    }
    println!(
        "  restore of a store of known size: {:.1} MiB in {:.2} s ({:.2} s per 100 MB)",
        mib(known_bytes),
        known_took.as_secs_f64(),
        per_100_mb(known_took, known_bytes)
    );
    println!("  complete and replicated before the loss: {complete_and_replicated:?}");
    println!(
        "  in-flight export at the loss: {in_flight_at_loss:?} (status, token, attempts), \
         {finished_before} parts finished, kick-off replicated: {kickoff_replicated}; restored: \
         {in_flight_restored}; then: {in_flight_outcome}"
    );
    println!(
        "  full snapshots Litestream uploaded: fhir.db {snapshots_fhir}, export-output.db \
         {snapshots_output}"
    );
    assert!(
        problems.is_empty(),
        "after the node loss:\n  {}",
        problems.join("\n  ")
    );
    assert!(
        !lag.lag.is_empty(),
        "the lag probe measured no finalize: {:?}",
        lag.errors
    );
}
