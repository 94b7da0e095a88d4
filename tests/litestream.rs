//! The store under Litestream: moto (`.ci/moto.sh`) as the S3-compatible
//! replica and Litestream 0.5 (`.ci/litestream.sh`) replicating one store
//! file while several writer processes finalize parts and reader processes
//! read them (feature `litestream-tests`; without the two programs these
//! tests fail and say how to install them).
//!
//! The same workload runs three times: without Litestream, under Litestream
//! with the store's own checkpoints, and under Litestream with
//! [`Checkpoints::External`]. What it asserts:
//!
//! - every part finalized is restored byte for byte from the replica
//!   (`litestream restore` into a fresh file, opened as a store, verified);
//! - Litestream uploads no full snapshot beyond its first one (its log's
//!   `sync … snap=true` lines);
//! - the `-wal` stays below a stated bound;
//! - no finalize waited as long as the busy timeout (a checkpoint that held
//!   writers would show there).
//!
//! With `--nocapture` it prints the figures: finalize waits with and without
//! Litestream, the largest `-wal`, replication lag (commit → in the bucket)
//! and restore time per 100 MB of store. Times are printed, never asserted,
//! but for those hold-up bounds.
#![cfg(feature = "litestream-tests")]

mod litestream_support;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use litestream_support::{quantile, Replication};
use sqlite_export_store::{
    Checkpoints, ExportJobId, ExportOutputStore, ExportPartKey, PartFilter, SqliteOutputStore,
    StoreOptions,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ROLE: &str = "EXPORT_STORE_LITESTREAM_ROLE";
const DB: &str = "EXPORT_STORE_LITESTREAM_DB";
const ID: &str = "EXPORT_STORE_LITESTREAM_ID";
const REPORT: &str = "EXPORT_STORE_LITESTREAM_REPORT";
const MODE: &str = "EXPORT_STORE_LITESTREAM_CHECKPOINTS";
const STOP: &str = "EXPORT_STORE_LITESTREAM_STOP";
const TEST: &str = "store_under_litestream";

const TENANT: &str = "acme";
/// Writer processes, parts each, NDJSON bytes per part.
const WRITERS: u32 = 3;
const PARTS: u32 = 12;
const PART_BYTES: usize = 2 << 20;
/// Reader processes.
const READERS: u32 = 2;
/// A writer rests this long after every fourth part, so that each
/// process's writer thread goes idle long enough to truncate the log.
const REST: Duration = Duration::from_millis(1300);
/// The bound on the `-wal` under Litestream with [`Checkpoints::External`]:
/// Litestream checkpoints once the log reaches 1,000 pages (4 MiB), at its
/// next look (every second); one second of these writers plus a batch of
/// chunks (8 MiB at most) stays well below it.
const WAL_BOUND: u64 = 32 << 20;
/// The store's busy timeout (its default).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

fn options(mode: &str) -> StoreOptions {
    let o = StoreOptions::default().with_busy_timeout(BUSY_TIMEOUT);
    match mode {
        "external" => o.with_checkpoints(Checkpoints::External),
        _ => o,
    }
}

// ------------------------------------------------------------ the content

/// A part's NDJSON, seeded by the writer and part, so the parent can make
/// it again ([`litestream_support::binary_lines`]).
fn content(writer: u32, part: u32) -> Vec<u8> {
    litestream_support::binary_lines("w", writer, part, PART_BYTES)
}

fn key(writer: u32, part: u32) -> ExportPartKey {
    ExportPartKey::output(
        TENANT,
        ExportJobId::from(format!("job-w{writer}")),
        "Binary",
        part,
        1,
    )
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

// ------------------------------------------------------------ the children

fn child_main(role: &str) -> ! {
    let db = PathBuf::from(std::env::var(DB).unwrap());
    let id: u32 = std::env::var(ID).unwrap().parse().unwrap();
    let mode = std::env::var(MODE).unwrap();
    let mut report = std::fs::File::create(std::env::var(REPORT).unwrap()).unwrap();
    let stop = PathBuf::from(std::env::var(STOP).unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let store = SqliteOutputStore::open_with(&db, "http://hfs.test", options(&mode)).unwrap();
        match role {
            "writer" => {
                for part in 0..PARTS {
                    let k = key(id, part);
                    let bytes = content(id, part);
                    let mut w = store.open_writer(&k).await.unwrap();
                    w.writer.write_all(&bytes).await.unwrap();
                    w.byte_count = bytes.len() as u64;
                    w.line_count = bytes.iter().filter(|&&b| b == b'\n').count() as u64;
                    // Every chunk stored first: what is timed is the
                    // durable commit that publishes the part, the step a
                    // checkpoint holding the database would hold up.
                    w.writer.shutdown().await.unwrap();
                    let t = Instant::now();
                    store.finalize_part(&k, w).await.unwrap();
                    let wait = t.elapsed();
                    writeln!(report, "part {part} {} {}", wait.as_micros(), unix_ms()).unwrap();
                    if part % 4 == 3 {
                        tokio::time::sleep(REST).await;
                    }
                }
            }
            "reader" => {
                let mut reads = 0u64;
                let mut longest = Duration::ZERO;
                let mut i = id as usize;
                while !stop.exists() {
                    let parts: Vec<_> = store
                        .list_parts(&PartFilter::all())
                        .await
                        .unwrap()
                        .into_iter()
                        .filter(|p| p.finished)
                        .collect();
                    if parts.is_empty() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    i = (i * 7 + 3) % parts.len();
                    let t = Instant::now();
                    let mut r = store.open_reader(&parts[i].key).await.unwrap();
                    let mut buf = Vec::new();
                    r.read_to_end(&mut buf).await.unwrap();
                    assert_eq!(buf.len() as u64, parts[i].byte_count);
                    longest = longest.max(t.elapsed());
                    reads += 1;
                }
                writeln!(report, "reads {reads} {}", longest.as_micros()).unwrap();
            }
            other => panic!("unknown role {other}"),
        }
    });
    std::process::exit(0)
}

fn spawn_child(role: &str, id: u32, db: &Path, mode: &str, report: &Path, stop: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST, "--test-threads", "1", "-q", "--nocapture"])
        .env(ROLE, role)
        .env(DB, db)
        .env(ID, id.to_string())
        .env(MODE, mode)
        .env(REPORT, report)
        .env(STOP, stop)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

