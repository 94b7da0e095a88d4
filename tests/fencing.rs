//! Fencing across deletes, on a real SQLite file: once a job's outputs are
//! deleted, a worker that lost its lease (a zombie, old token) cannot open or
//! finalize any part of that job, while a later claim (a higher token) may
//! write it again. The job's fence mark survives reopening the file and is
//! dropped by `reclaim_abandoned` once it is old.

mod faultkit;

use std::path::Path;
use std::time::Duration;

use faultkit::{content, key, lines, noisy_lines, now_ms, read_part, tenant, write_part};
use sqlite_export_store::JOB_FENCE_MIN_AGE;
use sqlite_export_store::{
    ExportJobId, ExportOutputStore, ExportPartKey, SqliteOutputStore, StorageError, StoreOptions,
};

const BASE: &str = "http://hfs.test";
const ZOMBIE: u64 = 1;
const LIVE: u64 = 2;

fn options() -> StoreOptions {
    StoreOptions::default().with_chunk_size(1024)
}

/// A store in a fresh file of its own folder.
fn store_in(dir: &tempfile::TempDir) -> SqliteOutputStore {
    SqliteOutputStore::open_with(dir.path().join("fencing.db"), BASE, options()).unwrap()
}

async fn delete_job(store: &SqliteOutputStore, t: &str, job: &str) {
    store
        .delete_job_outputs(&tenant(t), &ExportJobId::from(job))
        .await
        .unwrap();
}

/// The job's fence mark, read through a connection of its own.
fn mark(db: &Path, t: &str, job: &str) -> Option<u64> {
    let c = rusqlite::Connection::open(db).unwrap();
    sqlite_export_store::__test_support::sql::job_fence(&c, t, job).unwrap()
}

fn marks(db: &Path) -> u64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row("SELECT count(*) FROM job_fences", [], |r| {
        r.get::<_, i64>(0)
    })
    .unwrap() as u64
}

/// Moves every mark's record time `age` into the past.
fn age_marks(db: &Path, age: Duration) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c.execute(
        "UPDATE job_fences SET recorded_at_ms = ?1",
        [now_ms() - age.as_millis() as i64],
    )
    .unwrap();
}

/// `e` is the conflict a deleted job's fence mark raises.
fn fenced_by_delete(e: &StorageError, what: &str) {
    assert!(e.is_conflict(), "{what}: {e}");
    assert!(
        e.to_string()
            .contains("deleted or reclaimed under a newer claim"),
        "{what}: {e}"
    );
}

