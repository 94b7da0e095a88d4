#![cfg(feature = "hfs")]
//! The real Helios FHIR Server (HFS 0.2.7) with this crate's store, end to
//! end over TCP: `export-store hfs` is started on 127.0.0.1:0 with a
//! temporary data folder, loaded with the vendored Synthea sample over FHIR
//! REST, and driven the way Bulk Data clients drive it, smart-fetch
//! included.
//!
//! Four tests share one loaded server (started by the first of them, under
//! a watchdog that stops it when the test process ends); bulk submit, the
//! kill-and-restart test and the `--metrics-addr` test start their own. `cargo test --features hfs
//! --test hfs -- --nocapture` shows where the time goes.
//!
//! HFS needs the FHIR R4 spec's search parameters (`search-parameters-r4.json`
//! in its data folder): without them it resolves no conditional reference
//! (`Location?identifier=…`, which Synthea's data is full of) and finds no
//! Patient compartment, so Patient and Group exports hold only Patients. The
//! loader says so when a transaction fails that way. The sample is loaded
//! in transaction bundles; `HFS_TEST_LOAD=put` loads it one PUT at a time.
//!
//! The smart-fetch test needs the client installed by `.ci/smart-fetch.sh`
//! (into `target/smart-fetch-venv`, or `$SMART_FETCH_VENV`); without it,
//! it fails and says so.

mod hfs_support;
mod watch_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hfs_support::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------
// The shared server: the whole sample, a Group, parts of 100 resources
// ---------------------------------------------------------------------------

struct Shared {
    hfs: Hfs,
    sample: Sample,
    group_id: String,
    group: BTreeSet<String>,
}

/// Resources per export part on the shared server: small, so that the
/// larger types are exported in many parts (Procedure: 21).
const SHARED_BATCH: u32 = 100;

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Result<Shared, String>> = OnceLock::new();
    let started = SHARED.get_or_init(|| {
        std::panic::catch_unwind(start_shared).map_err(|panic| {
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "(no message)".into())
        })
    });
    match started {
        Ok(shared) => shared,
        Err(e) => panic!("the shared HFS server did not come up: {e}"),
    }
}

fn start_shared() -> Shared {
    let sample = Sample::load();
    note("starting the shared server");
    let hfs = Hfs::start(HfsOptions {
        batch_size: Some(SHARED_BATCH),
        outlive_handle: true,
        env: vec![(
            "HFS_BULK_EXPORT_MAX_CONCURRENT_PER_TENANT".into(),
            "16".into(),
        )],
        ..HfsOptions::default()
    });
    note(format_args!(
        "shared server at {} (log: {})",
        hfs.base,
        hfs.log.display()
    ));
    let group: BTreeSet<String> = sample.ids(&["Patient"])["Patient"]
        .iter()
        .take(3)
        .cloned()
        .collect();
    let group_id = "export-store-test-group".to_string();
    block_on(async {
        let http = http();
        load(
            &http,
            &hfs.base,
            &sample,
            &sample.types(),
            LoadMode::from_env(),
        )
        .await;
        put_group(&http, &hfs.base, &group_id, &group).await;
    });
    Shared {
        hfs,
        sample,
        group_id,
        group,
    }
}

// ---------------------------------------------------------------------------
// 1. CapabilityStatement and kick-off rules
// ---------------------------------------------------------------------------

