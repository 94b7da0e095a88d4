#![cfg(feature = "helios")]
//! `export-store export --to DIR` against HFS itself: the real binary
//! writes a store's finished parts into DIR, and HFS's own
//! `LocalFsOutputStore` (helios-persistence 0.2.7) rooted at DIR opens and
//! reads every one of them back, byte for byte, under its own keys.

mod faultkit;

use std::process::Command;

use faultkit::{content, key, noisy_lines};
use helios_persistence::backends::local_fs::LocalFsOutputStore;
use helios_persistence::core::bulk_export_output::ExportPartKey as HfsKey;
use helios_persistence::core::ExportJobId as HfsJobId;
use sqlite_export_store::{
    ExportJobId, ExportOutputStore, ExportPartKey, SqliteOutputStore, StoreOptions,
};
use tokio::io::AsyncReadExt;

/// What HFS's local-fs store reads under `k`, through HFS's own trait (in
/// scope here only: this crate's store implements both traits).
async fn read_with_hfs(hfs: &LocalFsOutputStore, k: &ExportPartKey) -> Vec<u8> {
    use helios_persistence::core::bulk_export_output::ExportOutputStore as _;
    let mut reader = hfs
        .open_reader(&hfs_key(k))
        .await
        .unwrap_or_else(|e| panic!("HFS cannot open {}: {e}", k.display()));
    let mut got = Vec::new();
    reader.read_to_end(&mut got).await.unwrap();
    got
}

fn hfs_key(k: &ExportPartKey) -> HfsKey {
    let job = HfsJobId::from_string(k.job_id.as_str());
    let mut h = HfsKey::output(
        k.tenant_id.clone(),
        job,
        k.resource_type.clone(),
        k.part_index,
        k.fencing_token,
    );
    h.file_type = k.file_type.clone();
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hfs_local_fs_store_reads_every_exported_part_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store.db");
    // Small chunks: parts of many frames.
    let options = StoreOptions::default().with_chunk_size(4096);
    let store = SqliteOutputStore::open_with(&db, "http://hfs.test", options).unwrap();
    let job = "7d1c9a40-5b8e-4f7e-9d7a-2f0c1b2a3e4d";
    let mut parts: Vec<(ExportPartKey, Vec<u8>)> = Vec::new();
    for k in [
        key("default", job, "Patient", 0, 1),
        key("default", job, "Patient", 0, 2),
        key("default", job, "Encounter", 3, 2),
        key("acme", "job-2", "Observation", 0, 7),
    ] {
        faultkit::write_part(&store, &k).await.unwrap();
        parts.push((k.clone(), content(&k)));
    }
    // A part of many chunks, an error part, a bulk-submit `deleted`
    // receipt and an empty part.
    let big = key("default", job, "Binary", 0, 2);
    let mut w = store.open_writer(&big).await.unwrap();
    let mut bytes = Vec::new();
    for l in noisy_lines(11, 200, 400) {
        w.write_line(&l).await.unwrap();
        bytes.extend_from_slice(l.as_bytes());
        bytes.push(b'\n');
    }
    store.finalize_part(&big, w).await.unwrap();
    assert!(store.part_info(&big).await.unwrap().chunk_count > 10);
    parts.push((big, bytes));
    let error = ExportPartKey::error("default", ExportJobId::from(job), "OperationOutcome", 0, 2);
    faultkit::write_part(&store, &error).await.unwrap();
    parts.push((error.clone(), content(&error)));
    let mut deleted = key("acme", "submit-1", "submit-v1-ab12", 0, 1);
    deleted.file_type = "deleted".into();
    faultkit::write_part(&store, &deleted).await.unwrap();
    parts.push((deleted.clone(), content(&deleted)));
    let empty = key("acme", "job-2", "Observation", 1, 7);
    let w = store.open_writer(&empty).await.unwrap();
    store.finalize_part(&empty, w).await.unwrap();
    parts.push((empty, Vec::new()));
    drop(store);

    let to = dir.path().join("hfs-output");
    let out = Command::new(env!("CARGO_BIN_EXE_export-store"))
        .args(["export", "--db"])
        .arg(&db)
        .arg("--to")
        .arg(&to)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("exported 8 parts,"));

    let hfs = LocalFsOutputStore::new(&to, "http://hfs.test");
    for (k, expected) in &parts {
        assert!(
            read_with_hfs(&hfs, k).await == *expected,
            "{} differs",
            k.display()
        );
    }
    // And nothing HFS would not find: no staging left.
    let tmp = walk(&to)
        .into_iter()
        .filter(|p| p.ends_with(".tmp"))
        .count();
    assert_eq!(tmp, 0);
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.to_string_lossy().into_owned());
        }
    }
    out
}
