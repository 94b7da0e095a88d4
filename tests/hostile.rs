//! Hostile input: bad keys and bad calls, table-driven. Each must get a
//! clear error of the right category (or, where the input is odd but legal,
//! work exactly and stay isolated), write nothing, and leave the store usable:
//! after every case a canary part is written and read back, and at the end
//! `verify` and `integrity_check` find nothing wrong.

mod faultkit;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use faultkit::{content, key, lines, read_part, write_part};
use sqlite_export_store::{
    ErrorKind, ExportJobId, ExportOutputStore, ExportPartKey, ExportPartWriter, SqliteOutputStore,
    StorageError, StorageResult, StoreOptions, TenantContext, TenantId,
};
use tokio::io::AsyncWriteExt;

const BASE: &str = "http://hfs.test";

fn tenant(t: &str) -> TenantContext {
    TenantContext::new(TenantId::new(t))
}

fn good() -> ExportPartKey {
    key("acme", "job-1", "Patient", 0, 1)
}

type Mutation = fn(&mut ExportPartKey);

/// Keys that every keyed call must refuse as invalid input.
fn bad_keys() -> Vec<(&'static str, Mutation)> {
    vec![
        ("empty tenant", |k| k.tenant_id.clear()),
        ("empty job id", |k| k.job_id = ExportJobId::from("")),
        ("empty resource type", |k| k.resource_type.clear()),
        ("empty file type", |k| k.file_type.clear()),
        ("NUL in tenant", |k| k.tenant_id = "ac\0me".into()),
        ("NUL in job id", |k| k.job_id = ExportJobId::from("job\0")),
        ("newline in resource type", |k| {
            k.resource_type = "Pat\nient".into()
        }),
        ("escape in job id", |k| {
            k.job_id = ExportJobId::from("\x1b[2Jjob")
        }),
        ("DEL in tenant", |k| k.tenant_id = "acme\x7f".into()),
        ("C1 control in tenant", |k| {
            k.tenant_id = "acme\u{85}".into()
        }),
        ("tab in resource type", |k| {
            k.resource_type = "Patient\t".into()
        }),
        ("1 MB tenant", |k| k.tenant_id = "x".repeat(1 << 20)),
        ("1 MB job id", |k| {
            k.job_id = ExportJobId::from("j".repeat(1 << 20))
        }),
        ("1 MB resource type", |k| {
            k.resource_type = "R".repeat(1 << 20)
        }),
        ("257-byte tenant", |k| k.tenant_id = "t".repeat(257)),
        ("file type with a path", |k| {
            k.file_type = "../output".into()
        }),
        ("file type in capitals", |k| k.file_type = "OUTPUT".into()),
        ("file type with NUL", |k| k.file_type = "output\0".into()),
        ("1 MB file type", |k| k.file_type = "o".repeat(1 << 20)),
    ]
}

/// Checks an error: its category, that it names the operation, and that it
/// stays short whatever the input (a 1 MB key is not echoed into logs).
fn expect(case: &str, r: StorageResult<()>, kind: ErrorKind, op: &str) {
    let e = r.err().unwrap_or_else(|| panic!("{case}: {op} succeeded"));
    assert_eq!(e.kind(), kind, "{case}: {e}");
    assert_eq!(e.operation(), op, "{case}: {e}");
    assert!(
        e.to_string().len() < 600,
        "{case}: a {}-byte message",
        e.to_string().len()
    );
    assert!(
        !e.to_string().contains('\0') && !e.to_string().contains('\n'),
        "{case}: {e:?}"
    );
}