#[test]
fn metadata_advertises_the_export_operations_and_kickoff_needs_respond_async() {
    let s = shared();
    block_on(async {
        let http = http();
        let r = http
            .get(s.hfs.url("/metadata"))
            .header("accept", "application/fhir+json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let cs: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(cs["resourceType"], "CapabilityStatement");
        let rest = cs["rest"].as_array().expect("CapabilityStatement.rest");
        let operations: BTreeSet<&str> = rest
            .iter()
            .flat_map(|r| r["operation"].as_array().into_iter().flatten())
            .filter_map(|o| o["name"].as_str())
            .collect();
        for op in ["export", "patient-export", "group-export"] {
            assert!(
                operations.contains(op),
                "CapabilityStatement lacks operation {op}: {operations:?}"
            );
        }
        // smart-fetch skips a `--type` the statement does not list.
        let resources: BTreeSet<&str> = rest
            .iter()
            .flat_map(|r| r["resource"].as_array().into_iter().flatten())
            .filter_map(|r| r["type"].as_str())
            .collect();
        for t in s.sample.types() {
            assert!(
                resources.contains(t),
                "CapabilityStatement does not list {t}"
            );
        }

        // Kick-off without `Prefer: respond-async`: 400, an OperationOutcome,
        // and no job.
        for path in [
            "/$export?_type=Patient".to_string(),
            "/Patient/$export?_type=Patient".to_string(),
            format!("/Group/{}/$export?_type=Patient", s.group_id),
        ] {
            let r = http
                .get(s.hfs.url(&path))
                .header("accept", "application/fhir+json")
                .send()
                .await
                .unwrap();
            let status = r.status();
            let location = r.headers().get("content-location").cloned();
            let body: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
            assert_eq!(
                status,
                StatusCode::BAD_REQUEST,
                "{path} without Prefer: {body}"
            );
            assert_eq!(body["resourceType"], "OperationOutcome", "{path}: {body}");
            assert!(location.is_none(), "{path}: a 400 with Content-Location");
        }
    });
}

// ---------------------------------------------------------------------------
// 2. System, Patient and Group export
// ---------------------------------------------------------------------------

#[test]
fn system_patient_and_group_exports_return_every_resource_exactly_once() {
    let s = shared();
    block_on(async {
        let http = http();
        let all = s.sample.types();

        // System level, every type of the sample.
        let started = Instant::now();
        let Export {
            status_url: status,
            got,
            ..
        } = export(
            &http,
            &s.hfs.base,
            &format!("/$export?_type={}", all.join(",")),
        )
        .await;
        note(format_args!(
            "system export: {} resources in {} files, {:.1}s",
            got.ids.values().map(Vec::len).sum::<usize>(),
            got.urls.len(),
            started.elapsed().as_secs_f64()
        ));
        let expected = s.sample.ids(&all);
        assert_exactly_once("system export", &expected, &got.ids);
        for (t, ids) in &expected {
            assert_eq!(
                got.counts.get(t).copied().unwrap_or(0),
                ids.len() as u64,
                "{t} count"
            );
            let parts = ids.len().div_ceil(SHARED_BATCH as usize);
            assert_eq!(
                got.parts.get(t).copied().unwrap_or(0),
                parts,
                "{t}: files of {SHARED_BATCH}"
            );
        }
        // What the store holds for the job is what the manifest lists: one
        // finished part per file, one fencing token, no staging left.
        let parts = parts_of(&s.hfs.output_db, &job_of(&status));
        assert!(
            parts.iter().all(|p| p.finalized),
            "staged parts left: {parts:?}"
        );
        assert_eq!(parts.len(), got.urls.len(), "store parts vs manifest files");
        let tokens: BTreeSet<u64> = parts.iter().map(|p| p.fencing_token).collect();
        assert_eq!(tokens.len(), 1, "one claim, one token: {tokens:?}");
        assert_eq!(
            parts.iter().filter_map(|p| p.line_count).sum::<u64>(),
            s.sample.count(&all) as u64
        );

        // HFS compresses our stream on the wire when asked to.
        let url = &got.urls[0];
        let plain = http.get(url).send().await.unwrap().bytes().await.unwrap();
        let r = http
            .get(url)
            .header("accept-encoding", "zstd")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let encoding = r
            .headers()
            .get("content-encoding")
            .map(|v| v.to_str().unwrap().to_string());
        let wire = r.bytes().await.unwrap();
        assert_eq!(
            encoding.as_deref(),
            Some("zstd"),
            "{url} with Accept-Encoding: zstd"
        );
        assert_eq!(
            zstd::decode_all(&wire[..]).unwrap(),
            plain,
            "{url}: zstd body"
        );

        // Patient level: every patient's compartment.
        let types = [
            "Patient",
            "Condition",
            "Encounter",
            "Immunization",
            "AllergyIntolerance",
        ];
        let started = Instant::now();
        let got = export(
            &http,
            &s.hfs.base,
            &format!("/Patient/$export?_type={}", types.join(",")),
        )
        .await
        .got;
        note(format_args!(
            "patient export: {} resources, {:.1}s",
            got.ids.values().map(Vec::len).sum::<usize>(),
            started.elapsed().as_secs_f64()
        ));
        let patients = s.sample.ids(&["Patient"]).remove("Patient").unwrap();
        let expected = s.sample.compartment_ids(&types, &patients);
        assert_eq!(
            expected,
            s.sample.ids(&types),
            "every resource of these types has a patient"
        );
        assert_exactly_once(
            "Patient/$export (needs HFS's search parameters for the compartment: \
             search-parameters-r4.json in the data folder)",
            &expected,
            &got.ids,
        );

        // Group level: the compartments of the Group's members only.
        let types = [
            "Patient",
            "Condition",
            "Immunization",
            "Procedure",
            "MedicationRequest",
        ];
        let started = Instant::now();
        let got = export(
            &http,
            &s.hfs.base,
            &format!("/Group/{}/$export?_type={}", s.group_id, types.join(",")),
        )
        .await
        .got;
        note(format_args!(
            "group export: {} resources, {:.1}s",
            got.ids.values().map(Vec::len).sum::<usize>(),
            started.elapsed().as_secs_f64()
        ));
        let expected = s.sample.compartment_ids(&types, &s.group);
        assert!(expected.values().all(|ids| !ids.is_empty()), "{expected:?}");
        assert!(
            expected["Procedure"].len() < s.sample.ids(&["Procedure"])["Procedure"].len(),
            "the group must not hold every patient's data"
        );
        assert_exactly_once("Group/$export", &expected, &got.ids);
    });
}

// ---------------------------------------------------------------------------
// 3. DELETE of a completed export
// ---------------------------------------------------------------------------

#[test]
fn deleting_an_export_removes_its_status_its_files_and_its_parts() {
    let s = shared();
    block_on(async {
        let http = http();
        let Export {
            status_url: status,
            got,
            ..
        } = export(
            &http,
            &s.hfs.base,
            "/$export?_type=Patient,Condition,Encounter",
        )
        .await;
        let job = job_of(&status);
        let before = parts_of(&s.hfs.output_db, &job);
        assert_eq!(
            before.len(),
            got.urls.len(),
            "parts in the store before DELETE"
        );
        assert!(got.urls.len() > 3, "{} files", got.urls.len());

        let (code, body) = status_of(&http, Method::DELETE, &status).await;
        assert_eq!(code, StatusCode::ACCEPTED, "DELETE {status}: {body}");
        let (code, body) = status_of(&http, Method::GET, &status).await;
        assert_eq!(code, StatusCode::NOT_FOUND, "status after DELETE: {body}");
        let outcome: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(outcome["resourceType"], "OperationOutcome", "{body}");
        for url in &got.urls {
            let (code, body) = status_of(&http, Method::GET, url).await;
            assert_eq!(code, StatusCode::NOT_FOUND, "{url} after DELETE: {body}");
        }
        let after = parts_of(&s.hfs.output_db, &job);
        assert!(
            after.is_empty(),
            "the store still holds parts of {job}: {after:?}"
        );
        // A second DELETE finds nothing.
        let (code, _) = status_of(&http, Method::DELETE, &status).await;
        assert_eq!(code, StatusCode::NOT_FOUND, "second DELETE");
    });
}

// ---------------------------------------------------------------------------
// 4. Bulk submit from a provider served by the test
// ---------------------------------------------------------------------------

#[test]
fn bulk_submit_with_output_and_deleted_files_completes_and_serves_its_receipts() {
    let sample = Sample::load();
    // This server's store records BLAKE3 (`--digest blake3`); the others
    // record the default XXH3-128.
    let hfs = Hfs::start(
        HfsOptions::default()
            .env("HFS_BULK_SUBMIT_POLL_RATE_LIMIT", "0")
            .digest("blake3"),
    );
    block_on(async {
        let http = http();
        let patients = &sample.resources["Patient"];
        let conditions = &sample.resources["Condition"];
        let ndjson = ndjson_of;
        let gone_patient = patients[0]["id"].as_str().unwrap().to_string();
        let gone_condition = conditions[0]["id"].as_str().unwrap().to_string();
        let deleted = json!({
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {"request": {"method": "DELETE", "url": format!("Patient/{gone_patient}")}},
                {"request": {"method": "DELETE", "url": format!("Condition/{gone_condition}")}},
            ],
        });

        // The manifest names the provider's own address, so it is built after
        // the listener is bound: a second provider serves it.
        let mut files = BTreeMap::new();
        let ndjson_ct = "application/fhir+ndjson".to_string();
        files.insert(
            "Patient.ndjson".into(),
            (ndjson_ct.clone(), ndjson(patients)),
        );
        files.insert(
            "Condition.ndjson".into(),
            (ndjson_ct.clone(), ndjson(conditions)),
        );
        files.insert(
            "deleted.ndjson".into(),
            (ndjson_ct.clone(), format!("{deleted}\n").into_bytes()),
        );
        let data = provider(files).await;
        let manifest = json!({
            "transactionTime": "2025-01-01T00:00:00Z",
            "request": format!("{}/$export", data.base),
            "requiresAccessToken": false,
            "output": [
                {"type": "Patient", "url": format!("{}/Patient.ndjson", data.base), "count": patients.len()},
                {"type": "Condition", "url": format!("{}/Condition.ndjson", data.base), "count": conditions.len()},
            ],
            "deleted": [
                {"type": "Bundle", "url": format!("{}/deleted.ndjson", data.base)},
            ],
            "error": [],
        });
        let (manifest_url, meta) = serve_manifest(&manifest).await;
        let submission =
            Submission::completed("export-store-test", "synthea-1", &manifest_url, &data.base);
        let started = Instant::now();
        submission.submit_to(&http, &hfs).await;

        let r = http
            .post(hfs.url("/$bulk-submit-status"))
            .header("content-type", "application/fhir+json")
            .body(submission.status_request.to_string())
            .send()
            .await
            .unwrap();
        let code = r.status();
        let location = r
            .headers()
            .get("content-location")
            .map(|v| v.to_str().unwrap().to_string());
        let body = r.text().await.unwrap();
        assert_eq!(code, StatusCode::ACCEPTED, "$bulk-submit-status: {body}");
        let status_url = location.expect("$bulk-submit-status: no Content-Location");

        let (code, _, body) = poll(&http, &status_url, JOB_TIMEOUT).await;
        let text = String::from_utf8_lossy(&body).to_string();
        assert_eq!(
            code,
            StatusCode::OK,
            "submission status: {text}\n{}",
            hfs.log_tail()
        );
        let m: Value = serde_json::from_slice(&body).unwrap();
        note(format_args!(
            "bulk submit of {} resources and 2 deletions: {:.1}s",
            patients.len() + conditions.len(),
            started.elapsed().as_secs_f64()
        ));

        // HFS fetched the manifest and every file.
        let asked = meta.requests.lock().unwrap().clone();
        assert!(asked.iter().any(|r| r == "GET /manifest.json"), "{asked:?}");
        let asked = data.requests.lock().unwrap().clone();
        for f in ["Patient.ndjson", "Condition.ndjson", "deleted.ndjson"] {
            assert!(
                asked.iter().any(|r| r == &format!("GET /{f}")),
                "{f} not fetched: {asked:?}"
            );
        }

        // Errors, if any, are shown in full.
        let outcome = m["outcome"].as_array().cloned().unwrap_or_default();
        if !outcome.is_empty() {
            let mut shown = Vec::new();
            for o in &outcome {
                let url = o["url"].as_str().unwrap_or_default();
                shown.push(format!("{o}: {:?}", get_ndjson(&http, url).await));
            }
            panic!(
                "the submission reported errors:\n{}\nmanifest: {m}",
                shown.join("\n")
            );
        }

        // Every receipt downloads with 200 and parses; HFS serves them on its
        // /bulk-submit-file/ route (the store says a token is needed, so HFS
        // does not hand out the store's own /export-file/ URL, which only
        // knows export jobs).
        let output = m["output"]
            .as_array()
            .unwrap_or_else(|| panic!("no output: {m}"));
        let deleted_entries = m["deleted"]
            .as_array()
            .unwrap_or_else(|| panic!("no deleted: {m}"));
        assert!(!output.is_empty(), "no output receipts: {m}");
        assert_eq!(deleted_entries.len(), 1, "one deleted receipt: {m}");
        let mut receipts = 0u64;
        for entry in output.iter().chain(deleted_entries) {
            let url = entry["url"]
                .as_str()
                .unwrap_or_else(|| panic!("receipt without url: {entry}"));
            assert!(
                url.starts_with(&hfs.url("/bulk-submit-file/")),
                "receipt URL {url} is not HFS's /bulk-submit-file/ route"
            );
            let lines = get_ndjson(&http, url).await;
            assert_eq!(
                Some(lines.len() as u64),
                entry["count"].as_u64(),
                "{url}: {entry}"
            );
            receipts += lines.len() as u64;
        }
        let written: u64 = output.iter().filter_map(|e| e["count"].as_u64()).sum();
        assert_eq!(
            written as usize,
            patients.len() + conditions.len(),
            "output receipts: {m}"
        );
        assert_eq!(receipts, written + 2);

        // The `deleted` receipt lists what was removed: the part HFS
        // finalizes with file type "deleted".
        let url = deleted_entries[0]["url"].as_str().unwrap();
        let lines = get_ndjson(&http, url).await;
        assert_eq!(
            lines,
            vec![
                json!({"reference": format!("Patient/{gone_patient}")}),
                json!({"reference": format!("Condition/{gone_condition}")}),
            ]
        );
        let (code, _) = status_of(
            &http,
            Method::GET,
            &hfs.url(&format!("/Patient/{gone_patient}")),
        )
        .await;
        assert!(
            matches!(code, StatusCode::GONE | StatusCode::NOT_FOUND),
            "deleted Patient: {code}"
        );
        let kept = patients[1]["id"].as_str().unwrap();
        let (code, body) =
            status_of(&http, Method::GET, &hfs.url(&format!("/Patient/{kept}"))).await;
        assert_eq!(code, StatusCode::OK, "submitted Patient/{kept}: {body}");

        // The receipts are parts of this crate's store.
        let db = rusqlite::Connection::open_with_flags(
            &hfs.output_db,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let kinds: Vec<(String, i64)> = db
            .prepare("SELECT file_type, count(*) FROM parts WHERE finalized = 1 GROUP BY file_type ORDER BY 1")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            kinds.iter().any(|(k, n)| k == "deleted" && *n == 1),
            "the store's finished parts by file type: {kinds:?}"
        );
        assert!(kinds.iter().any(|(k, _)| k == "output"), "{kinds:?}");
        // Recorded with BLAKE3, as `--digest blake3` asked, and each digest
        // is the content's: `verify` recomputes every one.
        let algorithms: Vec<String> = db
            .prepare("SELECT DISTINCT digest_algorithm FROM parts WHERE finalized = 1")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(algorithms, ["blake3"]);
        let store =
            sqlite_export_store::SqliteOutputStore::open(&hfs.output_db, &hfs.base).unwrap();
        let report = store.verify().await.unwrap();
        assert!(report.parts_checked >= 2, "{report:?}");
        assert!(report.problems.is_empty(), "{report:?}");
    });
}

