//! Crash safety with real process death.
//!
//! Each test re-runs this very test binary as a child process that writes,
//! finalizes, deletes, reclaims, prunes and vacuums parts and reports every
//! step it completed to a file. The child dies by `abort()` at a fail point
//! (`EXPORT_STORE_FAILPOINT`), by `SIGKILL` while paused at a fail point, or
//! by `SIGKILL` after a random delay. The parent then reopens the file and
//! checks what a user relies on:
//!
//! - `PRAGMA integrity_check` is `ok`;
//! - every part the child saw finalized reads back byte for byte, with the
//!   digest the child recorded, unless a delete or prune the child started
//!   covers it, and then a delete is all or nothing;
//! - every finished part in the file holds exactly what its writer wrote;
//! - no staged part is readable;
//! - a new writer on a key whose staging was cut off works;
//! - reclaiming abandoned staging leaves no staged part and no orphaned
//!   chunk, and `verify` finds nothing wrong.

mod faultkit;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use faultkit::{content, digest_hex, key, read_part, write_part};
use sqlite_export_store::{
    ExportJobId, ExportOutputStore, ExportPartKey, SqliteOutputStore, StoreOptions, TenantContext,
    TenantId,
};

const CHILD: &str = "EXPORT_STORE_CRASH_CHILD";
const REPORT: &str = "EXPORT_STORE_CRASH_REPORT";
const RUN: &str = "EXPORT_STORE_CRASH_RUN";
const ROUNDS: &str = "EXPORT_STORE_CRASH_ROUNDS";
const TENANT: &str = "acme";

fn options() -> StoreOptions {
    // Small chunks: a few KiB of NDJSON make many chunk rows and batches.
    StoreOptions::default().with_chunk_size(2048)
}

// ---------------------------------------------------------------- the child

/// The child's side: runs the workload, appending one line per completed
/// step to the report file, then exits. Never returns.
fn child_main() -> ! {
    let db = PathBuf::from(std::env::var(CHILD).unwrap());
    let report = std::env::var(REPORT).unwrap();
    let run = std::env::var(RUN).unwrap();
    let rounds: u32 = std::env::var(ROUNDS).unwrap().parse().unwrap();
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(report)
        .unwrap();
    let mut say = move |line: String| {
        // One write per line: a line is in the kernel before the next step.
        out.write_all(format!("{line}\n").as_bytes()).unwrap();
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let store = SqliteOutputStore::open_with(&db, "http://hfs.test", options()).unwrap();
        say("open".into());
        for round in 0..rounds {
            let p = format!("r{run}-{round}");
            let keep = format!("{p}-keep");
            let doomed = format!("{p}-doomed");
            let tenant = TenantContext::new(TenantId::new(TENANT));
            // Parts of a job that stays.
            for i in 0..3 {
                let k = key(TENANT, &keep, "Encounter", i, 1);
                let f = write_part(&store, &k).await.unwrap();
                assert_eq!(f.size_bytes, content(&k).len() as u64);
                say(format!(
                    "fin {} {}",
                    faultkit::encode_key(&k),
                    digest_hex(&content(&k))
                ));
            }
            // A job that is deleted.
            for i in 0..2 {
                let k = key(TENANT, &doomed, "Encounter", i, 1);
                write_part(&store, &k).await.unwrap();
                say(format!(
                    "fin {} {}",
                    faultkit::encode_key(&k),
                    digest_hex(&content(&k))
                ));
            }
            say(format!("deleting {doomed}"));
            store
                .delete_job_outputs(&tenant, &ExportJobId::from(doomed.as_str()))
                .await
                .unwrap();
            say(format!("deleted {doomed}"));
            // Staging abandoned by "another process": a second handle on the
            // file whose writer is never finalized nor dropped.
            let other = SqliteOutputStore::open_with(&db, "http://hfs.test", options()).unwrap();
            let k = key(TENANT, &keep, "Observation", 0, 1);
            let mut w = other.open_writer(&k).await.unwrap();
            for l in faultkit::lines(&k) {
                w.write_line(&l).await.unwrap();
            }
            w.flush().await.unwrap();
            std::mem::forget(w);
            std::mem::forget(other);
            say(format!("abandoned {}", faultkit::encode_key(&k)));
            let n = store.reclaim_abandoned(Duration::ZERO).await.unwrap();
            say(format!("reclaimed {n}"));
            // The job is claimed again under token 2; the old parts are pruned.
            for i in 0..2 {
                let k = key(TENANT, &keep, "Encounter", i, 2);
                write_part(&store, &k).await.unwrap();
                say(format!(
                    "fin {} {}",
                    faultkit::encode_key(&k),
                    digest_hex(&content(&k))
                ));
            }
            say(format!("pruning {keep}"));
            let n = store
                .prune_superseded(&tenant, &ExportJobId::from(keep.as_str()))
                .await
                .unwrap();
            say(format!("pruned {keep} {n}"));
            store.reclaim_space().await.unwrap();
            say("space".into());
            // A tenant that is purged.
            let gone = format!("{p}-tenant");
            for i in 0..2 {
                let k = key(&gone, &keep, "Patient", i, 1);
                write_part(&store, &k).await.unwrap();
                say(format!(
                    "fin {} {}",
                    faultkit::encode_key(&k),
                    digest_hex(&content(&k))
                ));
            }
            say(format!("purging {gone}"));
            store.delete_tenant_outputs(&gone).await.unwrap();
            say(format!("purged {gone}"));
        }
        say("done".into());
    });
    std::process::exit(0)
}

