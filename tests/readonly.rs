//! A store opened read-only (`SqliteOutputStore::open_read_only`,
//! `export-store serve --read-only`), on real SQLite files: every write
//! refused at once with nothing changed in the file, other schema versions
//! refused untouched, hostile paths, and the real binary serving downloads
//! over TCP from a read-only file, from a read-only folder, and while a
//! writer in another process finalizes parts into the same file.
//!
//! Read-only files and folders are read-only bind mounts (`mount --bind`,
//! then `mount -o remount,bind,ro`) when the tests run as root, which file
//! permissions do not stop; a test that cannot mount then fails, saying
//! so. Run by another user, they are the same file or folder with its
//! write permissions taken away, reached through a hard link (a file: so
//! that SQLite puts its `-wal` and `-shm` beside the link, as beside a
//! mount) or a symbolic link (a folder).
#![cfg(feature = "server")]

mod clikit;
mod server_support;

use std::ffi::OsStr;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::OpenFlags;
use server_support::{digest_hex, key, ndjson_of, put, ServeProcess};
use sqlite_export_store::__test_support::schema::{MIGRATIONS, SCHEMA_VERSION};
use sqlite_export_store::{
    BackupOptions, ExportJobId, ExportOutputStore, ExportPartKey, PartFilter, SqliteOutputStore,
    StorageError, StoreOptions, TenantContext, TenantId,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BASE: &str = "http://127.0.0.1:1";

/// `src`, read-only, at `at` (an empty file or folder): for root a
/// read-only bind mount, unmounted when dropped (also when the test
/// panics; lazily if something still holds it); for another user a hard
/// link to the file or a symbolic link to the folder `src`, with its write
/// permissions taken away, given back when dropped.
struct ReadOnlyMount {
    at: PathBuf,
    /// Without a mount: `src` and its permission bits before.
    chmod: Option<(PathBuf, u32)>,
}

/// Whether the tests run as root (which only a read-only mount stops).
fn is_root() -> bool {
    let o = Command::new("id").arg("-u").output().expect("`id -u`");
    String::from_utf8_lossy(&o.stdout).trim() == "0"
}

impl ReadOnlyMount {
    fn new(src: &Path, at: &Path) -> ReadOnlyMount {
        if !is_root() {
            return ReadOnlyMount::by_permissions(src, at);
        }
        let mount = |args: &[&OsStr]| -> Output {
            Command::new("mount")
                .args(args)
                .output()
                .expect("this test needs the `mount` command")
        };
        let o = mount(&["--bind".as_ref(), src.as_os_str(), at.as_os_str()]);
        assert!(
            o.status.success(),
            "this test needs a read-only bind mount and cannot make one (it must run as root \
             with CAP_SYS_ADMIN): `mount --bind` failed: {}",
            clikit::stderr(&o)
        );
        let m = ReadOnlyMount {
            at: at.into(),
            chmod: None,
        };
        let o = mount(&["-o".as_ref(), "remount,bind,ro".as_ref(), at.as_os_str()]);
        assert!(
            o.status.success(),
            "this test needs a read-only bind mount: `mount -o remount,bind,ro` failed: {}",
            clikit::stderr(&o)
        );
        // As root, only the mount stops a write: check that it does.
        let probe = if at.is_dir() {
            std::fs::write(at.join("probe"), b"x")
        } else {
            std::fs::OpenOptions::new().append(true).open(at).map(drop)
        };
        let e = probe.expect_err("a write through the read-only mount succeeded");
        assert_eq!(e.raw_os_error(), Some(30), "not EROFS: {e}");
        m
    }

    fn by_permissions(src: &Path, at: &Path) -> ReadOnlyMount {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(src).unwrap().permissions().mode();
        std::fs::set_permissions(src, std::fs::Permissions::from_mode(mode & !0o222)).unwrap();
        let m = ReadOnlyMount {
            at: at.into(),
            chmod: Some((src.into(), mode)),
        };
        if at.is_dir() {
            std::fs::remove_dir(at).unwrap();
            std::os::unix::fs::symlink(src, at).unwrap();
        } else {
            std::fs::remove_file(at).unwrap();
            std::fs::hard_link(src, at).unwrap();
        }
        let probe = if src.is_dir() {
            std::fs::write(at.join("probe"), b"x")
        } else {
            std::fs::OpenOptions::new().append(true).open(at).map(drop)
        };
        let e = probe.expect_err("a write through the read-only link succeeded");
        assert_eq!(e.raw_os_error(), Some(13), "not EACCES: {e}");
        m
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        if let Some((src, mode)) = &self.chmod {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(src, std::fs::Permissions::from_mode(*mode));
            // Back to what the caller made: an empty folder or file.
            let _ = std::fs::remove_file(&self.at);
            if src.is_dir() {
                let _ = std::fs::create_dir(&self.at);
            } else {
                let _ = std::fs::write(&self.at, b"");
            }
            return;
        }
        let ok = Command::new("umount")
            .arg(&self.at)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.at).status();
        }
    }
}