// ---------------------------------------------------------------------------
// 5. A server killed in the middle of an export
// ---------------------------------------------------------------------------

/// Resources per part for the kill test: many parts, so that the kill
/// lands in the middle.
const KILL_BATCH: u32 = 10;

#[test]
fn a_killed_server_resumes_the_export_after_the_lease_and_serves_every_resource_once() {
    let sample = Sample::load();
    // A short lease, so the restarted server reclaims the job soon.
    let options = HfsOptions::default()
        .batch_size(KILL_BATCH)
        .env("HFS_BULK_EXPORT_LEASE_DURATION", "4")
        .env("HFS_BULK_EXPORT_HEARTBEAT_INTERVAL", "1");
    let mut first = Hfs::start(options);
    let types = sample.types();
    block_on(async {
        let http = http();
        load(&http, &first.base, &sample, &types, LoadMode::from_env()).await;
    });
    let total = sample.count(&types);
    let expected_parts: usize = sample
        .ids(&types)
        .values()
        .map(|ids| ids.len().div_ceil(KILL_BATCH as usize))
        .sum();

    // Kick off, wait until a few parts are finished, then SIGKILL.
    let kickoff_url = first.url(&format!("/$export?_type={}", types.join(",")));
    let status_url = block_on(async { kickoff(&http(), &kickoff_url).await });
    let job = job_of(&status_url);
    let deadline = Instant::now() + JOB_TIMEOUT;
    let killed_at = loop {
        let parts = parts_of(&first.output_db, &job);
        let finished = parts.iter().filter(|p| p.finalized).count();
        if finished >= 3 {
            assert!(
                finished < expected_parts,
                "the export finished ({finished} of {expected_parts} parts) before the kill"
            );
            first.kill();
            break parts_of(&first.output_db, &job);
        }
        assert!(
            Instant::now() < deadline,
            "no part finished in {JOB_TIMEOUT:?}\n{}",
            first.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let finished_then = killed_at.iter().filter(|p| p.finalized).count();
    note(format_args!(
        "killed with {finished_then} of {expected_parts} parts finished, {} staged",
        killed_at.len() - finished_then
    ));
    let first_tokens: BTreeSet<u64> = killed_at.iter().map(|p| p.fencing_token).collect();
    assert_eq!(first_tokens.len(), 1, "{killed_at:?}");

    // The same files, a new process: the job resumes once its lease lapses.
    let second = first.restart();
    let status_url = status_url.replace(&first.base, &second.base);
    block_on(async {
        let http = http();
        let started = Instant::now();
        let m = manifest(&http, &status_url).await;
        note(format_args!(
            "resumed export completed {:.1}s after the restart",
            started.elapsed().as_secs_f64()
        ));
        let got = download_all(&http, &second.base, &kickoff_url, &m, false).await;
        assert_exactly_once(
            "export resumed after SIGKILL",
            &sample.ids(&types),
            &got.ids,
        );
        assert_eq!(got.counts.values().sum::<u64>(), total as u64);
        assert_eq!(got.urls.len(), expected_parts);

        // The store: the killed claim's parts (token 1) are still there, and
        // not what was served; the served parts are the second claim's.
        let parts = parts_of(&second.output_db, &job);
        let last = parts.iter().map(|p| p.fencing_token).max().unwrap();
        assert!(
            !first_tokens.contains(&last),
            "no second claim wrote the job: tokens {first_tokens:?} then {last}"
        );
        let served: Vec<&PartRow> = parts
            .iter()
            .filter(|p| p.fencing_token == last && p.finalized)
            .collect();
        assert_eq!(
            served.len(),
            got.urls.len(),
            "finished parts of the last claim"
        );
        assert_eq!(
            served.iter().filter_map(|p| p.line_count).sum::<u64>(),
            total as u64
        );
        assert!(
            parts
                .iter()
                .all(|p| p.fencing_token == last || first_tokens.contains(&p.fencing_token)),
            "{parts:?}"
        );

        // DELETE takes every token's parts, staged ones included.
        let (code, body) = status_of(&http, Method::DELETE, &status_url).await;
        assert_eq!(code, StatusCode::ACCEPTED, "DELETE: {body}");
        let left = parts_of(&second.output_db, &job);
        assert!(left.is_empty(), "parts left after DELETE: {left:?}");
    });
    drop(second);
}

// ---------------------------------------------------------------------------
// 6. smart-fetch, a real Bulk Data client
// ---------------------------------------------------------------------------

/// Where `.ci/smart-fetch.sh` installs smart-fetch (or `$SMART_FETCH_VENV`).
fn smart_fetch_venv() -> PathBuf {
    std::env::var_os("SMART_FETCH_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/smart-fetch-venv")
        })
}

