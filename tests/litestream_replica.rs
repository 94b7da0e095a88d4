//! A read-only replica that serves downloads, kept current through
//! Litestream (feature `litestream-tests`; needs `.ci/moto.sh` and
//! `.ci/litestream.sh`).
//!
//! The replica node runs three processes, as `docs/operations.md` sets
//! them up: `litestream restore -f` keeping a private copy of the primary
//! current, `export-store mirror` copying each finished part out of that
//! copy, checked, into the replica store, and `export-store serve
//! --read-only` serving the replica store. The copy Litestream follows is
//! never served: Litestream 0.5.17 (`Replica.applyLTXFile`, replica.go)
//! writes each LTX file's pages into it in place and tells readers so only
//! when page 1 is among them.
//!
//! Checks, while a writer finalizes parts on the primary and a client
//! downloads from the replica all along: every part finalized on the
//! primary becomes downloadable on the replica byte for byte; every 200
//! answer is whole and right; a part written but not finalized, replicated
//! and in the followed copy, is 404; a job deleted on the primary
//! disappears from the replica; `verify` passes on the replica. With
//! `--nocapture` it prints the lag from finalize on the primary to
//! downloadable on the replica (p50/p99) and the download throughput of
//! the replica beside a `serve --read-only` of the primary.
#![cfg(feature = "litestream-tests")]

mod litestream_support;
mod server_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use litestream_support::{quantile, Follower, Replication};
use server_support::ServeProcess;
use sqlite_export_store::{
    Checkpoints, ExportJobId, ExportOutputStore, ExportPartKey, SqliteOutputStore, StoreOptions,
    TenantContext, TenantId,
};
use tokio::io::AsyncWriteExt;

const TENANT: &str = "default";
/// Jobs written while the replica runs, parts each, NDJSON bytes a part.
const JOBS: u32 = 4;
const PARTS: u32 = 4;
const PART_BYTES: usize = 2 << 20;
/// Litestream's follow interval and the mirror's pause between passes.
const FOLLOW_EVERY: Duration = Duration::from_millis(100);
const MIRROR_EVERY: &str = "100ms";
/// The generous bound on finalize (or delete) → seen on the replica.
const LAG_BOUND: Duration = Duration::from_secs(45);
/// Rounds of the throughput comparison.
const ROUNDS: usize = 3;

/// A part's NDJSON, seeded by job and part
/// ([`litestream_support::binary_lines`]).
fn content(job: u32, part: u32) -> Vec<u8> {
    litestream_support::binary_lines("j", job, part, PART_BYTES)
}

fn job_id(job: u32) -> String {
    format!("job-{job}")
}

fn key(job: u32, part: u32) -> ExportPartKey {
    ExportPartKey::output(TENANT, ExportJobId::from(job_id(job)), "Binary", part, 1)
}

/// The part's path under a server's base URL.
fn path_of(job: u32, part: u32) -> String {
    format!("/export-file/{}/Binary-{part}", job_id(job))
}

async fn write_part(
    store: &SqliteOutputStore,
    job: u32,
    part: u32,
) -> sqlite_export_store::ExportPartWriter {
    let bytes = content(job, part);
    let mut w = store.open_writer(&key(job, part)).await.unwrap();
    w.writer.write_all(&bytes).await.unwrap();
    w.writer.flush().await.unwrap();
    w.byte_count = bytes.len() as u64;
    w.line_count = bytes.iter().filter(|&&b| b == b'\n').count() as u64;
    w
}

/// What a GET answered: a whole body with 200, another status, or a body
/// that broke off (a clean failure: the client sees an error, not a
/// short success).
#[derive(Debug)]
enum Got {
    Whole(Vec<u8>),
    Status(u16),
    BrokeOff(#[allow(dead_code)] String),
}

async fn get(http: &reqwest::Client, url: &str) -> Got {
    let r = match http.get(url).send().await {
        Ok(r) => r,
        Err(e) => return Got::BrokeOff(e.to_string()),
    };
    if r.status() != 200 {
        return Got::Status(r.status().as_u16());
    }
    match r.bytes().await {
        Ok(b) => Got::Whole(b.to_vec()),
        Err(e) => Got::BrokeOff(e.to_string()),
    }
}

/// `export-store mirror --from FROM --db DB --every MIRROR_EVERY`, its
/// output in a file; killed on drop.
struct Mirror {
    child: Child,
    log: PathBuf,
}

impl Mirror {
    fn start(from: &Path, db: &Path, log: PathBuf) -> Mirror {
        let child = Command::new(env!("CARGO_BIN_EXE_export-store"))
            .arg("mirror")
            .arg("--from")
            .arg(from)
            .arg("--db")
            .arg(db)
            .args(["--every", MIRROR_EVERY])
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .unwrap();
        Mirror { child, log }
    }

    fn logs(&self) -> String {
        format!(
            "mirror stdout:\n{}\nmirror stderr:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default(),
            std::fs::read_to_string(self.log.with_extension("err")).unwrap_or_default()
        )
    }