fn with_suffix(db: &Path, suffix: &str) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// What must not change under a read-only store: the database file's and
/// its log's bytes (a missing log counts as empty: SQLite may create an
/// empty one), and what the tables hold.
#[derive(PartialEq, Eq)]
struct Snapshot {
    main: Vec<u8>,
    wal: Vec<u8>,
    rows: Vec<i64>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let short = |b: &[u8]| format!("{} bytes, {}", b.len(), &digest_hex(b)[..12]);
        f.debug_struct("Snapshot")
            .field("main", &short(&self.main))
            .field("wal", &short(&self.wal))
            .field("rows", &self.rows)
            .finish()
    }
}

fn snapshot(db: &Path) -> Snapshot {
    let main = std::fs::read(db).unwrap();
    let wal = std::fs::read(with_suffix(db, "-wal")).unwrap_or_default();
    let c = rusqlite::Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let rows = [
        "SELECT count(*) FROM parts",
        "SELECT count(*) FROM parts WHERE finalized = 1",
        "SELECT count(*) FROM chunks",
        "SELECT count(*) FROM job_fences",
        "PRAGMA user_version",
        "PRAGMA freelist_count",
        "PRAGMA page_count",
    ]
    .iter()
    .map(|q| c.query_row(q, [], |r| r.get(0)).unwrap_or(-1))
    .collect();
    Snapshot { main, wal, rows }
}

/// Awaits `f`, failing the test if it takes more than a few seconds.
async fn promptly<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), f)
        .await
        .unwrap_or_else(|_| panic!("{what} hung on a read-only store"))
}

/// A refusal because the store is read-only: internal, and says so.
fn assert_read_only_refusal<T>(what: &str, r: Result<T, StorageError>) {
    let Err(e) = r else {
        panic!("{what} succeeded on a read-only store")
    };
    assert!(e.is_internal(), "{what}: {e}");
    assert!(e.message().contains("open read-only"), "{what}: {e}");
}

fn part_key(job: &str, index: u32) -> ExportPartKey {
    key("default", job, index, 1)
}

/// A store at `dir/export-store.db` with two finished parts of job `a`,
/// one of job `b`, and a job `gone` deleted (so a fence mark), all written
/// and closed: the log is checkpointed away.
async fn store_with_parts(dir: &Path) -> (PathBuf, Vec<(ExportPartKey, Vec<u8>)>) {
    let db = dir.join("export-store.db");
    let store = SqliteOutputStore::open_with(
        &db,
        BASE,
        StoreOptions::default().with_chunk_size(64 * 1024),
    )
    .unwrap();
    let mut parts = Vec::new();
    for (i, (job, index)) in [("a", 0), ("a", 1), ("b", 0)].into_iter().enumerate() {
        let bytes = ndjson_of(100_000 + 50_000 * i);
        put(&store, &part_key(job, index), &bytes).await;
        parts.push((part_key(job, index), bytes));
    }
    put(&store, &part_key("gone", 0), b"{}\n").await;
    store
        .delete_job_outputs(
            &TenantContext::new(TenantId::new("default")),
            &ExportJobId::from("gone"),
        )
        .await
        .unwrap();
    store.reclaim_space().await.unwrap();
    drop(store);
    (db, parts)
}

async fn read_all(store: &SqliteOutputStore, key: &ExportPartKey) -> Vec<u8> {
    let mut r = store.open_reader(key).await.unwrap();
    let mut out = Vec::new();
    r.read_to_end(&mut out).await.unwrap();
    out
}

