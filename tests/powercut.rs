//! Power loss: the store on lossyfs, a file system that forgets what was
//! not synced (`tests/lossyfs/`), with the power cut in the middle of its
//! work.
//!
//! Each cut re-runs this test binary as a child process that opens a store
//! on the lossy mount and works with several concurrent writers: writing
//! and finalizing parts, deleting jobs, abandoning staging and reclaiming
//! it, and resting, so that the store's writer checkpoints and truncates its
//! log and gives freed pages back. The child reports each step to a file
//! outside the mount, synced line by line; a `finalize_part` that returned
//! `Ok` is reported after it returned. The parent cuts the power (at a
//! random moment, or at a chosen file operation: a write, fsync or
//! truncation of the log or the database), kills the child, unmounts,
//! mounts what survived and checks what a user relies on:
//!
//! - the file opens, `PRAGMA integrity_check` is `ok`, `verify` passes;
//! - every part reported finalized reads back byte for byte with its
//!   digest, unless a delete the child started covers it; a delete is all
//!   or nothing, and one followed by a finalize of the same worker holds;
//! - every finished part in the file holds exactly what its writer wrote
//!   (no part is partly visible), and no staged part is readable;
//! - staging left behind is reclaimable: `reclaim_abandoned` leaves no
//!   staged part and no orphaned chunk.
//!
//! The next child works on what survived, checks included. Other cuts land
//! while a store file is created, and while an older schema is migrated.
//! Two tests prove that the checks can fail: on a file system that ignores
//! fsync, and with a store whose finalize skips its sync
//! (`EXPORT_STORE_FINALIZE_SYNC=OFF`, feature `failpoints`).
//!
//! `cargo test --features powercut-tests --test powercut` (after
//! `bash .ci/lossyfs.sh`). With `LOSSYFS_IGNORE_FSYNC=1` (every mount
//! ignores fsync) or `EXPORT_STORE_FINALIZE_SYNC=OFF` (every child's
//! finalize skips its sync) in the environment, every test here fails.
#![cfg(feature = "powercut-tests")]

mod faultkit;
mod lossyfs;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faultkit::{content, digest_hex, key, read_part, write_part, Rng};
use lossyfs::{LossyFs, Options, Place};
use sqlite_export_store::{
    ExportJobId, ExportOutputStore, SqliteOutputStore, StoreOptions, TenantContext, TenantId,
};

const CHILD: &str = "EXPORT_STORE_POWERCUT_CHILD";
const REPORT: &str = "EXPORT_STORE_POWERCUT_REPORT";
const RUN: &str = "EXPORT_STORE_POWERCUT_RUN";
const MODE: &str = "EXPORT_STORE_POWERCUT_MODE";
const TENANT: &str = "acme";
/// The store's file name on the mount (suffixes tell the file system's
/// armed cuts which file is which).
const DB: &str = "store.sqlite";
/// Concurrent writers in a working child.
const WRITERS: u32 = 3;

fn options() -> StoreOptions {
    // Small chunks: a few KiB of NDJSON make many chunk rows and batches.
    StoreOptions::default().with_chunk_size(2048)
}

// ---------------------------------------------------------------- the child

/// Appends lines to the report, each synced before the next step.
#[derive(Clone)]
struct Say(Arc<Mutex<std::fs::File>>);

impl Say {
    fn open(path: &str) -> Say {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        Say(Arc::new(Mutex::new(f)))
    }
    fn line(&self, line: String) {
        let mut f = self.0.lock().unwrap();
        f.write_all(format!("{line}\n").as_bytes()).unwrap();
        f.sync_data().unwrap();
    }
}