/// The sample's types that smart-fetch knows.
const SMART_FETCH_TYPES: &[&str] = &[
    "AllergyIntolerance",
    "Condition",
    "Device",
    "DocumentReference",
    "Encounter",
    "Immunization",
    "MedicationRequest",
    "Patient",
    "Procedure",
];

#[test]
fn smart_fetch_downloads_every_resource_exactly_once() {
    let venv = smart_fetch_venv();
    let exe = venv.join("bin/smart-fetch");
    assert!(
        exe.is_file(),
        "smart-fetch is not installed at {}: run `bash .ci/smart-fetch.sh` first (or set \
         SMART_FETCH_VENV to a virtual environment that has smart-fetch, zstandard and brotli)",
        exe.display()
    );
    let s = shared();
    block_on(async {
        // smart-fetch talks to HFS through a proxy that records what it asks
        // for: it rewrites HFS's URLs in headers and JSON bodies to its own
        // and passes downloads through untouched.
        let proxy = proxy::start(s.hfs.base.clone()).await;
        let out = tempfile::tempdir().unwrap();
        let dir = out.path().join("export");
        let started = Instant::now();
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.arg("bulk")
            .args(["--fhir-url", &proxy.base])
            .args(["--type", &SMART_FETCH_TYPES.join(",")])
            .args(["--no-default-filters", "--no-compression"])
            .arg(&dir)
            .env("NO_COLOR", "1")
            .env("TERM", "dumb")
            .env("COLUMNS", "200")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let run = tokio::time::timeout(JOB_TIMEOUT, cmd.output())
            .await
            .unwrap_or_else(|_| panic!("smart-fetch did not finish in {JOB_TIMEOUT:?}"))
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
        let log = std::fs::read_to_string(dir.join("log.ndjson")).unwrap_or_default();
        let tail = |s: &[u8]| {
            let s = String::from_utf8_lossy(s).to_string();
            s[s.len().saturating_sub(4000)..].to_string()
        };
        assert!(
            run.status.success(),
            "smart-fetch exited with {}\nstdout: {}\nstderr: {}\nlog.ndjson: {}\nproxy saw: {:#?}",
            run.status,
            tail(&run.stdout),
            tail(&run.stderr),
            tail(log.as_bytes()),
            proxy.seen()
        );
        note(format_args!(
            "smart-fetch: {:.1}s",
            started.elapsed().as_secs_f64()
        ));

        // Its NDJSON files (not its log.ndjson or .metadata).
        let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut files = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            let pieces: Vec<&str> = name.split('.').collect();
            let is_data = pieces.len() == 3
                && pieces[2] == "ndjson"
                && pieces[1].chars().all(|c| c.is_ascii_digit())
                && SMART_FETCH_TYPES.contains(&pieces[0]);
            if !is_data {
                continue;
            }
            files += 1;
            for line in parse_ndjson(&std::fs::read(&path).unwrap(), &name) {
                assert_eq!(
                    line["resourceType"].as_str(),
                    Some(pieces[0]),
                    "{name}: {line}"
                );
                got.entry(pieces[0].to_string())
                    .or_default()
                    .push(line["id"].as_str().unwrap().to_string());
            }
        }
        assert!(files >= SMART_FETCH_TYPES.len(), "{files} data files");
        assert_exactly_once(
            "smart-fetch's files",
            &s.sample.ids(SMART_FETCH_TYPES),
            &got,
        );

        // What it asked for: every download through HFS's file route, with
        // zstd among the encodings it accepts; and it deleted the job after.
        let seen = proxy.seen();
        let downloads: Vec<&proxy::Seen> = seen
            .iter()
            .filter(|r| r.method == "GET" && r.path.starts_with("/export-file/"))
            .collect();
        assert!(
            downloads.len() >= files,
            "{} downloads for {files} files",
            downloads.len()
        );
        for d in &downloads {
            assert_eq!(d.status, 200, "{d:?}");
            assert!(
                d.accept_encoding.as_deref().is_some_and(|a| a.contains("zstd")),
                "smart-fetch did not ask for zstd (are zstandard and brotli installed in {}?): {d:?}",
                venv.display()
            );
        }
        let encodings: BTreeSet<Option<String>> = downloads
            .iter()
            .map(|d| d.content_encoding.clone())
            .collect();
        note(format_args!(
            "smart-fetch: {} downloads, Accept-Encoding {:?}, HFS answered {encodings:?}",
            downloads.len(),
            downloads[0].accept_encoding
        ));
        assert!(
            seen.iter().any(|r| r.method == "DELETE"
                && r.path.starts_with("/export-status/")
                && r.status == 202),
            "smart-fetch did not DELETE its job (or HFS did not answer 202): {seen:#?}"
        );
    });
}