    /// Passes that changed the replica so far (one line each).
    fn passes(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("mirrored:"))
            .count()
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The transaction `litestream restore -f` last applied to `follow`
/// (its `-txid` file: the TXID in hexadecimal).
fn followed_txid(follow: &Path) -> u64 {
    std::fs::read_to_string(format!("{}-txid", follow.display()))
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
        .unwrap_or(0)
}

/// Waits until the follower has applied transaction `txid`.
fn await_followed(follow: &Path, follower: &Follower, txid: u64) {
    let deadline = Instant::now() + LAG_BOUND;
    while followed_txid(follow) < txid {
        assert!(
            Instant::now() < deadline,
            "the follower did not reach txid {txid} within {LAG_BOUND:?} (at {}): {}",
            followed_txid(follow),
            follower.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[test]
fn a_read_only_replica_serves_what_the_primary_finalized() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let primary = dir.path().join("primary").join("store.db");
    let follow_dir = dir.path().join("follow");
    let replica_dir = dir.path().join("replica");
    for d in [primary.parent().unwrap(), &follow_dir, &replica_dir] {
        std::fs::create_dir_all(d).unwrap();
    }
    let follow = follow_dir.join("store.db");
    let served = replica_dir.join("store.db");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let options = StoreOptions::default().with_checkpoints(Checkpoints::External);
    let store = rt.block_on(async {
        let store = SqliteOutputStore::open_with(&primary, "http://127.0.0.1:1", options).unwrap();
        // Job 0 is there before replication starts.
        for part in 0..PARTS {
            let w = write_part(&store, 0, part).await;
            store.finalize_part(&key(0, part), w).await.unwrap();
        }
        store
    });

    let rep = Replication::start(&[&primary]);
    let follower = rep.follow(&primary, &follow, FOLLOW_EVERY);
    await_followed(&follow, &follower, rep.sync_wait(&primary).replicated_txid);
    let mirror = Mirror::start(&follow, &served, dir.path().join("mirror.log"));
    let deadline = Instant::now() + LAG_BOUND;
    while mirror.passes() == 0 {
        assert!(
            Instant::now() < deadline,
            "no first pass\n{}",
            mirror.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let replica = ServeProcess::start(&served, &["--read-only".as_ref()]);
    let origin = ServeProcess::start(&primary, &["--read-only".as_ref()]);
    let http = reqwest::Client::new();

    // Downloads from the replica all along: every 200 whole and right.
    let finalized: Arc<Mutex<Vec<(u32, u32)>>> =
        Arc::new(Mutex::new((0..PARTS).map(|p| (0, p)).collect()));
    let stop_loop = Arc::new(AtomicBool::new(false));
    let (whole, broke, wrong) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(Mutex::new(Vec::<String>::new())),
    );
    let background = {
        let (http, base, finalized, stop) = (
            http.clone(),
            replica.base.clone(),
            finalized.clone(),
            stop_loop.clone(),
        );
        let (whole, broke, wrong) = (whole.clone(), broke.clone(), wrong.clone());
        rt.spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let parts = finalized.lock().unwrap().clone();
                let (job, part) = parts[i % parts.len()];
                i += 1;
                match get(&http, &format!("{base}{}", path_of(job, part))).await {
                    Got::Whole(b) if b == content(job, part) => {
                        whole.fetch_add(1, Ordering::SeqCst);
                    }
                    Got::Whole(b) => wrong
                        .lock()
                        .unwrap()
                        .push(format!("{job}/{part}: 200 with {} wrong bytes", b.len())),
                    Got::BrokeOff(_) => {
                        broke.fetch_add(1, Ordering::SeqCst);
                    }
                    // A deleted job's parts go 404.
                    Got::Status(404) if job == 1 => {}
                    Got::Status(s) => wrong.lock().unwrap().push(format!("{job}/{part}: {s}")),
                }
            }
        })
    };

    let mut lags = Vec::new();
    rt.block_on(async {
        for part in 0..PARTS {
            let url = format!("{}{}", replica.base, path_of(0, part));
            match get(&http, &url).await {
                Got::Whole(b) => assert!(b == content(0, part), "job 0 part {part}"),
                other => panic!("job 0 part {part}: {other:?}\n{}", replica.logs()),
            }
        }
        for job in 1..=JOBS {
            let mut pending = Vec::new();
            for part in 0..PARTS {
                let w = write_part(&store, job, part).await;
                if part == 0 {
                    // Written, replicated, in the followed copy, and past
                    // a few mirror passes, not finalized: 404.
                    let txid = rep.sync_wait(&primary).replicated_txid;
                    await_followed(&follow, &follower, txid);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    assert!(
                        staged_in(&follow) > 0,
                        "the followed copy holds the staged part"
                    );
                    let url = format!("{}{}", replica.base, path_of(job, part));
                    match get(&http, &url).await {
                        Got::Status(404) => {}
                        other => panic!("unfinalized job {job} part {part}: {other:?}"),
                    }
                }
                store.finalize_part(&key(job, part), w).await.unwrap();
                pending.push((job, part, Instant::now()));
            }
            for (job, part, at) in pending {
                let url = format!("{}{}", replica.base, path_of(job, part));
                loop {
                    match get(&http, &url).await {
                        Got::Whole(b) => {
                            assert!(
                                b == content(job, part),
                                "job {job} part {part}: wrong bytes"
                            );
                            lags.push(at.elapsed());
                            break;
                        }
                        Got::Status(404) | Got::BrokeOff(_) => {}
                        other => panic!("job {job} part {part}: {other:?}\n{}", replica.logs()),
                    }
                    assert!(
                        at.elapsed() < LAG_BOUND,
                        "job {job} part {part} not on the replica within {LAG_BOUND:?}\n{}\n{}\n{}",
                        follower.log_text(),
                        mirror.logs(),
                        rep.logs()
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                finalized.lock().unwrap().push((job, part));
            }
        }

        // The same parts from the primary's server and the replica's.
        let parts: Vec<(u32, u32)> = (2..=JOBS)
            .flat_map(|j| (0..PARTS).map(move |p| (j, p)))
            .collect();
        let bytes = (parts.len() * PART_BYTES) as f64;
        let mut rates = [Vec::new(), Vec::new()];
        for _ in 0..ROUNDS {
            for (side, base) in [&origin.base, &replica.base].into_iter().enumerate() {
                let t = Instant::now();
                for &(job, part) in &parts {
                    match get(&http, &format!("{base}{}", path_of(job, part))).await {
                        Got::Whole(b) => assert!(b == content(job, part)),
                        other => panic!("{base} job {job} part {part}: {other:?}"),
                    }
                }
                rates[side].push(bytes / 1e6 / t.elapsed().as_secs_f64());
            }
        }
        let [origin_rate, replica_rate] = rates.map(median);

        // A job deleted on the primary disappears from the replica.
        store
            .delete_job_outputs(
                &TenantContext::new(TenantId::new(TENANT)),
                &ExportJobId::from(job_id(1)),
            )
            .await
            .unwrap();
        let deleted = Instant::now();
        for part in 0..PARTS {
            let url = format!("{}{}", replica.base, path_of(1, part));
            loop {
                match get(&http, &url).await {
                    Got::Status(404) => break,
                    Got::Whole(b) => assert!(b == content(1, part)),
                    // Deleted while it streamed: the client sees an error.
                    Got::BrokeOff(_) => {}
                    other => panic!("deleted job 1 part {part}: {other:?}"),
                }
                assert!(deleted.elapsed() < LAG_BOUND, "job 1 still on the replica");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let gone = deleted.elapsed();

        stop_loop.store(true, Ordering::SeqCst);
        background.await.unwrap();

        println!(
            "replica lag, finalize on the primary -> downloadable on the replica: \
             p50 {:?}, p99 {:?} ({} parts); delete -> gone {gone:?}",
            quantile(&lags, 0.5),
            quantile(&lags, 0.99),
            lags.len()
        );
        println!(
            "download throughput, {} parts of {} MiB NDJSON, median of {ROUNDS} rounds: \
             primary {origin_rate:.1} MB/s, replica {replica_rate:.1} MB/s (replica/primary {:.2})",
            parts.len(),
            PART_BYTES >> 20,
            replica_rate / origin_rate
        );
    });

    let wrong = wrong.lock().unwrap().clone();
    println!(
        "mirror passes that changed the replica {}; background downloads: {} whole, {} broke \
         off cleanly, {} wrong; run {:?}",
        mirror.passes(),
        whole.load(Ordering::SeqCst),
        broke.load(Ordering::SeqCst),
        wrong.len(),
        started.elapsed()
    );
    assert!(wrong.is_empty(), "{wrong:?}\n{}", replica.logs());
    assert!(whole.load(Ordering::SeqCst) > 0);
    drop(replica);
    drop(origin);
    drop(mirror);
    drop(follower);
    // The replica store is whole, and holds exactly the primary's parts.
    let verify = Command::new(env!("CARGO_BIN_EXE_export-store"))
        .args(["verify", "--db"])
        .arg(&served)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "verify of the replica: {}",
        String::from_utf8_lossy(&verify.stdout)
    );
    rt.block_on(async {
        let replica = SqliteOutputStore::open_read_only(&served, "http://127.0.0.1:1").unwrap();
        let all = sqlite_export_store::PartFilter::all();
        let mut theirs = store.list_parts(&all).await.unwrap();
        let mut ours = replica.list_parts(&all).await.unwrap();
        theirs.retain(|p| p.finished);
        for list in [&mut theirs, &mut ours] {
            list.sort_by(|a, b| {
                a.key
                    .display()
                    .to_string()
                    .cmp(&b.key.display().to_string())
            });
        }
        let keys = |l: &[sqlite_export_store::PartSummary]| {
            l.iter()
                .map(|p| p.key.display().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(&ours), keys(&theirs));
        drop(store)
    });
}

/// Staged parts in a store file (a plain read-only connection).
fn staged_in(db: &Path) -> i64 {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    c.query_row("SELECT count(*) FROM parts WHERE finalized = 0", [], |r| {
        r.get(0)
    })
    .unwrap()
}