fn is_child() -> bool {
    std::env::var_os(CHILD).is_some()
}

// --------------------------------------------------------------- the parent

/// How the child is to die.
#[derive(Clone, Copy, Debug)]
enum Death {
    /// `abort()` at the armed fail point.
    Abort(&'static str),
    /// Paused at the armed fail point, then `SIGKILL`ed.
    KillAt(&'static str),
    /// `SIGKILL`ed after this delay.
    KillAfter(Duration),
}

struct Outcome {
    status: ExitStatus,
    report: Vec<String>,
}

fn spawn_child(
    test: &str,
    db: &Path,
    report: &Path,
    run: u32,
    rounds: u32,
    fp: Option<&str>,
) -> Child {
    let exe = std::env::current_exe().unwrap();
    // `ulimit -c 0`: an aborted child leaves no core file behind.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("ulimit -c 0; exec \"$0\" \"$@\"")
        .arg(exe)
        .args(["--exact", test, "--test-threads", "1", "-q", "--nocapture"])
        .env(CHILD, db)
        .env(REPORT, report)
        .env(RUN, run.to_string())
        .env(ROUNDS, rounds.to_string())
        .env_remove(sqlite_export_store::__test_support::failpoint::ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(fp) = fp {
        cmd.env(sqlite_export_store::__test_support::failpoint::ENV, fp);
    }
    cmd.spawn().unwrap()
}

fn wait_with_deadline(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the child did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn run_child(test: &str, db: &Path, run: u32, rounds: u32, death: Death) -> Outcome {
    let report = db.with_extension(format!("report{run}"));
    let _ = std::fs::remove_file(&report);
    let fp = match death {
        Death::Abort(p) => Some(p.to_string()),
        Death::KillAt(p) => Some(format!("{p}:pause")),
        Death::KillAfter(_) => None,
    };
    let mut child = spawn_child(test, db, &report, run, rounds, fp.as_deref());
    let stderr = child.stderr.take().unwrap();
    // Drains the child's standard error; says when a fail point paused it.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let drain = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.starts_with("export-store failpoint ") {
                let _ = tx.send(line.clone());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let status = match death {
        Death::Abort(_) => wait_with_deadline(&mut child, Duration::from_secs(60)),
        Death::KillAt(p) => {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    let name = p.split(':').next().unwrap();
                    assert!(line.contains(name), "paused at the wrong point: {line}")
                }
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().unwrap();
                    panic!(
                        "fail point {p} was never reached ({status}); child said:\n{}",
                        drain.join().unwrap()
                    );
                }
            }
            child.kill().unwrap();
            child.wait().unwrap()
        }
        Death::KillAfter(d) => {
            // The delay runs from the moment the store is open, so that a
            // slow start on a loaded machine does not eat it.
            let deadline = Instant::now() + Duration::from_secs(60);
            while std::fs::metadata(&report).map_or(true, |m| m.len() == 0) {
                if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            std::thread::sleep(d);
            let _ = child.kill();
            child.wait().unwrap()
        }
    };
    let said = drain.join().unwrap();
    let report = std::fs::read_to_string(&report)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect::<Vec<_>>();
    match death {
        Death::Abort(p) => assert_eq!(
            status.signal(),
            Some(6),
            "the child should have aborted at {p} but ended with {status}; it said:\n{said}\n\
             report: {report:?}"
        ),
        Death::KillAt(_) => assert_eq!(status.signal(), Some(9), "{status}"),
        Death::KillAfter(_) => assert!(
            status.signal() == Some(9) || status.success(),
            "the child failed on its own ({status}):\n{said}"
        ),
    }
    Outcome { status, report }
}

/// What the parent learns from a report.
#[derive(Default)]
struct Told {
    finalized: BTreeMap<String, String>,
    started: BTreeSet<String>,
    finished: BTreeSet<String>,
    opened_keys: BTreeSet<String>,
}

fn parse(report: &[String]) -> Told {
    let mut t = Told::default();
    for line in report {
        let mut f = line.split(' ');
        match f.next().unwrap() {
            "fin" => {
                let k = f.next().unwrap().to_string();
                t.finalized.insert(k, f.next().unwrap().to_string());
            }
            "deleting" | "pruning" | "purging" => {
                t.started.insert(f.next().unwrap().to_string());
            }
            "deleted" | "pruned" | "purged" => {
                t.finished.insert(f.next().unwrap().to_string());
            }
            "abandoned" => {
                t.opened_keys.insert(f.next().unwrap().to_string());
            }
            _ => {}
        }
    }
    t
}

/// The checks after a death; returns how many reported parts were read back.
async fn check_after_death(db: &Path, told: &Told, what: &str) -> usize {
    assert_eq!(faultkit::integrity_check(db), "ok", "{what}");
    let store = SqliteOutputStore::open_with(db, "http://hfs.test", options()).unwrap();
    let rows = faultkit::part_rows(db);
    let finished: BTreeSet<String> = rows
        .iter()
        .filter(|r| r.1)
        .map(|r| faultkit::encode_key(&r.0))
        .collect();

    // Every finished part in the file holds exactly what was written.
    for (k, done) in &rows {
        if *done {
            let bytes = read_part(&store, k)
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(
                bytes == content(k),
                "{what}: {} reads back wrong bytes",
                faultkit::encode_key(k)
            );
        }
    }
    // Every reported part is there, unless a delete/prune/purge covers it.
    let mut read_back = 0;
    let mut groups: BTreeMap<String, Vec<bool>> = BTreeMap::new();
    for (encoded, digest) in &told.finalized {
        let k = faultkit::decode_key(encoded);
        let job = k.job_id.as_str().to_string();
        let superseded = k.fencing_token == 1
            && k.resource_type == "Encounter"
            && k.part_index < 2
            && told
                .finalized
                .contains_key(&faultkit::encode_key(&ExportPartKey {
                    fencing_token: 2,
                    ..k.clone()
                }));
        let cover = if told.started.contains(&k.tenant_id) {
            Some(k.tenant_id.clone())
        } else if job.ends_with("-doomed") && told.started.contains(&job) {
            Some(job.clone())
        } else if superseded && told.started.contains(&job) {
            Some(format!("prune {job}"))
        } else {
            None
        };
        let present = finished.contains(encoded);
        match cover {
            None => {
                assert!(present, "{what}: finalized part {encoded} is lost");
                let bytes = read_part(&store, &k).await.unwrap();
                assert_eq!(&digest_hex(&bytes), digest, "{what}: {encoded}");
                let info = store.part_info(&k).await.unwrap();
                assert_eq!(&info.digest, digest, "{what}: {encoded}");
                read_back += 1;
            }
            Some(group) => {
                let done = told.finished.contains(group.trim_start_matches("prune "));
                if done {
                    assert!(!present, "{what}: {encoded} survived its completed delete");
                    let e = read_part(&store, &k).await.unwrap_err();
                    assert!(e.is_not_found(), "{what}: {e}");
                }
                groups.entry(group).or_default().push(present);
            }
        }
    }
    for (group, present) in groups {
        assert!(
            present.iter().all(|p| *p) || present.iter().all(|p| !*p),
            "{what}: {group} was applied in part: {present:?}"
        );
    }
    // No staged part is readable; a new writer on its key works.
    let mut retried = 0;
    for (k, done) in &rows {
        if *done || finished.contains(&faultkit::encode_key(k)) {
            continue;
        }
        let e = read_part(&store, k).await.unwrap_err();
        assert!(
            e.is_not_found(),
            "{what}: staged {} is readable: {e}",
            faultkit::encode_key(k)
        );
        if retried < 2 {
            match write_part(&store, k).await {
                Ok(_) => {
                    assert!(read_part(&store, k).await.unwrap() == content(k));
                    retried += 1;
                }
                Err(e) => assert!(
                    e.is_conflict(),
                    "{what}: retry of {}: {e}",
                    faultkit::encode_key(k)
                ),
            }
        }
    }
    faultkit::reclaim_and_verify(&store, db, what).await;
    drop(store);
    assert_eq!(faultkit::integrity_check(db), "ok", "{what}");
    read_back
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Every fail point on the write path, with the hit that lands in the
/// middle of the workload, and how the child dies there.
const DEATHS: &[Death] = &[
    Death::Abort("open_writer.before_commit:4"),
    Death::Abort("writer.chunk.inserted:7"),
    Death::Abort("writer.batch.before_commit:3"),
    Death::KillAt("writer.batch.after_commit:5"),
    Death::Abort("finalize.before_commit:2"),
    Death::Abort("finalize.after_commit:3"),
    Death::KillAt("finalize.after_commit:6"),
    Death::Abort("delete.before_commit:1"),
    Death::KillAt("delete.after_commit:1"),
    Death::Abort("reclaim.before_commit:1"),
    Death::KillAt("reclaim.after_commit:1"),
    Death::Abort("prune.before_commit:1"),
    Death::Abort("vacuum.step:1"),
    Death::Abort("delete.before_commit:2"),
    Death::KillAt("delete.after_commit:2"),
];

#[test]
fn dies_at_every_fail_point_and_loses_nothing_finalized() {
    if is_child() {
        child_main();
    }
    let test = "dies_at_every_fail_point_and_loses_nothing_finalized";
    // Every fail point the library knows is probed at least once.
    let probed: BTreeSet<&str> = DEATHS
        .iter()
        .map(|d| match d {
            Death::Abort(p) | Death::KillAt(p) => p.split(':').next().unwrap(),
            Death::KillAfter(_) => unreachable!(),
        })
        .collect();
    let known: BTreeSet<&str> = sqlite_export_store::__test_support::failpoint::POINTS
        .iter()
        .copied()
        .collect();
    assert_eq!(probed, known, "every fail point is probed");

    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (mut parts, mut aborts, mut kills) = (0, 0, 0);
    for (run, death) in DEATHS.iter().enumerate() {
        let db = dir.path().join(format!("point{run}.db"));
        let out = run_child(test, &db, run as u32, 1, *death);
        assert!(
            !out.report.iter().any(|l| l == "done"),
            "{death:?}: the child finished without dying"
        );
        let told = parse(&out.report);
        parts += rt.block_on(check_after_death(&db, &told, &format!("{death:?}")));
        match death {
            Death::Abort(_) => aborts += 1,
            _ => kills += 1,
        }
        let _ = out.status;
    }
    println!(
        "crash points: {} runs at {} fail points ({aborts} by abort, {kills} by SIGKILL); \
         {parts} finalized parts read back intact",
        DEATHS.len(),
        probed.len()
    );
}

#[test]
fn dies_at_random_moments_and_loses_nothing_finalized() {
    if is_child() {
        child_main();
    }
    let test = "dies_at_random_moments_and_loses_nothing_finalized";
    const RUNS: u32 = 16;
    let mut rng = faultkit::Rng::from_env("random crash moments");
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    // One file for every run: each child starts on the debris of the last.
    let db = dir.path().join("random.db");
    let (mut parts, mut mid_work) = (0, 0);
    let mut last_steps: BTreeMap<String, u32> = BTreeMap::new();
    for run in 0..RUNS {
        let delay = Duration::from_millis(rng.below(600));
        let out = run_child(test, &db, run, 1000, Death::KillAfter(delay));
        let told = parse(&out.report);
        let last = out
            .report
            .last()
            .map_or("nothing", |l| l.split(' ').next().unwrap());
        *last_steps.entry(last.to_string()).or_default() += 1;
        if !told.finalized.is_empty() {
            mid_work += 1;
        }
        parts += rt.block_on(check_after_death(
            &db,
            &told,
            &format!("run {run} killed {delay:?} after it opened the store"),
        ));
    }
    println!(
        "random crashes: {RUNS} children killed by SIGKILL, {mid_work} of them after finalizing \
         parts; {parts} finalized parts read back intact; last step completed before death: \
         {last_steps:?}"
    );
    assert!(
        mid_work >= RUNS / 2,
        "most children should die in the middle of their work"
    );
}
