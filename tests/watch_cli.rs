//! `export-store serve --metrics-addr`: the real binary over real TCP.
//! Downloads in every encoding, then `/metrics` scraped and parsed (the
//! Prometheus text format) to check that each figure moved by what the
//! client saw; `/healthz` before and after the database file is removed;
//! and, without the flag, neither path on any port.
#![cfg(feature = "server")]

mod server_support;
mod watch_support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use server_support::{key, ndjson_of, put};
use sqlite_export_store::{PartInfo, SqliteOutputStore};
use watch_support::{scrape, scrape_typed, Scrape};

const TOKEN: &str = "watch-token-0123456789abcdef";
const ROUTE: &str = "/export-file/{job_id}/{file}";
const UNMATCHED: &str = "<unmatched>";

#[test]
fn the_parser_reads_labels_escapes_and_histograms() {
    let s = Scrape::parse(
        "# HELP a_total Things.\n# TYPE a_total counter\n\
         a_total{route=\"/x/{id}\",q=\"say \\\"hi\\\"\\\\\"} 3\n\
         # TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.5\nh_count 2\n\
         # TYPE g gauge\ng 1.5e3\n",
    );
    assert_eq!(
        s.value("a_total", &[("route", "/x/{id}"), ("q", "say \"hi\"\\")]),
        3.0
    );
    assert_eq!(s.value("h_bucket", &[("le", "+Inf")]), 2.0);
    assert_eq!((s.value("h_count", &[]), s.value("g", &[])), (2.0, 1500.0));
    assert_eq!(s.kind("h"), "histogram");
    assert!(std::panic::catch_unwind(|| Scrape::parse("undeclared 1\n")).is_err());
}

// ---------------------------------------------------------------------------
// The binary
// ---------------------------------------------------------------------------

/// `export-store serve` started on `127.0.0.1:0`; killed when dropped.
struct Serve {
    child: Child,
    stdout: BufReader<ChildStdout>,
    log: PathBuf,
    base: String,
    /// `http://ADDR` of the metrics listener, when started with one.
    metrics: Option<String>,
}