/// The child's side: opens the store on the lossy mount and works until it
/// is killed (or opens it, maybe writes one part, and waits to be killed).
/// An error stops it with exit status 3 after it said so: after a cut every
/// operation fails, and the parent judges whether the power was still on.
fn child_main() -> ! {
    let db = PathBuf::from(std::env::var(CHILD).unwrap());
    let say = Say::open(&std::env::var(REPORT).unwrap());
    let run = std::env::var(RUN).unwrap();
    let mode = std::env::var(MODE).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let outcome: Result<(), String> = rt.block_on(async move {
        let store = SqliteOutputStore::open_with(&db, "http://hfs.test", options())
            .map_err(|e| format!("open: {e}"))?;
        say.line("open".into());
        // Opening only: the store stays open (a clean close would checkpoint
        // and sync the log) until the power is cut and the child killed.
        if mode == "open-only" {
            say.line("done".into());
            std::future::pending::<()>().await;
        }
        if mode == "open" {
            let k = key(TENANT, &format!("r{run}-opened"), "Patient", 0, 1);
            write_part(&store, &k)
                .await
                .map_err(|e| format!("finalize: {e}"))?;
            say.line(format!(
                "w0 fin {} {}",
                faultkit::encode_key(&k),
                digest_hex(&content(&k))
            ));
            say.line("done".into());
            std::future::pending::<()>().await;
        }
        let store = Arc::new(store);
        // Workers hold this to work; the rest task takes it whole, so that
        // the store's writer sits idle (and truncates its log).
        let gate = Arc::new(tokio::sync::RwLock::new(()));
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let (store, gate, say, db) = (store.clone(), gate.clone(), say.clone(), db.clone());
            let run = run.clone();
            tasks.push(tokio::spawn(async move {
                worker(&store, &gate, &say, &db, &run, w).await
            }));
        }
        let rest = {
            let (gate, say) = (gate.clone(), say.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(800)).await;
                    let held = gate.write().await;
                    say.line("rest".into());
                    tokio::time::sleep(Duration::from_millis(1150)).await;
                    say.line("work".into());
                    drop(held);
                }
            })
        };
        let mut first_error = None;
        for t in tasks {
            if let Err(e) = t.await.unwrap() {
                first_error.get_or_insert(e);
            }
        }
        rest.abort();
        Err(first_error.unwrap_or_else(|| "the workers stopped".into()))
    });
    match outcome {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("powercut child: {e}");
            std::process::exit(3)
        }
    }
}

/// One writer's loop: parts of a job that stays, now and then a job that is
/// deleted, staging abandoned and reclaimed.
async fn worker(
    store: &SqliteOutputStore,
    gate: &tokio::sync::RwLock<()>,
    say: &Say,
    db: &Path,
    run: &str,
    w: u32,
) -> Result<(), String> {
    let keep = format!("r{run}-w{w}-keep");
    for i in 0u32.. {
        let _working = gate.read().await;
        let k = key(TENANT, &keep, "Encounter", i, 1);
        say.line(format!("w{w} writing {}", faultkit::encode_key(&k)));
        match write_part(store, &k).await {
            Ok(_) => say.line(format!(
                "w{w} fin {} {}",
                faultkit::encode_key(&k),
                digest_hex(&content(&k))
            )),
            // Reclaimed by another worker's reclaim: not an error of the store.
            Err(e) if e.is_not_found() => {
                say.line(format!("w{w} reclaimed-under {}", faultkit::encode_key(&k)))
            }
            Err(e) => return Err(format!("w{w} finalize {}: {e}", faultkit::encode_key(&k))),
        }
        if i % 4 == 3 {
            let doomed = format!("r{run}-w{w}-doomed{i}");
            for j in 0..2 {
                let k = key(TENANT, &doomed, "Observation", j, 1);
                say.line(format!("w{w} writing {}", faultkit::encode_key(&k)));
                write_part(store, &k)
                    .await
                    .map_err(|e| format!("w{w} finalize {}: {e}", faultkit::encode_key(&k)))?;
                say.line(format!(
                    "w{w} fin {} {}",
                    faultkit::encode_key(&k),
                    digest_hex(&content(&k))
                ));
            }
            say.line(format!("w{w} deleting {doomed}"));
            store
                .delete_job_outputs(
                    &TenantContext::new(TenantId::new(TENANT)),
                    &ExportJobId::from(doomed.as_str()),
                )
                .await
                .map_err(|e| format!("w{w} delete {doomed}: {e}"))?;
            say.line(format!("w{w} deleted {doomed}"));
        }
        if i % 5 == 4 && w == 0 {
            // Staging abandoned by "another process": a second handle on
            // the file whose writer is never finalized nor dropped.
            let other = SqliteOutputStore::open_with(db, "http://hfs.test", options())
                .map_err(|e| format!("w{w} second open: {e}"))?;
            let k = key(TENANT, &keep, "Basic", i, 1);
            let mut wr = other
                .open_writer(&k)
                .await
                .map_err(|e| format!("w{w} open_writer: {e}"))?;
            for l in faultkit::lines(&k) {
                wr.write_line(&l)
                    .await
                    .map_err(|e| format!("w{w} write_line: {e}"))?;
            }
            wr.flush().await.map_err(|e| format!("w{w} flush: {e}"))?;
            std::mem::forget(wr);
            std::mem::forget(other);
            say.line(format!("w{w} abandoned {}", faultkit::encode_key(&k)));
            tokio::time::sleep(Duration::from_millis(300)).await;
            say.line(format!("w{w} reclaiming"));
            let n = store
                .reclaim_abandoned(Duration::from_millis(250))
                .await
                .map_err(|e| format!("w{w} reclaim: {e}"))?;
            say.line(format!("w{w} reclaimed {n}"));
        }
    }
    Ok(())
}

