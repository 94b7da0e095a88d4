//! `export-store backup` as a real process on real files, while writers of
//! this process keep finalizing parts into the same store: the copy holds
//! every part finished before the backup began and no staged part, passes
//! `verify`, opens as a store and reads back byte for byte; the writers are
//! never held up for long; refusals touch nothing; a killed backup leaves
//! nothing under the destination's name.

mod clikit;
mod faultkit;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clikit::{bin, code, run, stderr, stdout};
use faultkit::{content, key, noisy_lines, read_part, resources};
use serde_json::Value;
use sqlite_export_store::{
    ExportOutputStore, ExportPartKey, PartFilter, SqliteOutputStore, StorageError,
};

const BASE: &str = "http://hfs.test";

fn ndjson(lines: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines {
        out.extend_from_slice(l.as_bytes());
        out.push(b'\n');
    }
    out
}

/// How the store is filled before the backup: parts of job `big`.
#[derive(Clone, Copy)]
enum Fill {
    /// `parts` parts of `lines` random base64 lines of 1,000 characters
    /// (barely compressible: the file is about as big as the NDJSON).
    Noisy { parts: u32, lines: usize },
    /// `parts` parts of 1,000 real Synthea resources each, as HFS writes
    /// them (compressible as real exports are).
    Synthea { parts: u32 },
}

/// The NDJSON of part `i` of job `big`.
fn fill_content(fill: Fill, i: u32) -> Vec<u8> {
    match fill {
        Fill::Noisy { lines, .. } => ndjson(&noisy_lines(100 + i as u64, lines, 1000)),
        Fill::Synthea { .. } => {
            let pool = resources();
            let mut lines = vec![format!(
                r#"{{"resourceType":"Basic","id":"big-{i}","code":{{"text":"part {i}"}}}}"#
            )];
            lines.extend((0..999).map(|n| pool[(i as usize * 7 + n) % pool.len()].clone()));
            ndjson(&lines)
        }
    }
}

fn fill_parts(fill: Fill) -> u32 {
    match fill {
        Fill::Noisy { parts, .. } | Fill::Synthea { parts } => parts,
    }
}

/// Fills the store at `db` (see [`Fill`]); returns the NDJSON bytes written.
async fn fill_store(db: &Path, fill: Fill) -> u64 {
    let store = SqliteOutputStore::open(db, BASE).unwrap();
    let mut bytes = 0;
    for i in 0..fill_parts(fill) {
        let k = key("t", "big", "Binary", i, 1);
        let data = fill_content(fill, i);
        let mut w = store.open_writer(&k).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut w.writer, &data)
            .await
            .unwrap();
        w.byte_count = data.len() as u64;
        w.line_count = data.iter().filter(|b| **b == b'\n').count() as u64;
        store.finalize_part(&k, w).await.unwrap();
        bytes += data.len() as u64;
    }
    bytes
}

/// The expected NDJSON of any part these tests write.
fn expected(k: &ExportPartKey, fill: Fill) -> Vec<u8> {
    if k.job_id.as_str() == "big" {
        fill_content(fill, k.part_index)
    } else {
        content(k)
    }
}

/// Each writer's finalized parts, with when each finalize returned.
type Log = Arc<Mutex<Vec<Vec<(ExportPartKey, Instant)>>>>;

/// Four writers finalizing small parts (tenant `t`, jobs `w0`..`w3`)
/// into `store` as fast as they can until `stop`.
fn start_writers(
    store: &SqliteOutputStore,
    stop: &Arc<AtomicBool>,
    log: &Log,
) -> Vec<tokio::task::JoinHandle<Result<(), StorageError>>> {
    (0..4)
        .map(|w| {
            let (store, stop, log) = (store.clone(), stop.clone(), log.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let k = key("t", &format!("w{w}"), "Encounter", n, 1);
                    faultkit::write_part(&store, &k).await?;
                    log.lock().unwrap()[w].push((k, Instant::now()));
                    n += 1;
                }
                Ok(())
            })
        })
        .collect()
}

