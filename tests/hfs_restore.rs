//! A store restored to an earlier moment than HFS's `fhir.db`: the real
//! `export-store hfs` (HFS 0.2.7 with this crate's store), two exports run
//! to completion, then the store is put back to a real earlier state (an
//! `export-store backup` taken after the first export completed and before
//! the second was kicked off) while HFS is stopped, as a restore of two
//! independently replicated files can leave them.
//!
//! - `helios::restore::check_restored` names exactly the second job and
//!   every one of its files, and changes nothing in `fhir.db`; on the data
//!   folder before the store was put back it reports nothing, and neither
//!   it nor `fail_incomplete_exports` changes a byte of `fhir.db`.
//! - HFS started again: the first job still serves its manifest and every
//!   file byte for byte; the second job's status answers as HFS answers a
//!   failed export (500, an `OperationOutcome` whose diagnostics say why),
//!   never a manifest; its old file URLs answer 404; the log warns, naming
//!   the job and its files.
//!
//! ```sh
//! cargo test --features hfs --test hfs_restore -- --nocapture
//! ```
#![cfg(feature = "hfs")]

mod hfs_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use hfs_support::*;
use reqwest::StatusCode;
use serde_json::Value;
use sqlite_export_store::helios::restore::{check_restored, fail_incomplete_exports};
use sqlite_export_store::SqliteOutputStore;

/// Loaded and exported: no conditional references among them.
const TYPES: &[&str] = &["Patient", "AllergyIntolerance"];
/// Resources per part: small, so that each export makes several parts.
const BATCH: u32 = 5;

/// Every output URL of a manifest, as its path (`/export-file/{job}/…`),
/// with the bytes it served.
async fn files_of(
    http: &reqwest::Client,
    base: &str,
    manifest: &Value,
) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for entry in manifest["output"].as_array().expect("output array") {
        let url = entry["url"].as_str().unwrap();
        let path = url
            .strip_prefix(base)
            .unwrap_or_else(|| panic!("{url} not under {base}"));
        let r = http.get(url).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "GET {url}");
        files.insert(path.to_string(), r.bytes().await.unwrap().to_vec());
    }
    assert!(!files.is_empty(), "no output files: {manifest}");
    files
}

/// `fhir.db` and its WAL, byte for byte.
fn fhir_db_bytes(data_dir: &Path) -> Vec<Vec<u8>> {
    ["fhir.db", "fhir.db-wal"]
        .iter()
        .map(|f| std::fs::read(data_dir.join(f)).unwrap_or_default())
        .collect()
}

/// HFS's export job rows: id → (status, error_message, completed_at).
fn job_rows(fhir_db: &Path) -> BTreeMap<String, (String, Option<String>, Option<String>)> {
    let conn = rusqlite::Connection::open_with_flags(
        fhir_db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .unwrap();
    let mut stmt = conn
        .prepare("SELECT id, status, error_message, completed_at FROM bulk_export_jobs")
        .unwrap();
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?, r.get(3)?))))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    rows
}

