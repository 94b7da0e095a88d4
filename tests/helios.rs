#![cfg(feature = "helios")]
//! `SqliteOutputStore` as HFS's own `ExportOutputStore` (helios-persistence
//! 0.2.7), driven through `Arc<dyn ExportOutputStore>` with HFS's types, the
//! way HFS's export worker, bulk-submit worker, REST handlers and tenant
//! purge call it.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use helios_persistence::core::bulk_export_output::{
    delete_tenant_outputs_everywhere, DownloadUrl, ExportOutputStore as HfsStore, ExportPartKey,
    ExportPartWriter, FinalizedPart,
};
use helios_persistence::core::ExportJobId;
use helios_persistence::error::{BackendError, ResourceError, ValidationError};
use helios_persistence::{StorageError, TenantContext, TenantId, TenantPermissions};
use sqlite_export_store as ours;
use sqlite_export_store::helios::BACKEND_NAME;
use sqlite_export_store::testkit::conformance::{self, Params};
use sqlite_export_store::{SqliteOutputStore, StoreOptions};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};

const BASE: &str = "https://fhir.example.org/r4";
/// Small chunks: many chunk boundaries from little data.
const CHUNK: usize = 4096;

fn sqlite(options: StoreOptions) -> SqliteOutputStore {
    SqliteOutputStore::temporary_with(BASE, options.with_chunk_size(CHUNK)).expect("store")
}

fn hfs(store: &SqliteOutputStore) -> Arc<dyn HfsStore> {
    Arc::new(store.clone())
}

fn tenant(id: &str) -> TenantContext {
    TenantContext::new(TenantId::new(id), TenantPermissions::full_access())
}

/// One file of the Synthea sample vendored in the repository.
fn synthea(file: &str) -> Vec<u8> {
    sqlite_export_store::__test_support::sample::synthea_file(file)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn lines(data: &[u8]) -> Vec<&str> {
    let text = std::str::from_utf8(data).expect("NDJSON is UTF-8");
    text.lines().collect()
}

async fn read_all(store: &dyn HfsStore, key: &ExportPartKey) -> Vec<u8> {
    let mut reader = store
        .open_reader(key)
        .await
        .unwrap_or_else(|e| panic!("open_reader {}: {e}", key.part_segment()));
    let mut out = Vec::new();
    reader
        .read_to_end(&mut out)
        .await
        .unwrap_or_else(|e| panic!("read {}: {e}", key.part_segment()));
    out
}

/// The part is not readable, and HFS would answer 404 naming it.
async fn assert_not_found(store: &dyn HfsStore, key: &ExportPartKey, why: &str) {
    match store.open_reader(key).await {
        Err(StorageError::Resource(ResourceError::NotFound { resource_type, id })) => {
            assert_eq!(resource_type, key.resource_type, "{why}");
            assert_eq!(id, key.part_segment(), "{why}");
        }
        Err(e) => panic!("{why}: expected NotFound, got {e:?}"),
        Ok(_) => panic!("{why}: the part is readable"),
    }
}

/// What HFS may show a job owner carries no file path and no SQL.
fn assert_clean(message: &str, store: &SqliteOutputStore) {
    let dir = store.path().parent().expect("a folder").to_string_lossy();
    assert!(!message.contains(dir.as_ref()), "path in {message:?}");
    for sql in [
        "SELECT",
        "INSERT",
        "UPDATE",
        "DELETE FROM",
        "BEGIN",
        "sqlite_",
    ] {
        assert!(!message.contains(sql), "SQL ({sql}) in {message:?}");
    }
}

fn second_connection(store: &SqliteOutputStore) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(store.path()).expect("second connection");
    c.busy_timeout(Duration::from_secs(5))
        .expect("busy timeout");
    c
}

// ---------------------------------------------------------------------------
// The conformance suite, through HFS's trait

/// Our trait on top of an `Arc<dyn>` of HFS's: every conformance call goes
/// through the adapter, and its errors come back by variant only, so a
/// scenario that checks a category checks the adapter's mapping too.
struct ThroughHfs(Arc<dyn HfsStore>);