/// The longest gap between two successive finalizes of one writer whose
/// later one falls in `[from, to]`.
fn max_gap(log: &[Vec<(ExportPartKey, Instant)>], from: Instant, to: Instant) -> Duration {
    log.iter()
        .flat_map(|w| w.windows(2))
        .filter(|p| p[1].1 >= from && p[1].1 <= to)
        .map(|p| p[1].1 - p[0].1)
        .max()
        .unwrap_or_default()
}

/// What one backup under writers measured.
struct Figures {
    /// The backup's `--json` summary.
    summary: Value,
    /// The backup process, start to exit.
    wall: Duration,
    /// The writers' longest gap between finalizes in as long a window
    /// before the backup.
    gap_before: Duration,
    /// Their longest gap while the backup ran.
    gap_during: Duration,
    /// Finalizes while the backup ran.
    finalizes_during: usize,
    ndjson_bytes: u64,
}

/// Fills a store, starts four writers, takes a backup with `args` while
/// they write, and checks the copy: it holds every part finished before the
/// backup began, only parts that were finished, all byte for byte, no
/// staged part; it passes `verify` and opens as a store.
async fn backup_under_writers(dir: &Path, fill: Fill, args: &[&str]) -> Figures {
    let db = dir.join("store.db");
    let copy = dir.join("copy.db");
    let ndjson_bytes = fill_store(&db, fill).await;
    let store = SqliteOutputStore::open(&db, BASE).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let log: Log = Arc::new(Mutex::new(vec![Vec::new(); 4]));
    let writers = start_writers(&store, &stop, &log);

    // The writers alone, for a baseline; then the backup.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline_from = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let began = Instant::now();
    let finished_before: HashSet<ExportPartKey> = log
        .lock()
        .unwrap()
        .iter()
        .flatten()
        .map(|(k, _)| k.clone())
        .collect();
    let backup = bin()
        .arg("backup")
        .arg("--to")
        .arg(&copy)
        .arg("--db")
        .arg(&db)
        .arg("--json")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let o = tokio::task::spawn_blocking(move || backup.wait_with_output().unwrap())
        .await
        .unwrap();
    let ended = Instant::now();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap().unwrap();
    }
    let summary: Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)));
    let log = log.lock().unwrap().clone();
    let gap_before = max_gap(&log, baseline_from, began);
    let gap_during = max_gap(&log, began, ended);
    let finalizes_during = log
        .iter()
        .flatten()
        .filter(|(_, t)| *t >= began && *t <= ended)
        .count();
    let written: HashSet<ExportPartKey> = log.iter().flatten().map(|(k, _)| k.clone()).collect();

    // The copy: one file, verified, a store.
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut p = copy.as_os_str().to_owned();
        p.push(suffix);
        assert!(!Path::new(&p).exists(), "{suffix} beside the copy");
    }
    assert_eq!(
        std::fs::metadata(&copy).unwrap().len(),
        summary["file_bytes"].as_u64().unwrap()
    );
    let o = run(&copy, &["verify"]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    assert!(!stdout(&o).contains("staged part"), "{}", stdout(&o));
    let copied = SqliteOutputStore::open(&copy, BASE).unwrap();
    let parts = copied.list_parts(&PartFilter::all()).await.unwrap();
    assert!(
        parts.iter().all(|p| p.finished),
        "no staged part in the copy"
    );
    let keys: HashSet<ExportPartKey> = parts.iter().map(|p| p.key.clone()).collect();
    for i in 0..fill_parts(fill) {
        assert!(keys.contains(&key("t", "big", "Binary", i, 1)));
    }
    for k in &finished_before {
        assert!(
            keys.contains(k),
            "{} finished before the backup began",
            k.display()
        );
    }
    for k in &keys {
        assert!(
            k.job_id.as_str() == "big" || written.contains(k),
            "{} was never finished",
            k.display()
        );
        let bytes = read_part(&copied, k).await.unwrap();
        assert!(bytes == expected(k, fill), "{} differs", k.display());
    }
    assert_eq!(
        summary["parts_verified"].as_u64().unwrap(),
        keys.len() as u64
    );
    drop(copied);
    drop(store);
    let o = run(&db, &["verify"]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    Figures {
        summary,
        wall: ended - began,
        gap_before,
        gap_during,
        finalizes_during,
        ndjson_bytes,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_under_four_writers_is_consistent_and_never_stalls_them() {
    let tmp = tempfile::tempdir().unwrap();
    // About 24 MiB of pages, copied 64 pages (256 KiB) a step: hundreds of
    // steps while the writers finalize.
    let f = backup_under_writers(
        tmp.path(),
        Fill::Noisy {
            parts: 24,
            lines: 1000,
        },
        &["--step-pages", "64", "--pause-ms", "5"],
    )
    .await;
    let s = &f.summary;
    let steps = s["steps"].as_u64().unwrap();
    let longest_step = Duration::from_secs_f64(s["longest_step_ms"].as_f64().unwrap() / 1000.0);
    eprintln!(
        "backup {:?} ({} steps, longest {:?}), {} finalizes meanwhile; writers' longest gap: \
         {:?} before, {:?} during",
        f.wall, steps, longest_step, f.finalizes_during, f.gap_before, f.gap_during
    );
    assert!(steps >= 50, "{s}");
    assert!(f.finalizes_during > 0, "the writers kept finalizing");
    // A writer waits at most about one step (the copy never takes the
    // write lock); generous for a shared machine.
    let bound = (longest_step + Duration::from_millis(5)) * 20
        + f.gap_before * 4
        + Duration::from_millis(500);
    assert!(
        f.gap_during < bound,
        "a writer waited {:?} during the backup (bound {bound:?})",
        f.gap_during
    );
}

/// Files in `dir` whose name marks a backup's temporary copy.
fn partials(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".backup-partial"))
        .collect()
}

/// The temporary copies themselves in `dir` (not their journals).
fn copies(dir: &Path) -> Vec<String> {
    let mut found: Vec<String> = partials(dir)
        .into_iter()
        .filter(|n| n.ends_with(".backup-partial"))
        .collect();
    found.sort();
    found
}

fn backup(db: &Path, to: &Path, args: &[&str]) -> Output {
    bin()
        .arg("backup")
        .arg("--to")
        .arg(to)
        .arg("--db")
        .arg(db)
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_backups_touch_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("store.db");
    let store = SqliteOutputStore::open(&db, BASE).unwrap();
    for i in 0..3 {
        faultkit::write_part(&store, &key("t", "j", "Patient", i, 1))
            .await
            .unwrap();
    }
    drop(store);
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let no_sql = |o: &Output| {
        for sql in ["SELECT", "INSERT", "PRAGMA", "sqlite_schema"] {
            assert!(!stderr(o).contains(sql), "{}", stderr(o));
        }
    };

    // An existing file is kept unless --force.
    let dest = out.join("backup.db");
    std::fs::write(&dest, b"an older backup").unwrap();
    let o = backup(&db, &dest, &[]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    no_sql(&o);
    assert_eq!(std::fs::read(&dest).unwrap(), b"an older backup");
    assert_eq!(partials(&out), Vec::<String>::new());
    let o = backup(&db, &dest, &["--force", "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["parts_verified"], 3);
    assert_eq!(code(&run(&dest, &["verify"])), 0);
    let copy = SqliteOutputStore::open(&dest, BASE).unwrap();
    let k = key("t", "j", "Patient", 2, 1);
    assert!(read_part(&copy, &k).await.unwrap() == content(&k));
    drop(copy);

    // Files that are not a store are refused and left as they were.
    let text = tmp.path().join("notes.txt");
    std::fs::write(
        &text,
        b"not a database at all, but long enough to have a header",
    )
    .unwrap();
    let empty = tmp.path().join("empty.db");
    std::fs::write(&empty, b"").unwrap();
    let other = tmp.path().join("other.db");
    rusqlite::Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
        .unwrap();
    let other_bytes = std::fs::read(&other).unwrap();
    for (file, says) in [
        (&text, "not a SQLite database"),
        (&empty, "not a SQLite database"),
        (&other, "without the store's tables"),
    ] {
        let to = out.join("x.db");
        let o = backup(file, &to, &[]);
        assert_eq!(code(&o), 2, "{}", stderr(&o));
        assert!(stderr(&o).contains("not an export store"), "{}", stderr(&o));
        assert!(stderr(&o).contains(says), "{}", stderr(&o));
        no_sql(&o);
        assert!(!to.exists());
    }
    assert_eq!(std::fs::read(&empty).unwrap(), b"");
    assert_eq!(std::fs::read(&other).unwrap(), other_bytes);

    // No store at all; the store's own file; a folder that does not exist.
    let o = backup(&tmp.path().join("missing.db"), &out.join("y.db"), &[]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("no store"), "{}", stderr(&o));
    assert!(!tmp.path().join("missing.db").exists());
    for to in [db.clone(), tmp.path().join("nowhere/z.db"), out.clone()] {
        let o = backup(&db, &to, &["--force"]);
        assert_eq!(code(&o), 2, "{}: {}", to.display(), stderr(&o));
        no_sql(&o);
    }
    assert_eq!(partials(&out), Vec::<String>::new());
    assert_eq!(partials(tmp.path()), Vec::<String>::new());
    assert_eq!(code(&run(&db, &["verify"])), 0);
}

/// Starts a deliberately slow backup (8 pages a step, 20 ms apart) of `db`
/// to `dest` and waits until its temporary copy appears beside `dest`
/// (one that is not in `before`); returns the process and that copy's name.
fn slow_backup(db: &Path, dest: &Path, before: &[String]) -> (std::process::Child, String) {
    let folder = dest.parent().unwrap();
    let mut child = bin()
        .arg("backup")
        .arg("--to")
        .arg(dest)
        .arg("--db")
        .arg(db)
        .args(["--step-pages", "8", "--pause-ms", "20", "--force"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(new) = copies(folder).into_iter().find(|p| !before.contains(p)) {
            return (child, new);
        }
        assert!(Instant::now() < deadline, "no temporary copy appeared");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the backup ended early"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backup_leaves_nothing_at_the_destination() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("store.db");
    fill_store(
        &db,
        Fill::Noisy {
            parts: 8,
            lines: 1000,
        },
    )
    .await;
    let dest = tmp.path().join("backup.db");
    let (mut child, killed) = slow_backup(&db, &dest, &[]);
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap(); // SIGKILL
    let o = child.wait_with_output().unwrap();
    assert!(!o.status.success());
    assert!(!dest.exists(), "nothing under the destination's name");
    assert_eq!(
        copies(tmp.path()),
        vec![killed.clone()],
        "the killed copy stays"
    );
    assert_eq!(code(&run(&db, &["verify"])), 0, "the source is unharmed");

    // A backup still running keeps its copy while another backup to the
    // same name starts (and publishes); the killed one's copy is removed
    // by the first backup that starts after it.
    let (mut running, copy) = slow_backup(&db, &dest, std::slice::from_ref(&killed));
    assert!(
        !partials(tmp.path()).iter().any(|p| p.starts_with(&killed)),
        "the abandoned copy and its journals are removed"
    );
    let o = backup(&db, &dest, &["--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        copies(tmp.path()).contains(&copy) || running.try_wait().unwrap().is_some(),
        "a running backup's copy is left alone"
    );
    running.kill().unwrap();
    running.wait().unwrap();
    assert_eq!(code(&run(&dest, &["verify"])), 0);
    let copy_store = SqliteOutputStore::open(&dest, BASE).unwrap();
    let parts = copy_store.list_parts(&PartFilter::all()).await.unwrap();
    assert_eq!(parts.len(), 8);
    drop(copy_store);

    // The next backup sweeps what the second kill left.
    let o = backup(&db, &dest, &["--force"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(partials(tmp.path()), Vec::<String>::new());
}

/// Prints one backup's figures as JSON.
fn print_figures(what: &str, f: &Figures) {
    let s = &f.summary;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut figures = BTreeMap::new();
    figures.insert("store", what.to_string());
    figures.insert("ndjson_mib", format!("{:.1}", mib(f.ndjson_bytes)));
    figures.insert(
        "copy_mib",
        format!("{:.1}", mib(s["file_bytes"].as_u64().unwrap())),
    );
    figures.insert("backup_wall_s", format!("{:.3}", f.wall.as_secs_f64()));
    figures.insert(
        "copy_s",
        format!("{:.3}", s["copy_seconds"].as_f64().unwrap()),
    );
    figures.insert(
        "verify_s",
        format!("{:.3}", s["verify_seconds"].as_f64().unwrap()),
    );
    figures.insert("steps", s["steps"].to_string());
    figures.insert(
        "longest_step_ms",
        format!("{:.1}", s["longest_step_ms"].as_f64().unwrap()),
    );
    figures.insert("finalizes_during", f.finalizes_during.to_string());
    figures.insert(
        "writer_max_gap_before_ms",
        format!("{:.1}", f.gap_before.as_secs_f64() * 1000.0),
    );
    figures.insert(
        "writer_max_gap_during_ms",
        format!("{:.1}", f.gap_during.as_secs_f64() * 1000.0),
    );
    println!("{}", serde_json::to_string_pretty(&figures).unwrap());
}

/// Figures for docs/operations.md (not a pass/fail check): a backup, with
/// the default step and pause, of a store of about 256 MiB of NDJSON in
/// HFS-sized parts of real Synthea resources (compressed as real exports
/// are), while four writers finalize. Run in a release build:
/// `cargo test --release --test backup_cli figures -- --ignored --nocapture --test-threads 1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "figures: run by hand in a release build"]
async fn figures_backup_of_256_mib_of_synthea_under_four_writers() {
    let tmp = tempfile::tempdir().unwrap();
    let parts = (256 << 20) / fill_content(Fill::Synthea { parts: 1 }, 0).len() as u32;
    let fill = Fill::Synthea { parts: parts + 1 };
    let f = backup_under_writers(tmp.path(), fill, &[]).await;
    print_figures("256 MiB of Synthea NDJSON", &f);
}

/// The same with 256 MiB of NDJSON that zstd barely shrinks, so that the
/// file itself is about that big.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "figures: run by hand in a release build"]
async fn figures_backup_of_a_256_mib_file_under_four_writers() {
    let tmp = tempfile::tempdir().unwrap();
    let fill = Fill::Noisy {
        parts: 256,
        lines: 1000,
    };
    let f = backup_under_writers(tmp.path(), fill, &[]).await;
    print_figures("256 MiB of random base64 NDJSON", &f);
}

/// The backup gets the store file's permissions, whatever the umask: a
/// store its operator's group may read gives a backup the group may read,
/// a private one a private backup.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backup_has_the_store_files_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store.db");
    fill_store(&db, Fill::Synthea { parts: 3 }).await;
    for mode in [0o640, 0o600, 0o644] {
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(mode)).unwrap();
        let to = dir.path().join(format!("backup-{mode:o}.db"));
        let out = backup(&db, &to, &[]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let got = std::fs::metadata(&to).unwrap().permissions().mode() & 0o777;
        assert_eq!(got, mode, "backup of a {mode:o} store is {got:o}");
    }
}