// ---------------------------------------------------------------------------
// 7. --metrics-addr: HFS's own metrics beside the store's, and /healthz
// ---------------------------------------------------------------------------

#[test]
fn the_metrics_listener_shows_hfs_requests_beside_the_store_figures_and_its_health() {
    let hfs = Hfs::start(HfsOptions::default().batch_size(2).metrics());
    let metrics = hfs.metrics.clone().expect("a `metrics on` line");
    block_on(async {
        let http = http();
        let healthz = || async {
            let r = http.get(format!("{metrics}/healthz")).send().await.unwrap();
            let status = r.status();
            let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
            (status, v)
        };
        assert_eq!(healthz().await, (StatusCode::OK, json!({"status": "ok"})));

        for i in 0..5 {
            let patient = json!({"resourceType": "Patient", "id": format!("watched-{i}")});
            put(&http, &hfs.base, &patient).await;
        }
        let Export { got, .. } = export(&http, &hfs.base, "/$export?_type=Patient").await;
        assert_eq!(got.urls.len(), 3, "5 patients in parts of 2");
        // Each file once more, as it is on the wire: its NDJSON bytes.
        let mut ndjson = 0;
        for url in &got.urls {
            let r = http.get(url).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK, "{url}");
            assert!(r.headers().get("content-encoding").is_none(), "{url}");
            ndjson += r.bytes().await.unwrap().len();
        }
        // Not on HFS's own port.
        for path in ["/metrics", "/healthz"] {
            let r = http.get(hfs.url(path)).send().await.unwrap();
            let status = r.status();
            let body = r.text().await.unwrap();
            assert_ne!(status, StatusCode::OK, "{path}: {body}");
            assert!(!body.contains("http_requests_total"), "{path}: {body}");
        }

        let s = watch_support::scrape(&http, &metrics).await;
        let requests = "http_requests_total";
        assert_eq!(s.kind(requests), "counter");
        let download = [
            ("method", "GET"),
            ("route", "/export-file/{job_id}/{part}"),
            ("service", "hfs"),
            ("status", "200"),
        ];
        let downloads = 2.0 * got.urls.len() as f64;
        assert_eq!(s.value(requests, &download), downloads, "{}", s.text);
        let kickoff = [
            ("method", "GET"),
            ("route", "/$export"),
            ("service", "hfs"),
            ("status", "202"),
        ];
        assert_eq!(s.value(requests, &kickoff), 1.0, "{}", s.text);
        let puts: f64 = s
            .all(requests)
            .iter()
            .filter(|x| x.labels["method"] == "PUT")
            .map(|x| x.value)
            .sum();
        assert_eq!(puts, 5.0, "{}", s.text);
        let duration = "http_request_duration_seconds";
        assert_eq!(s.kind(duration), "histogram");
        assert_eq!(s.value(&format!("{duration}_count"), &download), downloads);
        assert!(s.value("uptime_seconds", &[("service", "hfs")]) > 0.0);

        // The store's figures, from the same recorder, with HFS's label.
        let figure = |name: &str| {
            assert_eq!(s.kind(name), "gauge", "{name}");
            s.get(name, &[("service", "hfs")])
                .unwrap_or_else(|| panic!("no {name}:\n{}", s.text))
        };
        let stored = stored_bytes_of(&hfs.output_db);
        assert_eq!(figure("export_store_finished_parts"), 3.0);
        assert_eq!(figure("export_store_ndjson_bytes"), ndjson as f64);
        assert_eq!(figure("export_store_stored_bytes"), stored as f64);
        let on_disk = std::fs::metadata(&hfs.output_db).unwrap().len();
        assert_eq!(figure("export_store_database_bytes"), on_disk as f64);
        assert!(
            s.all("export_store_sent_bytes_total").is_empty(),
            "HFS serves the downloads, not the store's route"
        );

        // The output store's file removed under the server: unhealthy,
        // and the reason names the store.
        std::fs::remove_file(&hfs.output_db).unwrap();
        let (status, v) = healthz().await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
        assert_eq!(v["status"], "unavailable");
        let reason = v["reason"].as_str().unwrap();
        assert!(reason.starts_with("store: "), "{reason}");
        assert!(reason.contains("removed or replaced"), "{reason}");
    });
}

