#![cfg(feature = "hfs")]
//! `export-store hfs` with HFS's own authentication on, over real TCP.
//!
//! The test is its own token issuer (`idp/`): RSA and EC keys made at run
//! time, their JWKS served on loopback, and SMART backend-services tokens
//! signed with them. The server runs with `HFS_AUTH_ENABLED=true`, that
//! JWKS, a pinned issuer and audience, URL and header tenant routing
//! (`HFS_TENANT_ROUTING_MODE=both`) and a file audit sink, and is checked
//! the way an attacker and a Bulk Data client would check it:
//!
//! - every door (the FHIR API, export kick-off, status, files, DELETE, bulk
//!   submit) refuses a missing, expired, mis-issued, mis-addressed,
//!   tampered, unsigned, algorithm-confused, unknown-key or SMART-v1 token,
//!   and no refusal shows a stack trace, SQL or a file path;
//! - two tenants, each by its token's `tenant_id` claim: each export holds
//!   only its own tenant's resources, the other tenant's token (also with a
//!   spoofed `X-Tenant-ID` or `/{tenant}/` prefix) never reads a byte of it,
//!   and the store's rows carry the right tenant;
//! - smart-fetch downloads with `--bearer-token` and fails without;
//! - a broken auth configuration stops the server before it listens, with
//!   the variable named.
//!
//! Three tests share one server (started by the first, under a watchdog);
//! `cargo test --features hfs --test hfs_auth -- --nocapture` shows the
//! steps.

mod hfs_support;
mod idp;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hfs_support::*;
use idp::{tamper_claims, tamper_signature, Claims, Idp, Signer, AUDIENCE, ISSUER};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const A: &str = "tenant-a";
const B: &str = "tenant-b";

struct Shared {
    idp: Idp,
    hfs: Hfs,
    sample: Sample,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let idp = Idp::start();
        let mut options = HfsOptions {
            outlive_handle: true,
            ..HfsOptions::default()
        }
        .batch_size(3)
        .env("HFS_TENANT_ROUTING_MODE", "both")
        .env("HFS_AUDIT_BACKEND", "file")
        .env("HFS_AUDIT_FILE_PATH", "{data_dir}/audit.ndjson");
        for (k, v) in idp.env() {
            options = options.env(&k, &v);
        }
        let hfs = Hfs::start(options);
        note(format_args!("HFS with auth on at {}", hfs.base));
        Shared {
            idp,
            hfs,
            sample: Sample::load(),
        }
    })
}

/// A client that sends `Authorization: Bearer {token}` on every request.
fn client(token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .default_headers(headers)
        .build()
        .unwrap()
}