impl Serve {
    fn start(db: &Path, args: &[&str], with_metrics: bool) -> Serve {
        let log = db.with_extension("log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_export-store"));
        cmd.arg("serve")
            .arg("--db")
            .arg(db)
            .args(["--addr", "127.0.0.1:0"])
            .args(args);
        if with_metrics {
            cmd.args(["--metrics-addr", "127.0.0.1:0"]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut s = Serve {
            child,
            stdout,
            log,
            base: String::new(),
            metrics: None,
        };
        s.base = s.line("listening on ");
        if with_metrics {
            s.metrics = Some(s.line("metrics on "));
        }
        s
    }

    /// The next line of standard output, which must start with `prefix`;
    /// what follows it.
    fn line(&mut self, prefix: &str) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        match line.trim().strip_prefix(prefix) {
            Some(rest) => rest.to_string(),
            None => panic!(
                "expected `{prefix}…` on standard output, got {line:?}; log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            ),
        }
    }

    fn metrics(&self) -> &str {
        self.metrics.as_deref().unwrap()
    }

    /// Kills the process; everything else it printed on standard output.
    fn kill_and_read_stdout(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut rest = String::new();
        self.stdout.read_to_string(&mut rest).unwrap();
        rest
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three finished parts of the default tenant, job `job`: small (one
/// chunk), medium (three chunks) and large (enough that a client that
/// does not read keeps its download open).
async fn store_with_parts(dir: &Path) -> (PathBuf, Vec<(Vec<u8>, PartInfo)>) {
    let db = dir.join("export-store.db");
    let store = SqliteOutputStore::open(&db, "http://127.0.0.1:1").unwrap();
    let mut parts = Vec::new();
    for (i, size) in [200_000, 2_500_000, 12 << 20].into_iter().enumerate() {
        let data = ndjson_of(size);
        let info = put(&store, &key("default", "job", i as u32, 1), &data).await;
        parts.push((data, info));
    }
    (db, parts)
}

/// What the client sent and received: requests by (method, route, status)
/// and body bytes by encoding.
#[derive(Default)]
struct Seen {
    requests: HashMap<(&'static str, &'static str, u16), u64>,
    bytes: HashMap<String, u64>,
}

impl Seen {
    async fn send(
        &mut self,
        http: &reqwest::Client,
        method: Method,
        route: &'static str,
        url: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Vec<u8>) {
        let mut req = http.request(method.clone(), url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = req.send().await.unwrap();
        let status = r.status();
        let encoding = r
            .headers()
            .get("content-encoding")
            .map_or("identity".to_string(), |v| v.to_str().unwrap().to_string());
        let body = r.bytes().await.unwrap().to_vec();
        let m = match method.as_str() {
            "GET" => "GET",
            "HEAD" => "HEAD",
            _ => "other",
        };
        *self
            .requests
            .entry((m, route, status.as_u16()))
            .or_default() += 1;
        *self.bytes.entry(encoding).or_default() += body.len() as u64;
        (status, body)
    }
}

/// A GET with the token over a socket whose receive buffer is small, so
/// that the server cannot push a large body into kernel buffers ahead of
/// a reader that does not read.
async fn stalled_get(addr: SocketAddr, path: &str) -> hyper::Response<hyper::body::Incoming> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", addr.to_string())
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("accept-encoding", "identity")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    sender.send_request(req).await.unwrap()
}

/// Scrapes until `done` holds (at most 30 s): the server notices a client
/// that left only when it next writes.
async fn scrape_until(http: &reqwest::Client, metrics: &str, done: impl Fn(&Scrape) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = scrape(http, metrics).await;
        if done(&s) {
            return;
        }
        assert!(Instant::now() < deadline, "never reached:\n{}", s.text);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn file_len(p: &Path) -> f64 {
    std::fs::metadata(p).map_or(0, |m| m.len()) as f64
}

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_clients_received_and_health_follows_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let (db, parts) = store_with_parts(dir.path()).await;
    let serve = Serve::start(&db, &["--token", TOKEN], true);
    let (base, metrics) = (serve.base.clone(), serve.metrics().to_string());
    let http = reqwest::Client::new();
    let auth = ("authorization", format!("Bearer {TOKEN}"));
    let auth = (auth.0, auth.1.as_str());
    let url = |i: u32| format!("{base}/export-file/job/Patient-{i}");

    // Healthy, without any token, and the metrics port serves no download.
    let r = http.get(format!("{metrics}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["status"], "ok");
    let r = http
        .get(format!("{metrics}/export-file/job/Patient-0"))
        .header(auth.0, auth.1)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    let mut seen = Seen::default();
    let identity = [("accept-encoding", "identity"), auth];
    let (status, body) = seen
        .send(&http, Method::GET, ROUTE, &url(0), &identity)
        .await;
    assert_eq!((status, body.len()), (StatusCode::OK, parts[0].0.len()));
    let (status, body) = seen
        .send(&http, Method::GET, ROUTE, &url(1), &identity)
        .await;
    assert_eq!((status, body.len()), (StatusCode::OK, parts[1].0.len()));
    let (status, zstd_body) = seen
        .send(
            &http,
            Method::GET,
            ROUTE,
            &url(0),
            &[("accept-encoding", "zstd"), auth],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(zstd_body.len() as u64, parts[0].1.stored_bytes);
    let (status, gzip_body) = seen
        .send(
            &http,
            Method::GET,
            ROUTE,
            &url(1),
            &[("accept-encoding", "gzip"), auth],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(!gzip_body.is_empty());
    let (status, _) = seen
        .send(
            &http,
            Method::GET,
            ROUTE,
            &url(0),
            &[("range", "bytes=0-99"), auth],
        )
        .await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    let (status, _) = seen
        .send(&http, Method::HEAD, ROUTE, &url(0), &identity)
        .await;
    assert_eq!(status, StatusCode::OK);
    let etag = format!("\"{}\"", parts[0].1.digest);
    let (status, _) = seen
        .send(
            &http,
            Method::GET,
            ROUTE,
            &url(0),
            &[("if-none-match", &etag), auth],
        )
        .await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    let (status, _) = seen.send(&http, Method::GET, ROUTE, &url(7), &[auth]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The main port's token check is unaffected.
    let (status, _) = seen.send(&http, Method::GET, ROUTE, &url(0), &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = seen
        .send(&http, Method::POST, ROUTE, &url(0), &[auth])
        .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    // Neither path is on the main port, token or not.
    for path in ["/metrics", "/healthz"] {
        let (status, _) = seen
            .send(
                &http,
                Method::GET,
                UNMATCHED,
                &format!("{base}{path}"),
                &[auth],
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }

    let (s, content_type) = scrape_typed(&http, &metrics).await;
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    let requests = "export_store_http_requests_total";
    assert_eq!(s.kind(requests), "counter");
    let rendered: u64 = s.all(requests).iter().map(|x| x.value as u64).sum();
    assert_eq!(rendered, seen.requests.values().sum::<u64>(), "{}", s.text);
    for ((method, route, status), n) in &seen.requests {
        let labels = [
            ("method", *method),
            ("route", *route),
            ("status", &status.to_string()),
        ];
        assert_eq!(
            s.value(requests, &labels),
            *n as f64,
            "{labels:?}\n{}",
            s.text
        );
    }
    let sent = "export_store_sent_bytes_total";
    assert_eq!(s.kind(sent), "counter");
    for encoding in ["identity", "zstd", "gzip"] {
        let client = seen.bytes.get(encoding).copied().unwrap_or(0);
        assert_eq!(
            s.value(sent, &[("encoding", encoding)]),
            client as f64,
            "{encoding}"
        );
    }
    assert_eq!(seen.bytes["zstd"], zstd_body.len() as u64);
    assert_eq!(seen.bytes["gzip"], gzip_body.len() as u64);
    let duration = "export_store_download_duration_seconds";
    assert_eq!(s.kind(duration), "histogram");
    for (encoding, downloads) in [("identity", 3.0), ("zstd", 1.0), ("gzip", 1.0)] {
        let labels = [("encoding", encoding), ("outcome", "complete")];
        let count = s.value(&format!("{duration}_count"), &labels);
        assert_eq!(count, downloads, "{encoding}\n{}", s.text);
        let inf = [labels[0], labels[1], ("le", "+Inf")];
        assert_eq!(s.value(&format!("{duration}_bucket"), &inf), downloads);
        assert!(s.value(&format!("{duration}_sum"), &labels) > 0.0);
    }
    let counted: f64 = s
        .all(&format!("{duration}_count"))
        .iter()
        .map(|x| x.value)
        .sum();
    assert_eq!(counted, 5.0, "HEAD, 304 and errors are no downloads");
    assert_eq!(s.kind("export_store_open_downloads"), "gauge");
    assert_eq!(s.get("export_store_open_downloads", &[]), Some(0.0));

    // The store's figures are the store's own; the file sizes are the
    // files' (nothing writes meanwhile).
    let figure = |name: &str| {
        assert_eq!(s.kind(name), "gauge", "{name}");
        s.get(name, &[]).unwrap_or_else(|| panic!("no {name}"))
    };
    assert_eq!(figure("export_store_finished_parts"), parts.len() as f64);
    let ndjson: u64 = parts.iter().map(|(d, _)| d.len() as u64).sum();
    assert_eq!(figure("export_store_ndjson_bytes"), ndjson as f64);
    let stored: u64 = parts.iter().map(|(_, i)| i.stored_bytes).sum();
    assert_eq!(figure("export_store_stored_bytes"), stored as f64);
    assert!(stored < ndjson / 4, "{stored} of {ndjson}");
    assert_eq!(figure("export_store_database_bytes"), file_len(&db));
    assert!(figure("export_store_database_bytes") > stored as f64);
    let wal = PathBuf::from(format!("{}-wal", db.display()));
    assert_eq!(figure("export_store_wal_bytes"), file_len(&wal));

    // A download whose client stops reading stays open; once the client
    // leaves, it ends as disconnected.
    let addr: SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    let stalled = stalled_get(addr, "/export-file/job/Patient-2").await;
    assert_eq!(stalled.status(), hyper::StatusCode::OK);
    let open = |n: f64| move |s: &Scrape| s.get("export_store_open_downloads", &[]) == Some(n);
    scrape_until(&http, &metrics, open(1.0)).await;
    drop(stalled);
    let left = [("encoding", "identity"), ("outcome", "disconnected")];
    scrape_until(&http, &metrics, move |s| {
        open(0.0)(s) && s.value(&format!("{duration}_count"), &left) == 1.0
    })
    .await;
    let s = scrape(&http, &metrics).await;
    let ok = [("method", "GET"), ("route", ROUTE), ("status", "200")];
    assert_eq!(
        s.value(requests, &ok),
        (seen.requests[&("GET", ROUTE, 200)] + 1) as f64
    );
    let identity_sent = s.value(sent, &[("encoding", "identity")]);
    assert!(identity_sent > (seen.bytes["identity"] + 16 * 1024) as f64);
    assert!(identity_sent < (seen.bytes["identity"] + parts[2].0.len() as u64) as f64);

    // The database file removed: unhealthy, with the reason, no path.
    std::fs::remove_file(&db).unwrap();
    let r = http.get(format!("{metrics}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["status"], "unavailable");
    let reason = v["reason"].as_str().unwrap();
    assert!(reason.contains("removed or replaced"), "{reason}");
    assert!(!reason.contains(dir.path().to_str().unwrap()), "{reason}");
    // The metrics still answer: the file sizes follow the file system.
    let s = scrape(&http, &metrics).await;
    assert_eq!(s.get("export_store_database_bytes", &[]), Some(0.0));
}

#[test]
fn without_the_flag_neither_path_is_served_anywhere() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("export-store.db");
    drop(SqliteOutputStore::open(&db, "http://127.0.0.1:1").unwrap());
    let mut serve = Serve::start(&db, &[], false);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let http = reqwest::Client::new();
        for path in ["/metrics", "/healthz"] {
            let r = http
                .get(format!("{}{path}", serve.base))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
        }
    });
    let rest = serve.kill_and_read_stdout();
    assert!(!rest.contains("metrics on"), "{rest:?}");
}

#[test]
fn a_metrics_address_in_use_stops_the_start_before_anything_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("export-store.db");
    drop(SqliteOutputStore::open(&db, "http://127.0.0.1:1").unwrap());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_export-store"))
        .arg("serve")
        .arg("--db")
        .arg(&db)
        .args(["--addr", "127.0.0.1:0", "--metrics-addr"])
        .arg(taken.local_addr().unwrap().to_string())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--metrics-addr"), "{err}");
}