/// The stored bytes of the finished parts, read from the output database
/// with a read-only connection.
fn stored_bytes_of(db: &std::path::Path) -> u64 {
    use rusqlite::{Connection, OpenFlags};
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    conn.busy_timeout(Duration::from_secs(30)).unwrap();
    conn.query_row(
        "SELECT coalesce(sum(stored_bytes), 0) FROM parts WHERE finalized = 1",
        [],
        |r| r.get::<_, i64>(0),
    )
    .unwrap() as u64
}

mod proxy {
    //! A recording HTTP proxy in front of HFS for one client.
    use std::sync::{Arc, Mutex};

    use axum::body::Body;
    use axum::extract::{Request, State};
    use axum::http::header;
    use axum::response::Response;

    #[derive(Clone, Debug)]
    pub struct Seen {
        pub method: String,
        pub path: String,
        pub accept_encoding: Option<String>,
        pub status: u16,
        pub content_encoding: Option<String>,
    }

    pub struct Proxy {
        pub base: String,
        seen: Arc<Mutex<Vec<Seen>>>,
    }

    impl Proxy {
        pub fn seen(&self) -> Vec<Seen> {
            self.seen.lock().unwrap().clone()
        }
    }

    struct Upstream {
        upstream: String,
        base: String,
        seen: Arc<Mutex<Vec<Seen>>>,
        http: reqwest::Client,
    }