/// The store still works: a new part goes in and comes back exactly.
async fn still_usable(store: &SqliteOutputStore, n: &mut u32) {
    let k = key("canary", "canary", "Patient", *n, 1);
    *n += 1;
    write_part(store, &k).await.unwrap();
    assert!(read_part(store, &k).await.unwrap() == content(&k));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_are_invalid_input_for_every_call_and_write_nothing() {
    let store =
        SqliteOutputStore::temporary_with(BASE, StoreOptions::default().with_chunk_size(2048))
            .unwrap();
    let mut canaries = 0;
    still_usable(&store, &mut canaries).await;
    let rows_before = faultkit::part_rows(store.path()).len();
    for (case, mutate) in bad_keys() {
        let mut k = good();
        mutate(&mut k);
        let invalid = ErrorKind::InvalidInput;
        expect(
            case,
            store.open_writer(&k).await.map(drop),
            invalid,
            "open_writer",
        );
        expect(
            case,
            store.open_reader(&k).await.map(drop),
            invalid,
            "open_reader",
        );
        expect(
            case,
            store.part_info(&k).await.map(drop),
            invalid,
            "part_info",
        );
        expect(
            case,
            store.latest_in_slot(&k).await.map(drop),
            invalid,
            "latest_in_slot",
        );
        expect(
            case,
            store
                .download_url(&k, Duration::from_secs(60))
                .await
                .map(drop),
            invalid,
            "download_url",
        );
        // A good writer finalized under the bad key publishes nothing.
        let mut w = store.open_writer(&good()).await.unwrap();
        w.write_line("{}").await.unwrap();
        expect(
            case,
            store.finalize_part(&k, w).await.map(drop),
            invalid,
            "finalize_part",
        );
        if k.tenant_id != good().tenant_id || k.job_id != good().job_id {
            let t = tenant(&k.tenant_id);
            expect(
                case,
                store.delete_job_outputs(&t, &k.job_id).await,
                invalid,
                "delete_job_outputs",
            );
            expect(
                case,
                store.prune_superseded(&t, &k.job_id).await.map(drop),
                invalid,
                "prune_superseded",
            );
        }
        if k.tenant_id != good().tenant_id {
            expect(
                case,
                store.delete_tenant_outputs(&k.tenant_id).await,
                invalid,
                "delete_tenant_outputs",
            );
        }
        still_usable(&store, &mut canaries).await;
    }
    // Nothing was written for any bad key: only the canaries were added.
    let rows = faultkit::part_rows(store.path());
    assert_eq!(rows.len(), rows_before + bad_keys().len());
    assert!(rows
        .iter()
        .all(|(k, done)| *done && k.tenant_id == "canary"));
    assert!(store.verify().await.unwrap().is_ok());
    println!("{} bad keys refused by every call", bad_keys().len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_but_legal_ids_work_exactly_and_stay_isolated() {
    let store =
        SqliteOutputStore::temporary_with(BASE, StoreOptions::default().with_chunk_size(2048))
            .unwrap();
    // `..` and `/` games: ids are opaque strings, never paths.
    let tenants = [
        "acme",
        "acme/..",
        "../acme",
        "acme/",
        "/",
        ".",
        "..",
        "acme/research",
        "acme%2F..",
    ];
    let jobs = [
        "job",
        "../../etc/passwd",
        "a/b",
        "j%2e%2e",
        "submit-0123456789abcdef",
    ];
    let mut keys = Vec::new();
    for t in tenants {
        for j in jobs {
            keys.push(key(t, j, "Patient", 0, 1));
        }
    }
    // Extremes of the numeric fields, a bulk-submit type and Unicode.
    keys.push(key("acme", "job", "Observation", u32::MAX, u64::MAX));
    keys.push(key(
        "acme",
        "job",
        &format!("submit-v1-{}", "ab".repeat(32)),
        0,
        0,
    ));
    keys.push(key("acme", "job", "Patient Résumé 🙂", 7, 3));
    keys.push(ExportPartKey::error(
        "acme",
        ExportJobId::from("job"),
        "OperationOutcome",
        0,
        1,
    ));
    keys.push(key(
        &"t".repeat(256),
        &"j".repeat(256),
        &"R".repeat(256),
        1,
        1,
    ));
    for k in &keys {
        write_part(&store, k)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", k.display()));
    }
    for k in &keys {
        assert!(
            read_part(&store, k).await.unwrap() == content(k),
            "{}",
            k.display()
        );
        let url = store
            .download_url(k, Duration::from_secs(60))
            .await
            .unwrap()
            .url;
        // The URL stays one route: `/` in an id is escaped, never a separator.
        let path = url.strip_prefix(BASE).unwrap();
        let segments: Vec<&str> = path.split('/').collect();
        assert_eq!(segments.len(), 4, "{url}");
        assert_eq!(segments[1], "export-file", "{url}");
        assert!(
            segments[3].ends_with(&format!("-{}", k.part_index)),
            "{url}"
        );
        // And a client's URL parser keeps it under the route.
        let parsed = reqwest::Url::parse(&url).unwrap();
        assert!(parsed.path().starts_with("/export-file/"), "{url}");
    }
    // The highest token in the slot fences out every lower one.
    let lower = key("acme", "job", "Observation", u32::MAX, u64::MAX - 1);
    let e = store.open_writer(&lower).await.unwrap_err();
    assert!(e.is_conflict(), "{e}");
    // Purging `acme/..`, `..` or `/` touches no other tenant: tenants
    // match exactly, never as paths or prefixes.
    let purged = ["acme/..", "..", "/"];
    for t in purged {
        store.delete_tenant_outputs(t).await.unwrap();
    }
    for k in &keys {
        let r = read_part(&store, k).await;
        if purged.contains(&k.tenant_id.as_str()) {
            assert!(r.unwrap_err().is_not_found(), "{}", k.display());
        } else {
            assert!(r.unwrap() == content(k), "{}", k.display());
        }
    }
    // Deleting job `../../etc/passwd` of `acme` leaves `acme`'s other jobs
    // and the same job id of every other tenant.
    store
        .delete_job_outputs(&tenant("acme"), &ExportJobId::from("../../etc/passwd"))
        .await
        .unwrap();
    for k in keys
        .iter()
        .filter(|k| !purged.contains(&k.tenant_id.as_str()))
    {
        let r = read_part(&store, k).await;
        if k.tenant_id == "acme" && k.job_id.as_str() == "../../etc/passwd" {
            assert!(r.unwrap_err().is_not_found());
        } else {
            assert!(r.unwrap() == content(k), "{}", k.display());
        }
    }
    assert!(store.verify().await.unwrap().is_ok());
}

/// One bad call: it runs against a clone of the store.
type Call =
    Box<dyn Fn(SqliteOutputStore) -> Pin<Box<dyn Future<Output = StorageResult<()>> + Send>>>;

/// A bad call, the category and the operation its error must name.
type Case = (&'static str, ErrorKind, &'static str, Call);

fn boxed<F, Fut>(f: F) -> Call
where
    F: Fn(SqliteOutputStore) -> Fut + 'static,
    Fut: Future<Output = StorageResult<()>> + Send + 'static,
{
    Box::new(move |s| Box::pin(f(s)))
}

fn io(e: std::io::Error) -> StorageError {
    StorageError::from_io("write", e)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_calls_get_a_clear_error_and_publish_nothing() {
    let cases: Vec<Case> = vec![
        (
            "a writer that is not the store's",
            ErrorKind::InvalidInput,
            "finalize_part",
            boxed(|s| async move {
                let w = ExportPartWriter::new(Box::pin(tokio::io::sink()));
                s.finalize_part(&good(), w).await.map(drop)
            }),
        ),
        (
            "a writer finalized under another key",
            ErrorKind::InvalidInput,
            "finalize_part",
            boxed(|s| async move {
                let mut w = s.open_writer(&good()).await?;
                w.write_line("{}").await.map_err(io)?;
                s.finalize_part(&key("acme", "job-1", "Patient", 1, 1), w)
                    .await
                    .map(drop)
            }),
        ),
        (
            "a byte count that disagrees with the bytes written",
            ErrorKind::InvalidInput,
            "finalize_part",
            boxed(|s| async move {
                let mut w = s.open_writer(&good()).await?;
                w.writer
                    .write_all(b"{\"resourceType\":\"Patient\"}\n")
                    .await
                    .map_err(io)?;
                w.line_count = 1;
                w.byte_count = 1000;
                s.finalize_part(&good(), w).await.map(drop)
            }),
        ),
        (
            "a write after shutdown",
            ErrorKind::InvalidInput,
            "write",
            boxed(|s| async move {
                let mut w = s.open_writer(&good()).await?;
                w.writer.shutdown().await.map_err(io)?;
                w.write_line("{}").await.map_err(io)
            }),
        ),
        (
            "a finalize fenced out by a higher token",
            ErrorKind::Conflict,
            "finalize_part",
            boxed(|s| async move {
                // A job of its own: deleting a job fences its tokens out.
                let zombie = key("acme", "job-fenced", "Patient", 0, 1);
                let mut w = s.open_writer(&zombie).await?;
                w.write_line("{}").await.map_err(io)?;
                write_part(&s, &key("acme", "job-fenced", "Patient", 0, 2)).await?;
                let r = s.finalize_part(&zombie, w).await.map(drop);
                s.delete_job_outputs(&tenant("acme"), &ExportJobId::from("job-fenced"))
                    .await?;
                r
            }),
        ),
        (
            "a writer whose staging another open of the same key replaced",
            ErrorKind::NotFound,
            "finalize_part",
            boxed(|s| async move {
                let mut first = s.open_writer(&good()).await?;
                first.write_line("{\"first\":true}").await.map_err(io)?;
                let second = s.open_writer(&good()).await?;
                let r = s.finalize_part(&good(), first).await.map(drop);
                drop(second);
                r
            }),
        ),
        (
            "a writer whose job was deleted meanwhile",
            ErrorKind::NotFound,
            "finalize_part",
            boxed(|s| async move {
                // A job of its own: deleting a job fences its tokens out.
                let k = key("acme", "job-deleted", "Patient", 0, 1);
                let mut w = s.open_writer(&k).await?;
                w.write_line("{}").await.map_err(io)?;
                s.delete_job_outputs(&tenant("acme"), &k.job_id).await?;
                for l in lines(&k) {
                    if w.write_line(&l).await.is_err() {
                        break;
                    }
                }
                s.finalize_part(&k, w).await.map(drop)
            }),
        ),
        (
            "an empty tenant purge",
            ErrorKind::InvalidInput,
            "delete_tenant_outputs",
            boxed(|s| async move { s.delete_tenant_outputs("").await }),
        ),
        (
            "a reader of a part never written",
            ErrorKind::NotFound,
            "open_reader",
            boxed(|s| async move {
                s.open_reader(&key("acme", "nothing", "Patient", 0, 1))
                    .await
                    .map(drop)
            }),
        ),
        (
            "a reader of a part still staged",
            ErrorKind::NotFound,
            "open_reader",
            boxed(|s| async move {
                let mut w = s.open_writer(&good()).await?;
                w.write_line("{}").await.map_err(io)?;
                w.flush().await.map_err(io)?;
                let r = s.open_reader(&good()).await.map(drop);
                drop(w);
                r
            }),
        ),
    ];
    let store =
        SqliteOutputStore::temporary_with(BASE, StoreOptions::default().with_chunk_size(2048))
            .unwrap();
    let mut canaries = 0;
    for (case, kind, op, call) in &cases {
        expect(case, call(store.clone()).await, *kind, op);
        // Nothing of `good()` was published by a failed call.
        let e = read_part(&store, &good()).await.unwrap_err();
        assert!(e.is_not_found(), "{case}: {e}");
        still_usable(&store, &mut canaries).await;
    }
    println!("{} bad calls refused with the right category", cases.len());
    // Dropped writers leave no staging behind once the writer thread caught up.
    store
        .reclaim_abandoned(Duration::from_secs(3600))
        .await
        .unwrap();
    let report = store.verify().await.unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(faultkit::integrity_check(store.path()), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_but_legal_calls_work() {
    let store =
        SqliteOutputStore::temporary_with(BASE, StoreOptions::default().with_chunk_size(2048))
            .unwrap();
    // A writer that never wrote makes an empty part (a type with no resources).
    let empty = key("acme", "job", "Device", 0, 1);
    let w = store.open_writer(&empty).await.unwrap();
    let f = store.finalize_part(&empty, w).await.unwrap();
    assert_eq!((f.line_count, f.size_bytes), (0, 0));
    assert!(read_part(&store, &empty).await.unwrap().is_empty());
    assert_eq!(store.part_info(&empty).await.unwrap().chunk_count, 0);
    // Finalizing the same key twice with the same contents: one part, once.
    let k = key("acme", "job", "Patient", 0, 1);
    write_part(&store, &k).await.unwrap();
    let first = store.part_info(&k).await.unwrap();
    write_part(&store, &k).await.unwrap();
    let second = store.part_info(&k).await.unwrap();
    assert_eq!(first.digest, second.digest);
    assert!(read_part(&store, &k).await.unwrap() == content(&k));
    let versions = faultkit::part_rows(store.path())
        .into_iter()
        .filter(|(r, _)| r == &k)
        .count();
    assert_eq!(versions, 1, "the second finalize replaced the first");
    // Deletes of things that do not exist are fine (idempotent).
    store
        .delete_job_outputs(&tenant("nobody"), &ExportJobId::from("none"))
        .await
        .unwrap();
    store.delete_tenant_outputs("nobody").await.unwrap();
    assert_eq!(
        store
            .prune_superseded(&tenant("nobody"), &ExportJobId::from("none"))
            .await
            .unwrap(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_used_after_its_store_was_dropped_stages_but_is_never_published() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("dropped.db");
    let opts = StoreOptions::default().with_chunk_size(2048);
    let k = key("acme", "job", "Encounter", 0, 1);
    let store = SqliteOutputStore::open_with(&db, BASE, opts.clone()).unwrap();
    let mut w = store.open_writer(&k).await.unwrap();
    let ls = lines(&k);
    w.write_line(&ls[0]).await.unwrap();
    drop(store);
    // The writer holds the database open: writing goes on without error.
    for l in &ls[1..] {
        w.write_line(l).await.unwrap();
    }
    w.flush().await.unwrap();
    // Only the store that opened it could finalize it; a new one refuses.
    let reopened = SqliteOutputStore::open_with(&db, BASE, opts).unwrap();
    let e = reopened.finalize_part(&k, w).await.unwrap_err();
    assert!(e.is_invalid_input(), "{e}");
    assert!(e.to_string().contains("not opened by this store"), "{e}");
    assert!(read_part(&reopened, &k).await.unwrap_err().is_not_found());
    // Its staging went with it; the key works for a fresh writer.
    assert_eq!(faultkit::census(&db).staged_parts, 0);
    write_part(&reopened, &k).await.unwrap();
    assert!(read_part(&reopened, &k).await.unwrap() == content(&k));
}