// ------------------------------------------------------------ the parent

/// What one run of the workload measured.
#[derive(Debug, Default)]
struct Figures {
    name: String,
    finalize_waits: Vec<Duration>,
    /// Commit time (Unix ms) of every part.
    commits: Vec<u64>,
    max_wal: u64,
    reads: u64,
    longest_read: Duration,
    /// Commit → in the bucket, per part.
    lag: Vec<Duration>,
    snapshots: Vec<String>,
    ltx_levels: BTreeMap<u32, (usize, u64)>,
    restore: Option<(Duration, u64)>,
    wall: Duration,
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

impl Figures {
    fn print(&self) {
        println!("== {}", self.name);
        println!(
            "  finalize wait: p50 {}, p99 {}, longest {} ({} parts, run {:.1} s)",
            ms(quantile(&self.finalize_waits, 0.5)),
            ms(quantile(&self.finalize_waits, 0.99)),
            ms(quantile(&self.finalize_waits, 1.0)),
            self.finalize_waits.len(),
            self.wall.as_secs_f64()
        );
        println!(
            "  largest -wal: {:.1} MiB; reads: {} parts, longest {}",
            self.max_wal as f64 / (1 << 20) as f64,
            self.reads,
            ms(self.longest_read)
        );
        if !self.lag.is_empty() {
            println!(
                "  replication lag commit → in the bucket: p50 {}, p99 {}, longest {}",
                ms(quantile(&self.lag, 0.5)),
                ms(quantile(&self.lag, 0.99)),
                ms(quantile(&self.lag, 1.0))
            );
        }
        for (level, (n, bytes)) in &self.ltx_levels {
            println!(
                "  LTX level {level}: {n} files, {:.1} MiB",
                *bytes as f64 / (1 << 20) as f64
            );
        }
        println!("  full snapshots uploaded: {}", self.snapshots.len());
        for s in &self.snapshots {
            println!("    {s}");
        }
        if let Some((t, bytes)) = self.restore {
            println!(
                "  restore: {:.2} s for {:.1} MiB ({:.2} s per 100 MB)",
                t.as_secs_f64(),
                bytes as f64 / (1 << 20) as f64,
                t.as_secs_f64() * 1e8 / bytes as f64
            );
        }
    }
}

/// Samples the `-wal` file's size until stopped; the largest seen.
struct WalWatch {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WalWatch {
    fn start(db: &Path) -> WalWatch {
        let wal = PathBuf::from(format!("{}-wal", db.display()));
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(AtomicU64::new(0));
        let (s, m) = (stop.clone(), max.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                if let Ok(meta) = std::fs::metadata(&wal) {
                    m.fetch_max(meta.len(), Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        WalWatch {
            stop,
            max,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        self.max.load(Ordering::SeqCst)
    }
}

/// Follows Litestream's local and replicated positions every 50 ms: when
/// each local transaction was first seen, and when the bucket first held
/// each.
struct LagProbe {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<(Instant, u64, u64)>>>,
}

const PROBE_EVERY: Duration = Duration::from_millis(50);

impl LagProbe {
    fn start(rep: Arc<Replication>, db: PathBuf) -> LagProbe {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !s.load(Ordering::SeqCst) {
                let local = rep.local_txid(&db);
                let remote = rep.replicated_txid(&db);
                samples.push((Instant::now(), local, remote));
                std::thread::sleep(PROBE_EVERY);
            }
            samples
        });
        LagProbe {
            stop,
            thread: Some(thread),
        }
    }

    /// Per commit (an `Instant`): the time until the bucket held the first
    /// local transaction seen only after the commit (an upper bound of the
    /// commit's own lag, by up to one Litestream sync).
    fn finish(mut self, commits: &[Instant]) -> Vec<Duration> {
        self.stop.store(true, Ordering::SeqCst);
        let samples = self.thread.take().unwrap().join().unwrap();
        // When each local transaction was first seen.
        let mut first_seen: Vec<(Instant, u64)> = Vec::new();
        for &(t, local, _) in &samples {
            if first_seen.last().is_none_or(|&(_, l)| local > l) {
                first_seen.push((t, local));
            }
        }
        let mut lags = Vec::new();
        for &c in commits {
            // A transaction first seen more than two probe periods after
            // the commit was written by a sync that ran after it.
            let Some(&(_, txid)) = first_seen.iter().find(|(t, _)| *t > c + PROBE_EVERY * 2) else {
                continue;
            };
            if let Some(&(t, _, _)) = samples.iter().find(|(_, _, r)| *r >= txid) {
                lags.push(t.saturating_duration_since(c));
            }
        }
        lags
    }
}

/// Runs the workload on a fresh store: `WRITERS` writer processes and
/// `READERS` reader processes, under Litestream if `replicate`.
fn run(name: &str, mode: &str, replicate: bool) -> Figures {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store.db");
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            SqliteOutputStore::open_with(&db, "http://hfs.test", options(mode)).unwrap();
        });
    }
    let rep = replicate.then(|| Arc::new(Replication::start(&[&db])));
    let stop = dir.path().join("stop");
    let wal = WalWatch::start(&db);
    let probe = rep.as_ref().map(|r| LagProbe::start(r.clone(), db.clone()));
    let started = Instant::now();
    // Instant and Unix time together, to place the children's commits.
    let (t0, u0) = (Instant::now(), unix_ms());
    let report = |role: &str, i: u32| dir.path().join(format!("{role}{i}.report"));
    let mut readers: Vec<Child> = (0..READERS)
        .map(|i| spawn_child("reader", i, &db, mode, &report("reader", i), &stop))
        .collect();
    let mut writers: Vec<Child> = (0..WRITERS)
        .map(|i| spawn_child("writer", i, &db, mode, &report("writer", i), &stop))
        .collect();
    for (i, w) in writers.iter_mut().enumerate() {
        let status = w.wait().unwrap();
        assert!(status.success(), "writer {i}: {status}");
    }
    let wall = started.elapsed();
    std::fs::write(&stop, b"").unwrap();
    for (i, r) in readers.iter_mut().enumerate() {
        let status = r.wait().unwrap();
        assert!(status.success(), "reader {i}: {status}");
    }
    let mut f = Figures {
        name: name.to_string(),
        wall,
        ..Default::default()
    };
    for i in 0..WRITERS {
        for line in std::fs::read_to_string(report("writer", i))
            .unwrap()
            .lines()
        {
            let v: Vec<&str> = line.split(' ').collect();
            f.finalize_waits
                .push(Duration::from_micros(v[2].parse().unwrap()));
            f.commits.push(v[3].parse().unwrap());
        }
    }
    for i in 0..READERS {
        let text = std::fs::read_to_string(report("reader", i)).unwrap();
        let v: Vec<&str> = text.trim().split(' ').collect();
        f.reads += v[1].parse::<u64>().unwrap();
        f.longest_read = f
            .longest_read
            .max(Duration::from_micros(v[2].parse().unwrap()));
    }
    if let Some(rep) = &rep {
        rep.sync_wait(&db);
        let commits: Vec<Instant> = f
            .commits
            .iter()
            .map(|&u| t0 + Duration::from_millis(u.saturating_sub(u0)))
            .collect();
        f.lag = probe.unwrap().finish(&commits);
        f.snapshots = rep.snapshot_syncs_of(&db);
        for o in rep.ltx_objects(&db) {
            let e = f.ltx_levels.entry(o.level).or_default();
            e.0 += 1;
            e.1 += o.size;
        }
        let restored = dir.path().join("restored.db");
        let t = Instant::now();
        rep.restore(&db, &restored, &[]);
        let took = t.elapsed();
        let size = std::fs::metadata(&restored).unwrap().len();
        f.restore = Some((took, size));
        check_restored(&restored);
    }
    f.max_wal = wal.finish();
    f
}

/// Opens the restored file as a store: it verifies, and holds every part
/// the writers finalized, byte for byte.
fn check_restored(path: &Path) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store =
            SqliteOutputStore::open_with(path, "http://hfs.test", options("store")).unwrap();
        let report = store.verify().await.unwrap();
        assert!(report.is_ok(), "the restored store: {:?}", report.problems);
        let finished = store
            .list_parts(&PartFilter::all())
            .await
            .unwrap()
            .into_iter()
            .filter(|p| p.finished)
            .count();
        assert_eq!(finished, (WRITERS * PARTS) as usize);
        for w in 0..WRITERS {
            for p in 0..PARTS {
                let mut r = store.open_reader(&key(w, p)).await.unwrap();
                let mut got = Vec::new();
                r.read_to_end(&mut got).await.unwrap();
                assert!(got == content(w, p), "part {p} of writer {w} differs");
            }
        }
    });
}