fn hfs_key(k: &ours::ExportPartKey) -> ExportPartKey {
    ExportPartKey {
        tenant_id: k.tenant_id.clone(),
        job_id: ExportJobId::from_string(k.job_id.as_str()),
        resource_type: k.resource_type.clone(),
        file_type: k.file_type.clone(),
        part_index: k.part_index,
        fencing_token: k.fencing_token,
    }
}

fn category(e: StorageError) -> ours::StorageError {
    use ours::ErrorKind as K;
    let kind = match &e {
        StorageError::Resource(ResourceError::NotFound { .. }) => K::NotFound,
        StorageError::Resource(ResourceError::AlreadyExists { .. }) => K::Conflict,
        StorageError::Validation(ValidationError::InvalidResource { .. }) => K::InvalidInput,
        StorageError::Backend(BackendError::Unavailable { backend_name, .. })
        | StorageError::Backend(BackendError::Internal { backend_name, .. })
            if backend_name != BACKEND_NAME =>
        {
            panic!("backend_name {backend_name:?}")
        }
        StorageError::Backend(BackendError::Unavailable { .. }) => K::Unavailable,
        StorageError::Backend(BackendError::Internal { .. }) => K::Internal,
        other => panic!("the adapter returned a variant outside its mapping: {other:?}"),
    };
    ours::StorageError::new(kind, "through_hfs", e.to_string())
}

#[async_trait]
impl ours::ExportOutputStore for ThroughHfs {
    async fn open_writer(
        &self,
        key: &ours::ExportPartKey,
    ) -> ours::StorageResult<ours::ExportPartWriter> {
        let w = self.0.open_writer(&hfs_key(key)).await.map_err(category)?;
        Ok(ours::ExportPartWriter {
            writer: w.writer,
            line_count: w.line_count,
            byte_count: w.byte_count,
        })
    }

    async fn finalize_part(
        &self,
        key: &ours::ExportPartKey,
        w: ours::ExportPartWriter,
    ) -> ours::StorageResult<ours::FinalizedPart> {
        let w = ExportPartWriter {
            writer: w.writer,
            line_count: w.line_count,
            byte_count: w.byte_count,
        };
        let hk = hfs_key(key);
        let p: FinalizedPart = self.0.finalize_part(&hk, w).await.map_err(category)?;
        assert_eq!(p.key, hk, "FinalizedPart::key");
        Ok(ours::FinalizedPart {
            key: key.clone(),
            resource_type: p.resource_type,
            line_count: p.line_count,
            size_bytes: p.size_bytes,
        })
    }

    async fn download_url(
        &self,
        key: &ours::ExportPartKey,
        ttl: Duration,
    ) -> ours::StorageResult<ours::DownloadUrl> {
        let u: DownloadUrl = self
            .0
            .download_url(&hfs_key(key), ttl)
            .await
            .map_err(category)?;
        Ok(ours::DownloadUrl {
            url: u.url,
            requires_access_token: u.requires_access_token,
        })
    }

    async fn open_reader(
        &self,
        key: &ours::ExportPartKey,
    ) -> ours::StorageResult<Pin<Box<dyn AsyncRead + Send>>> {
        self.0.open_reader(&hfs_key(key)).await.map_err(category)
    }

    async fn delete_job_outputs(
        &self,
        t: &ours::TenantContext,
        job: &ours::ExportJobId,
    ) -> ours::StorageResult<()> {
        self.0
            .delete_job_outputs(
                &tenant(t.tenant_id().as_str()),
                &ExportJobId::from_string(job.as_str()),
            )
            .await
            .map_err(category)
    }

