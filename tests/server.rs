//! The download server over real TCP with a real HTTP client: headers,
//! encodings, ranges, validators, access control, failures mid-body, and
//! resource bounds.
#![cfg(feature = "server")]

mod server_support;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::{Method, StatusCode};
use server_support::*;
use sqlite_export_store::server::ServerConfig;
use sqlite_export_store::{
    ExportJobId, ExportOutputStore, ExportPartKey, SqliteOutputStore, StoreOptions, TenantContext,
    TenantId,
};
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_download_carries_every_header_and_the_exact_bytes() {
    let s = serve(
        StoreOptions::default().with_chunk_size(16 * 1024),
        ServerConfig::new(),
    )
    .await;
    let data = ndjson_of(300_000);
    let k = key("default", &ExportJobId::new().to_string(), 0, 1);
    let info = put(&s.store, &k, &data).await;
    assert!(info.chunk_count > 10);
    let url = url_of(&s, &k).await;
    let (status, hd, body) = s.get(&url, &[]).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(body, data);
    assert_eq!(h(&hd, "content-type"), Some("application/fhir+ndjson"));
    assert_eq!(
        h(&hd, "content-length"),
        Some(data.len().to_string().as_str())
    );
    assert_eq!(
        h(&hd, "etag"),
        Some(format!("\"{}\"", digest_hex(&data)).as_str())
    );
    assert_eq!(info.digest, digest_hex(&data));
    let lm = httpdate::parse_http_date(h(&hd, "last-modified").unwrap()).unwrap();
    let finalized = info
        .finalized_at
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(lm.duration_since(UNIX_EPOCH).unwrap().as_secs(), finalized);
    assert_eq!(h(&hd, "cache-control"), Some("private"));
    assert_eq!(h(&hd, "accept-ranges"), Some("bytes"));
    assert_eq!(h(&hd, "vary"), Some("Accept-Encoding"));
    assert_eq!(h(&hd, "content-encoding"), None);
    let id1 = h(&hd, "x-request-id").unwrap().to_string();
    let (_, hd2, _) = s.get(&url, &[]).await;
    assert_ne!(
        h(&hd2, "x-request-id").unwrap(),
        id1,
        "a fresh id per request"
    );
    let (_, hd3, _) = s.get(&url, &[("x-request-id", "proxy-7f3a")]).await;
    assert_eq!(h(&hd3, "x-request-id"), Some("proxy-7f3a"));
}