/// Every call that writes fails at once with a read-only refusal, reads
/// work, and neither the file's bytes nor its rows change: not even while
/// the log holds frames a read-write store would checkpoint, and free
/// pages it would give back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_is_refused_and_the_file_is_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let (db, parts) = store_with_parts(dir.path()).await;
    // Leave work for a writer: a part deleted by another connection, its
    // frames left in the log (no checkpoint on close), its pages free.
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.pragma_update(None, "foreign_keys", true).unwrap();
        c.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        c.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )
        .unwrap();
        c.execute("DELETE FROM parts WHERE job_id = 'b'", [])
            .unwrap();
    }
    let before = snapshot(&db);
    assert!(!before.wal.is_empty(), "the log holds the delete");
    assert!(before.rows[5] > 0, "the delete left free pages");

    let store = SqliteOutputStore::open_read_only(&db, BASE).unwrap();
    assert!(store.is_read_only());
    assert!(store.options().is_read_only());

    // Reads: what the log holds is seen.
    let listed = store.list_parts(&PartFilter::all()).await.unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    for (k, bytes) in &parts[..2] {
        assert_eq!(&read_all(&store, k).await, bytes);
        let info = store.part_info(k).await.unwrap();
        assert_eq!(info.digest, digest_hex(bytes));
        assert_eq!(store.latest_in_slot(k).await.unwrap(), info);
        let mut frames = Vec::new();
        store
            .open_frames(k)
            .await
            .unwrap()
            .read_to_end(&mut frames)
            .await
            .unwrap();
        assert_eq!(&zstd::decode_all(&frames[..]).unwrap(), bytes);
        let url = store
            .download_url(k, Duration::from_secs(60))
            .await
            .unwrap();
        assert!(url.url.starts_with(BASE), "{}", url.url);
    }
    assert!(store
        .part_info(&parts[2].0)
        .await
        .unwrap_err()
        .is_not_found());
    assert_eq!(store.list_jobs(&PartFilter::all()).await.unwrap().len(), 1);
    assert_eq!(
        store.list_tenants(&PartFilter::all()).await.unwrap().len(),
        1
    );
    assert!(store.space().await.unwrap().free_pages > 0);
    store.file_stats().await.unwrap();
    let report = store.verify().await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.parts_checked, 2);

    // Writes: each refused at once.
    let k = part_key("new", 0);
    assert_read_only_refusal(
        "open_writer",
        promptly("open_writer", store.open_writer(&k)).await,
    );
    // A writer of another store, handed to this one: refused before it is
    // touched, and the other store's part is still its own to finalize.
    let other = SqliteOutputStore::temporary(BASE).unwrap();
    let mut w = other.open_writer(&k).await.unwrap();
    w.writer.write_all(b"{}\n").await.unwrap();
    w.byte_count = 3;
    w.line_count = 1;
    let r = promptly("finalize_part", store.finalize_part(&k, w)).await;
    assert_read_only_refusal("finalize_part", r);
    let w = other.open_writer(&k).await.unwrap();
    let r = promptly("finalize_parts", store.finalize_parts(vec![(k.clone(), w)])).await;
    assert!(r.is_err(), "finalize_parts succeeded on a read-only store");
    let w = other.open_writer(&k).await.unwrap();
    let r = promptly(
        "finalize_new_job",
        store.finalize_new_job(vec![(k.clone(), w)]),
    )
    .await;
    assert!(
        r.is_err(),
        "finalize_new_job succeeded on a read-only store"
    );
    let tenant = TenantContext::new(TenantId::new("default"));
    let job = ExportJobId::from("a");
    assert_read_only_refusal(
        "delete_job_outputs",
        promptly("delete", store.delete_job_outputs(&tenant, &job)).await,
    );
    assert_read_only_refusal(
        "delete_tenant_outputs",
        promptly("delete", store.delete_tenant_outputs("default")).await,
    );
    assert_read_only_refusal(
        "reclaim_abandoned",
        promptly("reclaim", store.reclaim_abandoned(Duration::ZERO)).await,
    );
    assert_read_only_refusal(
        "prune_superseded",
        promptly("prune", store.prune_superseded(&tenant, &job)).await,
    );
    assert_read_only_refusal(
        "reclaim_space",
        promptly("reclaim_space", store.reclaim_space()).await,
    );

    // A backup only reads the store: it works, and the copy is whole.
    let copy = dir.path().join("copy.db");
    let report = store
        .backup_to(&copy, &BackupOptions::default())
        .await
        .unwrap();
    assert_eq!(report.verify.parts_checked, 2);

    // Long enough for a writer thread's idle work (log truncation after
    // one idle second, space reclamation), had the store one.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(read_all(&store, &parts[0].0).await, parts[0].1);
    drop(store);
    assert_eq!(snapshot(&db), before, "a read-only store changed the file");
}