    async fn delete_tenant_outputs(&self, tenant_id: &str) -> ours::StorageResult<()> {
        self.0
            .delete_tenant_outputs(tenant_id)
            .await
            .map_err(category)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_through_hfs_trait() {
    let store = ThroughHfs(hfs(&sqlite(StoreOptions::default())));
    let params = Params {
        chunk_size: CHUNK,
        fencing: true,
    };
    conformance::run_all(&store, &params).await;
}

// ---------------------------------------------------------------------------
// HFS's callers

/// The export worker: parts of 1,000 resources written with `write_line`,
/// finalized, then listed in the manifest and downloaded; DELETE sweeps
/// twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_worker_parts_round_trip() {
    let store = sqlite(StoreOptions::default().with_chunk_size(64 * 1024));
    let output = hfs(&store);
    let ctx = tenant("default");
    let job = ExportJobId::new();
    let data = synthea("Encounter.000.ndjson");
    let all = lines(&data);
    let mut keys = Vec::new();
    for (part_index, batch) in all.chunks(1000).enumerate() {
        let key = ExportPartKey::output(
            ctx.tenant_id().as_str(),
            job.clone(),
            "Encounter",
            part_index as u32,
            1,
        );
        let mut writer = output.open_writer(&key).await.expect("open_writer");
        for line in batch {
            writer.write_line(line).await.expect("write_line");
        }
        let finalized = output
            .finalize_part(&key, writer)
            .await
            .expect("finalize_part");
        let want: Vec<u8> = batch
            .iter()
            .flat_map(|l| [l.as_bytes(), b"\n"].concat())
            .collect();
        assert_eq!(finalized.key, key);
        assert_eq!(finalized.resource_type, "Encounter");
        assert_eq!(finalized.line_count, batch.len() as u64);
        assert_eq!(finalized.size_bytes, want.len() as u64);
        assert_eq!(read_all(output.as_ref(), &key).await, want);
        keys.push(key);
    }
    assert_eq!(keys.len(), 2, "1,215 encounters make two parts");

    let url = output
        .download_url(&keys[1], Duration::from_secs(3600))
        .await
        .expect("download_url");
    assert_eq!(url.url, format!("{BASE}/export-file/{job}/Encounter-1"));
    assert!(url.requires_access_token);
    let open = hfs(&store.clone().with_access_token_required(false));
    let url = open
        .download_url(&keys[1], Duration::from_secs(3600))
        .await
        .expect("download_url");
    assert_eq!(url.url, format!("{BASE}/export-file/{job}/Encounter-1"));
    assert!(!url.requires_access_token);

    output.delete_job_outputs(&ctx, &job).await.expect("delete");
    output
        .delete_job_outputs(&ctx, &job)
        .await
        .expect("delete again");
    for key in &keys {
        assert_not_found(output.as_ref(), key, "deleted part").await;
    }
    assert_eq!(store.live_writers(), 0);
}

/// Bulk submit: raw 64 KiB pieces that ignore line boundaries, counters set
/// by hand (`replay_receipt_spool`), an error part from one `write_line`, a
/// replay abandoned on a spool mismatch, and the submission's cleanup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_submit_raw_writes_with_hand_set_counters() {
    let store = sqlite(StoreOptions::default());
    let output = hfs(&store);
    let ctx = tenant("acme/research");
    let job = ExportJobId::from_string("submit-0f1e2d3c4b5a6978");
    let locator = format!("submit-v1-{}", "7c".repeat(32));
    let k = |file_type: &str, idx| ExportPartKey {
        tenant_id: ctx.tenant_id().as_str().to_string(),
        job_id: job.clone(),
        resource_type: locator.clone(),
        file_type: file_type.to_string(),
        part_index: idx,
        fencing_token: 3,
    };
    let spool = synthea("Procedure.000.ndjson");
    let spool_lines = lines(&spool).len() as u64;

    let key = k("output", 0);
    let mut w = output.open_writer(&key).await.expect("open_writer");
    for piece in spool.chunks(64 * 1024) {
        w.writer.write_all(piece).await.expect("raw write");
    }
    w.line_count = spool_lines;
    w.byte_count = spool.len() as u64;
    let part = output.finalize_part(&key, w).await.expect("finalize");
    assert_eq!(
        (part.line_count, part.size_bytes),
        (spool_lines, spool.len() as u64)
    );
    assert_eq!(part.resource_type, locator);
    assert_eq!(read_all(output.as_ref(), &key).await, spool);