/// One request: status and body.
async fn send(
    method: Method,
    url: &str,
    authorization: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> (StatusCode, String) {
    let mut r = http().request(method.clone(), url);
    if let Some(a) = authorization {
        r = r.header("authorization", a);
    }
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    if let Some(b) = body {
        r = r
            .header("content-type", "application/fhir+json")
            .body(b.to_string());
    }
    let resp = r
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = resp.status();
    (status, resp.text().await.unwrap_or_default())
}

/// What a refusal must never show: internals an attacker could use.
fn assert_no_leak(what: &str, body: &str, data_dir: &std::path::Path) {
    let lower = body.to_ascii_lowercase();
    for needle in [
        "select ",
        "insert into",
        "sqlite",
        "panicked",
        "stack backtrace",
        ".rs:",
        "/tmp/",
        "/root/",
        "/home/",
    ] {
        assert!(
            !lower.contains(needle),
            "{what}: the answer shows {needle:?}: {body}"
        );
    }
    assert!(
        !body.contains(data_dir.to_str().unwrap()),
        "{what}: the answer shows the data folder: {body}"
    );
}

/// The resources of `t` in the sample, split between the two tenants:
/// tenant A gets the first half, tenant B the rest.
fn half(sample: &Sample, t: &str, tenant: &str) -> Vec<Value> {
    let all = &sample.resources[t];
    let mid = all.len() / 2;
    if tenant == A {
        all[..mid].to_vec()
    } else {
        all[mid..].to_vec()
    }
}

fn ids_of(resources: &[Value]) -> BTreeSet<String> {
    resources
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

/// `export-store ls --parts --json` of the output store: (tenant, job) of
/// every part.
fn store_parts(db: &std::path::Path) -> Vec<(String, String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_export-store"))
        .args(["ls", "--parts", "--json", "--db"])
        .arg(db)
        .output()
        .unwrap();
    assert!(
        out.status.success() || out.status.code() == Some(4),
        "export-store ls: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    doc["parts"]
        .as_array()
        .map(|parts| {
            parts
                .iter()
                .map(|p| {
                    (
                        p["tenant"].as_str().unwrap().to_string(),
                        p["job"].as_str().unwrap().to_string(),
                        p["state"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// 1. Every door refuses every bad token
// ---------------------------------------------------------------------------

#[test]
fn every_door_refuses_a_missing_or_bad_token_and_lets_a_good_one_in() {
    let s = shared();
    let (idp, hfs) = (&s.idp, &s.hfs);
    assert!(
        idp.fetches() >= 1,
        "the server never fetched the JWKS at {}",
        idp.jwks_url
    );
    let log = hfs.log_tail();
    assert!(
        log.contains("Authentication ENABLED"),
        "the log does not say that authentication is on:\n{log}"
    );
    block_on(async {
        let good = Claims::new(A);
        let token = idp.token(&good);
        let http = client(&token);

        // A finished export of tenant A, whose status, files and DELETE the
        // bad tokens then try.
        let patients = half(&s.sample, "Patient", A);
        for p in &patients {
            put(&http, &hfs.base, p).await;
        }
        let e = export_as(&http, &hfs.base, "/$export?_type=Patient", true).await;
        let file = e.got.urls[0].clone();
        let status_url = e.status_url.clone();
        let job = job_of(&status_url);

        let submit = json!({
            "resourceType": "Parameters",
            "parameter": [
                {"name": "manifestUrl", "valueString": "http://127.0.0.1:9/manifest.json"},
                {"name": "submitter", "valueIdentifier": {"system": "urn:test", "value": "t"}},
                {"name": "submissionId", "valueString": "s-1"}
            ]
        });
        let patient = json!({"resourceType": "Patient", "id": "intruder", "active": true});
        let doors: Vec<Door> = vec![
            (
                "FHIR search",
                Method::GET,
                hfs.url("/Patient"),
                None,
                vec![],
            ),
            (
                "FHIR read",
                Method::GET,
                hfs.url(&format!("/Patient/{}", patients[0]["id"].as_str().unwrap())),
                None,
                vec![],
            ),
            (
                "FHIR update",
                Method::PUT,
                hfs.url("/Patient/intruder"),
                Some(&patient),
                vec![],
            ),
            (
                "export kick-off",
                Method::GET,
                hfs.url("/$export?_type=Patient"),
                None,
                vec![("prefer", "respond-async")],
            ),
            (
                "Patient export kick-off",
                Method::GET,
                hfs.url("/Patient/$export"),
                None,
                vec![("prefer", "respond-async")],
            ),
            (
                "export status",
                Method::GET,
                status_url.clone(),
                None,
                vec![],
            ),
            ("export file", Method::GET, file.clone(), None, vec![]),
            (
                "export DELETE",
                Method::DELETE,
                status_url.clone(),
                None,
                vec![],
            ),
            (
                "bulk submit kick-off",
                Method::POST,
                hfs.url("/$bulk-submit"),
                Some(&submit),
                vec![("prefer", "respond-async")],
            ),
            (
                "bulk submit status",
                Method::POST,
                hfs.url("/$bulk-submit-status"),
                Some(&submit),
                vec![("prefer", "respond-async")],
            ),
            (
                "bulk submit status poll",
                Method::GET,
                hfs.url("/bulk-submit-status/anything"),
                None,
                vec![],
            ),
            (
                "bulk submit file",
                Method::GET,
                hfs.url("/bulk-submit-file/anything/output-Patient-0"),
                None,
                vec![],
            ),
        ];

        let expired = Claims {
            exp_in: Some(-600),
            ..good.clone()
        };
        let wrong_issuer = Claims {
            iss: "https://other-issuer.example.test".into(),
            ..good.clone()
        };
        let wrong_audience = Claims {
            aud: Some("https://other-server.example.test".into()),
            ..good.clone()
        };
        let no_audience = Claims {
            aud: None,
            ..good.clone()
        };
        let no_subject = Claims {
            sub: None,
            ..good.clone()
        };
        let no_expiry = Claims {
            exp_in: None,
            ..good.clone()
        };
        let bad: Vec<(&str, Option<String>, StatusCode)> = vec![
            ("no token", None, StatusCode::UNAUTHORIZED),
            (
                "not a bearer token",
                Some("Basic YWRtaW46YWRtaW4=".into()),
                StatusCode::UNAUTHORIZED,
            ),
            (
                "garbage",
                Some("Bearer not.a.jwt".into()),
                StatusCode::UNAUTHORIZED,
            ),
            (
                "expired",
                Some(bearer(&idp.token(&expired))),
                StatusCode::UNAUTHORIZED,
            ),
            (
                "wrong issuer",
                Some(bearer(&idp.token(&wrong_issuer))),
                StatusCode::UNAUTHORIZED,
            ),
            (
                "wrong audience",
                Some(bearer(&idp.token(&wrong_audience))),
                StatusCode::UNAUTHORIZED,
            ),
            (
                "no audience",
                Some(bearer(&idp.token(&no_audience))),
                StatusCode::UNAUTHORIZED,
            ),
            (
                "no subject",
                Some(bearer(&idp.token(&no_subject))),
                StatusCode::UNAUTHORIZED,
            ),
            (
                "no expiry",
                Some(bearer(&idp.token(&no_expiry))),
                StatusCode::UNAUTHORIZED,
            ),
            (
                "tampered signature",
                Some(bearer(&tamper_signature(&token))),
                StatusCode::UNAUTHORIZED,
            ),
            (
                "tampered claims (tenant)",
                Some(bearer(&tamper_claims(&token, |c| {
                    c["tenant_id"] = json!(B)
                }))),
                StatusCode::UNAUTHORIZED,
            ),
            (
                "tampered claims (expiry)",
                Some(bearer(&tamper_claims(&idp.token(&expired), |c| {
                    c["exp"] = json!(c["exp"].as_i64().unwrap() + 3600)
                }))),
                StatusCode::UNAUTHORIZED,
            ),
            (
                "alg none",
                Some(bearer(&idp.unsigned(&good))),
                StatusCode::UNAUTHORIZED,
            ),
            (
                "HS256 keyed with the public key",
                Some(bearer(&idp.hs256_with_public_key(&good))),
                StatusCode::UNAUTHORIZED,
            ),
            (
                "a key not in the JWKS",
                Some(bearer(&idp.token(&good.clone().signer(Signer::Unknown)))),
                StatusCode::UNAUTHORIZED,
            ),
            (
                "another key under a known kid",
                Some(bearer(&idp.token(&good.clone().signer(Signer::Impostor)))),
                StatusCode::UNAUTHORIZED,
            ),
            (
                "SMART v1 scope system/*.read",
                Some(bearer(&idp.token(&good.clone().scope("system/*.read")))),
                StatusCode::FORBIDDEN,
            ),
        ];

        let mut checked = 0;
        let mut table: BTreeMap<String, BTreeSet<u16>> = BTreeMap::new();
        for (token_name, authorization, want) in &bad {
            for (door, method, url, body, headers) in &doors {
                let (status, text) = send(
                    method.clone(),
                    url,
                    authorization.as_deref(),
                    headers,
                    *body,
                )
                .await;
                let what = format!("{door} ({method} {url}) with {token_name}");
                assert_eq!(status, *want, "{what}: {text}");
                assert_no_leak(&what, &text, &hfs.data_dir);
                table
                    .entry(token_name.to_string())
                    .or_default()
                    .insert(status.as_u16());
                checked += 1;
            }
        }
        note(format_args!(
            "{checked} refusals over {} doors: {table:?}",
            doors.len()
        ));

        // Nothing the bad tokens sent took effect: the export and its file
        // are still there, the intruder was not written.
        let (status, _) = send(Method::GET, &status_url, Some(&bearer(&token)), &[], None).await;
        assert_eq!(status, StatusCode::OK, "the export after the refusals");
        assert_eq!(get_ndjson(&http, &file).await.len() as u64, {
            e.manifest["output"][0]["count"].as_u64().unwrap()
        });
        let (status, _) = send(
            Method::GET,
            &hfs.url("/Patient/intruder"),
            Some(&bearer(&token)),
            &[],
            None,
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "the refused PUT wrote");

        // Good tokens by every supported algorithm get in; /metadata is
        // open, as in HFS.
        for signer in [Signer::Rs256, Signer::Rs384, Signer::Es256, Signer::Es384] {
            let t = idp.token(&good.clone().signer(signer));
            let (status, text) = send(
                Method::GET,
                &hfs.url("/Patient"),
                Some(&bearer(&t)),
                &[],
                None,
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{signer:?}: {text}");
        }
        let (status, _) = send(Method::GET, &hfs.url("/metadata"), None, &[], None).await;
        assert_eq!(status, StatusCode::OK, "/metadata without a token");

        // HFS's scope check (0.2.7) takes the first path segment for a
        // resource type: `/export-status/{job}` is a read, and DELETE a
        // delete, of type `export-status`; `/export-file/{job}/{Type}-{n}` a
        // search of type `{Type}-{n}`. So a read-only token cannot cancel
        // its own export, and a token scoped to Patient cannot even poll
        // one (docs/hfs.md, "Running with authentication").
        let read_only = client(&idp.token(&good.clone().scope("system/*.rs")));
        let ro = export_as(&read_only, &hfs.base, "/$export?_type=Patient", true).await;
        let (status, text) = status_of(&read_only, Method::DELETE, &ro.status_url).await;
        assert_eq!(
            status,
            StatusCode::FORBIDDEN,
            "DELETE with system/*.rs: {text}"
        );
        let patient_only = client(&idp.token(&good.clone().scope("system/Patient.rs")));
        let patient_status = kickoff(&patient_only, &hfs.url("/$export?_type=Patient")).await;
        let (status, text) = status_of(&patient_only, Method::GET, &patient_status).await;
        assert_eq!(
            status,
            StatusCode::FORBIDDEN,
            "status with system/Patient.rs: {text}"
        );
        let (status, text) = status_of(&patient_only, Method::GET, &ro.got.urls[0]).await;
        assert_eq!(
            status,
            StatusCode::FORBIDDEN,
            "file with system/Patient.rs: {text}"
        );
        let (status, _) = status_of(&http, Method::DELETE, &ro.status_url).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        let (status, _) = status_of(&http, Method::DELETE, &patient_status).await;
        assert_eq!(status, StatusCode::ACCEPTED);

        // With a good token: DELETE ends the export, its files and its
        // parts.
        let (status, text) = send(
            Method::DELETE,
            &status_url,
            Some(&bearer(&token)),
            &[],
            None,
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "DELETE: {text}");
        let (status, _) = send(Method::GET, &status_url, Some(&bearer(&token)), &[], None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "status after DELETE");
        let (status, _) = send(Method::GET, &file, Some(&bearer(&token)), &[], None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "file after DELETE");
        assert!(
            store_parts(&hfs.output_db)
                .iter()
                .all(|(_, j, _)| *j != job),
            "the deleted export's parts are still in the store"
        );

        // HFS's audit sink recorded an event for each of them, at least.
        let audit = std::fs::read_to_string(hfs.data_dir.join("audit.ndjson")).unwrap_or_default();
        let events: Vec<Value> = audit
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l}: {e}")))
            .collect();
        assert!(
            events.len() >= checked && events.iter().all(Value::is_object),
            "the audit file holds {} events for {checked} refused requests",
            events.len()
        );
    });
}

/// A door: its name, method, URL, body and extra headers.
type Door<'a> = (
    &'a str,
    Method,
    String,
    Option<&'a Value>,
    Vec<(&'a str, &'a str)>,
);

/// Environment variables.
type Env<'a> = Vec<(&'a str, &'a str)>;

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

// ---------------------------------------------------------------------------
// 2. Two tenants
// ---------------------------------------------------------------------------

#[test]
fn each_tenant_exports_only_its_own_resources_and_never_reads_the_others() {
    let s = shared();
    let (idp, hfs) = (&s.idp, &s.hfs);
    block_on(async {
        let token_a = idp.token(&Claims::new(A));
        let token_b = idp.token(&Claims::new(B).signer(Signer::Es256));
        let (http_a, http_b) = (client(&token_a), client(&token_b));

        // Tenant A: Organizations and the first half of the Patients;
        // tenant B: the other half, and no Organization.
        let orgs = s.sample.resources["Organization"].clone();
        let (pa, pb) = (half(&s.sample, "Patient", A), half(&s.sample, "Patient", B));
        for r in orgs.iter().chain(&pa) {
            put(&http_a, &hfs.base, r).await;
        }
        for r in &pb {
            put(&http_b, &hfs.base, r).await;
        }

        let path = "/$export?_type=Patient,Organization";
        let ea = export_as(&http_a, &hfs.base, path, true).await;
        let eb = export_as(&http_b, &hfs.base, path, true).await;
        let want_a: BTreeMap<String, BTreeSet<String>> = [
            ("Patient".to_string(), ids_of(&pa)),
            ("Organization".to_string(), ids_of(&orgs)),
        ]
        .into();
        let want_b: BTreeMap<String, BTreeSet<String>> =
            [("Patient".to_string(), ids_of(&pb))].into();
        assert_exactly_once("tenant A's export", &want_a, &ea.got.ids);
        assert_exactly_once("tenant B's export", &want_b, &eb.got.ids);
        note(format_args!(
            "tenant A: {} files, tenant B: {} files",
            ea.got.urls.len(),
            eb.got.urls.len()
        ));

        // B's token on A's status, files and DELETE: plainly, with A's
        // X-Tenant-ID, and under A's URL prefix. Never a 2xx, never A's
        // data.
        let (job_a, job_b) = (job_of(&ea.status_url), job_of(&eb.status_url));
        let prefixed = |url: &str| url.replacen(&hfs.base, &format!("{}/{A}", hfs.base), 1);
        let a_ids: Vec<String> = pa
            .iter()
            .chain(&orgs)
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect();
        let mut tries = Vec::new();
        for url in std::iter::once(ea.status_url.clone()).chain(ea.got.urls.iter().cloned()) {
            tries.push((Method::GET, url.clone(), vec![]));
            tries.push((Method::GET, url.clone(), vec![("x-tenant-id", A)]));
            tries.push((Method::GET, prefixed(&url), vec![]));
        }
        for headers in [vec![], vec![("x-tenant-id", A)]] {
            tries.push((Method::DELETE, ea.status_url.clone(), headers));
        }
        tries.push((Method::DELETE, prefixed(&ea.status_url), vec![]));
        // B's FHIR searches aimed at A.
        tries.push((Method::GET, hfs.url("/Patient"), vec![("x-tenant-id", A)]));
        tries.push((Method::GET, hfs.url(&format!("/{A}/Patient")), vec![]));
        tries.push((
            Method::GET,
            hfs.url(&format!("/Patient/{}", a_ids[0])),
            vec![],
        ));
        let mut statuses = BTreeSet::new();
        for (method, url, headers) in &tries {
            let (status, body) =
                send(method.clone(), url, Some(&bearer(&token_b)), headers, None).await;
            let what = format!("tenant B's token: {method} {url} {headers:?}");
            let search = url.ends_with("/Patient");
            if search {
                // A search answers with B's own tenant, whatever it asks.
                assert!(
                    status == StatusCode::OK || status.is_client_error(),
                    "{what}: {status}"
                );
            } else {
                assert!(
                    matches!(status.as_u16(), 400 | 403 | 404),
                    "{what}: {status} {body}"
                );
            }
            // Nor any of A's resources (an id it asked for may be repeated
            // in a not-found message).
            for id in a_ids.iter().filter(|id| !url.contains(id.as_str())) {
                assert!(
                    !body.contains(id.as_str()),
                    "{what}: tenant A's {id} in {body}"
                );
            }
            assert!(
                !body.contains("\"resourceType\":\"Patient\"") || search,
                "{what}: a Patient in {body}"
            );
            // A refusal may repeat the job id it was asked for, never the
            // job's manifest or its files.
            assert!(
                !body.contains("transactionTime") && !body.contains("/export-file/"),
                "{what}: tenant A's manifest in {body}"
            );
            assert_no_leak(&what, &body, &hfs.data_dir);
            statuses.insert(status.as_u16());
        }
        note(format_args!(
            "{} cross-tenant tries, answered {statuses:?}",
            tries.len()
        ));

        // A token without a tenant claim may not name a tenant.
        let claimless = idp.token(&Claims {
            tenant: None,
            ..Claims::new(A)
        });
        let (status, body) = send(
            Method::GET,
            &ea.status_url,
            Some(&bearer(&claimless)),
            &[("x-tenant-id", A)],
            None,
        )
        .await;
        assert_eq!(
            status,
            StatusCode::FORBIDDEN,
            "a claimless token naming tenant A: {body}"
        );

        // A's export is intact after B's attempts: same files, same bytes.
        let again = download_all(
            &http_a,
            &hfs.base,
            ea.manifest["request"].as_str().unwrap(),
            &manifest(&http_a, &ea.status_url).await,
            true,
        )
        .await;
        assert_eq!(
            again.ids, ea.got.ids,
            "tenant A's files after tenant B's attempts"
        );

        // The store's rows: every part of A's job under tenant A, of B's
        // under B, none under the default tenant.
        let rows = store_parts(&hfs.output_db);
        let of = |job: &str| -> BTreeSet<String> {
            rows.iter()
                .filter(|(_, j, _)| j == job)
                .map(|(t, _, _)| t.clone())
                .collect()
        };
        assert_eq!(
            of(&job_a),
            BTreeSet::from([A.to_string()]),
            "tenant A's job in the store"
        );
        assert_eq!(
            of(&job_b),
            BTreeSet::from([B.to_string()]),
            "tenant B's job in the store"
        );
        assert!(
            rows.iter().all(|(t, _, _)| t != "default"),
            "parts under the default tenant: {rows:?}"
        );
        assert!(
            rows.iter()
                .filter(|(_, j, _)| *j == job_a || *j == job_b)
                .all(|(_, _, state)| state == "finished"),
            "{rows:?}"
        );
    });
}

// ---------------------------------------------------------------------------
// 3. smart-fetch with a bearer token
// ---------------------------------------------------------------------------

fn smart_fetch() -> PathBuf {
    let venv = std::env::var_os("SMART_FETCH_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/smart-fetch-venv")
        });
    let exe = venv.join("bin/smart-fetch");
    assert!(
        exe.is_file(),
        "smart-fetch is not installed at {}: run `bash .ci/smart-fetch.sh` first",
        exe.display()
    );
    exe
}

#[test]
fn smart_fetch_with_a_bearer_token_downloads_its_tenants_export_and_without_one_fails() {
    let exe = smart_fetch();
    let s = shared();
    let (idp, hfs) = (&s.idp, &s.hfs);
    const TENANT: &str = "tenant-smart";
    let token = idp.token(&Claims::new(TENANT).signer(Signer::Es384));
    let patients = s.sample.resources["Patient"].clone();
    block_on(async {
        let http = client(&token);
        for p in &patients {
            put(&http, &hfs.base, p).await;
        }
    });
    let run = |token: Option<&str>, dir: &std::path::Path| {
        let mut cmd = Command::new(&exe);
        cmd.arg("bulk")
            .args(["--fhir-url", &hfs.base])
            .args(["--type", "Patient"])
            .args(["--no-default-filters", "--no-compression"]);
        if let Some(t) = token {
            cmd.args(["--bearer-token", t]);
        }
        let mut child = cmd
            .arg(dir)
            .env("NO_COLOR", "1")
            .env("TERM", "dumb")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + JOB_TIMEOUT;
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("smart-fetch did not finish in {JOB_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        child.wait_with_output().unwrap()
    };
    let out = tempfile::tempdir().unwrap();

    let without = run(None, &out.path().join("no-token"));
    assert!(
        !without.status.success(),
        "smart-fetch without a token succeeded: {}",
        String::from_utf8_lossy(&without.stdout)
    );

    let dir = out.path().join("export");
    let started = Instant::now();
    let with = run(Some(&token), &dir);
    assert!(
        with.status.success(),
        "smart-fetch --bearer-token exited with {}\nstdout: {}\nstderr: {}",
        with.status,
        String::from_utf8_lossy(&with.stdout),
        String::from_utf8_lossy(&with.stderr)
    );
    note(format_args!(
        "smart-fetch with a token: {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if !(name.starts_with("Patient.") && name.ends_with(".ndjson")) {
            continue;
        }
        for line in parse_ndjson(&std::fs::read(&path).unwrap(), &name) {
            got.entry("Patient".into())
                .or_default()
                .push(line["id"].as_str().unwrap().to_string());
        }
    }
    let want: BTreeMap<String, BTreeSet<String>> =
        [("Patient".to_string(), ids_of(&patients))].into();
    assert_exactly_once("smart-fetch's files", &want, &got);
}

// ---------------------------------------------------------------------------
// 4. A broken auth configuration stops the server
// ---------------------------------------------------------------------------

/// Runs `export-store hfs` with `env` and expects it to exit, unsuccessfully
/// and before listening, saying `expected`.
fn refuses_to_start(what: &str, env: &[(&str, &str)], expected: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_export-store"))
        .args(["hfs", "--addr", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .env_remove("HFS_AUTH_ENABLED")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + START_TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what}: export-store hfs still runs after {START_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success(), "{what}: exited {}", out.status);
    assert!(
        !stdout.contains("listening on"),
        "{what}: it listened before failing: {stdout}"
    );
    assert!(
        stderr.contains(expected),
        "{what}: the error does not name {expected}:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
}

#[test]
fn a_broken_auth_configuration_stops_the_server_before_it_listens() {
    let idp = Idp::start();
    let closed = {
        // A port nobody listens on.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        format!("http://127.0.0.1:{port}/jwks.json")
    };
    let not_found = idp.jwks_url.replace("/jwks.json", "/missing.json");
    let on = ("HFS_AUTH_ENABLED", "true");
    let jwks = ("HFS_AUTH_JWKS_URL", idp.jwks_url.as_str());
    let iss = ("HFS_AUTH_ISSUER", ISSUER);
    let aud = ("HFS_AUTH_AUDIENCE", AUDIENCE);
    // (what is broken, the environment, the variable the error names)
    let cases: Vec<(&str, Env, &str)> = vec![
        ("no JWKS URL", vec![on, iss, aud], "HFS_AUTH_JWKS_URL"),
        ("no issuer", vec![on, jwks, aud], "HFS_AUTH_ISSUER"),
        (
            "a JWKS nobody serves",
            vec![on, ("HFS_AUTH_JWKS_URL", closed.as_str()), iss, aud],
            "HFS_AUTH_JWKS_URL",
        ),
        (
            "a JWKS URL that answers 404",
            vec![on, ("HFS_AUTH_JWKS_URL", not_found.as_str()), iss, aud],
            "HFS_AUTH_JWKS_URL",
        ),
        (
            "an algorithm HFS does not verify",
            vec![on, jwks, iss, aud, ("HFS_AUTH_ALGORITHMS", "RS256,HS256")],
            "HFS_AUTH_ALGORITHMS",
        ),
        (
            "a file audit sink without a file",
            vec![on, jwks, iss, aud, ("HFS_AUDIT_BACKEND", "file")],
            "HFS_AUDIT_FILE_PATH",
        ),
    ];
    for (what, env, expected) in &cases {
        refuses_to_start(what, env, expected);
        note(format_args!("refused to start: {what}"));
    }
}
