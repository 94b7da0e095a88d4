//! `export-store mirror` as a real process on real files: one pass
//! (`--once`) and its exit statuses, refusals that change nothing, and the
//! loop that follows a source being written, stopped by SIGTERM.

mod clikit;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clikit::{bin, code, run, stderr, stdout};
use sqlite_export_store::{
    ExportJobId, ExportOutputStore, ExportPartKey, PartFilter, SqliteOutputStore, StoreOptions,
};

const BASE: &str = "http://hfs.test";

/// Writes and finalizes part `n` of `job` with `lines` lines; its bytes.
async fn write_part(store: &SqliteOutputStore, job: &str, n: u32, lines: usize) -> Vec<u8> {
    let key = ExportPartKey::output(
        "default",
        ExportJobId::from(job.to_string()),
        "Patient",
        n,
        1,
    );
    let mut w = store.open_writer(&key).await.unwrap();
    let mut bytes = Vec::new();
    for i in 0..lines {
        let l = format!("{{\"resourceType\":\"Patient\",\"id\":\"{job}-{n}-{i}\"}}");
        w.write_line(&l).await.unwrap();
        bytes.extend_from_slice(l.as_bytes());
        bytes.push(b'\n');
    }
    store.finalize_part(&key, w).await.unwrap();
    bytes
}