    let ekey = k("error", 0);
    let outcome =
        r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"invalid"}]}"#;
    let mut w = output.open_writer(&ekey).await.expect("open error part");
    w.write_line(outcome).await.expect("write_line");
    let part = output
        .finalize_part(&ekey, w)
        .await
        .expect("finalize error part");
    assert_eq!(
        (part.line_count, part.size_bytes),
        (1, outcome.len() as u64 + 1)
    );
    assert_eq!(
        read_all(output.as_ref(), &ekey).await,
        format!("{outcome}\n").into_bytes()
    );

    // Counters that claim more than was written: refused, nothing published.
    let short = k("output", 1);
    let mut w = output.open_writer(&short).await.expect("open");
    w.writer
        .write_all(&spool[..100_000])
        .await
        .expect("raw write");
    w.line_count = spool_lines;
    w.byte_count = spool.len() as u64;
    match output.finalize_part(&short, w).await {
        Err(StorageError::Validation(ValidationError::InvalidResource { message, .. })) => {
            assert!(message.contains("incomplete"), "{message}");
            assert_clean(&message, &store);
        }
        other => panic!("{other:?}"),
    }
    assert_not_found(
        output.as_ref(),
        &short,
        "part with counters above its bytes",
    )
    .await;

    // A spool mismatch found before finalize: the writer is dropped.
    let dropped = k("output", 2);
    let mut w = output.open_writer(&dropped).await.expect("open");
    w.writer
        .write_all(&spool[..50_000])
        .await
        .expect("raw write");
    drop(w);
    assert_not_found(output.as_ref(), &dropped, "dropped writer").await;

    output
        .delete_job_outputs(&ctx, &job)
        .await
        .expect("cleanup");
    for key in [&key, &ekey] {
        assert_not_found(output.as_ref(), key, "cleaned-up submission").await;
    }
    assert_eq!(store.live_writers(), 0);
}