/// A file of an older or a newer schema is refused with both versions
/// named, by the library, `serve --read-only` and `ls`, and left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_schema_versions_are_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    // Older: a file written under schema 1.
    let old = dir.path().join("old.db");
    {
        let c = rusqlite::Connection::open(&old).unwrap();
        c.pragma_update(None, "journal_mode", "WAL").unwrap();
        c.execute_batch(MIGRATIONS[0].1).unwrap();
        c.pragma_update(None, "user_version", 1).unwrap();
    }
    // Newer: a current store marked one version ahead.
    let (current, _) = store_with_parts(&dir.path().join("new").tap_mkdir()).await;
    {
        let c = rusqlite::Connection::open(&current).unwrap();
        c.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
    }
    for (db, version, word) in [(&old, 1, "older"), (&current, SCHEMA_VERSION + 1, "newer")] {
        let before = snapshot(db);
        let e = SqliteOutputStore::open_read_only(db, BASE).unwrap_err();
        assert!(e.is_invalid_input(), "{e}");
        let text = e.to_string();
        for want in [
            word.to_string(),
            format!("schema version {version},"),
            format!("the {SCHEMA_VERSION} "),
        ] {
            assert!(text.contains(&want), "{want:?} missing: {text}");
        }
        for args in [
            &["serve", "--read-only", "--addr", "127.0.0.1:0"][..],
            &["ls"],
        ] {
            let o = clikit::run(db, args);
            assert_ne!(clikit::code(&o), 0, "{args:?} accepted schema {version}");
            let err = clikit::stderr(&o);
            assert!(
                err.contains(word) && err.contains(&format!("schema version {version},")),
                "{args:?}: {err}"
            );
        }
        assert_eq!(snapshot(db), before, "schema {version}: the file changed");
    }
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

/// Paths that hold no store: not found or refused with a clear message,
/// and nothing created or changed.
#[test]
fn hostile_paths_are_refused_and_nothing_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let listing = || {
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    let missing = dir.path().join("missing.db");
    let e = SqliteOutputStore::open_read_only(&missing, BASE).unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(e.message().contains("never creates"), "{e}");
    assert!(!e.to_string().contains(dir.path().to_str().unwrap()), "{e}");
    let e =
        SqliteOutputStore::open_read_only(dir.path().join("no/such/folder.db"), BASE).unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let e = SqliteOutputStore::open_read_only(dir.path(), BASE).unwrap_err();
    assert!(
        e.is_invalid_input() && e.message().contains("folder"),
        "{e}"
    );
    let o = clikit::run(&missing, &["serve", "--read-only", "--addr", "127.0.0.1:0"]);
    assert_eq!(clikit::code(&o), 1);
    assert!(
        clikit::stderr(&o).contains("no store at"),
        "{}",
        clikit::stderr(&o)
    );
    assert!(listing().is_empty(), "{:?}", listing());

    let text = dir.path().join("notes.db");
    let garbage = b"this is not a SQLite database, though it is long enough to have a header \
                    where SQLite looks for one: 0123456789abcdef"
        .repeat(40);
    std::fs::write(&text, &garbage).unwrap();
    let e = SqliteOutputStore::open_read_only(&text, BASE).unwrap_err();
    assert!(e.message().contains("not a SQLite database"), "{e}");
    let o = clikit::run(&text, &["serve", "--read-only", "--addr", "127.0.0.1:0"]);
    assert_eq!(clikit::code(&o), 1);
    assert!(
        clikit::stderr(&o).contains("not a SQLite database"),
        "{}",
        clikit::stderr(&o)
    );
    assert_eq!(std::fs::read(&text).unwrap(), garbage);

    let empty = dir.path().join("empty.db");
    std::fs::write(&empty, b"").unwrap();
    let e = SqliteOutputStore::open_read_only(&empty, BASE).unwrap_err();
    assert!(e.is_invalid_input() && e.message().contains("empty"), "{e}");
    assert_eq!(std::fs::read(&empty).unwrap(), b"");

    let other = dir.path().join("other.db");
    rusqlite::Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1)")
        .unwrap();
    let bytes = std::fs::read(&other).unwrap();
    let e = SqliteOutputStore::open_read_only(&other, BASE).unwrap_err();
    assert!(e.message().contains("not a store"), "{e}");
    assert_eq!(std::fs::read(&other).unwrap(), bytes);
    let mut names = listing();
    names.retain(|n| n.to_string_lossy().contains('-'));
    assert!(names.is_empty(), "companion files created: {names:?}");
}