/// The finished parts of the store file `db`, as (key, bytes), in order.
async fn contents(db: &Path) -> Vec<(String, Vec<u8>)> {
    let store = SqliteOutputStore::open_read_only(db, BASE).unwrap();
    let mut out = Vec::new();
    for p in store
        .list_parts(&PartFilter::all().finished_only())
        .await
        .unwrap()
    {
        let mut r = store.open_reader(&p.key).await.unwrap();
        let mut bytes = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut r, &mut bytes)
            .await
            .unwrap();
        out.push((p.key.display().to_string(), bytes));
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pass_copies_the_finished_parts_and_says_what_it_did() {
    let dir = tempfile::tempdir().unwrap();
    let (src, rep) = (dir.path().join("src.db"), dir.path().join("rep.db"));
    let store = SqliteOutputStore::open_with(&src, BASE, StoreOptions::default()).unwrap();
    for n in 0..3 {
        write_part(&store, "job-a", n, 500 + n as usize).await;
    }
    let from = src.to_str().unwrap();
    let o = run(&rep, &["mirror", "--once", "--from", from]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with("mirrored: 3 parts added"),
        "{}",
        stdout(&o)
    );
    assert_eq!(contents(&rep).await, contents(&src).await);
    // Nothing new: nothing added, all unchanged.
    let o = run(&rep, &["mirror", "--once", "--from", from]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).contains("0 parts added") && stdout(&o).contains("3 unchanged"),
        "{}",
        stdout(&o)
    );
    let o = run(&rep, &["verify"]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_the_source_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (src, rep) = (dir.path().join("src.db"), dir.path().join("rep.db"));
    let store = SqliteOutputStore::open_with(&src, BASE, StoreOptions::default()).unwrap();
    write_part(&store, "job-a", 0, 100).await;
    let o = run(&rep, &["mirror", "--once", "--from", src.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let before = contents(&rep).await;
    let junk = dir.path().join("junk.db");
    std::fs::write(
        &junk,
        b"not a database, not at all, but long enough to look at",
    )
    .unwrap();
    let missing = dir.path().join("missing.db");
    let folder = dir.path().to_path_buf();
    for (from, says) in [
        (missing.as_path(), "no database file"),
        (folder.as_path(), "folder"),
        (junk.as_path(), "not a SQLite database"),
        (rep.as_path(), "own file"),
    ] {
        let o = run(
            &rep,
            &["mirror", "--once", "--from", from.to_str().unwrap()],
        );
        assert_eq!(code(&o), 1, "{}: {}", from.display(), stderr(&o));
        assert!(
            stderr(&o).contains(says),
            "{}: {}",
            from.display(),
            stderr(&o)
        );
        assert_eq!(contents(&rep).await, before, "{}", from.display());
    }
    // A bad --every is clap's refusal.
    let o = run(&rep, &["mirror", "--from", "x", "--every", "soon"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_parts_are_reported_with_status_3_and_not_copied() {
    let dir = tempfile::tempdir().unwrap();
    let (src, rep) = (dir.path().join("src.db"), dir.path().join("rep.db"));
    {
        let store = SqliteOutputStore::open_with(&src, BASE, StoreOptions::default()).unwrap();
        write_part(&store, "job-a", 0, 2000).await;
        write_part(&store, "job-a", 1, 2000).await;
        write_part(&store, "job-a", 2, 2000).await;
    }
    // One frame of part 1 damaged in the middle, its length kept; one
    // frame of part 2 stored as text.
    let c = rusqlite::Connection::open(&src).unwrap();
    c.execute_batch("DROP TRIGGER chunks_of_finished_parts_are_immutable")
        .unwrap();
    let part = |n: u32| -> (i64, Vec<u8>) {
        c.query_row(
            "SELECT chunks.id, frame FROM chunks JOIN parts ON parts.id = part_id
             WHERE part_index = ?1 ORDER BY seq LIMIT 1",
            [n],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    };
    let (id, mut frame) = part(1);
    let mid = frame.len() / 2;
    for b in &mut frame[mid..mid + 16] {
        *b ^= 0x5a;
    }
    c.execute(
        "UPDATE chunks SET frame = ?2 WHERE id = ?1",
        rusqlite::params![id, frame],
    )
    .unwrap();
    let (id, _) = part(2);
    c.execute("UPDATE chunks SET frame = 'text' WHERE id = ?1", [id])
        .unwrap();
    drop(c);
    let o = run(&rep, &["mirror", "--once", "--from", src.to_str().unwrap()]);
    assert_eq!(code(&o), 3, "{}\n{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("1 part added"), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("2 failed their check"),
        "{}",
        stdout(&o)
    );
    assert!(stderr(&o).contains("Patient-1"), "{}", stderr(&o));
    assert!(stderr(&o).contains("Patient-2"), "{}", stderr(&o));
    let held: Vec<String> = contents(&rep).await.into_iter().map(|(k, _)| k).collect();
    assert_eq!(held.len(), 1);
    assert!(held[0].contains("Patient-0"), "{held:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loop_follows_the_source_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (src, rep) = (dir.path().join("src.db"), dir.path().join("rep.db"));
    let store = SqliteOutputStore::open_with(&src, BASE, StoreOptions::default()).unwrap();
    write_part(&store, "job-a", 0, 100).await;
    let child = bin()
        .args(["mirror", "--every", "50ms", "--from"])
        .arg(&src)
        .arg("--db")
        .arg(&rep)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let until = |what: &str, f: &mut dyn FnMut() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !f() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let count = |db: &Path| -> i64 {
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|c| {
                c.query_row("SELECT count(*) FROM parts WHERE finalized = 1", [], |r| {
                    r.get(0)
                })
            })
            .unwrap_or(0)
    };
    until("the first part on the replica", &mut || count(&rep) == 1);
    write_part(&store, "job-a", 1, 100).await;
    write_part(&store, "job-b", 0, 100).await;
    until("three parts on the replica", &mut || count(&rep) == 3);
    store
        .delete_job_outputs(
            &sqlite_export_store::TenantContext::new(sqlite_export_store::TenantId::new("default")),
            &ExportJobId::from("job-a".to_string()),
        )
        .await
        .unwrap();
    until("job-a gone from the replica", &mut || count(&rep) == 1);
    let stopped = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stopped.elapsed() < Duration::from_secs(10));
    let said = stdout(&out);
    assert!(said.starts_with("mirroring "), "{said}");
    assert!(
        said.lines().filter(|l| l.starts_with("mirrored:")).count() >= 3,
        "{said}"
    );
    assert_eq!(contents(&rep).await, contents(&src).await);
}