/// Tenant purge goes through HFS's own helper over both of a deployment's
/// stores (here two handles on one database): exactly that tenant, so
/// neither a child tenant nor one sharing its prefix loses anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_purge_through_hfs_helper_is_exact() {
    let store = sqlite(StoreOptions::default());
    let stores: Vec<Arc<dyn HfsStore>> = vec![
        hfs(&store),
        hfs(&store.clone().with_access_token_required(false)),
    ];
    let job = ExportJobId::new();
    let body = b"{\"resourceType\":\"Patient\"}\n";
    let mut keys = Vec::new();
    for t in ["acme", "acme/research", "acme2"] {
        let key = ExportPartKey::output(t, job.clone(), "Patient", 0, 1);
        let mut w = stores[0].open_writer(&key).await.expect("open");
        w.write_line("{\"resourceType\":\"Patient\"}")
            .await
            .expect("write");
        stores[0].finalize_part(&key, w).await.expect("finalize");
        keys.push(key);
    }
    delete_tenant_outputs_everywhere(stores.iter(), "acme")
        .await
        .expect("purge");
    assert_not_found(stores[0].as_ref(), &keys[0], "purged tenant").await;
    assert_eq!(read_all(stores[1].as_ref(), &keys[1]).await, body);
    assert_eq!(read_all(stores[1].as_ref(), &keys[2]).await, body);
    // Hierarchical ids are legal here (HFS's local-fs store refuses them).
    delete_tenant_outputs_everywhere(stores.iter(), "acme/research")
        .await
        .expect("purge child tenant");
    assert_not_found(stores[0].as_ref(), &keys[1], "purged child tenant").await;
    assert_eq!(read_all(stores[0].as_ref(), &keys[2]).await, body);
    match delete_tenant_outputs_everywhere(stores.iter(), "").await {
        Err(StorageError::Validation(ValidationError::InvalidResource { message, .. })) => {
            assert!(message.contains("tenant id is empty"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Writers that fail: HFS's local-fs store tests, and our own sink

#[derive(Clone, Copy, Debug, PartialEq)]
enum Failure {
    None,
    Write,
    Flush,
    Shutdown,
}

/// HFS's `FinalizationWriter`: records what is asked of it, fails on
/// demand, and records its drop.
struct InjectedSink {
    failure: Failure,
    events: Arc<Mutex<Vec<&'static str>>>,
}

impl InjectedSink {
    fn record(&self, event: &'static str, fails: bool) -> io::Result<()> {
        self.events.lock().unwrap().push(event);
        if fails {
            Err(io::Error::other(format!("injected {event} failure")))
        } else {
            Ok(())
        }
    }
}

impl AsyncWrite for InjectedSink {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(
            self.record("write", self.failure == Failure::Write)
                .map(|()| b.len()),
        )
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.record("flush", self.failure == Failure::Flush))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.record("shutdown", self.failure == Failure::Shutdown))
    }
}

impl Drop for InjectedSink {
    fn drop(&mut self) {
        self.events.lock().unwrap().push("drop");
    }
}

/// HFS's local-fs tests swap the writer's sink for one that fails at the
/// write (a buffered drain), the flush or the shutdown, or for one that
/// works. None of them publishes: the store closes the sink it is handed,
/// stops at the first failure, drops the sink before returning, and
/// refuses a sink it did not open. The key stays usable afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_or_failing_sinks_never_publish() {
    let store = sqlite(StoreOptions::default());
    let output = hfs(&store);
    let job = ExportJobId::new();
    let line = r#"{"resourceType":"Patient","id":"p1"}"#;
    for (i, failure) in [
        Failure::Write,
        Failure::Flush,
        Failure::Shutdown,
        Failure::None,
    ]
    .into_iter()
    .enumerate()
    {
        let key = ExportPartKey::output("t1", job.clone(), "Patient", i as u32, 1);
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = InjectedSink {
            failure,
            events: events.clone(),
        };
        let mut writer = output.open_writer(&key).await.expect("open_writer");
        if failure == Failure::None {
            writer.writer = Box::pin(sink);
        } else {
            writer.writer = Box::pin(BufWriter::with_capacity(64 * 1024, sink));
            writer.write_line(line).await.expect("buffered write");
            assert_eq!(
                (writer.line_count, writer.byte_count),
                (1, line.len() as u64 + 1)
            );
            assert!(
                events.lock().unwrap().is_empty(),
                "{failure:?}: still buffered"
            );
        }
        let err = output
            .finalize_part(&key, writer)
            .await
            .expect_err("a swapped sink must not publish");
        let events = events.lock().unwrap().clone();
        match failure {
            Failure::Write | Failure::Flush | Failure::Shutdown => match &err {
                StorageError::Backend(BackendError::Internal {
                    backend_name,
                    message,
                    ..
                }) => {
                    assert_eq!(backend_name, BACKEND_NAME);
                    assert!(message.starts_with("finalize_part of t1/"), "{message}");
                    assert_clean(message, &store);
                }
                other => panic!("{failure:?}: {other:?}"),
            },
            Failure::None => match &err {
                StorageError::Validation(ValidationError::InvalidResource { message, .. }) => {
                    assert!(message.contains("replaced"), "{message}");
                }
                other => panic!("{failure:?}: {other:?}"),
            },
        }
        assert_eq!(
            events.iter().filter(|e| **e == "drop").count(),
            1,
            "{failure:?}: the sink is dropped by finalize: {events:?}"
        );
        assert_eq!(events.last(), Some(&"drop"), "{failure:?}: {events:?}");
        if let Some(at) = events.iter().position(|e| {
            (failure == Failure::Write && *e == "write")
                || (failure == Failure::Flush && *e == "flush")
                || (failure == Failure::Shutdown && *e == "shutdown")
        }) {
            assert_eq!(
                &events[at + 1..],
                &["drop"],
                "{failure:?}: nothing is asked of a sink after it failed"
            );
        }
        if failure != Failure::None {
            assert_eq!(
                events[0], "write",
                "{failure:?}: the buffer is drained first"
            );
        }
        assert_not_found(output.as_ref(), &key, &format!("{failure:?}")).await;

        let mut again = output.open_writer(&key).await.expect("reopen");
        again.write_line(line).await.expect("write");
        output
            .finalize_part(&key, again)
            .await
            .expect("finalize afresh");
        assert_eq!(
            read_all(output.as_ref(), &key).await,
            format!("{line}\n").into_bytes()
        );
    }
    output
        .delete_job_outputs(&tenant("t1"), &job)
        .await
        .expect("delete");
    assert_eq!(store.live_writers(), 0);
}