fn is_child() -> bool {
    std::env::var_os(CHILD).is_some()
}

// --------------------------------------------------------------- the parent

/// What a child is to do.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// Work until killed.
    Work,
    /// Open the store, write one part, then wait to be killed.
    Open,
    /// Open the store, then wait to be killed.
    OpenOnly,
}

fn spawn_child(
    test: &str,
    db: &Path,
    report: &Path,
    run: u32,
    mode: Mode,
    env: &[(&str, &str)],
) -> Child {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", test, "--test-threads", "1", "-q", "--nocapture"])
        .env(CHILD, db)
        .env(REPORT, report)
        .env(RUN, run.to_string())
        .env(
            MODE,
            match mode {
                Mode::Work => "work",
                Mode::Open => "open",
                Mode::OpenOnly => "open-only",
            },
        )
        .env_remove(sqlite_export_store::__test_support::failpoint::ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

fn read_report(report: &Path) -> Vec<String> {
    std::fs::read_to_string(report)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// How the power is cut.
#[derive(Clone, Debug)]
enum Cut {
    /// This long after the child opened the store.
    After(Duration),
    /// Right after the child reported its first finalized part.
    AfterFirstFinalize,
    /// At the `n`-th operation `kind` on a file ending in `suffix`, before
    /// it runs or once it returned.
    At {
        kind: &'static str,
        suffix: &'static str,
        n: u64,
        after: bool,
    },
}

/// One child under one cut: returns its report and where the cut landed.
fn run_cut(
    test: &str,
    fs: &LossyFs,
    run: u32,
    mode: Mode,
    cut: &Cut,
    env: &[(&str, &str)],
) -> (Vec<String>, String) {
    let db = fs.path(DB);
    let report = fs.backing.with_extension(format!("report{run}"));
    let _ = std::fs::remove_file(&report);
    if let Cut::At {
        kind,
        suffix,
        n,
        after,
    } = cut
    {
        fs.arm(kind, suffix, *n, *after);
    }
    let mut child = spawn_child(test, &db, &report, run, mode, env);
    let stderr = child.stderr.take().unwrap();
    let drain = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    // An armed cut that has not landed by then (the child did fewer such
    // operations) is made by hand.
    let deadline = Instant::now()
        + match cut {
            Cut::At { .. } => Duration::from_secs(10),
            _ => Duration::from_secs(60),
        };
    let mut cut_at_deadline = None;
    // Waits for the moment of the cut, or for the child's end.
    let ended = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        let report_now = read_report(&report);
        if mode != Mode::Work && report_now.iter().any(|l| l == "done") {
            break None;
        }
        match cut {
            Cut::After(d) => {
                if report_now.iter().any(|l| l == "open") {
                    let at = Instant::now() + *d;
                    cut_at_deadline = Some(at);
                    break None;
                }
            }
            Cut::AfterFirstFinalize => {
                if report_now.iter().any(|l| l.contains(" fin ")) {
                    break None;
                }
            }
            Cut::At { .. } => {
                if fs.cut_at().is_some() {
                    break None;
                }
            }
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    if let Some(at) = cut_at_deadline {
        while Instant::now() < at && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    // The power goes (if an armed cut has not landed yet, it goes now),
    // then the child is killed.
    let where_ = match fs.cut_at() {
        Some(w) => w,
        None => fs.cut(),
    };
    let _ = child.kill();
    let status = child.wait().unwrap();
    let said = drain.join().unwrap();
    let report = read_report(&report);
    // A child that ended before the power went failed on its own (or, for
    // Mode::Open, finished: then it said "done").
    if let Some(status) = ended {
        let finished = mode != Mode::Work && report.iter().any(|l| l == "done");
        let cut_first = where_.starts_with("before") || where_.starts_with("after");
        assert!(
            finished || cut_first,
            "the child ended ({status}) while the power was on: {said}\nreport: {report:?}"
        );
    }
    let _ = status;
    (report, where_)
}

/// What the parent learns from a report.
#[derive(Default, Debug)]
struct Told {
    finalized: BTreeMap<String, String>,
    /// Doomed jobs whose delete began, and whether a later finalize of the
    /// same worker makes the delete durable.
    deleting: BTreeMap<String, bool>,
    /// What each worker was doing last.
    doing: BTreeMap<String, String>,
    resting: bool,
}

fn parse(report: &[String]) -> Told {
    let mut t = Told::default();
    let mut deleted_by: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in report {
        let f: Vec<&str> = line.split(' ').collect();
        match f.as_slice() {
            ["rest"] => t.resting = true,
            ["work"] => t.resting = false,
            [w, "fin", k, digest] => {
                t.finalized.insert(k.to_string(), digest.to_string());
                for job in deleted_by.remove(*w).unwrap_or_default() {
                    t.deleting.insert(job, true);
                }
                t.doing.insert(w.to_string(), "finalized".into());
            }
            [w, "deleting", job] => {
                t.deleting.insert(job.to_string(), false);
                t.doing.insert(w.to_string(), "deleting".into());
            }
            [w, "deleted", job] => {
                deleted_by
                    .entry(w.to_string())
                    .or_default()
                    .push(job.to_string());
                t.doing.insert(w.to_string(), "deleted".into());
            }
            [w, what, ..] => {
                t.doing.insert(w.to_string(), what.to_string());
            }
            _ => {}
        }
    }
    t
}

/// The checks after a cut, on the remounted file system. `durable` holds
/// the parts found finalized after earlier cuts of the same file (each must
/// still be there: nothing deletes them); the parts this cut adds are put
/// in it. Returns how many reported parts were read back.
async fn check_after_cut(
    db: &Path,
    told: &Told,
    durable: &mut BTreeMap<String, String>,
    what: &str,
) -> usize {
    if !db.exists() {
        assert!(
            told.finalized.is_empty() && durable.is_empty(),
            "{what}: the store file is gone, and with it finalized parts"
        );
        return 0;
    }
    assert_eq!(faultkit::integrity_check(db), "ok", "{what}");
    let store = SqliteOutputStore::open_with(db, "http://hfs.test", options())
        .unwrap_or_else(|e| panic!("{what}: the store does not open: {e}"));
    let rows = faultkit::part_rows(db);
    let finished: BTreeSet<String> = rows
        .iter()
        .filter(|r| r.1)
        .map(|r| faultkit::encode_key(&r.0))
        .collect();

    // Parts finalized before earlier cuts are all still there (`verify`
    // below reads every finished part's chunks against its digest).
    for k in durable.keys() {
        assert!(finished.contains(k), "{what}: {k}, durable before, is lost");
    }
    // Every reported part is there, byte for byte, unless a delete covers
    // it; a delete is all or nothing, and holds once a later finalize of
    // the same worker synced it.
    let mut read_back = 0;
    let mut groups: BTreeMap<String, Vec<bool>> = BTreeMap::new();
    for (encoded, digest) in &told.finalized {
        let k = faultkit::decode_key(encoded);
        let job = k.job_id.as_str().to_string();
        let present = finished.contains(encoded);
        if told.deleting.contains_key(&job) {
            groups.entry(job).or_default().push(present);
            continue;
        }
        assert!(present, "{what}: finalized part {encoded} is lost");
        let bytes = read_part(&store, &k)
            .await
            .unwrap_or_else(|e| panic!("{what}: {encoded}: {e}"));
        assert!(
            bytes == content(&k),
            "{what}: {encoded} reads back wrong bytes"
        );
        assert_eq!(&digest_hex(&bytes), digest, "{what}: {encoded}");
        let info = store.part_info(&k).await.unwrap();
        assert_eq!(&info.digest, digest, "{what}: {encoded}");
        read_back += 1;
    }
    for (job, present) in &groups {
        if told.deleting[job] {
            assert!(
                present.iter().all(|p| !p),
                "{what}: job {job} came back after its delete was synced: {present:?}"
            );
        } else {
            assert!(
                present.iter().all(|p| *p) || present.iter().all(|p| !p),
                "{what}: the delete of {job} is partly visible: {present:?}"
            );
        }
    }
    // No part is partly visible: the finished parts nobody reported (their
    // finalize returned just before the cut, or was still returning) hold
    // exactly what was written; no staged part is readable.
    for (k, done) in &rows {
        let encoded = faultkit::encode_key(k);
        if *done && !told.finalized.contains_key(&encoded) && !durable.contains_key(&encoded) {
            let bytes = read_part(&store, k)
                .await
                .unwrap_or_else(|e| panic!("{what}: {encoded}: {e}"));
            assert!(
                bytes == content(k),
                "{what}: {encoded} reads back wrong bytes"
            );
        }
        if !*done {
            let e = read_part(&store, k).await.err();
            assert!(
                e.as_ref().is_some_and(|e| e.is_not_found()),
                "{what}: staged {encoded} is readable: {e:?}"
            );
        }
    }
    faultkit::reclaim_and_verify(&store, db, what).await;
    drop(store);
    // What is durable now: the finished parts of jobs no delete touched.
    for (k, done) in &rows {
        if *done && !told.deleting.contains_key(k.job_id.as_str()) {
            durable.insert(faultkit::encode_key(k), String::new());
        }
    }
    read_back
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Tallies of where cuts landed.
struct Tally {
    started: Instant,
    cuts: u32,
    parts: usize,
    fin_reported: u32,
    at_op: BTreeMap<String, u32>,
    doing: BTreeMap<String, u32>,
}

impl Default for Tally {
    fn default() -> Tally {
        Tally {
            started: Instant::now(),
            cuts: 0,
            parts: 0,
            fin_reported: 0,
            at_op: BTreeMap::new(),
            doing: BTreeMap::new(),
        }
    }
}

impl Tally {
    fn add(&mut self, where_: &str, context: Option<&str>, told: &Told, parts: usize) {
        self.cuts += 1;
        self.parts += parts;
        if !told.finalized.is_empty() {
            self.fin_reported += 1;
        }
        // "on request, last operation: write store.sqlite-wal" or
        // "before fsync store.sqlite-wal": the operation and the file's suffix.
        let op = where_
            .trim_start_matches("on request, last operation: ")
            .split(" (")
            .next()
            .unwrap()
            .replace("store.sqlite", "DB")
            .replace("/DB", "DB");
        let op = match context {
            Some(c) => format!("{op} ({c})"),
            None => op,
        };
        *self.at_op.entry(op).or_default() += 1;
        let mut doing: Vec<&str> = told.doing.values().map(String::as_str).collect();
        doing.sort();
        doing.dedup();
        let key = if told.resting {
            "resting".to_string()
        } else if doing.is_empty() {
            "opening".to_string()
        } else {
            doing.join("+")
        };
        *self.doing.entry(key).or_default() += 1;
    }
    fn print(&self, what: &str) {
        println!(
            "{what}: {} power cuts in {:.0?}, {} of them after finalized parts were reported; {} \
             reported parts read back intact\n  the file operation at the cut: {:?}\n  what the \
             workers were doing: {:?}",
            self.cuts,
            self.started.elapsed(),
            self.fin_reported,
            self.parts,
            self.at_op,
            self.doing
        );
    }
}

/// Runs `cuts` cuts of working children, `per_file` on each store file
/// before starting a fresh one; `choose` picks each cut.
fn cut_working_children(
    test: &str,
    cuts: u32,
    per_file: u32,
    rng: &mut Rng,
    mut choose: impl FnMut(&mut Rng, u32) -> (Cut, bool),
) -> Tally {
    let rt = runtime();
    let mut tally = Tally::default();
    let mut run = 0;
    while run < cuts {
        let place = Place::new();
        let mut fs = place.mount(Options {
            seed: rng.next(),
            ..Options::default()
        });
        let mut durable = BTreeMap::new();
        for _ in 0..per_file.min(cuts - run) {
            let (cut, tear) = choose(rng, run);
            fs.set_tear(tear);
            let (report, where_) = run_cut(test, &fs, run, Mode::Work, &cut, &[]);
            fs.unmount();
            fs = place.mount(Options {
                seed: rng.next(),
                ..Options::default()
            });
            let told = parse(&report);
            let what = format!(
                "run {run}, cut {cut:?}{}, landed {where_}",
                if tear { " (torn)" } else { "" }
            );
            let parts = rt.block_on(check_after_cut(&fs.path(DB), &told, &mut durable, &what));
            tally.add(&where_, None, &told, parts);
            run += 1;
        }
        fs.unmount();
    }
    tally
}

#[test]
fn power_cuts_at_random_moments_lose_nothing_finalized() {
    if is_child() {
        child_main();
    }
    let test = "power_cuts_at_random_moments_lose_nothing_finalized";
    let mut rng = Rng::from_env("random power cuts");
    let tally = cut_working_children(test, 80, 8, &mut rng, |rng, _| {
        (
            Cut::After(Duration::from_millis(rng.below(1000))),
            rng.below(2) == 0,
        )
    });
    tally.print("random moments");
    assert!(
        tally.fin_reported >= tally.cuts / 2,
        "most cuts should land after parts were finalized"
    );
}

/// File operations to cut at, before they run or once they returned, and
/// about how many of them a working child makes in its first half second
/// (`n` is chosen below that): log writes (chunk batches and finalizes),
/// log syncs (finalizes), database writes and syncs (checkpoints), log
/// truncations (after a checkpoint caught up, and when idle).
const AT: &[(&str, &str, u64, bool)] = &[
    ("write", "-wal", 4000, false),
    ("fsync", "-wal", 60, false),
    ("fsync", "-wal", 60, true),
    ("write", "sqlite", 200, false),
    ("fsync", "sqlite", 3, false),
    ("fsync", "sqlite", 3, true),
    ("truncate", "-wal", 4, false),
    ("truncate", "-wal", 4, true),
];

#[test]
fn power_cuts_at_chosen_file_operations_lose_nothing_finalized() {
    if is_child() {
        child_main();
    }
    let test = "power_cuts_at_chosen_file_operations_lose_nothing_finalized";
    let mut rng = Rng::from_env("power cuts at chosen operations");
    let tally = cut_working_children(test, 80, 8, &mut rng, |rng, run| {
        let (kind, suffix, most, after) = AT[run as usize % AT.len()];
        (
            Cut::At {
                kind,
                suffix,
                n: 1 + rng.below(most),
                after,
            },
            rng.below(2) == 0,
        )
    });
    tally.print("chosen operations");
}

/// Cuts a child that opens a new store file, or one of an older schema,
/// at each of its first file operations in turn.
#[test]
fn power_cuts_while_a_store_file_is_created_or_migrated() {
    if is_child() {
        child_main();
    }
    let test = "power_cuts_while_a_store_file_is_created_or_migrated";
    let migrations = sqlite_export_store::__test_support::schema::MIGRATIONS;
    let version = sqlite_export_store::__test_support::schema::SCHEMA_VERSION;
    let mut rng = Rng::from_env("power cuts while opening");
    let rt = runtime();
    let mut tally = Tally::default();
    // How many file operations an open takes: one run without a cut.
    let ops = |old: Option<usize>| -> u64 {
        let place = Place::new();
        if let Some(n) = old {
            make_old(&place.backing().join(DB), &migrations[..n]);
        }
        let fs = place.mount(Options::default());
        let (report, _) = run_cut(
            test,
            &fs,
            9999,
            Mode::OpenOnly,
            &Cut::At {
                kind: "any",
                suffix: "*",
                n: 1_000_000,
                after: false,
            },
            &[],
        );
        assert!(report.iter().any(|l| l == "done"), "{report:?}");
        let counts = fs.status();
        fs.unmount();
        counts
            .lines()
            .find_map(|l| l.strip_prefix("counts: "))
            .unwrap()
            .split(' ')
            .filter_map(|kv| kv.split('=').nth(1)?.parse::<u64>().ok())
            .sum()
    };
    let fresh_ops = ops(None);
    let mut run = 0;
    for old in [None, Some(1), Some(3), Some(version as usize - 1)] {
        let total = if old.is_none() { fresh_ops } else { ops(old) };
        // Ten cuts spread over the whole open and into the first finalize,
        // two once the child finalized its part and exited.
        let n_cuts = 12u64;
        let span = total + total / 4;
        for i in 0..n_cuts {
            let n = if i < 10 {
                1 + (i * span / 10) + rng.below((span / 10).max(1))
            } else {
                u64::MAX / 2
            };
            let place = Place::new();
            if let Some(k) = old {
                make_old(&place.backing().join(DB), &migrations[..k]);
            }
            let tear = rng.below(2) == 0;
            let fs = place.mount(Options {
                tear,
                seed: rng.next(),
                ..Options::default()
            });
            let cut = Cut::At {
                kind: "any",
                suffix: "*",
                n,
                after: false,
            };
            let (report, where_) = run_cut(test, &fs, run, Mode::Open, &cut, &[]);
            fs.unmount();
            let fs = place.mount(Options::default());
            let told = parse(&report);
            let what = format!(
                "{} file, cut at operation {n} of {total}, landed {where_}",
                match old {
                    None => "new".to_string(),
                    Some(k) => format!("schema {k}"),
                }
            );
            let parts = rt.block_on(check_after_cut(
                &fs.path(DB),
                &told,
                &mut BTreeMap::new(),
                &what,
            ));
            if fs.path(DB).exists() {
                // Whatever the cut left, the store opened it at the current
                // schema.
                let c = rusqlite::Connection::open(fs.path(DB)).unwrap();
                let v: u32 = c
                    .query_row("PRAGMA user_version", [], |r| r.get(0))
                    .unwrap();
                assert_eq!(v, version, "{what}");
            }
            fs.unmount();
            let context = if old.is_some() {
                "migrating"
            } else {
                "new file"
            };
            tally.add(&where_, Some(context), &told, parts);
            run += 1;
        }
    }
    tally.print(&format!(
        "opening (an open takes {fresh_ops} file operations on a new file)"
    ));
}

/// A store file of an older schema: the first `migrations`, applied by
/// hand as the store of that time did, in WAL mode.
fn make_old(path: &Path, migrations: &[(&str, &str)]) {
    let c = rusqlite::Connection::open(path).unwrap();
    c.pragma_update(None, "page_size", 4096).unwrap();
    c.pragma_update(None, "auto_vacuum", "INCREMENTAL").unwrap();
    c.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
        .unwrap();
    for (i, (_, m)) in migrations.iter().enumerate() {
        c.execute_batch(m).unwrap();
        c.pragma_update(None, "user_version", i as u32 + 1).unwrap();
    }
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
}

/// Runs cuts right after the first reported finalize under `options` and
/// `env`; returns the failure messages of the checks.
fn failures_under(test: &str, options: Options, env: &[(&str, &str)], cuts: u32) -> Vec<String> {
    let rt = runtime();
    let mut failures = Vec::new();
    for run in 0..cuts {
        let place = Place::new();
        let fs = place.mount(options);
        let (report, where_) = run_cut(test, &fs, run, Mode::Work, &Cut::AfterFirstFinalize, env);
        fs.unmount();
        let fs = place.mount(options);
        let told = parse(&report);
        assert!(
            !told.finalized.is_empty(),
            "a part was finalized before the cut"
        );
        let what = format!("run {run}, landed {where_}");
        let db = fs.path(DB);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rt.block_on(check_after_cut(&db, &told, &mut BTreeMap::new(), &what))
        }));
        if let Err(e) = outcome {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(msg);
        }
        fs.unmount();
    }
    failures
}

#[test]
fn the_checks_catch_a_file_system_that_ignores_fsync() {
    if is_child() {
        child_main();
    }
    let test = "the_checks_catch_a_file_system_that_ignores_fsync";
    let options = Options {
        ignore_fsync: true,
        ..Options::default()
    };
    let failures = failures_under(test, options, &[], 3);
    println!("a file system that ignores fsync: {failures:#?}");
    assert_eq!(failures.len(), 3, "every cut must be caught: {failures:?}");
    assert!(
        failures
            .iter()
            .all(|f| f.contains("is lost") || f.contains("store file is gone")),
        "{failures:?}"
    );
}

#[test]
fn the_checks_catch_a_store_whose_finalize_skips_its_sync() {
    if is_child() {
        child_main();
    }
    let test = "the_checks_catch_a_store_whose_finalize_skips_its_sync";
    let env = [(
        sqlite_export_store::__test_support::failpoint::FINALIZE_SYNC_ENV,
        "OFF",
    )];
    let failures = failures_under(test, Options::default(), &env, 3);
    println!("a finalize without its sync: {failures:#?}");
    assert!(
        !failures.is_empty(),
        "a skipped finalize sync must be caught"
    );
    assert!(
        failures
            .iter()
            .all(|f| f.contains("is lost") || f.contains("store file is gone")),
        "{failures:?}"
    );
}