/// Nothing of `k` is readable, and its slot serves nothing.
async fn not_served(store: &SqliteOutputStore, k: &ExportPartKey) {
    assert!(read_part(store, k).await.unwrap_err().is_not_found());
    assert!(store.part_info(k).await.unwrap_err().is_not_found());
    let probe = ExportPartKey {
        fencing_token: 0,
        ..k.clone()
    };
    assert!(store
        .latest_in_slot(&probe)
        .await
        .unwrap_err()
        .is_not_found());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_cannot_write_a_deleted_job_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(&dir);
    let db = store.path().to_path_buf();
    // The job was claimed twice: the zombie wrote part 0, the live worker
    // parts 0 and 1.
    write_part(&store, &key("acme", "job", "Patient", 0, ZOMBIE))
        .await
        .unwrap();
    for i in 0..2 {
        write_part(&store, &key("acme", "job", "Patient", i, LIVE))
            .await
            .unwrap();
    }
    // A job of the same id in another tenant, and another job of the tenant.
    let bystanders = [
        key("other", "job", "Patient", 0, ZOMBIE),
        key("acme", "job-2", "Patient", 0, ZOMBIE),
    ];
    for k in &bystanders {
        write_part(&store, k).await.unwrap();
    }
    delete_job(&store, "acme", "job").await;
    assert_eq!(mark(&db, "acme", "job"), Some(LIVE));
    assert_eq!(marks(&db), 1, "only the deleted job is marked");

    // The zombie opens slots the job never had, and slots it had: refused
    // at once, whatever the slot.
    for k in [
        key("acme", "job", "Patient", 0, ZOMBIE),
        key("acme", "job", "Patient", 7, ZOMBIE),
        key("acme", "job", "Observation", 0, ZOMBIE),
        ExportPartKey::error(
            "acme",
            ExportJobId::from("job"),
            "OperationOutcome",
            0,
            ZOMBIE,
        ),
        // The claim that was live when the job was deleted is over too.
        key("acme", "job", "Patient", 2, LIVE),
    ] {
        let Err(e) = store.open_writer(&k).await else {
            panic!("{} was opened in a deleted job", k.display());
        };
        fenced_by_delete(&e, &k.display().to_string());
        not_served(&store, &k).await;
    }
    let census = faultkit::census(&db);
    assert_eq!(
        (census.finished_parts, census.staged_parts),
        (bystanders.len() as u64, 0),
        "nothing came back to life"
    );
    // Deleting again (idempotent) keeps the mark; the bystanders still work.
    delete_job(&store, "acme", "job").await;
    assert_eq!(mark(&db, "acme", "job"), Some(LIVE));
    for k in &bystanders {
        assert!(read_part(&store, k).await.unwrap() == content(k));
        write_part(
            &store,
            &ExportPartKey {
                part_index: 1,
                ..k.clone()
            },
        )
        .await
        .unwrap();
    }
    // A job that had no parts when it was deleted has no mark: the store
    // has seen none of its tokens.
    delete_job(&store, "acme", "never-written").await;
    assert_eq!(mark(&db, "acme", "never-written"), None);
    assert!(store.verify().await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_claim_writes_the_job_again_after_a_delete() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(&dir);
    for i in 0..3 {
        write_part(&store, &key("acme", "job", "Patient", i, LIVE))
            .await
            .unwrap();
    }
    delete_job(&store, "acme", "job").await;
    // HFS reclaims the job with the next token and starts again at part 0.
    let next = LIVE + 1;
    for i in 0..2 {
        let k = key("acme", "job", "Patient", i, next);
        let done = write_part(&store, &k).await.unwrap();
        assert_eq!(done.size_bytes, content(&k).len() as u64);
        assert!(read_part(&store, &k).await.unwrap() == content(&k));
        let probe = key("acme", "job", "Patient", i, 0);
        assert_eq!(
            store.latest_in_slot(&probe).await.unwrap().fencing_token,
            next
        );
    }
    // The deleted claims stay fenced out, in the new claim's slots and
    // beyond them.
    for k in [
        key("acme", "job", "Patient", 0, LIVE),
        key("acme", "job", "Patient", 2, LIVE),
        key("acme", "job", "Patient", 2, ZOMBIE),
    ] {
        assert!(store.open_writer(&k).await.err().unwrap().is_conflict());
    }
    // Deleting the new claim's output raises the mark to its token.
    delete_job(&store, "acme", "job").await;
    assert_eq!(mark(store.path(), "acme", "job"), Some(next));
    let e = store
        .open_writer(&key("acme", "job", "Patient", 5, next))
        .await
        .err()
        .unwrap();
    fenced_by_delete(&e, "the deleted claim");
    write_part(&store, &key("acme", "job", "Patient", 0, next + 1))
        .await
        .unwrap();
    // Tokens keep their order over the whole u64 range.
    let top = key("acme", "top", "Patient", 0, u64::MAX - 1);
    write_part(&store, &top).await.unwrap();
    delete_job(&store, "acme", "top").await;
    assert_eq!(mark(store.path(), "acme", "top"), Some(u64::MAX - 1));
    assert!(store
        .open_writer(&ExportPartKey {
            fencing_token: 5,
            ..top.clone()
        })
        .await
        .err()
        .unwrap()
        .is_conflict());
    write_part(
        &store,
        &ExportPartKey {
            fencing_token: u64::MAX,
            ..top
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_purge_fences_every_job_of_exactly_that_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(&dir);
    let db = store.path().to_path_buf();
    let purged = [("job-a", 3), ("job-b", 7), ("job-c", 1)];
    let mut staging = Vec::new();
    for (job, token) in purged {
        write_part(&store, &key("acme", job, "Patient", 0, token))
            .await
            .unwrap();
        // A zombie of an earlier claim staged a part and is still at it.
        let z = key("acme", job, "Encounter", 0, token - 1);
        let mut w = store.open_writer(&z).await.unwrap();
        w.write_line(&lines(&z)[0]).await.unwrap();
        staging.push((z, w));
    }
    // A hierarchical tenant id is another tenant, and so is one that only
    // shares a prefix.
    let spared = [
        key("acme/research", "job-a", "Patient", 0, 3),
        key("acme2", "job-b", "Patient", 0, 7),
    ];
    for k in &spared {
        write_part(&store, k).await.unwrap();
    }
    store.delete_tenant_outputs("acme").await.unwrap();
    for (z, w) in staging {
        assert!(store.finalize_part(&z, w).await.is_err(), "{}", z.display());
        not_served(&store, &z).await;
    }
    for (job, token) in purged {
        assert_eq!(mark(&db, "acme", job), Some(token), "{job}");
        for t in [token - 1, token] {
            let k = key("acme", job, "Observation", 4, t);
            fenced_by_delete(&store.open_writer(&k).await.err().unwrap(), job);
            not_served(&store, &key("acme", job, "Patient", 0, token)).await;
        }
        write_part(&store, &key("acme", job, "Patient", 0, token + 1))
            .await
            .unwrap();
    }
    for k in &spared {
        assert_eq!(mark(&db, &k.tenant_id, k.job_id.as_str()), None);
        assert!(read_part(&store, k).await.unwrap() == content(k));
        // Their own old tokens still open new slots: nothing fenced them.
        write_part(
            &store,
            &ExportPartKey {
                part_index: 1,
                fencing_token: 1,
                ..k.clone()
            },
        )
        .await
        .unwrap();
    }
    assert_eq!(marks(&db), purged.len() as u64);
    assert!(store.verify().await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_staging_when_its_job_is_deleted_fails_at_finalize() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(&dir);
    let k = key("acme", "job", "Patient", 0, ZOMBIE);
    let mut w = store.open_writer(&k).await.unwrap();
    let all = lines(&k);
    let (before, after) = all.split_at(all.len() / 2);
    for l in before {
        w.write_line(l).await.unwrap();
    }
    delete_job(&store, "acme", "job").await;
    // Later chunks may already fail; the finalize must.
    let mut refused_early = false;
    for l in after {
        if w.write_line(l).await.is_err() {
            refused_early = true;
            break;
        }
    }
    if !refused_early {
        let e = store.finalize_part(&k, w).await.unwrap_err();
        assert!(e.is_not_found() || e.is_conflict(), "{e}");
    }
    not_served(&store, &k).await;
    let census = faultkit::census(store.path());
    assert_eq!(
        (
            census.finished_parts,
            census.staged_parts,
            census.orphan_chunks
        ),
        (0, 0, 0)
    );
    assert_eq!(mark(store.path(), "acme", "job"), Some(ZOMBIE));
    let e = store.open_writer(&k).await.err().unwrap();
    fenced_by_delete(&e, "the zombie's retry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalize_checks_the_jobs_mark_again() {
    // A mark that appears while a part is staged (written here straight
    // into the file, as another process sharing it would) stops the
    // finalize: the staged part stays unpublished.
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(&dir);
    let k = key("acme", "job", "Patient", 0, ZOMBIE);
    let mut w = store.open_writer(&k).await.unwrap();
    for l in lines(&k) {
        w.write_line(&l).await.unwrap();
    }
    {
        let c = rusqlite::Connection::open(store.path()).unwrap();
        c.busy_timeout(Duration::from_secs(5)).unwrap();
        c.execute(
            "INSERT INTO job_fences (tenant_id, job_id, fencing_token, recorded_at_ms)
             VALUES ('acme', 'job', ?1, ?2)",
            rusqlite::params![
                sqlite_export_store::__test_support::sql::token_to_sql(ZOMBIE),
                now_ms()
            ],
        )
        .unwrap();
    }
    let e = store.finalize_part(&k, w).await.unwrap_err();
    fenced_by_delete(&e, "finalize");
    not_served(&store, &k).await;
    assert_eq!(faultkit::census(store.path()).finished_parts, 0);
    // The next claim's part is published beside it.
    let next = ExportPartKey {
        fencing_token: ZOMBIE + 1,
        ..k.clone()
    };
    write_part(&store, &next).await.unwrap();
    assert!(read_part(&store, &next).await.unwrap() == content(&next));
    assert_eq!(store.reclaim_abandoned(Duration::ZERO).await.unwrap(), 0);
    assert_eq!(faultkit::census(store.path()).staged_parts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fencing_off_marks_are_kept_but_not_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("unfenced.db");
    let store = SqliteOutputStore::open_with(&db, BASE, options().with_fencing(false)).unwrap();
    let k = key("acme", "job", "Patient", 0, LIVE);
    write_part(&store, &k).await.unwrap();
    delete_job(&store, "acme", "job").await;
    assert_eq!(mark(&db, "acme", "job"), Some(LIVE));
    // The same token writes the job again, as before fence marks existed.
    write_part(&store, &k).await.unwrap();
    write_part(&store, &key("acme", "job", "Patient", 1, ZOMBIE))
        .await
        .unwrap();
    assert!(read_part(&store, &k).await.unwrap() == content(&k));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marks_survive_reopening_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fencing.db");
    {
        let store = store_in(&dir);
        write_part(&store, &key("acme", "job", "Patient", 0, LIVE))
            .await
            .unwrap();
        delete_job(&store, "acme", "job").await;
    }
    faultkit::settle(&db);
    let store = store_in(&dir);
    assert_eq!(mark(&db, "acme", "job"), Some(LIVE));
    for t in [ZOMBIE, LIVE] {
        let k = key("acme", "job", "Encounter", 3, t);
        fenced_by_delete(
            &store.open_writer(&k).await.err().unwrap(),
            "after reopening",
        );
    }
    write_part(&store, &key("acme", "job", "Patient", 0, LIVE + 1))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reclaim_abandoned_prunes_old_marks_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(&dir);
    let db = store.path().to_path_buf();
    write_part(&store, &key("acme", "job", "Patient", 0, LIVE))
        .await
        .unwrap();
    delete_job(&store, "acme", "job").await;
    // Whatever age the caller gives, a mark younger than a day stays.
    assert_eq!(store.reclaim_abandoned(Duration::ZERO).await.unwrap(), 0);
    assert_eq!(mark(&db, "acme", "job"), Some(LIVE));
    age_marks(&db, JOB_FENCE_MIN_AGE - Duration::from_secs(600));
    store
        .reclaim_abandoned(Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(mark(&db, "acme", "job"), Some(LIVE));
    // A caller that keeps staging longer keeps marks longer too.
    age_marks(&db, JOB_FENCE_MIN_AGE + Duration::from_secs(600));
    store
        .reclaim_abandoned(JOB_FENCE_MIN_AGE * 2)
        .await
        .unwrap();
    assert_eq!(mark(&db, "acme", "job"), Some(LIVE));
    store
        .reclaim_abandoned(Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(mark(&db, "acme", "job"), None);
    // Once the mark is gone, the store no longer refuses the old token.
    write_part(&store, &key("acme", "job", "Patient", 0, ZOMBIE))
        .await
        .unwrap();

    // Many old marks go in several short transactions; new ones stay.
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.busy_timeout(Duration::from_secs(5)).unwrap();
        let old = now_ms() - 2 * JOB_FENCE_MIN_AGE.as_millis() as i64;
        c.execute_batch("BEGIN").unwrap();
        for i in 0..2500 {
            c.execute(
                "INSERT INTO job_fences (tenant_id, job_id, fencing_token, recorded_at_ms)
                 VALUES ('bulk', ?1, ?2, ?3)",
                rusqlite::params![format!("job-{i}"), i64::MIN + 1, old],
            )
            .unwrap();
        }
        c.execute_batch("COMMIT").unwrap();
    }
    write_part(&store, &key("acme", "fresh", "Patient", 0, LIVE))
        .await
        .unwrap();
    delete_job(&store, "acme", "fresh").await;
    assert_eq!(marks(&db), 2501);
    store
        .reclaim_abandoned(Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(marks(&db), 1);
    assert_eq!(mark(&db, "acme", "fresh"), Some(LIVE));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_database_still_deletes_and_records_every_mark() {
    // Marks are written after the parts are deleted, into the pages the
    // delete freed: at the size cap, a tenant purge of many jobs with long
    // ids still goes through.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("full.db");
    let store = SqliteOutputStore::open_with(
        &db,
        BASE,
        StoreOptions::default()
            .with_chunk_size(16 << 10)
            .with_max_database_size(Some(1 << 20)),
    )
    .unwrap();
    let job = |i: u32| format!("{i:04}-{}", "j".repeat(250));
    let mut stored = 0;
    let mut full = None;
    for i in 0..2000 {
        let k = key("acme", &job(i), "Binary", 0, 5);
        let r = async {
            let mut w = store.open_writer(&k).await?;
            for l in noisy_lines(i as u64, 24, 256) {
                w.write_line(&l)
                    .await
                    .map_err(|e| StorageError::from_io("write_line", e))?;
            }
            store.finalize_part(&k, w).await
        }
        .await;
        match r {
            Ok(_) => stored += 1,
            Err(e) => {
                full = Some(e);
                break;
            }
        }
    }
    let e = full.expect("the 1 MiB cap was never reached");
    assert!(e.is_internal() && e.to_string().contains("full"), "{e}");
    assert!(stored >= 50, "only {stored} jobs fit");
    store.delete_tenant_outputs("acme").await.unwrap();
    assert!(
        marks(&db) >= stored,
        "{} marks for {stored} jobs",
        marks(&db)
    );
    for i in [0, stored as u32 - 1] {
        assert_eq!(mark(&db, "acme", &job(i)), Some(5));
        let zombie = key("acme", &job(i), "Binary", 1, 5);
        fenced_by_delete(&store.open_writer(&zombie).await.err().unwrap(), "full");
        write_part(&store, &key("acme", &job(i), "Binary", 0, 6))
            .await
            .unwrap();
    }
    assert!(store.verify().await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_at_the_size_cap_records_its_marks_even_when_it_frees_no_page() {
    // The purged tenant's tiny parts share every page with another
    // tenant's, so deleting them empties hardly a page, while its marks
    // (long job ids) need several: the delete still goes through.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("capped.db");
    let store =
        SqliteOutputStore::open_with(&db, BASE, options().with_max_database_size(Some(1 << 20)))
            .unwrap();
    let job = |i: u32| format!("{i:04}-{}", "j".repeat(240));
    let tiny = |t: &str, i: u32| key(t, &job(i), "Patient", 0, 3);
    for i in 0..100 {
        for t in ["acme", "keep"] {
            let k = tiny(t, i);
            let mut w = store.open_writer(&k).await.unwrap();
            w.write_line("{\"resourceType\":\"Patient\"}")
                .await
                .unwrap();
            store.finalize_part(&k, w).await.unwrap();
        }
    }
    // Use up every page under the cap from a connection of our own.
    let (page_size, cap) = {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.busy_timeout(Duration::from_secs(5)).unwrap();
        let page_size: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
        let cap = (1 << 20) / page_size;
        c.query_row(&format!("PRAGMA max_page_count = {cap}"), [], |_| Ok(()))
            .unwrap();
        for len in [2000, 200, 20, 1] {
            for i in 0.. {
                let r = c.execute(
                    "INSERT INTO job_fences (tenant_id, job_id, fencing_token, recorded_at_ms)
                     VALUES ('side', ?1, 0, ?2)",
                    rusqlite::params![format!("{len}-{i:06}-{}", "s".repeat(len)), now_ms()],
                );
                if r.is_err() {
                    break;
                }
            }
        }
        let free: i64 = c
            .query_row("PRAGMA freelist_count", [], |r| r.get(0))
            .unwrap();
        let count: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
        assert_eq!((count, free), (cap, 0), "the file is at its cap");
        (page_size, cap)
    };
    store.delete_tenant_outputs("acme").await.unwrap();
    for i in [0, 57, 99] {
        assert_eq!(mark(&db, "acme", &job(i)), Some(3));
        let zombie = key("acme", &job(i), "Patient", 1, 3);
        fenced_by_delete(&store.open_writer(&zombie).await.err().unwrap(), "capped");
        assert!(read_part(&store, &tiny("keep", i)).await.is_ok());
    }
    assert_eq!(
        marks(&db) as usize,
        100 + {
            let c = rusqlite::Connection::open(&db).unwrap();
            c.query_row(
                "SELECT count(*) FROM job_fences WHERE tenant_id = 'side'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .unwrap() as usize
        }
    );
    // The file went at most a little past its cap.
    let c = rusqlite::Connection::open(&db).unwrap();
    let count: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
    println!(
        "purge at the cap: {} pages of {page_size} bytes for a cap of {cap}",
        count
    );
    assert!(count <= cap + 64, "{count} pages for a cap of {cap}");
}