/// The store's own sink failing mid-part (its job deleted under it, as a
/// DELETE during a run does): the write or the flush fails, finalize
/// answers 404, and nothing is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_sink_failing_mid_part_never_publishes() {
    let store = sqlite(StoreOptions::default());
    let output = hfs(&store);
    let ctx = tenant("t1");
    let job = ExportJobId::new();
    let key = ExportPartKey::output("t1", job.clone(), "Condition", 0, 1);
    let data = synthea("Condition.000.ndjson");
    let all = lines(&data);
    let mut w = output.open_writer(&key).await.expect("open_writer");
    for line in &all[..50] {
        w.write_line(line).await.expect("write before the delete");
    }
    w.flush().await.expect("flush before the delete");
    output.delete_job_outputs(&ctx, &job).await.expect("delete");
    let mut failed = None;
    for line in &all[50..] {
        if let Err(e) = w.write_line(line).await {
            failed = Some(("write_line", e));
            break;
        }
    }
    if failed.is_none() {
        if let Err(e) = w.flush().await {
            failed = Some(("flush", e));
        }
    }
    let (what, e) = failed.expect("a write or the flush after the delete fails");
    let e = ours::StorageError::from_io(what, e);
    assert!(e.is_not_found(), "{what}: {e}");
    match output.finalize_part(&key, w).await {
        Err(StorageError::Resource(ResourceError::NotFound { resource_type, id })) => {
            assert_eq!(
                (resource_type.as_str(), id.as_str()),
                ("Condition", "Condition-0")
            );
        }
        other => panic!("{other:?}"),
    }
    assert_not_found(output.as_ref(), &key, "part of a deleted job").await;
}

