//! Power loss under the `export-store` commands: the real binary with its
//! store (and, for `backup` and `export`, its destination) on lossyfs, a
//! file system that forgets what was not synced (`tests/lossyfs/`), and the
//! power cut while it works: at random moments, and at chosen file
//! operations (every operation of a run in turn, and the syncs that publish).
//!
//! - `import`: all or nothing. A job whose import exited 0 is all there
//!   after the cut, byte for byte; an interrupted one is absent or whole;
//!   jobs imported before are untouched; `verify` passes and `gc` leaves no
//!   staging.
//! - `backup`: a backup that exited 0 is at its destination after the cut
//!   and verifies; one cut mid-way leaves nothing there, or a whole copy
//!   that verifies; the next backup to the same destination removes what a
//!   cut one left beside it; the source is untouched.
//! - `export --to DIR`: a file under its final name is whole, byte for
//!   byte; after an `export` that exited 0 every part's file is there, the
//!   folder it made included; a second run completes an interrupted one.
//!
//! `cargo test --features powercut-tests --test powercut_cli` (after
//! `bash .ci/lossyfs.sh`). With `LOSSYFS_IGNORE_FSYNC=1` in the environment
//! (every mount ignores fsync) every test here fails.
#![cfg(feature = "powercut-tests")]

mod clikit;
mod faultkit;
mod lossyfs;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use faultkit::{key, read_part, Rng};
use lossyfs::{LossyFs, Options, Place};
use sqlite_export_store::{ExportOutputStore, ExportPartKey, SqliteOutputStore, StoreOptions};

const TENANT: &str = "acme";

/// Parts by name (`job/Type-n-token`), with their NDJSON.
type Parts = BTreeMap<String, (ExportPartKey, Vec<u8>)>;

fn part_name(k: &ExportPartKey) -> String {
    format!(
        "{}/{}-{}-{}",
        k.job_id.as_str(),
        k.resource_type,
        k.part_index,
        k.fencing_token
    )
}
/// The store's file name on the mount.
const DB: &str = "store.sqlite";

/// Mounts `place` with a seed of its own from `rng`.
fn mount(place: &Place, rng: &mut Rng) -> LossyFs {
    place.mount(Options {
        seed: rng.next(),
        ..Options::default()
    })
}

/// How the power is cut.
#[derive(Clone, Debug)]
enum Cut {
    /// This long after the command started.
    After(Duration),
    /// At the `n`-th operation `kind` on a path ending in `suffix`, before
    /// it runs or once it returned; if the command ends first, right then.
    At {
        kind: &'static str,
        suffix: &'static str,
        n: u64,
        after: bool,
    },
    /// Once the command exited.
    AtExit,
}

/// What became of one command under one cut.
struct Outcome {
    /// Its exit code, if it exited (before the cut, or of itself after it);
    /// `None`: killed after the cut.
    code: Option<i32>,
    /// Whether it had exited before the power went.
    ended_first: bool,
    /// Where the cut landed (lossyfs's words).
    landed: String,
    stderr: String,
}

impl Outcome {
    /// Exit status 0: whatever the command promises on success holds, even
    /// if it exited after the cut (its last sync returned before it).
    fn succeeded(&self) -> bool {
        self.code == Some(0)
    }
}