fn backup(db: &Path, to: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_export-store"))
        .arg("backup")
        .arg("--db")
        .arg(db)
        .arg("--to")
        .arg(to)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "export-store backup: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Puts `backup` in place of the store `db` (and drops its WAL and index).
fn put_back(backup: &Path, db: &Path) {
    for suffix in ["-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
    std::fs::copy(backup, db).unwrap();
}

#[test]
fn a_store_older_than_fhir_db_fails_the_exports_it_lacks_and_keeps_the_rest() {
    let started = std::time::Instant::now();
    let sample = Sample::load();
    let mut hfs = Hfs::start(HfsOptions::default().batch_size(BATCH));
    let http = http();
    let fhir_db = hfs.data_dir.join("fhir.db");
    let earlier = hfs.data_dir.parent().unwrap().join("store-earlier.db");

    // Two exports complete; the store is backed up between them.
    let (job_a, files_a, manifest_a, job_b, paths_b) = block_on(async {
        load(&http, &hfs.base, &sample, TYPES, LoadMode::Transaction).await;
        let a = export(&http, &hfs.base, "/$export?_type=Patient").await;
        let files_a = files_of(&http, &hfs.base, &a.manifest).await;
        backup(&hfs.output_db, &earlier);
        let b = export(
            &http,
            &hfs.base,
            &format!("/$export?_type={}", TYPES.join(",")),
        )
        .await;
        let files_b = files_of(&http, &hfs.base, &b.manifest).await;
        note(format_args!(
            "export A: {} files, export B: {} files",
            files_a.len(),
            files_b.len()
        ));
        let paths_b: Vec<String> = files_b.into_keys().collect();
        (
            job_of(&a.status_url),
            files_a,
            a.manifest,
            job_of(&b.status_url),
            paths_b,
        )
    });
    assert!(hfs.shut_down().success(), "{}", hfs.log_tail());
    let rows_before = job_rows(&fhir_db);
    assert_eq!(rows_before[&job_a].0, "complete");
    assert_eq!(rows_before[&job_b].0, "complete");

    // Everything matches: nothing reported, not a byte of fhir.db changed.
    block_on(async {
        let before = fhir_db_bytes(&hfs.data_dir);
        let store = SqliteOutputStore::open_read_only(&hfs.output_db, "http://unused").unwrap();
        let report = check_restored(&fhir_db, &store).await.unwrap();
        assert!(report.is_consistent(), "{report:?}");
        assert_eq!(report.exports_checked, 2, "{report:?}");
        assert!(fail_incomplete_exports(&fhir_db, &report)
            .unwrap()
            .is_empty());
        assert!(before == fhir_db_bytes(&hfs.data_dir), "fhir.db changed");
    });

    // The store goes back to the moment between the two exports.
    put_back(&earlier, &hfs.output_db);
    block_on(async {
        let before = fhir_db_bytes(&hfs.data_dir);
        let store = SqliteOutputStore::open_read_only(&hfs.output_db, "http://unused").unwrap();
        let report = check_restored(&fhir_db, &store).await.unwrap();
        assert_eq!(report.exports.len(), 1, "{report:?}");
        let job = &report.exports[0];
        assert_eq!(job.job_id, job_b);
        assert_eq!(job.tenant_id, "default");
        assert_eq!(job.files, paths_b.len());
        let mut missing: Vec<String> = job
            .missing
            .iter()
            .map(|f| format!("/export-file/{job_b}/{}", f.key.part_segment()))
            .collect();
        missing.sort();
        assert_eq!(missing, paths_b, "every file of B is missing, nothing else");
        assert!(
            before == fhir_db_bytes(&hfs.data_dir),
            "the check wrote to fhir.db"
        );
    });

    // HFS again, on the restored folder.
    let hfs2 = hfs.restart();
    block_on(async {
        // A: the same manifest, every file byte for byte.
        let status_a = hfs2.url(&format!("/export-status/{job_a}"));
        let manifest = manifest(&http, &status_a).await;
        assert_eq!(
            manifest["output"].as_array().unwrap().len(),
            manifest_a["output"].as_array().unwrap().len()
        );
        let again = files_of(&http, &hfs2.base, &manifest).await;
        assert!(again == files_a, "export A's files changed");

        // B: HFS's answer for a failed export, never a manifest.
        let status_b = hfs2.url(&format!("/export-status/{job_b}"));
        let (status, headers, body) = poll(&http, &status_b, JOB_TIMEOUT).await;
        let text = String::from_utf8_lossy(&body);
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{text}");
        assert_eq!(
            headers.get("content-type").unwrap().to_str().unwrap(),
            "application/fhir+json"
        );
        let outcome: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
        assert!(outcome.get("output").is_none(), "{outcome}");
        let issue = &outcome["issue"][0];
        assert_eq!(issue["severity"], "error");
        assert_eq!(issue["code"], "processing");
        let diagnostics = issue["diagnostics"].as_str().unwrap();
        assert!(
            diagnostics.contains("restored to an earlier moment")
                && diagnostics.contains("start the export again"),
            "{diagnostics}"
        );
        for path in &paths_b {
            let (s, _) = status_of(&http, reqwest::Method::GET, &hfs2.url(path)).await;
            assert_eq!(s, StatusCode::NOT_FOUND, "GET {path}");
        }
    });

    // fhir.db: B failed with HFS's values, A untouched.
    let rows_after = job_rows(&fhir_db);
    assert_eq!(rows_after[&job_a], rows_before[&job_a]);
    let (status, message, completed) = &rows_after[&job_b];
    assert_eq!(status, "error");
    assert!(message
        .as_deref()
        .unwrap()
        .contains("restored to an earlier moment"));
    let completed = completed.as_deref().unwrap();
    assert!(
        completed.ends_with("+00:00") && completed != rows_before[&job_b].2.as_deref().unwrap(),
        "completed_at {completed}"
    );

    // The log: one warning naming the job and its files.
    let log = std::fs::read_to_string(&hfs2.log).unwrap();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("marked failed"))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", hfs2.log_tail());
    let w = warnings[0];
    assert!(w.contains(&job_b), "{w}");
    assert!(
        w.contains("restored to an earlier moment than fhir.db"),
        "{w}"
    );
    assert!(w.contains("start the export again"), "{w}");
    for path in &paths_b {
        let name = path.rsplit('/').next().unwrap();
        assert!(w.contains(name), "{name} not in {w}");
    }
    note(format_args!(
        "done in {:.1}s",
        started.elapsed().as_secs_f64()
    ));
}
