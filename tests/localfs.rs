//! The conformance suite against `LocalFsOutputStore`, the benchmarks'
//! baseline: it must be a correct store for its figures to mean anything.
//! Like HFS's local-filesystem store it does no store-side fencing.

use sqlite_export_store::testkit::conformance::{self, Params};
use sqlite_export_store::testkit::localfs::LocalFsOutputStore;

fn params() -> Params {
    Params {
        chunk_size: 4096,
        fencing: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_fs_store_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalFsOutputStore::new(dir.path(), "http://127.0.0.1:8080").unwrap();
    conformance::run_all(&store, &params()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_fs_store_with_fsync_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalFsOutputStore::new(dir.path(), "http://127.0.0.1:8080")
        .unwrap()
        .with_fsync(true);
    conformance::run_all(&store, &params()).await;
}

#[tokio::test(flavor = "current_thread")]
async fn local_fs_store_on_a_current_thread_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalFsOutputStore::new(dir.path(), "http://127.0.0.1:8080").unwrap();
    conformance::run_all(&store, &params()).await;
}
