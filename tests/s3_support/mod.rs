//! Shared by the `export-store copy` tests: a real S3-compatible server
//! (moto's standalone server, installed by `.ci/moto.sh`) on a free
//! loopback port, killed on drop; its request log; raw S3 calls the
//! object_store client does not make; and the binary with a clean AWS
//! environment.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore};
use sqlite_export_store::{ExportOutputStore, ExportPartKey, SqliteOutputStore};
use tokio::io::AsyncWriteExt;

/// The keys every test hands the binary and the clients; moto takes any.
pub const ACCESS_KEY: &str = "AKIDEXPORTSTORETEST";
/// See [`ACCESS_KEY`].
pub const SECRET_KEY: &str = "export-store-test-secret";
/// The region of every test.
pub const REGION: &str = "us-east-1";

/// Where `.ci/moto.sh` installs moto (or `$MOTO_VENV`).
pub fn moto_venv() -> PathBuf {
    std::env::var_os("MOTO_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/moto-venv"))
}

/// A moto S3 server on 127.0.0.1, its log in a temporary folder.
pub struct Moto {
    child: Child,
    /// Its port.
    pub port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Moto {
    /// Starts a server and waits until it answers. Panics, saying how to
    /// install it, when the virtual environment is missing.
    pub fn start() -> Moto {
        let exe = moto_venv().join("bin/moto_server");
        assert!(
            exe.is_file(),
            "{} is missing: run `bash .ci/moto.sh` first (it installs the pinned moto[server] \
             from PyPI into target/moto-venv), or set MOTO_VENV to a virtual environment with \
             moto[server]",
            exe.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("moto.log");
        let port = free_port();
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(&exe)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
        let mut moto = Moto {
            child,
            port,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = moto.child.try_wait().unwrap() {
                panic!("moto_server exited ({status}): {}", moto.log_text());
            }
            if let Ok((200, _)) = moto.try_http("GET", "/", b"") {
                return moto;
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not answer within 60 s: {}",
                moto.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates `bucket`.
    pub fn create_bucket(&self, bucket: &str) {
        let (status, body) = self.http("PUT", &format!("/{bucket}"), b"");
        assert_eq!(status, 200, "create bucket {bucket}: {body}");
    }

    /// Everything the server logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The request lines (`PUT /bucket/key?… HTTP/1.1`) of every request
    /// that writes (`PUT`, `POST`, `DELETE`), in order.
    pub fn writes(&self) -> Vec<String> {
        strip_colours(&self.log_text())
            .lines()
            .filter_map(|l| {
                let start = l.find('"')? + 1;
                let end = start + l[start..].find('"')?;
                Some(l[start..end].to_string())
            })
            .filter(|r| r.starts_with("PUT ") || r.starts_with("POST ") || r.starts_with("DELETE "))
            .collect()
    }

    /// The multipart uploads begun and neither completed nor aborted in
    /// `bucket`: their keys.
    pub fn open_uploads(&self, bucket: &str) -> Vec<String> {
        let (status, body) = self.http("GET", &format!("/{bucket}?uploads"), b"");
        assert_eq!(status, 200, "list multipart uploads: {body}");
        body.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_string)
            .collect()
    }

    /// An object_store client for `bucket` on this server.
    pub fn client(&self, bucket: &str) -> Arc<dyn ObjectStore> {
        Arc::new(
            AmazonS3Builder::new()
                .with_bucket_name(bucket)
                .with_region(REGION)
                .with_endpoint(self.endpoint())
                .with_access_key_id(ACCESS_KEY)
                .with_secret_access_key(SECRET_KEY)
                .with_virtual_hosted_style_request(false)
                .with_client_options(ClientOptions::new().with_allow_http(true))
                .build()
                .unwrap(),
        )
    }

    /// One unsigned HTTP/1.1 request; (status, headers and body as text).
    pub fn http(&self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        self.try_http(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    fn try_http(&self, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.port,
            body.len()
        )?;
        s.write_all(body)?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        let text = String::from_utf8_lossy(&out).to_string();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("no status line: {text:?}")))?;
        Ok((status, text))
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The log without the ANSI colours werkzeug puts around some lines.
fn strip_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('\x1b') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        match rest.find('m') {
            Some(end) => rest = &rest[end + 1..],
            None => rest = "",
        }
    }
    out.push_str(rest);
    out
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The binary, with no AWS variable of the caller's environment, the test
/// keys, a HOME without `.aws`, and the instance role off (no request may
/// leave the loopback).
pub fn bin(home: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_export-store"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("HOME", home)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("EXPORT_STORE_COPY_FAILPOINT")
        .stdin(Stdio::null());
    cmd
}

/// Writes and finalizes one part.
pub async fn put(store: &SqliteOutputStore, key: &ExportPartKey, bytes: &[u8]) {
    let mut w = store.open_writer(key).await.unwrap();
    w.writer.write_all(bytes).await.unwrap();
    w.byte_count = bytes.len() as u64;
    w.line_count = bytes.iter().filter(|&&b| b == b'\n').count() as u64;
    store.finalize_part(key, w).await.unwrap();
}

/// Every key of `bucket` under `prefix`, sorted, with its bytes.
pub async fn objects(s3: &Arc<dyn ObjectStore>, prefix: Option<&str>) -> Vec<(String, Vec<u8>)> {
    use futures::TryStreamExt;
    let prefix = prefix.map(ObjectPath::from);
    let mut metas: Vec<_> = s3.list(prefix.as_ref()).try_collect().await.unwrap();
    metas.sort_by(|a, b| a.location.cmp(&b.location));
    let mut out = Vec::new();
    for m in metas {
        let bytes = s3.get(&m.location).await.unwrap().bytes().await.unwrap();
        out.push((m.location.to_string(), bytes.to_vec()));
    }
    out
}

/// The keys of `bucket` under `prefix`, sorted.
pub async fn keys(s3: &Arc<dyn ObjectStore>, prefix: Option<&str>) -> Vec<String> {
    use futures::TryStreamExt;
    let prefix = prefix.map(ObjectPath::from);
    let mut keys: Vec<String> = s3
        .list(prefix.as_ref())
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap();
    keys.sort();
    keys
}

/// Parses the `--json` summary printed on standard output.
pub fn summary(stdout: &[u8]) -> serde_json::Value {
    serde_json::from_slice(stdout).unwrap_or_else(|e| {
        panic!(
            "the summary is not one JSON document ({e}): {}",
            String::from_utf8_lossy(stdout)
        )
    })
}