// ---------------------------------------------------------------------------
// Error categories, by HFS variant

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_found_conflict_and_invalid_input_by_variant() {
    let store = sqlite(StoreOptions::default());
    let output = hfs(&store);
    let job = ExportJobId::new();
    let key = |idx, token| ExportPartKey::output("t1", job.clone(), "Patient", idx, token);

    // Never written, then staged but not finalized: 404 both times.
    assert_not_found(output.as_ref(), &key(0, 1), "never written").await;
    let mut staged = output.open_writer(&key(0, 1)).await.expect("open");
    staged.write_line("{}").await.expect("write");
    staged.flush().await.expect("flush");
    assert_not_found(output.as_ref(), &key(0, 1), "staged").await;

    // A reclaim under token 2 fences token 1 out: 409, at open and at
    // finalize.
    let mut live = output.open_writer(&key(0, 2)).await.expect("live open");
    live.write_line("{\"live\":true}")
        .await
        .expect("live write");
    output
        .finalize_part(&key(0, 2), live)
        .await
        .expect("live finalize");
    for (what, result) in [
        (
            "finalize",
            output.finalize_part(&key(0, 1), staged).await.map(|_| ()),
        ),
        ("open", output.open_writer(&key(0, 1)).await.map(|_| ())),
    ] {
        match result {
            Err(StorageError::Resource(ResourceError::AlreadyExists { resource_type, id })) => {
                assert_eq!(
                    (resource_type.as_str(), id.as_str()),
                    ("Patient", "Patient-0"),
                    "{what}"
                );
            }
            other => panic!("zombie {what}: {other:?}"),
        }
    }
    assert_not_found(output.as_ref(), &key(0, 1), "zombie part").await;
    assert_eq!(
        read_all(output.as_ref(), &key(0, 2)).await,
        b"{\"live\":true}\n"
    );

    // Bad keys and arguments: 400, with our message.
    let mut bad = key(1, 1);
    bad.file_type = "../output".into();
    let mut overlong = key(1, 1);
    overlong.resource_type = "X".repeat(ours::MAX_ID_BYTES + 1);
    for (what, result, needle) in [
        (
            "file type",
            output.open_writer(&bad).await.map(|_| ()),
            "file type",
        ),
        (
            "overlong",
            output.open_reader(&overlong).await.map(|_| ()),
            "resource type",
        ),
        (
            "url",
            output
                .download_url(&bad, Duration::from_secs(1))
                .await
                .map(|_| ()),
            "file type",
        ),
        (
            "empty tenant",
            output.delete_job_outputs(&tenant(""), &job).await,
            "tenant id is empty",
        ),
        (
            "empty job",
            output
                .delete_job_outputs(&tenant("t1"), &ExportJobId::from_string(""))
                .await,
            "job id is empty",
        ),
    ] {
        match result {
            Err(StorageError::Validation(ValidationError::InvalidResource {
                message,
                details,
            })) => {
                assert!(message.contains("invalid input"), "{what}: {message}");
                assert!(message.contains(needle), "{what}: {message}");
                assert!(details.is_empty());
            }
            other => panic!("{what}: {other:?}"),
        }
    }
}

/// Another process holds SQLite's write lock past every retry: finalize
/// answers `Unavailable` (HFS: 503, and its worker retries the job), the
/// part stays unpublished, and the retry succeeds once the lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_database_is_unavailable_then_retry_succeeds() {
    let store = sqlite(
        StoreOptions::default()
            .with_busy_timeout(Duration::from_millis(100))
            .with_staging_retry(Duration::from_millis(300)),
    );
    let output = hfs(&store);
    let key = ExportPartKey::output("t1", ExportJobId::new(), "Patient", 0, 1);
    let line = r#"{"resourceType":"Patient","id":"busy"}"#;

    let mut w = output.open_writer(&key).await.expect("open_writer");
    w.write_line(line).await.expect("buffered write");
    let lock = second_connection(&store);
    lock.execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");

    let e = output
        .finalize_part(&key, w)
        .await
        .expect_err("finalize under a held lock");
    assert!(e.is_unavailable(), "{e:?}");
    match &e {
        StorageError::Backend(BackendError::Unavailable {
            backend_name,
            message,
        }) => {
            assert_eq!(backend_name, BACKEND_NAME);
            assert!(message.contains("busy"), "{message}");
            assert_clean(message, &store);
        }
        other => panic!("{other:?}"),
    }
    assert_clean(&e.to_string(), &store);
    match output.open_writer(&key).await {
        Err(e @ StorageError::Backend(BackendError::Unavailable { .. })) => {
            assert_clean(&e.to_string(), &store)
        }
        other => panic!("open_writer under a held lock: {:?}", other.map(|_| ())),
    }
    // Readers are not blocked by a writer.
    assert_not_found(output.as_ref(), &key, "part whose finalize was unavailable").await;

    lock.execute_batch("ROLLBACK").expect("release the lock");
    let mut w = output.open_writer(&key).await.expect("retry open");
    w.write_line(line).await.expect("retry write");
    let part = output.finalize_part(&key, w).await.expect("retry finalize");
    assert_eq!(part.line_count, 1);
    assert_eq!(
        read_all(output.as_ref(), &key).await,
        format!("{line}\n").into_bytes()
    );
}

