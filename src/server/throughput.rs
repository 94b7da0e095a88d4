//! Serving throughput, measured the way a client sees it: the router on a
//! loopback socket, downloads over real HTTP/1.1 connections (hyper), bodies
//! read to the end and checked for length. For a bench report.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::http::{header, Request, StatusCode};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

use super::{router, ServerConfig};
use crate::contract::ExportOutputStore;
use crate::error::{StorageError, StorageResult};
use crate::key::ExportPartKey;
use crate::store::url::route_path;
use crate::SqliteOutputStore;

const OP: &str = "measure_throughput";

/// What is downloaded in a throughput run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireForm {
    /// Plain NDJSON, decoded from the stored frames as it is sent.
    Identity,
    /// The stored zstd frames, passed through untouched.
    Zstd,
    /// gzip made on the fly (fastest level).
    Gzip,
    /// The baseline: the same NDJSON held in memory, sent by the same HTTP
    /// stack with no store behind it.
    MemoryBaseline,
}

/// The outcome of a throughput run.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Throughput {
    /// The form downloaded.
    pub form: WireForm,
    /// Downloads completed.
    pub downloads: usize,
    /// Connections used at once.
    pub concurrency: usize,
    /// Body bytes received, over all downloads (compressed for zstd/gzip).
    pub wire_bytes: u64,
    /// NDJSON bytes delivered: the part's size times `downloads`.
    pub ndjson_bytes: u64,
    /// Wall time of all downloads.
    pub elapsed: Duration,
}

impl Throughput {
    /// NDJSON delivered per second, in MiB.
    pub fn ndjson_mib_per_sec(&self) -> f64 {
        self.ndjson_bytes as f64 / (1 << 20) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    /// Body bytes on the wire per second, in MiB.
    pub fn wire_mib_per_sec(&self) -> f64 {
        self.wire_bytes as f64 / (1 << 20) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn fail(message: impl Into<String>) -> StorageError {
    StorageError::internal(OP, message)
}

/// Serves `store` on `127.0.0.1:0` (open access, default tenant = the key's
/// tenant) and downloads the latest finished part in `key`'s slot
/// `downloads` times in `form`, over `concurrency` keep-alive connections.
/// Every body is read to its end and its length checked (identity: the
/// part's size; zstd: its stored size). Must run inside a multi-threaded
/// Tokio runtime for the figures to mean anything.
pub async fn measure_throughput(
    store: &SqliteOutputStore,
    key: &ExportPartKey,
    form: WireForm,
    downloads: usize,
    concurrency: usize,
) -> StorageResult<Throughput> {
    let info = store.latest_in_slot(key).await?;
    let path = route_path(key.job_id.as_str(), &key.resource_type, key.part_index);
    let app = match form {
        WireForm::MemoryBaseline => {
            let mut ndjson = Vec::with_capacity(info.size_bytes as usize);
            let mut latest = key.clone();
            latest.fencing_token = info.fencing_token;
            store
                .open_reader(&latest)
                .await?
                .read_to_end(&mut ndjson)
                .await
                .map_err(|e| StorageError::from_io(OP, e))?;
            let ndjson = Bytes::from(ndjson);
            Router::new().route(
                &path,
                get(move || {
                    let body = ndjson.clone();
                    async move { ([(header::CONTENT_TYPE, "application/fhir+ndjson")], body) }
                }),
            )
        }
        _ => router(
            store.clone(),
            ServerConfig::new()
                .with_default_tenant(key.tenant_id.clone())
                .with_path_prefix(""),
        )?,
    };
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| fail("cannot bind a loopback socket").with_source(e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| fail("no local address").with_source(e))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(super::serve(listener, app, async move {
        let _ = stopped.await;
    }));
    let (accept, expect_len) = match form {
        WireForm::Identity | WireForm::MemoryBaseline => ("identity", Some(info.size_bytes)),
        WireForm::Zstd => ("zstd", Some(info.stored_bytes)),
        WireForm::Gzip => ("gzip", None),
    };
    let concurrency = concurrency.clamp(1, downloads.max(1));
    let start = Instant::now();
    let mut clients = Vec::with_capacity(concurrency);
    for c in 0..concurrency {
        let n = downloads / concurrency + usize::from(c < downloads % concurrency);
        let path = path.clone();
        clients.push(tokio::spawn(async move {
            client(addr, &path, accept, expect_len, n).await
        }));
    }
    let mut wire_bytes = 0;
    let mut outcome = Ok(());
    for c in clients {
        match c.await {
            Ok(Ok(n)) => wire_bytes += n,
            Ok(Err(e)) => outcome = Err(e),
            Err(_) => outcome = Err(fail("a download task panicked")),
        }
    }
    let elapsed = start.elapsed();
    let _ = stop.send(());
    let _ = server.await;
    outcome?;
    Ok(Throughput {
        form,
        downloads,
        concurrency,
        wire_bytes,
        ndjson_bytes: info.size_bytes * downloads as u64,
        elapsed,
    })
}

/// `n` downloads one after another on one connection; the body bytes read.
async fn client(
    addr: SocketAddr,
    path: &str,
    accept: &str,
    expect_len: Option<u64>,
    n: usize,
) -> StorageResult<u64> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| fail("cannot connect").with_source(e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| fail("HTTP handshake failed").with_source(e))?;
    let conn = tokio::spawn(conn);
    let mut total = 0;
    for _ in 0..n {
        let req = Request::get(path)
            .header(header::HOST, addr.to_string())
            .header(header::ACCEPT_ENCODING, accept)
            .body(Empty::<Bytes>::new())
            .map_err(|e| fail("bad request").with_source(e))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| fail("request failed").with_source(e))?;
        if resp.status() != StatusCode::OK {
            return Err(fail(format!("the server answered {}", resp.status())));
        }
        let mut body = resp.into_body();
        let mut got = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| fail("the download failed").with_source(e))?;
            if let Some(d) = frame.data_ref() {
                got += d.len() as u64;
            }
        }
        if expect_len.is_some_and(|l| l != got) || got == 0 && expect_len != Some(0) {
            return Err(fail(format!("a download returned {got} bytes")));
        }
        total += got;
    }
    drop(sender);
    let _ = conn.await;
    Ok(total)
}