/// Runs `export-store ARGS` with the cut `cut`, then unmounts `fs` and
/// mounts what survived.
fn run_cut(
    place: &Place,
    fs: LossyFs,
    rng: &mut Rng,
    args: &[String],
    cut: &Cut,
) -> (LossyFs, Outcome) {
    if let Cut::At {
        kind,
        suffix,
        n,
        after,
    } = cut
    {
        fs.arm(kind, suffix, *n, *after);
    }
    let log = place.logs().join("stderr.log");
    let started = Instant::now();
    let mut child = clikit::bin()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = started + Duration::from_secs(120);
    let mut ended: Option<ExitStatus> = None;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            ended = Some(status);
            break;
        }
        let now = Instant::now();
        let due = match cut {
            Cut::After(d) => now >= started + *d,
            Cut::At { .. } => fs.cut_at().is_some(),
            Cut::AtExit => false,
        };
        if due {
            break;
        }
        assert!(
            now < deadline,
            "export-store {args:?} still runs after 120 s: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let ended_first = ended.is_some() && fs.cut_at().is_none();
    let landed = match fs.cut_at() {
        Some(w) => w,
        None => fs.cut(),
    };
    // A command still running sees every operation fail: it may exit of
    // itself; otherwise it is killed.
    if ended.is_none() {
        let grace = Instant::now() + Duration::from_secs(3);
        while ended.is_none() && Instant::now() < grace {
            ended = child.try_wait().unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        if ended.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    fs.unmount();
    let fs = mount(place, rng);
    let outcome = Outcome {
        code: ended.and_then(|s| s.code()),
        ended_first,
        landed,
        stderr,
    };
    (fs, outcome)
}

/// `export-store verify --db DB` passes.
fn assert_verifies(db: &Path, what: &str) {
    let o = clikit::run(db, &["verify"]);
    assert_eq!(
        clikit::code(&o),
        0,
        "{what}: export-store verify on {}: {}{}",
        db.display(),
        clikit::stdout(&o),
        clikit::stderr(&o)
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Where cuts landed: the file operation (its file named by kind) and
/// what the command was at.
#[derive(Default)]
struct Tally {
    cuts: u32,
    at: BTreeMap<String, u32>,
    outcome: BTreeMap<String, u32>,
}

impl Tally {
    fn add(&mut self, landed: &str, outcome: &str) {
        self.cuts += 1;
        *self.at.entry(op_label(landed)).or_default() += 1;
        *self.outcome.entry(outcome.to_string()).or_default() += 1;
    }
    fn print(&self, what: &str, started: Instant) {
        println!(
            "{what}: {} power cuts in {:.0?}\n  the file operation at the cut: {:?}\n  outcomes: {:?}",
            self.cuts,
            started.elapsed(),
            self.at,
            self.outcome
        );
    }
}

/// "before fsync /store.sqlite-wal" → "before fsync log"; "on request,
/// last operation: write /out/acme/j/output-Patient-3-1.ndjson.tmp" →
/// "write staged file".
fn op_label(landed: &str) -> String {
    // "… (tore 2 writes)": the torn writes are not part of the operation.
    let landed = landed.split(" (").next().unwrap_or_default();
    let (when, rest) = match landed.strip_prefix("on request, last operation: ") {
        Some(rest) => ("random:", rest),
        None => match landed.split_once(' ') {
            Some((w, rest)) => (w, rest),
            None => ("", landed),
        },
    };
    let mut words = rest.split(' ');
    let op = words.next().unwrap_or_default();
    let path = words.next_back().unwrap_or_default();
    let name = path.rsplit('/').next().unwrap_or_default();
    let file = if name.ends_with("-wal") {
        "log"
    } else if name.ends_with("-journal") {
        "journal"
    } else if name.ends_with("-shm") {
        "shm"
    } else if name.ends_with(".backup-partial") {
        "backup copy"
    } else if name.ends_with(".ndjson.tmp") {
        "staged file"
    } else if name.ends_with(".ndjson") {
        "exported file"
    } else if name == DB {
        "database"
    } else if name == "copy.sqlite" {
        "backup"
    } else if name.is_empty()
        || ["out", "files", TENANT, "backups"].contains(&name)
        || name.starts_with("src-")
    {
        "folder"
    } else {
        name
    };
    format!("{when} {op} {file}").trim().to_string()
}

// ------------------------------------------------------------------ import

/// Resources per part of the imports.
const PER_PART: usize = 25;

/// The folder an import reads (off the mount): a Patient file and two
/// numbered Observation files of FHIR resources with random text (zstd
/// halves them). Returns each type's NDJSON, as its parts must add up to.
fn import_input(dir: &Path, rng: &mut Rng) -> BTreeMap<String, Vec<u8>> {
    let mut line = |t: &str, i: usize| {
        let text: String = (0..100).map(|_| format!("{:x}", rng.next())).collect();
        format!(
            r#"{{"resourceType":"{t}","id":"{}-{i}","text":{{"div":"{text}"}}}}"#,
            &t[..3]
        ) + "\n"
    };
    let patients: String = (0..120).map(|i| line("Patient", i)).collect();
    let obs0: String = (0..140).map(|i| line("Observation", i)).collect();
    let obs1: String = (140..300).map(|i| line("Observation", i)).collect();
    std::fs::write(dir.join("Patient.ndjson"), &patients).unwrap();
    std::fs::write(dir.join("Observation.000.ndjson"), &obs0).unwrap();
    std::fs::write(dir.join("Observation.001.ndjson"), &obs1).unwrap();
    BTreeMap::from([
        ("Patient".to_string(), patients.into_bytes()),
        ("Observation".to_string(), (obs0 + &obs1).into_bytes()),
    ])
}

/// The finished parts of `job` in the store file, by type and index.
fn finished_of(db: &Path, job: &str) -> BTreeMap<(String, u32), ExportPartKey> {
    faultkit::part_rows(db)
        .into_iter()
        .filter(|(k, done)| *done && k.job_id.as_str() == job)
        .map(|(k, _)| ((k.resource_type.clone(), k.part_index), k))
        .collect()
}

/// Whether `job` is absent (`false`) or whole (`true`); panics if it is
/// partly there or holds other bytes than its input.
async fn absent_or_whole(
    store: &SqliteOutputStore,
    db: &Path,
    job: &str,
    expected: &BTreeMap<String, Vec<u8>>,
    what: &str,
) -> bool {
    let parts = finished_of(db, job);
    if parts.is_empty() {
        return false;
    }
    for (t, ndjson) in expected {
        let lines = ndjson.iter().filter(|b| **b == b'\n').count();
        let want = lines.div_ceil(PER_PART) as u32;
        let mut got = Vec::new();
        for i in 0..want {
            let k = parts
                .get(&(t.clone(), i))
                .unwrap_or_else(|| panic!("{what}: job {job} is partly there: no {t} part {i}"));
            got.extend(
                read_part(store, k)
                    .await
                    .unwrap_or_else(|e| panic!("{what}: {job} {t} part {i}: {e}")),
            );
        }
        assert!(
            got == *ndjson,
            "{what}: job {job}: its {t} parts hold other bytes"
        );
    }
    let want: usize = expected
        .values()
        .map(|n| n.iter().filter(|b| **b == b'\n').count().div_ceil(PER_PART))
        .sum();
    assert_eq!(
        parts.len(),
        want,
        "{what}: job {job}: parts {:?}",
        parts.keys()
    );
    true
}

/// File operations an import makes, by kind (from lossyfs's counters).
fn counts(fs: &LossyFs) -> BTreeMap<String, u64> {
    fs.status()
        .lines()
        .find_map(|l| l.strip_prefix("counts: "))
        .unwrap_or_default()
        .split(' ')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn import_args(input: &Path, db: &Path, job: &str) -> Vec<String> {
    [
        "import",
        input.to_str().unwrap(),
        "--tenant",
        TENANT,
        "--job",
        job,
        "--per-part",
        &PER_PART.to_string(),
        "--db",
        db.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

/// Several imports into one store file, each under a cut, the first of
/// them creating the file; returns the tally.
fn imports_under_cuts(cuts: &[(Cut, bool)], rng: &mut Rng, tally: &mut Tally) {
    let rt = runtime();
    let place = Place::new();
    let expected = import_input(&place.off(), rng);
    let mut fs = mount(&place, rng);
    // Jobs that must stay whole: imported (exit 0) or found whole before.
    let mut whole: Vec<String> = Vec::new();
    for (run, (cut, tear)) in cuts.iter().enumerate() {
        let job = format!("job-{run}");
        fs.set_tear(*tear);
        let args = import_args(&place.off(), &fs.path(DB), &job);
        let (next, o) = run_cut(&place, fs, rng, &args, cut);
        fs = next;
        let what = format!(
            "import {run}, cut {cut:?}{}, landed {} (exit {:?}): {}",
            if *tear { " (torn)" } else { "" },
            o.landed,
            o.code,
            o.stderr.trim()
        );
        if o.ended_first {
            assert!(o.succeeded(), "{what}: the import failed with the power on");
        }
        let db = fs.path(DB);
        if !db.exists() {
            assert!(
                whole.is_empty() && !o.succeeded(),
                "{what}: the store file is gone, and with it imported jobs"
            );
            tally.add(&o.landed, "no store file yet");
            continue;
        }
        assert_eq!(faultkit::integrity_check(&db), "ok", "{what}");
        let store = SqliteOutputStore::open_with(&db, "http://hfs.test", StoreOptions::default())
            .unwrap_or_else(|e| panic!("{what}: the store does not open: {e}"));
        let found = rt.block_on(async {
            for j in &whole {
                assert!(
                    absent_or_whole(&store, &db, j, &expected, &what).await,
                    "{what}: job {j}, imported before, is lost"
                );
            }
            absent_or_whole(&store, &db, &job, &expected, &what).await
        });
        drop(store);
        if o.succeeded() {
            assert!(
                found,
                "{what}: the import exited 0 but job {job} is not there"
            );
        }
        if found {
            whole.push(job);
        }
        assert_verifies(&db, &what);
        let gc = clikit::run(&db, &["gc", "--older-than", "1ms"]);
        assert_eq!(clikit::code(&gc), 0, "{what}: gc: {}", clikit::stderr(&gc));
        let census = faultkit::census(&db);
        assert_eq!(
            (census.staged_parts, census.orphan_chunks),
            (0, 0),
            "{what}: staging left after gc"
        );
        tally.add(
            &o.landed,
            match (o.succeeded(), found) {
                (true, _) => "exited 0: whole",
                (false, true) => "interrupted: whole",
                (false, false) => "interrupted: absent",
            },
        );
    }
    fs.unmount();
}

/// How many file operations (`any`) and syncs one import into a new store
/// file makes, and how long it takes, on the mount.
fn calibrate_import(rng: &mut Rng) -> (u64, u64, Duration) {
    let place = Place::new();
    import_input(&place.off(), rng);
    let fs = mount(&place, rng);
    let args = import_args(&place.off(), &fs.path(DB), "job-calibration");
    let started = Instant::now();
    let o = clikit::bin().args(&args).output().unwrap();
    let took = started.elapsed();
    assert_eq!(clikit::code(&o), 0, "{}", clikit::stderr(&o));
    let c = counts(&fs);
    fs.unmount();
    (c.values().sum(), c.get("fsync").copied().unwrap_or(0), took)
}

#[test]
fn import_under_power_cuts_is_all_or_nothing() {
    let mut rng = Rng::from_env("import under power cuts");
    let started = Instant::now();
    let (ops, syncs, took) = calibrate_import(&mut rng);
    println!("an import into a new store file: {ops} file operations, {syncs} syncs, {took:.0?}");
    let mut tally = Tally::default();
    // Random moments over the whole run, creation of the file included
    // (the run's time includes the process's start and exit).
    let span = took.as_millis() as u64;
    for _ in 0..2 {
        let cuts: Vec<(Cut, bool)> = (0..6)
            .map(|_| {
                (
                    Cut::After(Duration::from_millis(rng.below(span))),
                    rng.below(2) == 0,
                )
            })
            .collect();
        imports_under_cuts(&cuts, &mut rng, &mut tally);
    }
    // Every part of a run in turn: 12 cuts spread over its operations.
    let cuts: Vec<(Cut, bool)> = (0..12)
        .map(|i| {
            let n = 1 + i * ops / 12 + rng.below((ops / 12).max(1));
            let cut = Cut::At {
                kind: "any",
                suffix: "*",
                n,
                after: false,
            };
            (cut, rng.below(2) == 0)
        })
        .collect();
    for chunk in cuts.chunks(6) {
        imports_under_cuts(chunk, &mut rng, &mut tally);
    }
    // The first three syncs of the log, before and after each: the first
    // is the commit that publishes the job, the others checkpoint it.
    let cuts: Vec<(Cut, bool)> = (0..6)
        .map(|i| {
            let n = 1 + i / 2;
            let cut = Cut::At {
                kind: "fsync",
                suffix: "-wal",
                n,
                after: i % 2 == 1,
            };
            (cut, true)
        })
        .collect();
    imports_under_cuts(&cuts, &mut rng, &mut tally);
    // Once it exited 0.
    imports_under_cuts(
        &[(Cut::AtExit, true), (Cut::AtExit, false)],
        &mut rng,
        &mut tally,
    );
    tally.print("import", started);
    assert!(
        tally.outcome.keys().any(|k| k.starts_with("interrupted")),
        "some cuts must interrupt an import: {:?}",
        tally.outcome
    );
    assert!(
        tally.outcome.contains_key("exited 0: whole"),
        "some imports must have exited 0 before their cut: {:?}",
        tally.outcome
    );
}

// ------------------------------------------------- a source store for backup and export

/// A store file of 3 jobs × 8 parts of hard-to-compress NDJSON (about 1.5
/// MiB), made in `dir` off the mount; returns each part's NDJSON.
fn source_store(dir: &Path) -> Parts {
    let db = dir.join(DB);
    let rt = runtime();
    let mut parts = BTreeMap::new();
    rt.block_on(async {
        let store =
            SqliteOutputStore::open_with(&db, "http://hfs.test", StoreOptions::default()).unwrap();
        for j in 0..3u32 {
            for i in 0..8u32 {
                let k = key(TENANT, &format!("src-{j}"), "Binary", i, 1);
                let lines = faultkit::noisy_lines(u64::from(j * 100 + i), 12, 5000);
                let mut w = store.open_writer(&k).await.unwrap();
                let mut bytes = Vec::new();
                for l in &lines {
                    w.write_line(l).await.unwrap();
                    bytes.extend_from_slice(l.as_bytes());
                    bytes.push(b'\n');
                }
                store.finalize_part(&k, w).await.unwrap();
                parts.insert(part_name(&k), (k, bytes));
            }
        }
    });
    faultkit::settle(&db);
    parts
}

/// A fresh place whose backing folder holds a copy of the source store
/// (durable: it is on the disk before the mount) and the folders named.
fn place_with_source(template: &Path, folders: &[&str]) -> Place {
    let place = Place::new();
    std::fs::copy(template.join(DB), place.backing().join(DB)).unwrap();
    for f in folders {
        std::fs::create_dir_all(place.backing().join(f)).unwrap();
    }
    place
}

/// The store at `db` holds exactly `parts`, byte for byte.
fn assert_holds(db: &Path, parts: &Parts, what: &str) {
    let rows: BTreeSet<String> = faultkit::part_rows(db)
        .into_iter()
        .filter(|r| r.1)
        .map(|r| part_name(&r.0))
        .collect();
    let want: BTreeSet<String> = parts.keys().cloned().collect();
    assert!(rows == want, "{what}: {} holds other parts", db.display());
    let store =
        SqliteOutputStore::open_with(db, "http://hfs.test", StoreOptions::default()).unwrap();
    runtime().block_on(async {
        for (k, bytes) in parts.values() {
            let got = read_part(&store, k)
                .await
                .unwrap_or_else(|e| panic!("{what}: {k:?}: {e}"));
            assert!(got == *bytes, "{what}: {k:?} reads back other bytes");
        }
    });
}

// ------------------------------------------------------------------ backup

const BACKUP_TO: &str = "backups/copy.sqlite";

fn backup_args(fs: &LossyFs, force: bool) -> Vec<String> {
    let mut args = vec![
        "backup".to_string(),
        "--db".into(),
        fs.path(DB).to_str().unwrap().into(),
        "--to".into(),
        fs.path(BACKUP_TO).to_str().unwrap().into(),
        // Small steps with pauses: the copy takes many steps, and cuts land
        // in the middle of it.
        "--step-pages".into(),
        "16".into(),
        "--pause-ms".into(),
        "5".into(),
    ];
    if force {
        args.push("--force".into());
    }
    args
}

/// Temporary copies left in the backup's folder.
fn partial_copies(fs: &LossyFs) -> Vec<String> {
    std::fs::read_dir(fs.path("backups"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".backup-partial"))
        .collect()
}

fn backup_under_cut(
    template: &Path,
    parts: &Parts,
    cut: &Cut,
    tear: bool,
    rng: &mut Rng,
    tally: &mut Tally,
) {
    let place = place_with_source(template, &["backups"]);
    let fs = mount(&place, rng);
    fs.set_tear(tear);
    let args = backup_args(&fs, false);
    let (fs, o) = run_cut(&place, fs, rng, &args, cut);
    let what = format!(
        "backup, cut {cut:?}{}, landed {} (exit {:?}): {}",
        if tear { " (torn)" } else { "" },
        o.landed,
        o.code,
        o.stderr.trim()
    );
    if o.ended_first {
        assert!(o.succeeded(), "{what}: the backup failed with the power on");
    }
    // The source is untouched.
    assert_holds(&fs.path(DB), parts, &format!("{what}: the source"));
    let dest = fs.path(BACKUP_TO);
    let there = dest.exists();
    if o.succeeded() {
        assert!(there, "{what}: the backup exited 0 but its copy is gone");
    }
    if there {
        assert_verifies(&dest, &what);
        assert_holds(&dest, parts, &format!("{what}: the copy"));
    }
    let left = partial_copies(&fs);
    // The next backup to the same place removes what this one left, and
    // writes a whole copy.
    let again = clikit::bin().args(backup_args(&fs, true)).output().unwrap();
    assert_eq!(
        clikit::code(&again),
        0,
        "{what}: the next backup: {}",
        clikit::stderr(&again)
    );
    assert_eq!(
        partial_copies(&fs),
        Vec::<String>::new(),
        "{what}: the next backup left temporary copies"
    );
    assert_holds(&dest, parts, &format!("{what}: the next copy"));
    fs.unmount();
    let outcome = match (o.succeeded(), there) {
        (true, _) => "exited 0: copy there",
        (false, true) => "interrupted: whole copy there",
        (false, false) if left.is_empty() => "interrupted: nothing there",
        (false, false) => "interrupted: nothing there, a temporary copy beside it",
    };
    tally.add(&o.landed, outcome);
}

#[test]
fn backup_under_power_cuts_leaves_a_whole_verified_copy_or_none() {
    let mut rng = Rng::from_env("backup under power cuts");
    let started = Instant::now();
    let template = tempfile::tempdir().unwrap();
    let parts = source_store(template.path());
    // One run without a cut: how long it takes and how it writes.
    let (ops, took) = {
        let place = place_with_source(template.path(), &["backups"]);
        let fs = mount(&place, &mut rng);
        let t = Instant::now();
        let o = clikit::bin()
            .args(backup_args(&fs, false))
            .output()
            .unwrap();
        let took = t.elapsed();
        assert_eq!(clikit::code(&o), 0, "{}", clikit::stderr(&o));
        let c = counts(&fs);
        fs.unmount();
        (c.values().sum::<u64>(), took)
    };
    println!("a backup: {ops} file operations, {took:.0?}");
    let mut tally = Tally::default();
    let span = took.as_millis() as u64 * 11 / 10;
    let mut cuts: Vec<Cut> = (0..6)
        .map(|_| Cut::After(Duration::from_millis(rng.below(span))))
        .collect();
    cuts.extend((0..6).map(|i| Cut::At {
        kind: "any",
        suffix: "*",
        n: 1 + i * ops / 6 + rng.below((ops / 6).max(1)),
        after: false,
    }));
    // Where the copy is published: its rename, and the syncs of its folder
    // (SQLite's, when the copy's journal is made, then the one that makes
    // the rename durable), before and after each.
    for after in [false, true] {
        cuts.push(Cut::At {
            kind: "rename",
            suffix: BACKUP_TO,
            n: 1,
            after,
        });
        for n in 1..=3 {
            cuts.push(Cut::At {
                kind: "fsyncdir",
                suffix: "backups",
                n,
                after,
            });
        }
    }
    cuts.push(Cut::AtExit);
    for cut in &cuts {
        let tear = rng.below(2) == 0;
        backup_under_cut(template.path(), &parts, cut, tear, &mut rng, &mut tally);
    }
    tally.print("backup", started);
    assert!(
        tally.outcome.keys().any(|k| k.starts_with("interrupted")),
        "{:?}",
        tally.outcome
    );
}

// ------------------------------------------------------------------ export

/// `--to`: two folders that do not exist yet on the mount.
const EXPORT_TO: &str = "out/files";

fn export_args(fs: &LossyFs) -> Vec<String> {
    [
        "export",
        "--db",
        fs.path(DB).to_str().unwrap(),
        "--to",
        fs.path(EXPORT_TO).to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

/// Checks the exported files after a cut: every file under a final name is
/// whole; with `all`, every part's file is there. Returns how many are.
fn check_exported(fs: &LossyFs, parts: &Parts, all: bool, what: &str) -> usize {
    let root = fs.path(EXPORT_TO);
    let mut present = 0;
    let mut missing = Vec::new();
    for (k, bytes) in parts.values() {
        let file = root
            .join(&k.tenant_id)
            .join(k.job_id.as_str())
            .join(format!(
                "{}-{}-{}-{}.ndjson",
                k.file_type, k.resource_type, k.part_index, k.fencing_token
            ));
        match std::fs::read(&file) {
            Ok(got) => {
                assert!(
                    got == *bytes,
                    "{what}: {} holds {} bytes, not the part's {}",
                    file.display(),
                    got.len(),
                    bytes.len()
                );
                present += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                missing.push(file.display().to_string())
            }
            Err(e) => panic!("{what}: {}: {e}", file.display()),
        }
    }
    if all {
        assert!(
            missing.is_empty(),
            "{what}: export exited 0, but {} of {} files are missing after the cut (e.g. {:?})",
            missing.len(),
            parts.len(),
            missing.first()
        );
    }
    // Nothing else: no staged `.tmp` file survives under the export's root.
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                let name = e.file_name().to_string_lossy().into_owned();
                assert!(
                    name.ends_with(".ndjson") && !name.ends_with(".tmp"),
                    "{what}: {} left in the export",
                    e.path().display()
                );
            }
        }
    }
    present
}

fn export_under_cut(
    template: &Path,
    parts: &Parts,
    cut: &Cut,
    tear: bool,
    rng: &mut Rng,
    tally: &mut Tally,
) {
    let place = place_with_source(template, &[]);
    let fs = mount(&place, rng);
    fs.set_tear(tear);
    let args = export_args(&fs);
    let (fs, o) = run_cut(&place, fs, rng, &args, cut);
    let what = format!(
        "export, cut {cut:?}{}, landed {} (exit {:?}): {}",
        if tear { " (torn)" } else { "" },
        o.landed,
        o.code,
        o.stderr.trim()
    );
    if o.ended_first {
        assert!(o.succeeded(), "{what}: the export failed with the power on");
    }
    let present = check_exported(&fs, parts, o.succeeded(), &what);
    // A second run completes what the cut interrupted.
    let again = clikit::bin().args(export_args(&fs)).output().unwrap();
    assert_eq!(
        clikit::code(&again),
        0,
        "{what}: the second export: {}",
        clikit::stderr(&again)
    );
    check_exported(&fs, parts, true, &format!("{what}, then exported again"));
    fs.unmount();
    let outcome = if o.succeeded() {
        "exited 0: every file there".to_string()
    } else if present == 0 {
        "interrupted: no file".to_string()
    } else if present == parts.len() {
        "interrupted: every file".to_string()
    } else {
        "interrupted: some files, each whole".to_string()
    };
    tally.add(&o.landed, &outcome);
}

#[test]
fn export_under_power_cuts_leaves_whole_files_and_all_of_them_once_it_exits() {
    let mut rng = Rng::from_env("export under power cuts");
    let started = Instant::now();
    let template = tempfile::tempdir().unwrap();
    let parts = source_store(template.path());
    let (ops, took) = {
        let place = place_with_source(template.path(), &[]);
        let fs = mount(&place, &mut rng);
        let t = Instant::now();
        let o = clikit::bin().args(export_args(&fs)).output().unwrap();
        let took = t.elapsed();
        assert_eq!(clikit::code(&o), 0, "{}", clikit::stderr(&o));
        let c = counts(&fs);
        fs.unmount();
        (c.values().sum::<u64>(), took)
    };
    println!("an export: {ops} file operations, {took:.0?}");
    let mut tally = Tally::default();
    let span = took.as_millis() as u64 * 11 / 10;
    let mut cuts: Vec<Cut> = (0..5)
        .map(|_| Cut::After(Duration::from_millis(rng.below(span))))
        .collect();
    cuts.extend((0..5).map(|i| Cut::At {
        kind: "any",
        suffix: "*",
        n: 1 + i * ops / 5 + rng.below((ops / 5).max(1)),
        after: false,
    }));
    // Around a file's publication: its sync, its rename, its folder's sync.
    for (kind, suffix) in [
        ("fsync", ".tmp"),
        ("rename", ".ndjson"),
        ("fsyncdir", "src-1"),
    ] {
        cuts.push(Cut::At {
            kind,
            suffix,
            n: 1 + rng.below(8),
            after: true,
        });
    }
    // Once it exited 0: the folders it made must hold.
    cuts.extend([Cut::AtExit, Cut::AtExit]);
    for cut in &cuts {
        let tear = rng.below(2) == 0;
        export_under_cut(template.path(), &parts, cut, tear, &mut rng, &mut tally);
    }
    tally.print("export", started);
    assert!(
        tally.outcome.keys().any(|k| k.starts_with("interrupted")),
        "{:?}",
        tally.outcome
    );
}