#[test]
fn store_under_litestream() {
    if let Ok(role) = std::env::var(ROLE) {
        child_main(&role);
    }
    litestream_support::litestream_exe();
    let runs = [
        run(
            "without Litestream (the store's checkpoints)",
            "store",
            false,
        ),
        run("Litestream, the store's checkpoints", "store", true),
        run("Litestream, Checkpoints::External", "external", true),
    ];
    for f in &runs {
        f.print();
    }
    let mut problems = Vec::<String>::new();
    for f in &runs[1..] {
        let longest = quantile(&f.finalize_waits, 1.0);
        if longest >= BUSY_TIMEOUT {
            problems.push(format!(
                "{}: a finalize waited {} (the busy timeout is {})",
                f.name,
                ms(longest),
                ms(BUSY_TIMEOUT)
            ));
        }
    }
    // With the store's own checkpoints, its idle truncation and automatic
    // checkpoints start the log over before Litestream has read it, and
    // Litestream uploads the whole database again (printed above, not
    // asserted: how often depends on timing). With External, never.
    let external = &runs[2];
    if external.snapshots.len() != 1 {
        problems.push(format!(
            "{}: Litestream uploaded {} full snapshots, expected only its first: {:#?}",
            external.name,
            external.snapshots.len(),
            external.snapshots
        ));
    }
    let snapshot_files = external.ltx_levels.get(&9).map_or(0, |l| l.0);
    if snapshot_files != 1 {
        problems.push(format!(
            "{}: {snapshot_files} snapshot files (level 9) in the bucket, expected 1",
            external.name
        ));
    }
    if external.max_wal >= WAL_BOUND {
        problems.push(format!(
            "{}: the -wal reached {} bytes (bound {WAL_BOUND})",
            external.name, external.max_wal
        ));
    }
    assert!(problems.is_empty(), "{problems:#?}");
}