    pub async fn start(upstream: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(Upstream {
            upstream,
            base: base.clone(),
            seen: seen.clone(),
            http: super::http(),
        });
        let app = axum::Router::new().fallback(forward).with_state(state);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Proxy { base, seen }
    }

    async fn forward(State(s): State<Arc<Upstream>>, req: Request) -> Response {
        let (parts, body) = req.into_parts();
        let body = axum::body::to_bytes(body, 64 << 20).await.unwrap();
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        let is_file = parts.uri.path().starts_with("/export-file/");
        let accept_encoding = parts
            .headers
            .get(header::ACCEPT_ENCODING)
            .map(|v| v.to_str().unwrap_or("?").to_string());
        let mut request = s
            .http
            .request(parts.method.clone(), format!("{}{path}", s.upstream));
        for (name, value) in &parts.headers {
            // JSON answers are rewritten, so only file downloads keep the
            // client's Accept-Encoding.
            let skip = name == header::HOST
                || name == header::CONTENT_LENGTH
                || (name == header::ACCEPT_ENCODING && !is_file);
            if !skip {
                request = request.header(name, value);
            }
        }
        let answer = request.body(body).send().await;
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                return Response::builder()
                    .status(502)
                    .body(Body::from(format!("proxy: {e}")))
                    .unwrap()
            }
        };
        let status = answer.status();
        let headers = answer.headers().clone();
        let content_encoding = headers
            .get(header::CONTENT_ENCODING)
            .map(|v| v.to_str().unwrap_or("?").to_string());
        let bytes = answer.bytes().await.unwrap_or_default();
        s.seen.lock().unwrap().push(Seen {
            method: parts.method.to_string(),
            path: path.clone(),
            accept_encoding,
            status: status.as_u16(),
            content_encoding: content_encoding.clone(),
        });
        let is_json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.contains("json") && !ct.contains("ndjson"));
        let body = if is_json && content_encoding.is_none() {
            String::from_utf8_lossy(&bytes)
                .replace(&s.upstream, &s.base)
                .into_bytes()
        } else {
            bytes.to_vec()
        };
        let mut response = Response::builder().status(status.as_u16());
        for (name, value) in &headers {
            if name == header::CONTENT_LENGTH
                || name == header::TRANSFER_ENCODING
                || name == header::CONNECTION
            {
                continue;
            }
            if name == header::CONTENT_LOCATION || name == header::LOCATION {
                let v = value
                    .to_str()
                    .unwrap_or_default()
                    .replace(&s.upstream, &s.base);
                response = response.header(name, v);
            } else {
                response = response.header(name, value);
            }
        }
        response.body(Body::from(body)).unwrap()
    }
}