/// A staged chunk lost before finalize (another process deleted its row):
/// finalize answers `Internal` (HFS: 500), keeps our error as the source,
/// and publishes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_staged_chunk_is_internal() {
    let store = sqlite(StoreOptions::default());
    let output = hfs(&store);
    let job = ExportJobId::new();
    let key = ExportPartKey::output("t1", job.clone(), "Condition", 0, 1);
    let data = synthea("Condition.000.ndjson");
    let mut w = output.open_writer(&key).await.expect("open_writer");
    for line in lines(&data).iter().take(40) {
        w.write_line(line).await.expect("write");
    }
    w.flush().await.expect("flush: the full chunks are stored");
    let removed = second_connection(&store)
        .execute(
            "DELETE FROM chunks WHERE seq = 0 AND part_id = \
             (SELECT id FROM parts WHERE job_id = ?1 AND finalized = 0)",
            [job.as_str()],
        )
        .expect("delete a staged chunk");
    assert_eq!(removed, 1);
    match output.finalize_part(&key, w).await {
        Err(StorageError::Backend(BackendError::Internal {
            backend_name,
            message,
            source,
        })) => {
            assert_eq!(backend_name, BACKEND_NAME);
            assert!(message.contains("internal error"), "{message}");
            assert!(message.contains("incomplete"), "{message}");
            assert_clean(&message, &store);
            let source = source.expect("the store's error is the source");
            let ours = source
                .downcast_ref::<ours::StorageError>()
                .expect("source is the store's error");
            assert!(ours.is_internal(), "{ours}");
        }
        other => panic!("{other:?}"),
    }
    assert_not_found(output.as_ref(), &key, "part with a lost chunk").await;
}

/// A finished part's frame damaged on disk (the immutability trigger
/// dropped first, on this test's own database): HFS's download stream ends
/// in an error of the corrupt category after a correct prefix, never with
/// wrong bytes reported as a complete part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_frame_fails_the_download_stream() {
    let store = sqlite(StoreOptions::default());
    let output = hfs(&store);
    let job = ExportJobId::new();
    let key = ExportPartKey::output("t1", job.clone(), "Condition", 0, 1);
    let data = synthea("Condition.000.ndjson");
    let data = &data[..data.len().min(40 * CHUNK)];
    let mut w = output.open_writer(&key).await.expect("open_writer");
    w.writer.write_all(data).await.expect("write");
    w.line_count = data.iter().filter(|b| **b == b'\n').count() as u64;
    w.byte_count = data.len() as u64;
    output.finalize_part(&key, w).await.expect("finalize");
    assert_eq!(read_all(output.as_ref(), &key).await, data);

    let c = second_connection(&store);
    c.execute_batch("DROP TRIGGER chunks_of_finished_parts_are_immutable")
        .expect("drop the trigger");
    let part_id: i64 = c
        .query_row(
            "SELECT id FROM parts WHERE job_id = ?1 AND finalized = 1",
            [job.as_str()],
            |r| r.get(0),
        )
        .expect("part id");
    let seq = 3;
    let mut frame: Vec<u8> = c
        .query_row(
            "SELECT frame FROM chunks WHERE part_id = ?1 AND seq = ?2",
            (part_id, seq),
            |r| r.get(0),
        )
        .expect("frame");
    let mid = frame.len() / 2;
    frame[mid] ^= 0x5a;
    c.execute(
        "UPDATE chunks SET frame = ?1 WHERE part_id = ?2 AND seq = ?3",
        (&frame, part_id, seq),
    )
    .expect("damage the frame");

    let mut reader = output.open_reader(&key).await.expect("the part is listed");
    let mut got = Vec::new();
    let e = reader
        .read_to_end(&mut got)
        .await
        .expect_err("a damaged part must not read to the end");
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    let e = ours::StorageError::from_io("read", e);
    assert!(e.is_corrupt(), "{e}");
    assert_clean(&e.to_string(), &store);
    assert!(
        got.len() < data.len(),
        "read {} of {}",
        got.len(),
        data.len()
    );
    assert!(
        data.starts_with(&got),
        "bytes before the error are the part's own"
    );
}