/// GET `url`: (status, body).
async fn get(url: &str) -> (u16, Vec<u8>) {
    let r = reqwest::get(url).await.unwrap();
    let status = r.status().as_u16();
    (status, r.bytes().await.unwrap().to_vec())
}

fn url(base: &str, key: &ExportPartKey) -> String {
    format!(
        "{base}/export-file/{}/{}-{}",
        key.job_id.as_str(),
        key.resource_type,
        key.part_index
    )
}

async fn serves_every_part(server: &ServeProcess, parts: &[(ExportPartKey, Vec<u8>)]) {
    for (k, bytes) in parts {
        let (status, body) = get(&url(&server.base, k)).await;
        assert_eq!(status, 200, "{}", k.display());
        assert!(&body == bytes, "{}: the body differs", k.display());
    }
}

/// `serve --read-only` on a read-only file (its folder writable) and in a
/// read-only folder serves downloads byte for byte; the read-write `serve`
/// cannot start on the read-only file; `ls`, `cat` and `verify` read both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_read_only_from_a_read_only_file_and_folder() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src").tap_mkdir();
    let (db, parts) = store_with_parts(&src).await;

    // The file read-only, in a folder of its own that is writable.
    let file_dir = dir.path().join("file").tap_mkdir();
    let ro_file = file_dir.join("export-store.db");
    std::fs::write(&ro_file, b"").unwrap();
    {
        let _mount = ReadOnlyMount::new(&db, &ro_file);
        let o = clikit::run(&ro_file, &["serve", "--addr", "127.0.0.1:0"]);
        assert_eq!(
            clikit::code(&o),
            1,
            "read-write serve started on a read-only file"
        );
        assert!(
            clikit::stderr(&o).contains("read-only"),
            "{}",
            clikit::stderr(&o)
        );
        let mut server = ServeProcess::start(&ro_file, &["--read-only".as_ref()]);
        serves_every_part(&server, &parts).await;
        read_commands_work(&ro_file, &parts);
        drop(server.kill_and_read_logs());
    }

    // The folder read-only, no writer: the store's file has no -wal or
    // -shm beside it, which SQLite needs and cannot create there.
    let folder = dir.path().join("folder").tap_mkdir();
    {
        let _mount = ReadOnlyMount::new(&src, &folder);
        let ro_db = folder.join("export-store.db");
        assert!(!with_suffix(&ro_db, "-wal").exists());
        let e = SqliteOutputStore::open_read_only(&ro_db, BASE).unwrap_err();
        assert!(e.message().contains("-wal and -shm"), "{e}");
        let o = clikit::run(&ro_db, &["serve", "--read-only", "--addr", "127.0.0.1:0"]);
        assert_eq!(clikit::code(&o), 1);
        assert!(
            clikit::stderr(&o).contains("folder read-only?"),
            "{}",
            clikit::stderr(&o)
        );
    }

    // With a writer holding the store open (so both files exist), the
    // read-only folder serves.
    let writer = SqliteOutputStore::open(&db, BASE).unwrap();
    {
        let _mount = ReadOnlyMount::new(&src, &folder);
        let ro_db = folder.join("export-store.db");
        let mut server = ServeProcess::start(&ro_db, &["--read-only".as_ref()]);
        serves_every_part(&server, &parts).await;
        read_commands_work(&ro_db, &parts);
        // A part the writer finalizes now is served too.
        let k = part_key("later", 0);
        let bytes = ndjson_of(70_000);
        assert_eq!(get(&url(&server.base, &k)).await.0, 404);
        put(&writer, &k, &bytes).await;
        serves_every_part(&server, &[(k, bytes)]).await;
        drop(server.kill_and_read_logs());
    }
    drop(writer);

    // A copy in rollback-journal mode (a backup) needs no companion files.
    let store = SqliteOutputStore::open_read_only(&db, BASE).unwrap();
    store
        .backup_to(src.join("copy.db"), &BackupOptions::default())
        .await
        .unwrap();
    drop(store);
    {
        let _mount = ReadOnlyMount::new(&src, &folder);
        let copy = folder.join("copy.db");
        let mut server = ServeProcess::start(&copy, &["--read-only".as_ref()]);
        serves_every_part(&server, &parts).await;
        drop(server.kill_and_read_logs());
        assert!(!with_suffix(&copy, "-wal").exists());
    }
}