/// The frames of the latest part of `key`'s slot, read from the file.
fn stored_frames(store: &SqliteOutputStore, key: &ExportPartKey) -> Vec<u8> {
    let c = rusqlite::Connection::open(store.path()).unwrap();
    let mut st = c
        .prepare(
            "SELECT frame FROM chunks WHERE part_id = (SELECT id FROM parts WHERE job_id = ?1 \
             AND finalized = 1) ORDER BY seq",
        )
        .unwrap();
    let frames: Vec<Vec<u8>> = st
        .query_map([key.job_id.as_str()], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    frames.concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_is_passed_through_as_stored_and_gzip_is_made_on_the_fly() {
    let s = serve(
        StoreOptions::default().with_chunk_size(32 * 1024),
        ServerConfig::new(),
    )
    .await;
    let data = ndjson_of(400_000);
    let k = key("default", "enc-job", 0, 1);
    let info = put(&s.store, &k, &data).await;
    let url = url_of(&s, &k).await;

    let (status, hd, body) = s
        .get(&url, &[("accept-encoding", "gzip, deflate, br, zstd")])
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h(&hd, "content-encoding"), Some("zstd"));
    assert_eq!(
        h(&hd, "content-length"),
        Some(info.stored_bytes.to_string().as_str())
    );
    assert_eq!(
        h(&hd, "etag"),
        Some(format!("W/\"{}+zstd\"", info.digest).as_str())
    );
    assert_eq!(h(&hd, "vary"), Some("Accept-Encoding"));
    assert_eq!(
        body,
        stored_frames(&s.store, &k),
        "the stored frames, byte for byte"
    );
    assert!(info.chunk_count > 10 && body.len() * 4 < data.len());
    assert_eq!(zstd::decode_all(&body[..]).unwrap(), data);

    for accept in ["gzip", "zstd;q=0, gzip", "gzip;q=1.0, zstd;q=0.5"] {
        let (status, hd, body) = s.get(&url, &[("accept-encoding", accept)]).await;
        assert_eq!(status, StatusCode::OK, "{accept}");
        assert_eq!(h(&hd, "content-encoding"), Some("gzip"), "{accept}");
        assert_eq!(h(&hd, "content-length"), None, "gzip is streamed");
        assert_eq!(
            h(&hd, "etag"),
            Some(format!("W/\"{}+gzip\"", info.digest).as_str())
        );
        let mut plain = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&body[..]), &mut plain)
            .unwrap();
        assert_eq!(plain, data, "{accept}");
        assert!(body.len() < data.len() / 3);
    }
    for accept in ["identity", "br", "*", "zstd;q=0"] {
        let (_, hd, body) = s.get(&url, &[("accept-encoding", accept)]).await;
        assert_eq!(h(&hd, "content-encoding"), None, "{accept}");
        assert_eq!(body, data);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_only_ignores_accepted_codings() {
    let s = serve(
        StoreOptions::default(),
        ServerConfig::new().with_identity_only(true),
    )
    .await;
    let data = ndjson_of(50_000);
    let k = key("default", "j", 0, 1);
    put(&s.store, &k, &data).await;
    let (status, hd, body) = s
        .get(&url_of(&s, &k).await, &[("accept-encoding", "zstd, gzip")])
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h(&hd, "content-encoding"), None);
    assert_eq!(
        h(&hd, "etag"),
        Some(format!("\"{}\"", digest_hex(&data)).as_str())
    );
    assert_eq!(body, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_range_edge_is_answered_from_the_right_frames() {
    let s = serve(
        StoreOptions::default().with_chunk_size(1000),
        ServerConfig::new(),
    )
    .await;
    let data = ndjson_of(25_500);
    let len = data.len() as u64;
    let k = key("default", "ranges", 0, 1);
    let info = put(&s.store, &k, &data).await;
    assert_eq!(info.chunk_count, len.div_ceil(1000));
    let url = url_of(&s, &k).await;

    let cases: Vec<(String, u64, u64)> = vec![
        ("bytes=0-0".into(), 0, 0),
        (format!("bytes={}-{}", len - 1, len - 1), len - 1, len - 1),
        ("bytes=990-1009".into(), 990, 1009),
        ("bytes=999-1000".into(), 999, 1000),
        ("bytes=1000-1999".into(), 1000, 1999),
        ("bytes=2000-2000".into(), 2000, 2000),
        ("bytes=1999-1999".into(), 1999, 1999),
        ("bytes=500-20499".into(), 500, 20499),
        ("bytes=12345-".into(), 12345, len - 1),
        ("bytes=-1".into(), len - 1, len - 1),
        ("bytes=-1500".into(), len - 1500, len - 1),
        (format!("bytes=-{}", len + 10), 0, len - 1),
        (format!("bytes=25000-{}", len + 1000), 25000, len - 1),
        ("bytes=0-".into(), 0, len - 1),
    ];
    for (range, a, b) in &cases {
        // A client that accepts zstd still gets identity bytes for a range.
        let (status, hd, body) = s
            .get(&url, &[("range", range), ("accept-encoding", "zstd, gzip")])
            .await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            h(&hd, "content-range"),
            Some(format!("bytes {a}-{b}/{len}").as_str()),
            "{range}"
        );
        assert_eq!(
            h(&hd, "content-length"),
            Some((b - a + 1).to_string().as_str())
        );
        assert_eq!(h(&hd, "content-encoding"), None, "{range}");
        assert_eq!(
            h(&hd, "etag"),
            Some(format!("\"{}\"", info.digest).as_str())
        );
        assert_eq!(body, &data[*a as usize..=*b as usize], "{range}");
    }
    for range in [
        format!("bytes={len}-"),
        format!("bytes={}-{}", len + 5, len + 9),
        "bytes=-0".into(),
    ] {
        let (status, hd, body) = s.get(&url, &[("range", &range)]).await;
        assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
        assert_eq!(
            h(&hd, "content-range"),
            Some(format!("bytes */{len}").as_str())
        );
        assert_eq!(outcome_code(&hd, &body, &s.store), "invalid");
    }
    // Several ranges, another unit, or bad syntax: the whole part.
    for range in ["bytes=0-1,5-6", "items=0-5", "bytes=9-3", "bytes=x-"] {
        let (status, hd, body) = s.get(&url, &[("range", range)]).await;
        assert_eq!(status, StatusCode::OK, "{range}");
        assert_eq!(h(&hd, "content-range"), None);
        assert_eq!(body, data);
    }
    let r = s
        .send(Method::HEAD, &url, &[("range", "bytes=100-199")])
        .await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(h(r.headers(), "content-length"), Some("100"));
    assert_eq!(
        h(r.headers(), "content-range"),
        Some(format!("bytes 100-199/{len}").as_str())
    );
    assert!(r.bytes().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_downloads_resume_into_the_whole_part() {
    let s = serve(
        StoreOptions::default().with_chunk_size(4096),
        ServerConfig::new(),
    )
    .await;
    let data = ndjson_of(200_000);
    let k = key("default", "resume", 0, 1);
    put(&s.store, &k, &data).await;
    let url = url_of(&s, &k).await;

    // The first attempt breaks off after some bytes.
    let mut got = Vec::new();
    let mut r = s.send(Method::GET, &url, &[]).await;
    let etag = h(r.headers(), "etag").unwrap().to_string();
    while got.len() < 10_000 {
        got.extend_from_slice(&r.chunk().await.unwrap().unwrap());
    }
    drop(r);
    // Each resumption reads a different amount, then breaks off too.
    let mut budget = [7_001usize, 13, 40_000, 1, 65_536, usize::MAX].into_iter();
    while got.len() < data.len() {
        let have = got.len();
        let range = format!("bytes={have}-");
        let mut r = s
            .send(Method::GET, &url, &[("range", &range), ("if-range", &etag)])
            .await;
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
        assert!(h(r.headers(), "content-range")
            .unwrap()
            .starts_with(&format!("bytes {have}-")));
        let want = budget.next().unwrap_or(usize::MAX);
        while got.len() - have < want {
            match r.chunk().await.unwrap() {
                Some(c) => got.extend_from_slice(&c),
                None => break,
            }
        }
    }
    assert_eq!(got.len(), data.len());
    assert_eq!(got, data);
    assert_eq!(format!("\"{}\"", digest_hex(&got)), etag);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_range_and_conditional_requests() {
    let s = serve(
        StoreOptions::default().with_chunk_size(4096),
        ServerConfig::new(),
    )
    .await;
    let data = ndjson_of(30_000);
    let k = key("default", "cond", 0, 1);
    let info = put(&s.store, &k, &data).await;
    let url = url_of(&s, &k).await;
    let (_, hd, _) = s.get(&url, &[]).await;
    let etag = h(&hd, "etag").unwrap().to_string();
    let lm = h(&hd, "last-modified").unwrap().to_string();
    let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3600));
    let earlier = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(1_000_000));
    let weak = format!("W/{etag}");
    let listed = format!("\"x\", {etag}");
    let zstd_tag = format!("W/\"{}+zstd\"", info.digest);

    // If-Range: a strong match or the exact date serve the range.
    for (if_range, ranged) in [
        (etag.as_str(), true),
        (lm.as_str(), true),
        ("\"0000\"", false),
        (weak.as_str(), false),
        (later.as_str(), false),
    ] {
        let (status, _, body) = s
            .get(&url, &[("range", "bytes=10-19"), ("if-range", if_range)])
            .await;
        if ranged {
            assert_eq!(
                (status, &body[..]),
                (StatusCode::PARTIAL_CONTENT, &data[10..20]),
                "{if_range}"
            );
        } else {
            assert_eq!(
                (status, body.len()),
                (StatusCode::OK, data.len()),
                "{if_range}"
            );
        }
    }

    // If-None-Match (weak comparison) and If-Modified-Since.
    let cases: Vec<(Vec<(&str, &str)>, StatusCode)> = vec![
        (vec![("if-none-match", &etag)], StatusCode::NOT_MODIFIED),
        (vec![("if-none-match", &weak)], StatusCode::NOT_MODIFIED),
        (vec![("if-none-match", "*")], StatusCode::NOT_MODIFIED),
        (vec![("if-none-match", &listed)], StatusCode::NOT_MODIFIED),
        (vec![("if-none-match", "\"other\"")], StatusCode::OK),
        (vec![("if-modified-since", &lm)], StatusCode::NOT_MODIFIED),
        (
            vec![("if-modified-since", &later)],
            StatusCode::NOT_MODIFIED,
        ),
        (vec![("if-modified-since", &earlier)], StatusCode::OK),
        // If-None-Match wins over If-Modified-Since.
        (
            vec![("if-none-match", "\"other\""), ("if-modified-since", &lm)],
            StatusCode::OK,
        ),
        // Another representation has another tag.
        (
            vec![("if-none-match", &etag), ("accept-encoding", "zstd")],
            StatusCode::OK,
        ),
        (
            vec![("if-none-match", &zstd_tag), ("accept-encoding", "zstd")],
            StatusCode::NOT_MODIFIED,
        ),
    ];
    for (headers, want) in cases {
        let (status, hd, body) = s.get(&url, &headers).await;
        assert_eq!(status, want, "{headers:?}");
        if want == StatusCode::NOT_MODIFIED {
            assert!(body.is_empty());
            assert!(h(&hd, "etag").is_some() && h(&hd, "last-modified").is_some());
            assert_eq!(h(&hd, "cache-control"), Some("private"));
        } else {
            assert!(!body.is_empty());
        }
    }
    let r = s
        .send(Method::HEAD, &url, &[("if-none-match", &etag)])
        .await;
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_answers_headers_only() {
    let s = serve(
        StoreOptions::default().with_chunk_size(8192),
        ServerConfig::new(),
    )
    .await;
    let data = ndjson_of(60_000);
    let k = key("default", "head", 0, 1);
    let info = put(&s.store, &k, &data).await;
    let url = url_of(&s, &k).await;
    let r = s.send(Method::HEAD, &url, &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        h(r.headers(), "content-length"),
        Some(data.len().to_string().as_str())
    );
    assert_eq!(
        h(r.headers(), "etag"),
        Some(format!("\"{}\"", info.digest).as_str())
    );
    assert_eq!(h(r.headers(), "accept-ranges"), Some("bytes"));
    assert!(r.bytes().await.unwrap().is_empty());
    let r = s
        .send(Method::HEAD, &url, &[("accept-encoding", "zstd")])
        .await;
    assert_eq!(h(r.headers(), "content-encoding"), Some("zstd"));
    assert_eq!(
        h(r.headers(), "content-length"),
        Some(info.stored_bytes.to_string().as_str())
    );
    assert!(r.bytes().await.unwrap().is_empty());
    let missing = url.replace("/Patient-0", "/Patient-1");
    assert_eq!(
        s.send(Method::HEAD, &missing, &[]).await.status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_part_is_served_as_empty_identity() {
    let s = serve(StoreOptions::default(), ServerConfig::new()).await;
    let k = key("default", "empty", 0, 1);
    let info = put(&s.store, &k, b"").await;
    assert_eq!(info.chunk_count, 0);
    let url = url_of(&s, &k).await;
    let (status, hd, body) = s.get(&url, &[("accept-encoding", "zstd, gzip")]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h(&hd, "content-encoding"), None);
    assert_eq!(h(&hd, "content-length"), Some("0"));
    assert_eq!(
        h(&hd, "etag"),
        Some(format!("\"{}\"", digest_hex(b"")).as_str())
    );
    assert!(body.is_empty());
    let (status, hd, _) = s.get(&url, &[("range", "bytes=0-")]).await;
    assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(h(&hd, "content-range"), Some("bytes */0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_staged_and_deleted_parts_are_404_operation_outcomes() {
    let s = serve(
        StoreOptions::default().with_chunk_size(1024),
        ServerConfig::new(),
    )
    .await;
    let data = ndjson_of(20_000);
    let done = key("default", "done", 0, 1);
    put(&s.store, &done, &data).await;
    // Staged: written and flushed, never finalized.
    let staged = key("default", "staged", 0, 1);
    let mut w = s.store.open_writer(&staged).await.unwrap();
    w.writer.write_all(&data).await.unwrap();
    w.writer.flush().await.unwrap();
    // Deleted after finalizing.
    let deleted = key("default", "deleted", 0, 1);
    put(&s.store, &deleted, &data).await;
    let tenant = TenantContext::new(TenantId::new("default"));
    s.store
        .delete_job_outputs(&tenant, &ExportJobId::from("deleted"))
        .await
        .unwrap();

    let b = &s.base;
    for url in [
        url_of(&s, &staged).await,
        url_of(&s, &deleted).await,
        url_of(&s, &key("default", "never", 0, 1)).await,
        format!("{b}/export-file/done/Patient-1"),
        format!("{b}/export-file/done/Observation-0"),
        format!("{b}/export-file/done/Patient"),
        format!("{b}/export-file/done/Patient-00"),
        format!("{b}/export-file/done"),
        format!("{b}/nothing/here"),
        format!("{b}/other/export-file/done/Patient-0"),
    ] {
        let (status, hd, body) = s.get(&url, &[]).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{url}");
        assert_eq!(outcome_code(&hd, &body, &s.store), "not-found", "{url}");
    }
    let long = "x".repeat(300);
    let (status, hd, body) = s
        .get(&format!("{b}/export-file/{long}/Patient-0"), &[])
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(outcome_code(&hd, &body, &s.store), "invalid");
    let (status, _, _) = s
        .get(&format!("{b}/export-file/%FF%FE/Patient-0"), &[])
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let r = s.send(Method::DELETE, &url_of(&s, &done).await, &[]).await;
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(h(r.headers(), "allow"), Some("GET, HEAD"));
    // The staged part finalizes fine afterwards and is then served.
    w.byte_count = data.len() as u64;
    s.store.finalize_part(&staged, w).await.unwrap();
    let (status, _, body) = s.get(&url_of(&s, &staged).await, &[]).await;
    assert_eq!((status, body == data), (StatusCode::OK, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_latest_finished_token_of_a_slot_is_served() {
    let s = serve(StoreOptions::default(), ServerConfig::new()).await;
    let first = ndjson_of(5_000);
    let second = ndjson_of(9_000);
    put(&s.store, &key("default", "fenced", 0, 1), &first).await;
    put(&s.store, &key("default", "fenced", 0, 2), &second).await;
    // A newer claim still staging changes nothing yet.
    let mut w = s
        .store
        .open_writer(&key("default", "fenced", 0, 3))
        .await
        .unwrap();
    w.write_line("{\"resourceType\":\"Patient\"}")
        .await
        .unwrap();
    w.flush().await.unwrap();
    let url = url_of(&s, &key("default", "fenced", 0, 1)).await;
    let (status, hd, body) = s.get(&url, &[]).await;
    assert_eq!((status, body == second), (StatusCode::OK, true));
    assert_eq!(
        h(&hd, "etag"),
        Some(format!("\"{}\"", digest_hex(&second)).as_str())
    );
    drop(w);
    // An error file is served at its own route when no output file has it.
    let err = ExportPartKey::error(
        "default",
        ExportJobId::from("fenced"),
        "OperationOutcome",
        0,
        2,
    );
    let oo = b"{\"resourceType\":\"OperationOutcome\"}\n";
    put(&s.store, &err, oo).await;
    let (status, _, body) = s.get(&url_of(&s, &err).await, &[]).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &oo[..]));
}

const DEFAULT_SECRET: &str = "default-secret-0123456789";
const ACME_SECRET: &str = "acme-secret-abcdefghijklmn";
const RESEARCH_SECRET: &str = "research-secret-opqrstuvwxyz";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_are_bound_to_one_tenant_by_every_path() {
    let config = ServerConfig::new()
        .with_token("default", DEFAULT_SECRET)
        .with_token("acme", ACME_SECRET)
        .with_token("acme/research", RESEARCH_SECRET);
    let s = serve(StoreOptions::default(), config).await;
    // The same job id in three tenants, each with its own content.
    let mine = ndjson_of(3_000);
    let acme = ndjson_of(4_000);
    let research = ndjson_of(5_000);
    put(&s.store, &key("default", "shared-job", 0, 1), &mine).await;
    put(&s.store, &key("acme", "shared-job", 0, 1), &acme).await;
    put(
        &s.store,
        &key("acme/research", "shared-job", 0, 1),
        &research,
    )
    .await;
    put(&s.store, &key("default", "only-default", 0, 1), &mine).await;
    let b = &s.base;
    let default_url = format!("{b}/export-file/shared-job/Patient-0");
    let acme_url = format!("{b}/acme/export-file/shared-job/Patient-0");
    let research_url = format!("{b}/acme%2Fresearch/export-file/shared-job/Patient-0");
    let bearer = |t: &str| format!("Bearer {t}");

    let (status, hd, body) = s.get(&default_url, &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        h(&hd, "www-authenticate"),
        Some("Bearer realm=\"export-file\"")
    );
    assert_eq!(outcome_code(&hd, &body, &s.store), "login");
    for wrong in [
        "Bearer nope-nope-nope-nope-nope",
        "Bearer",
        "Basic YWNtZTpzZWNyZXQ=",
    ] {
        let (status, hd, _) = s.get(&default_url, &[("authorization", wrong)]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{wrong}");
        assert!(h(&hd, "www-authenticate").unwrap().starts_with("Bearer"));
    }
    let (status, hd, _) = s
        .get(
            &default_url,
            &[("authorization", &bearer(&DEFAULT_SECRET[..20]))],
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(h(&hd, "www-authenticate")
        .unwrap()
        .contains("invalid_token"));

    let allowed = [
        (&default_url, DEFAULT_SECRET, &mine),
        (&acme_url, ACME_SECRET, &acme),
        (&research_url, RESEARCH_SECRET, &research),
    ];
    for (url, secret, want) in allowed {
        let (status, _, body) = s.get(url, &[("authorization", &bearer(secret))]).await;
        assert_eq!(status, StatusCode::OK, "{url}");
        assert_eq!(&body, want, "{url}");
    }
    let refused = [
        (&default_url, ACME_SECRET),
        (&default_url, RESEARCH_SECRET),
        (&acme_url, DEFAULT_SECRET),
        (&acme_url, RESEARCH_SECRET),
        (&research_url, ACME_SECRET),
    ];
    for (url, secret) in refused {
        let (status, hd, body) = s.get(url, &[("authorization", &bearer(secret))]).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{url} with {secret}");
        assert!(h(&hd, "www-authenticate")
            .unwrap()
            .contains("insufficient_scope"));
        assert_eq!(outcome_code(&hd, &body, &s.store), "forbidden");
    }
    // A tenant's own path never falls back to another tenant's part.
    let (status, _, _) = s
        .get(
            &format!("{b}/acme/export-file/only-default/Patient-0"),
            &[("authorization", &bearer(ACME_SECRET))],
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, body) = s
        .get(
            &format!("{b}/default/export-file/only-default/Patient-0"),
            &[("authorization", &bearer(DEFAULT_SECRET))],
        )
        .await;
    assert_eq!((status, body == mine), (StatusCode::OK, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_urls_need_no_token_and_refuse_tampering_expiry_and_other_tenants() {
    let signing = b"signing-key-0123456789abcdef".to_vec();
    let config = ServerConfig::new().with_token("default", DEFAULT_SECRET);
    let s = serve(
        StoreOptions::default().with_signing_key(signing.clone()),
        config,
    )
    .await;
    let data = ndjson_of(20_000);
    let k = key("default", "signed", 0, 1);
    put(&s.store, &k, &data).await;
    put(&s.store, &key("default", "signed", 1, 1), &data).await;
    put(&s.store, &key("acme", "signed", 0, 1), &data).await;
    let minted = s
        .store
        .download_url(&k, Duration::from_secs(600))
        .await
        .unwrap();
    assert!(!minted.requires_access_token);
    let url = minted.url;
    assert!(url.contains("?expires=") && url.contains("&signature="));

    let (status, _, body) = s.get(&url, &[]).await;
    assert_eq!((status, body == data), (StatusCode::OK, true));
    assert_eq!(
        s.send(Method::HEAD, &url, &[]).await.status(),
        StatusCode::OK
    );

    let (head, sig) = url.split_once("&signature=").unwrap();
    let flipped = format!(
        "{head}&signature={}{}",
        if sig.starts_with('0') { '1' } else { '0' },
        &sig[1..]
    );
    let (path_and_q, _) = url.split_once("?").unwrap();
    let expires: u64 = head.split_once("expires=").unwrap().1.parse().unwrap();
    let later = format!("{path_and_q}?expires={}&signature={sig}", expires + 1);
    let moved = url.replace("/Patient-0?", "/Patient-1?");
    let other_tenant = url.replace("/export-file/", "/acme/export-file/");
    let no_expiry = format!("{path_and_q}?signature={sig}");
    for bad in [&flipped, &later, &moved, &other_tenant, &no_expiry] {
        let (status, hd, body) = s.get(bad, &[]).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{bad}");
        assert_eq!(outcome_code(&hd, &body, &s.store), "forbidden", "{bad}");
    }
    // Expired: a correct signature whose time is over.
    let path = sqlite_export_store::__test_support::url::route_path("signed", "Patient", 0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let old =
        sqlite_export_store::__test_support::url::sign(&signing, "GET", "default", &path, now - 10);
    let expired = format!("{}{path}?expires={}&signature={old}", s.base, now - 10);
    let (status, hd, body) = s.get(&expired, &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(outcome_code(&hd, &body, &s.store), "expired");
    // Another tenant's URL is signed for that tenant and served on its path.
    let acme =
        sqlite_export_store::__test_support::url::sign(&signing, "GET", "acme", &path, now + 60);
    let acme_url = format!(
        "{}/acme{path}?expires={}&signature={acme}",
        s.base,
        now + 60
    );
    assert_eq!(s.get(&acme_url, &[]).await.0, StatusCode::OK);
    let misplaced = acme_url.replace("/acme/export-file/", "/export-file/");
    assert_eq!(s.get(&misplaced, &[]).await.0, StatusCode::FORBIDDEN);
    // Without a signature the token rule applies.
    assert_eq!(s.get(path_and_q, &[]).await.0, StatusCode::UNAUTHORIZED);
    let with_token = s
        .get(
            path_and_q,
            &[("authorization", &format!("Bearer {DEFAULT_SECRET}"))],
        )
        .await;
    assert_eq!(with_token.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_live_under_the_base_url_path() {
    let s = serve_at("/fhir/r4", StoreOptions::default(), ServerConfig::new()).await;
    let data = ndjson_of(2_000);
    let k = key("default", "prefixed", 0, 1);
    put(&s.store, &k, &data).await;
    let url = url_of(&s, &k).await;
    assert!(url.starts_with(&format!("{}/fhir/r4/export-file/", s.base)));
    let (status, _, body) = s.get(&url, &[]).await;
    assert_eq!((status, body == data), (StatusCode::OK, true));
    let (status, _, _) = s
        .get(&format!("{}/export-file/prefixed/Patient-0", s.base), &[])
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_frames_never_reach_the_client_as_a_complete_download() {
    let s = serve(
        StoreOptions::default().with_chunk_size(2048),
        ServerConfig::new(),
    )
    .await;
    let data = ndjson_of(40_000);
    let (first, last) = (
        key("default", "bad-first", 0, 1),
        key("default", "bad-last", 0, 1),
    );
    put(&s.store, &first, &data).await;
    let info = put(&s.store, &last, &data).await;
    // Damage one frame of each behind the store's back.
    let c = rusqlite::Connection::open(s.store.path()).unwrap();
    c.execute_batch("DROP TRIGGER chunks_of_finished_parts_are_immutable")
        .unwrap();
    let damage = |job: &str, seq: u64| {
        c.execute(
            "UPDATE chunks SET frame = substr(frame, 1, 20) || x'00ff00ff' || substr(frame, 25) \
             WHERE seq = ?2 AND part_id = (SELECT id FROM parts WHERE job_id = ?1)",
            rusqlite::params![job, seq as i64],
        )
        .unwrap()
    };
    assert_eq!(damage("bad-first", 0), 1);
    assert_eq!(damage("bad-last", info.chunk_count - 1), 1);
    // Damage in the first frame is found before any header goes out.
    let (status, hd, body) = s.get(&url_of(&s, &first).await, &[]).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(outcome_code(&hd, &body, &s.store), "exception");
    // Later damage aborts the body: the client sees an error, not a file.
    let r = s.send(Method::GET, &url_of(&s, &last).await, &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.bytes().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_deleted_while_it_streams_fails_the_download() {
    use http_body_util::BodyExt;
    let s = serve(
        StoreOptions::default().with_chunk_size(16 * 1024),
        ServerConfig::new(),
    )
    .await;
    let data = ndjson_of(6 << 20);
    let tenant = TenantContext::new(TenantId::new("default"));
    for (job, accept) in [
        ("del-identity", "identity"),
        ("del-zstd", "zstd"),
        ("del-gzip", "gzip"),
    ] {
        let k = key("default", job, 0, 1);
        let info = put(&s.store, &k, &data).await;
        let url = url_of(&s, &k).await;
        let path = url.strip_prefix(&s.base).unwrap();
        let resp = narrow_get(s.addr, path, accept).await;
        assert_eq!(resp.status(), 200, "{job}");
        let full = match accept {
            "zstd" => info.stored_bytes,
            _ => info.size_bytes,
        };
        let mut body = resp.into_body();
        let mut got = 0u64;
        while got < 4096 {
            let f = body.frame().await.unwrap().unwrap();
            got += f.data_ref().map_or(0, |d| d.len() as u64);
        }
        s.store
            .delete_job_outputs(&tenant, &ExportJobId::from(job))
            .await
            .unwrap();
        let failed = loop {
            match body.frame().await {
                Some(Ok(f)) => got += f.data_ref().map_or(0, |d| d.len() as u64),
                Some(Err(_)) => break true,
                None => break false,
            }
        };
        assert!(
            failed,
            "{job}: the body ended cleanly after {got} of {full} bytes"
        );
        assert!(got < full, "{job}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_holds_no_database_connection() {
    // One pooled connection, given up after 2 s: if the stalled download
    // held it, the other requests would fail with 503.
    let s = serve(
        StoreOptions::default()
            .with_chunk_size(8 * 1024)
            .with_pool_size(1)
            .with_busy_timeout(Duration::from_millis(100)),
        ServerConfig::new(),
    )
    .await;
    let big = ndjson_of(4 << 20);
    let small = ndjson_of(10_000);
    let (kb, ks) = (key("default", "big", 0, 1), key("default", "small", 0, 1));
    put(&s.store, &kb, &big).await;
    put(&s.store, &ks, &small).await;
    let (big_url, small_url) = (url_of(&s, &kb).await, url_of(&s, &ks).await);
    let mut stalled = Vec::new();
    for accept in ["identity", "zstd", "identity"] {
        let mut r = s
            .send(Method::GET, &big_url, &[("accept-encoding", accept)])
            .await;
        r.chunk().await.unwrap().unwrap();
        stalled.push(r);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..5 {
        let t = Instant::now();
        let (status, _, body) = s.get(&small_url, &[]).await;
        assert_eq!((status, body == small), (StatusCode::OK, true));
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t.elapsed()
        );
    }
    // The stalled downloads are intact when they go on.
    let mut r = stalled.remove(0);
    let mut rest = Vec::new();
    while let Some(c) = r.chunk().await.unwrap() {
        rest.extend_from_slice(&c);
    }
    assert!(big.ends_with(&rest) && !rest.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_throughput_is_measured_for_every_wire_form() {
    use sqlite_export_store::server::{measure_throughput, WireForm};
    let store = SqliteOutputStore::temporary_with(
        "http://127.0.0.1:9",
        StoreOptions::default().with_chunk_size(64 * 1024),
    )
    .unwrap();
    let k = key("acme", "bench", 0, 4);
    let info = put(&store, &k, &ndjson_of(1 << 20)).await;
    for form in [
        WireForm::Identity,
        WireForm::Zstd,
        WireForm::Gzip,
        WireForm::MemoryBaseline,
    ] {
        let mut any_token = k.clone();
        any_token.fencing_token = 0;
        let t = measure_throughput(&store, &any_token, form, 6, 3)
            .await
            .unwrap();
        assert_eq!((t.downloads, t.ndjson_bytes), (6, 6 * info.size_bytes));
        match form {
            WireForm::Zstd => assert_eq!(t.wire_bytes, 6 * info.stored_bytes),
            WireForm::Gzip => assert!(t.wire_bytes > 0 && t.wire_bytes < t.ndjson_bytes / 2),
            _ => assert_eq!(t.wire_bytes, t.ndjson_bytes),
        }
        assert!(t.ndjson_mib_per_sec() > 0.0);
        println!("{form:?}: {:.1} MiB/s of NDJSON", t.ndjson_mib_per_sec());
    }
}

/// Captures every log line of this test binary.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// The log line that names `request_id`, waiting briefly for it.
    async fn line_of(&self, request_id: &str) -> String {
        for _ in 0..200 {
            let text = String::from_utf8_lossy(&self.0.lock().unwrap()).to_string();
            if let Some(l) = text
                .lines()
                .find(|l| l.contains(&format!("request_id={request_id} ")))
            {
                return l.to_string();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no log line for request {request_id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_response_is_logged_with_request_id_status_bytes_and_duration() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let s = serve(
        StoreOptions::default().with_chunk_size(4096),
        ServerConfig::new(),
    )
    .await;
    let data = ndjson_of(2 << 20);
    let k = key("default", "logged", 0, 1);
    put(&s.store, &k, &data).await;
    let url = url_of(&s, &k).await;

    let (_, hd, body) = s.get(&url, &[]).await;
    let line = logs.line_of(h(&hd, "x-request-id").unwrap()).await;
    for field in [
        "status=200".to_string(),
        format!("bytes={}", body.len()),
        "duration_ms=".into(),
        "outcome=\"complete\"".into(),
        "method=GET".into(),
        "path=/export-file/logged/Patient-0".into(),
    ] {
        assert!(line.contains(&field), "{field} missing from {line}");
    }
    let (_, hd, _) = s
        .get(&format!("{}/export-file/logged/Patient-9", s.base), &[])
        .await;
    let line = logs.line_of(h(&hd, "x-request-id").unwrap()).await;
    assert!(line.contains("status=404"), "{line}");
    // A client that leaves midway is logged as such.
    let r = narrow_get(s.addr, url.strip_prefix(&s.base).unwrap(), "identity").await;
    let id = h(r.headers(), "x-request-id").unwrap().to_string();
    let mut body = r.into_body();
    http_body_util::BodyExt::frame(&mut body)
        .await
        .unwrap()
        .unwrap();
    drop(body);
    let line = logs.line_of(&id).await;
    assert!(line.contains("outcome=\"disconnected\""), "{line}");
}
