//! The conformance suite against the SQLite store (through `&dyn`, `Arc<dyn>`
//! and `Box<dyn>`, with a one-connection pool too) and against the in-memory
//! reference store.

use std::sync::Arc;

use sqlite_export_store::testkit::conformance::{self, Params};
use sqlite_export_store::testkit::memory::MemoryOutputStore;
use sqlite_export_store::{ExportOutputStore, SqliteOutputStore, StoreOptions};

/// Small chunks: many chunk boundaries from little data.
const CHUNK: usize = 4096;

fn store(options: StoreOptions) -> SqliteOutputStore {
    SqliteOutputStore::temporary_with("http://127.0.0.1:8080", options.with_chunk_size(CHUNK))
        .expect("temporary store")
}

fn params() -> Params {
    Params {
        chunk_size: CHUNK,
        fencing: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_store_through_a_reference() {
    let s = store(StoreOptions::default());
    conformance::run_all(&s as &dyn ExportOutputStore, &params()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_store_through_arc_dyn() {
    let s: Arc<dyn ExportOutputStore> = Arc::new(store(StoreOptions::default()));
    conformance::run_all(s.as_ref(), &params()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_store_through_box_dyn() {
    let s: Box<dyn ExportOutputStore> = Box::new(store(StoreOptions::default()));
    conformance::run_all(&*s, &params()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_store_with_a_pool_of_one_connection() {
    let s = store(StoreOptions::default().with_pool_size(1).with_read_ahead(4));
    conformance::run_all(&s, &params()).await;
}

#[tokio::test(flavor = "current_thread")]
async fn sqlite_store_on_a_current_thread_runtime() {
    let s = store(StoreOptions::default().with_in_flight_chunks(1));
    conformance::run_all(&s, &params()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_store_with_default_chunks() {
    let s = SqliteOutputStore::temporary("http://h").unwrap();
    conformance::round_trip_sizes(&s, sqlite_export_store::DEFAULT_CHUNK_SIZE).await;
    conformance::one_line_of_three_chunks(&s, sqlite_export_store::DEFAULT_CHUNK_SIZE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reference_memory_store() {
    let s = MemoryOutputStore::new();
    conformance::run_all(&s, &params()).await;
}