/// `ls`, `cat` and `verify` open the store read-only: they work where
/// nothing may be written.
fn read_commands_work(db: &Path, parts: &[(ExportPartKey, Vec<u8>)]) {
    let o = clikit::run(db, &["ls", "--parts", "--json"]);
    assert_eq!(clikit::code(&o), 0, "{}", clikit::stderr(&o));
    let o = clikit::run(db, &["verify"]);
    assert_eq!(
        clikit::code(&o),
        0,
        "{}{}",
        clikit::stdout(&o),
        clikit::stderr(&o)
    );
    let (k, bytes) = &parts[0];
    let o = clikit::run(db, &["cat", &k.display().to_string()]);
    assert_eq!(clikit::code(&o), 0, "{}", clikit::stderr(&o));
    assert!(&o.stdout == bytes, "cat's output differs");
}

/// A writer in another process (this test, through the library, and
/// `export-store import`) finalizes parts while `serve --read-only` serves
/// the same file: a part is not found until finalized, then served whole,
/// and a client polling all along never gets part of one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_appear_whole_as_another_process_finalizes_them() {
    let dir = tempfile::tempdir().unwrap();
    let (db, mut parts) = store_with_parts(dir.path()).await;
    let writer = SqliteOutputStore::open_with(
        &db,
        BASE,
        StoreOptions::default().with_chunk_size(16 * 1024),
    )
    .unwrap();
    let server = ServeProcess::start(&db, &["--read-only".as_ref()]);
    let base = server.base.clone();

    let fresh: Vec<(ExportPartKey, Vec<u8>)> = (0..4)
        .map(|i| {
            (
                part_key("live", i),
                ndjson_of(200_000 + 40_000 * i as usize),
            )
        })
        .collect();
    // A client polling every new part until the writer is done: each
    // answer is 404 or the whole part.
    let done = Arc::new(AtomicBool::new(false));
    let poller = {
        let (done, base, fresh) = (done.clone(), base.clone(), fresh.clone());
        tokio::spawn(async move {
            let mut whole = 0;
            while !done.load(Ordering::SeqCst) {
                for (k, bytes) in &fresh {
                    let (status, body) = get(&url(&base, k)).await;
                    match status {
                        404 => {}
                        200 => {
                            assert!(&body == bytes, "{}: served partly or wrong", k.display());
                            whole += 1;
                        }
                        s => panic!("{}: status {s}", k.display()),
                    }
                }
            }
            whole
        })
    };
    for (k, bytes) in &fresh {
        let mut w = writer.open_writer(k).await.unwrap();
        let half = bytes.len() / 2;
        w.writer.write_all(&bytes[..half]).await.unwrap();
        w.writer.flush().await.unwrap();
        // Half the chunks are committed as staging: not served.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(get(&url(&base, k)).await.0, 404, "{}", k.display());
        w.writer.write_all(&bytes[half..]).await.unwrap();
        w.byte_count = bytes.len() as u64;
        w.line_count = bytes.iter().filter(|&&b| b == b'\n').count() as u64;
        assert_eq!(get(&url(&base, k)).await.0, 404, "{}", k.display());
        writer.finalize_part(k, w).await.unwrap();
        let (status, body) = get(&url(&base, k)).await;
        assert_eq!(status, 200, "{}", k.display());
        assert!(&body == bytes, "{}", k.display());
    }
    done.store(true, Ordering::SeqCst);
    let whole = poller.await.unwrap();
    assert!(whole > 0, "the poller never saw a finished part");
    parts.extend(fresh);

    // `export-store import`, a process of its own, adds a job meanwhile.
    let input = dir.path().join("input").tap_mkdir();
    let ndjson: Vec<u8> = (0..3000)
        .flat_map(|i| format!("{{\"resourceType\":\"Condition\",\"id\":\"c{i}\"}}\n").into_bytes())
        .collect();
    std::fs::write(input.join("Condition.ndjson"), &ndjson).unwrap();
    let o = clikit::bin()
        .arg("import")
        .arg(&input)
        .args([
            "--tenant",
            "default",
            "--job",
            "imported",
            "--per-part",
            "100000",
            "--db",
        ])
        .arg(&db)
        .output()
        .unwrap();
    assert_eq!(clikit::code(&o), 0, "{}", clikit::stderr(&o));
    let (status, body) = get(&format!("{base}/export-file/imported/Condition-0")).await;
    assert_eq!(status, 200);
    assert!(body == ndjson, "the imported part differs");
    serves_every_part(&server, &parts).await;
    drop(writer);
}
