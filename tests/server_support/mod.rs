//! Shared by the download server's test binaries: real Synthea data, a
//! store served on 127.0.0.1:0, and small HTTP helpers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use sqlite_export_store::__test_support::sample;
use sqlite_export_store::server::{self, ServerConfig};
use sqlite_export_store::{
    ExportJobId, ExportOutputStore, ExportPartKey, PartInfo, SqliteOutputStore, StoreOptions,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// Real Synthea NDJSON, whole lines cycled until at least `size` bytes.
pub fn ndjson_of(size: usize) -> Vec<u8> {
    let mut source = Vec::new();
    for f in ["Condition.000.ndjson", "Encounter.000.ndjson"] {
        source.extend(sample::synthea_file(f).unwrap_or_else(|e| panic!("{e}")));
    }
    let lines: Vec<&[u8]> = source.split_inclusive(|&b| b == b'\n').collect();
    let mut out = Vec::with_capacity(size + 64 * 1024);
    for line in lines.iter().cycle() {
        if out.len() >= size {
            break;
        }
        out.extend_from_slice(line);
    }
    out
}

/// Lowercase hex XXH3-128 of `b` (high half first, as `xxhsum -H2`
/// prints it): the part digest the store records by default, and so the
/// strong ETag of a download.
pub fn digest_hex(b: &[u8]) -> String {
    format!("{:032x}", twox_hash::XxHash3_128::oneshot(b))
}

pub struct Served {
    pub store: SqliteOutputStore,
    pub base: String,
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    _stop: oneshot::Sender<()>,
}

/// A temporary store whose base URL is the server's own address (plus
/// `path`), served by the router on 127.0.0.1:0.
pub async fn serve_at(path: &str, options: StoreOptions, config: ServerConfig) -> Served {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let base = format!("http://{addr}");
    let store = SqliteOutputStore::temporary_with(&format!("{base}{path}"), options).unwrap();
    let router = server::router(store.clone(), config).unwrap();
    let (stop, stopped) = oneshot::channel();
    tokio::spawn(server::serve(listener, router, async move {
        let _ = stopped.await;
    }));
    Served {
        store,
        base,
        addr,
        http: reqwest::Client::new(),
        _stop: stop,
    }
}

pub async fn serve(options: StoreOptions, config: ServerConfig) -> Served {
    serve_at("", options, config).await
}

/// Writes `bytes` as one part and finalizes it.
pub async fn put(store: &SqliteOutputStore, key: &ExportPartKey, bytes: &[u8]) -> PartInfo {
    let mut w = store.open_writer(key).await.unwrap();
    w.writer.write_all(bytes).await.unwrap();
    w.byte_count = bytes.len() as u64;
    w.line_count = bytes.iter().filter(|&&b| b == b'\n').count() as u64;
    store.finalize_part(key, w).await.unwrap();
    store.part_info(key).await.unwrap()
}

pub fn key(tenant: &str, job: &str, index: u32, token: u64) -> ExportPartKey {
    ExportPartKey::output(tenant, ExportJobId::from(job), "Patient", index, token)
}

pub async fn url_of(s: &Served, key: &ExportPartKey) -> String {
    s.store
        .download_url(key, Duration::from_secs(3600))
        .await
        .unwrap()
        .url
}

impl Served {
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut r = self.http.request(method, url);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.send().await.unwrap()
    }

    pub async fn get(
        &self,
        url: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, Vec<u8>) {
        let r = self.send(Method::GET, url, headers).await;
        let (status, h) = (r.status(), r.headers().clone());
        (status, h, r.bytes().await.unwrap().to_vec())
    }
}

pub fn h<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.to_str().unwrap())
}

/// Checks a FHIR OperationOutcome error body and returns its issue code.
pub fn outcome_code(headers: &HeaderMap, body: &[u8], store: &SqliteOutputStore) -> String {
    assert_eq!(h(headers, "content-type"), Some("application/fhir+json"));
    let text = std::str::from_utf8(body).unwrap();
    let dir = store.path().parent().unwrap().to_str().unwrap();
    for secret in [dir, "SELECT", "sqlite", "chunks", ".db"] {
        assert!(!text.contains(secret), "{secret:?} leaked: {text}");
    }
    let v: serde_json::Value = serde_json::from_str(text).unwrap();
    assert_eq!(v["resourceType"], "OperationOutcome");
    assert_eq!(v["issue"][0]["severity"], "error");
    assert!(v["issue"][0]["diagnostics"]
        .as_str()
        .is_some_and(|d| !d.is_empty()));
    v["issue"][0]["code"].as_str().unwrap().to_string()
}

/// One GET over a socket whose receive buffer is small, so the server
/// cannot push the whole body into kernel buffers ahead of the reader.
pub async fn narrow_get(
    addr: SocketAddr,
    path: &str,
    accept: &str,
) -> hyper::Response<hyper::body::Incoming> {
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
        .header("accept-encoding", accept)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    sender.send_request(req).await.unwrap()
}

/// `export-store serve`, the real binary, started on `127.0.0.1:0` with
/// `args` after `serve --db DB --addr 127.0.0.1:0`; killed when dropped, so
/// a test that fails midway leaves no server behind. Its standard error
/// (the logs) goes to a file, readable at any time and never a pipe that a
/// long test could fill until the server blocks.
pub struct ServeProcess {
    /// The running binary.
    pub child: std::process::Child,
    /// `http://127.0.0.1:PORT`, from its first line of output.
    pub base: String,
    log: tempfile::NamedTempFile,
}

impl ServeProcess {
    /// Starts the binary and waits for its `listening on URL` line.
    pub fn start(db: &std::path::Path, args: &[&std::ffi::OsStr]) -> ServeProcess {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_export-store"))
            .arg("serve")
            .arg("--db")
            .arg(db)
            .args(["--addr", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        let mut process = ServeProcess {
            child,
            base: String::new(),
            log,
        };
        process.base = match first.trim().strip_prefix("listening on ") {
            Some(base) => base.to_string(),
            None => panic!("unexpected first line {first:?}: {}", process.logs()),
        };
        process
    }

    /// Everything it has logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Stops the binary (SIGKILL) and returns everything it logged.
    pub fn kill_and_read_logs(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.logs()
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
