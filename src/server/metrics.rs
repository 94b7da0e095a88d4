//! Metrics of the download route, and gauges of the store it serves,
//! recorded through the [`metrics`] facade (the one HFS records its own
//! metrics with) into any recorder: a Prometheus exporter's that the caller
//! renders, or the process's global one.
//!
//! [`ServerMetrics`], given to [`ServerConfig::with_metrics`](super::ServerConfig::with_metrics),
//! records for every response of the router:
//!
//! - [`REQUESTS`] (counter; labels `method`, `route`, `status`): responses,
//!   counted when their headers go out. `route` is the route's template
//!   (`/export-file/{job_id}/{file}` or `/{tenant}/export-file/{job_id}/{file}`,
//!   after the path prefix), or `<unmatched>` for any other path; `method`
//!   is `GET`, `HEAD` or `other`.
//! - [`SENT_BYTES`] (counter; label `encoding`: `identity`, `zstd`,
//!   `gzip`): body bytes handed to the connection, by the response's
//!   `Content-Encoding`, as they go (error bodies are `identity`). A client
//!   that leaves early may not have received the last of them.
//! - [`DOWNLOAD_DURATION`] (histogram; labels `encoding` and `outcome`:
//!   `complete`, `aborted` when the server ended the body on an error,
//!   `disconnected` when the client left): downloads, that is `GET`s
//!   answered `200` or `206`, from the request to the body's end. A
//!   Prometheus exporter renders it as a histogram when given
//!   [`DOWNLOAD_DURATION_BUCKETS`] for it, else as a summary.
//! - [`OPEN_DOWNLOADS`] (gauge): downloads whose body has not ended yet.
//!
//! [`StoreGauges`] sets, each time [`StoreGauges::refresh`] is called (at
//! scrape time):
//!
//! - [`FINISHED_PARTS`], [`NDJSON_BYTES`], [`STORED_BYTES`]: the finished
//!   parts, their NDJSON bytes and their stored (compressed) bytes, from
//!   one query over the parts table (`list_tenants` of the finished parts:
//!   one row per part is read, no chunk), run at most once per
//!   [`STORE_FIGURES_MAX_AGE`] whatever the number of scrapes;
//! - [`DATABASE_BYTES`], [`WAL_BYTES`]: the sizes of the database file and
//!   of its write-ahead log (`-wal`, 0 when there is none), from the file
//!   system, on every call.
//!
//! No label names a tenant, a job or a file: the number of series stays
//! small whatever is served, and a scraper learns nothing of whose files
//! the store holds. Recording costs a few atomic additions per response and
//! per body frame; without [`ServerMetrics`] the router records nothing.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, HttpBody};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder, Unit};

use crate::error::StorageResult;
use crate::{PartFilter, SqliteOutputStore};

/// Responses of the download router (counter).
pub const REQUESTS: &str = "export_store_http_requests_total";
/// Response body bytes sent, by encoding (counter).
pub const SENT_BYTES: &str = "export_store_sent_bytes_total";
/// How long downloads took, by encoding and outcome (histogram).
pub const DOWNLOAD_DURATION: &str = "export_store_download_duration_seconds";
/// Downloads under way (gauge).
pub const OPEN_DOWNLOADS: &str = "export_store_open_downloads";
/// Finished parts in the store (gauge).
pub const FINISHED_PARTS: &str = "export_store_finished_parts";
/// NDJSON bytes of the finished parts (gauge).
pub const NDJSON_BYTES: &str = "export_store_ndjson_bytes";
/// Stored (compressed) bytes of the finished parts (gauge).
pub const STORED_BYTES: &str = "export_store_stored_bytes";
/// The database file's size in bytes (gauge).
pub const DATABASE_BYTES: &str = "export_store_database_bytes";
/// The write-ahead log's size in bytes (gauge).
pub const WAL_BYTES: &str = "export_store_wal_bytes";

/// Bucket bounds, in seconds, for [`DOWNLOAD_DURATION`]: from a small part
/// on a local network to a large one over a slow link.
pub const DOWNLOAD_DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// How long [`StoreGauges::refresh`] reuses the part figures before it
/// queries them again.
pub const STORE_FIGURES_MAX_AGE: Duration = Duration::from_secs(10);

/// The `route` label of a request that matched no route.
const UNMATCHED: &str = "<unmatched>";

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// Where handles are registered: a recorder of the caller's, or whichever
/// recorder the process installed.
#[derive(Clone)]
enum Sink {
    Own(Arc<dyn Recorder + Send + Sync>),
    Global,
}

impl Sink {
    fn with<T>(&self, f: impl FnOnce(&dyn Recorder) -> T) -> T {
        match self {
            Sink::Own(r) => f(r.as_ref()),
            Sink::Global => metrics::with_recorder(f),
        }
    }
}

fn key(name: &'static str, labels: Vec<Label>) -> Key {
    Key::from_parts(name, labels)
}

/// A body's `Content-Encoding`, as a label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    Identity,
    Zstd,
    Gzip,
}

impl Encoding {
    const ALL: [Encoding; 3] = [Encoding::Identity, Encoding::Zstd, Encoding::Gzip];

    fn of(headers: &HeaderMap) -> Encoding {
        match headers.get(header::CONTENT_ENCODING).map(|v| v.as_bytes()) {
            Some(b"zstd") => Encoding::Zstd,
            Some(b"gzip") => Encoding::Gzip,
            _ => Encoding::Identity,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Encoding::Identity => "identity",
            Encoding::Zstd => "zstd",
            Encoding::Gzip => "gzip",
        }
    }
}

/// How a download's body ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Complete,
    Aborted,
    Disconnected,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::Aborted => "aborted",
            Outcome::Disconnected => "disconnected",
        }
    }
}

fn method_label(m: &Method) -> &'static str {
    if m == Method::GET {
        "GET"
    } else if m == Method::HEAD {
        "HEAD"
    } else {
        "other"
    }
}

/// The download route's metrics (see the [module](self)): give them to
/// [`ServerConfig::with_metrics`](super::ServerConfig::with_metrics).
/// Clones share their figures.
#[derive(Clone)]
pub struct ServerMetrics {
    inner: Arc<RouteMetrics>,
}

impl std::fmt::Debug for ServerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerMetrics")
            .field(
                "recorder",
                &match self.inner.sink {
                    Sink::Own(_) => "own",
                    Sink::Global => "global",
                },
            )
            .finish()
    }
}

/// Request counters by route, then by method and status.
type RequestCounters = HashMap<String, HashMap<(&'static str, u16), Counter>>;

struct RouteMetrics {
    sink: Sink,
    requests: RwLock<RequestCounters>,
    /// By [`Encoding`], in [`Encoding::ALL`]'s order.
    sent: [Counter; 3],
    /// By [`Encoding`], then [`Outcome`]; registered at first use, so that
    /// no empty histogram is rendered.
    durations: [[OnceLock<Histogram>; 3]; 3],
    open: Gauge,
}

impl ServerMetrics {
    /// Metrics recorded into `recorder`, for example a
    /// `metrics_exporter_prometheus::PrometheusRecorder` whose handle
    /// renders `GET /metrics`.
    pub fn new(recorder: Arc<dyn Recorder + Send + Sync>) -> Self {
        Self::with_sink(Sink::Own(recorder))
    }

    /// Metrics recorded into the recorder the process installed
    /// (`metrics::set_global_recorder`), as HFS installs its own; nothing
    /// is recorded if there is none when this is called.
    pub fn global() -> Self {
        Self::with_sink(Sink::Global)
    }

    fn with_sink(sink: Sink) -> Self {
        let (sent, open) = sink.with(|r| {
            r.describe_counter(
                REQUESTS.into(),
                None,
                "Responses of the download server, by method, route and status.".into(),
            );
            r.describe_counter(
                SENT_BYTES.into(),
                Some(Unit::Bytes),
                "Response body bytes sent, by Content-Encoding.".into(),
            );
            r.describe_histogram(
                DOWNLOAD_DURATION.into(),
                Some(Unit::Seconds),
                "Downloads (GET answered 200 or 206), from the request to the body's end.".into(),
            );
            r.describe_gauge(
                OPEN_DOWNLOADS.into(),
                None,
                "Downloads whose body has not ended.".into(),
            );
            let sent = Encoding::ALL.map(|e| {
                r.register_counter(
                    &key(SENT_BYTES, vec![Label::new("encoding", e.label())]),
                    &METADATA,
                )
            });
            let open = r.register_gauge(&key(OPEN_DOWNLOADS, vec![]), &METADATA);
            (sent, open)
        });
        ServerMetrics {
            inner: Arc::new(RouteMetrics {
                sink,
                requests: RwLock::new(HashMap::new()),
                sent,
                durations: Default::default(),
                open,
            }),
        }
    }

    fn count_request(&self, route: &str, method: &'static str, status: u16) {
        let m = &self.inner;
        if let Some(c) = m
            .requests
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(route)
            .and_then(|by| by.get(&(method, status)))
        {
            c.increment(1);
            return;
        }
        let counter = m.sink.with(|r| {
            r.register_counter(
                &key(
                    REQUESTS,
                    vec![
                        Label::new("method", method),
                        Label::new("route", route.to_string()),
                        Label::new("status", status.to_string()),
                    ],
                ),
                &METADATA,
            )
        });
        counter.increment(1);
        m.requests
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(route.to_string())
            .or_default()
            .entry((method, status))
            .or_insert(counter);
    }

    fn sent(&self, encoding: Encoding, bytes: u64) {
        self.inner.sent[encoding as usize].increment(bytes);
    }

    fn download_ended(&self, encoding: Encoding, outcome: Outcome, took: Duration) {
        let m = &self.inner;
        m.open.decrement(1.0);
        m.durations[encoding as usize][outcome as usize]
            .get_or_init(|| {
                m.sink.with(|r| {
                    r.register_histogram(
                        &key(
                            DOWNLOAD_DURATION,
                            vec![
                                Label::new("encoding", encoding.label()),
                                Label::new("outcome", outcome.label()),
                            ],
                        ),
                        &METADATA,
                    )
                })
            })
            .record(took.as_secs_f64());
    }
}

/// The middleware: counts the response, then wraps its body to count what
/// it sends and time the download.
pub(super) async fn track(
    State(metrics): State<ServerMetrics>,
    req: Request,
    next: Next,
) -> Response {
    let start = Instant::now();
    let method = method_label(req.method());
    let route = req.extensions().get::<MatchedPath>().cloned();
    let resp = next.run(req).await;
    let status = resp.status();
    metrics.count_request(
        route.as_ref().map_or(UNMATCHED, MatchedPath::as_str),
        method,
        status.as_u16(),
    );
    let download =
        method == "GET" && matches!(status, StatusCode::OK | StatusCode::PARTIAL_CONTENT);
    if download {
        metrics.inner.open.increment(1.0);
    }
    let (parts, body) = resp.into_parts();
    let expected = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let body = Body::new(Counted {
        inner: body,
        encoding: Encoding::of(&parts.headers),
        metrics,
        download: download.then_some(start),
        expected,
        bytes: 0,
    });
    Response::from_parts(parts, body)
}

/// A response body that counts its bytes and, for a download, ends it in
/// the metrics exactly once.
struct Counted {
    inner: Body,
    encoding: Encoding,
    metrics: ServerMetrics,
    /// When the download started; `None` once ended, or if no download.
    download: Option<Instant>,
    /// `Content-Length`, when sent: hyper stops polling once it is reached.
    expected: Option<u64>,
    bytes: u64,
}

impl Counted {
    fn end(&mut self, outcome: Outcome) {
        if let Some(start) = self.download.take() {
            self.metrics
                .download_ended(self.encoding, outcome, start.elapsed());
        }
    }
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    self.bytes += n;
                    self.metrics.sent(self.encoding, n);
                }
            }
            Poll::Ready(Some(Err(_))) => self.end(Outcome::Aborted),
            Poll::Ready(None) => self.end(Outcome::Complete),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        // As in the request log: a body dropped unpolled at its end is
        // complete; one dropped before that lost its client.
        let outcome = if self.inner.is_end_stream() || self.expected == Some(self.bytes) {
            Outcome::Complete
        } else {
            Outcome::Disconnected
        };
        self.end(outcome);
    }
}

/// The store's figures as gauges (see the [module](self)), set by
/// [`refresh`](Self::refresh). Clones share their gauges and cache.
#[derive(Clone)]
pub struct StoreGauges {
    inner: Arc<StoreFigures>,
}

impl std::fmt::Debug for StoreGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreGauges")
            .field("db", &self.inner.store.path())
            .finish()
    }
}

struct StoreFigures {
    store: SqliteOutputStore,
    wal: PathBuf,
    /// When the part figures were last queried.
    queried: tokio::sync::Mutex<Option<Instant>>,
    parts: Gauge,
    ndjson: Gauge,
    stored: Gauge,
    database: Gauge,
    wal_bytes: Gauge,
}

impl StoreGauges {
    /// Gauges of `store`'s figures, registered with `recorder`. For the
    /// process's global recorder (HFS's, say):
    /// `metrics::with_recorder(|r| StoreGauges::new(store, r))`.
    pub fn new(store: SqliteOutputStore, recorder: &dyn Recorder) -> Self {
        let gauge = |name: &'static str, unit: Option<Unit>, help: &'static str| {
            recorder.describe_gauge(name.into(), unit, help.into());
            recorder.register_gauge(&key(name, vec![]), &METADATA)
        };
        let mut wal = store.path().as_os_str().to_owned();
        wal.push("-wal");
        StoreGauges {
            inner: Arc::new(StoreFigures {
                wal: PathBuf::from(wal),
                queried: tokio::sync::Mutex::new(None),
                parts: gauge(FINISHED_PARTS, None, "Finished parts in the store."),
                ndjson: gauge(
                    NDJSON_BYTES,
                    Some(Unit::Bytes),
                    "NDJSON bytes of the finished parts.",
                ),
                stored: gauge(
                    STORED_BYTES,
                    Some(Unit::Bytes),
                    "Stored (zstd-compressed) bytes of the finished parts.",
                ),
                database: gauge(
                    DATABASE_BYTES,
                    Some(Unit::Bytes),
                    "Size of the database file.",
                ),
                wal_bytes: gauge(
                    WAL_BYTES,
                    Some(Unit::Bytes),
                    "Size of the database's write-ahead log.",
                ),
                store,
            }),
        }
    }

    /// Sets the gauges: the file sizes now, the part figures from a query
    /// at most [`STORE_FIGURES_MAX_AGE`] old. Concurrent calls share one
    /// query. On an error the part gauges keep their last values (the file
    /// sizes are set all the same) and the next call queries again.
    pub async fn refresh(&self) -> StorageResult<()> {
        let f = &self.inner;
        let mut queried = f.queried.lock().await;
        f.database.set(file_len(f.store.path()) as f64);
        f.wal_bytes.set(file_len(&f.wal) as f64);
        if queried.is_some_and(|t| t.elapsed() < STORE_FIGURES_MAX_AGE) {
            return Ok(());
        }
        let tenants = f
            .store
            .list_tenants(&PartFilter::all().finished_only())
            .await?;
        let (mut parts, mut ndjson, mut stored) = (0, 0, 0);
        for t in &tenants {
            parts += t.totals.finished_parts;
            ndjson += t.totals.byte_count;
            stored += t.totals.stored_bytes;
        }
        f.parts.set(parts as f64);
        f.ndjson.set(ndjson as f64);
        f.stored.set(stored as f64);
        *queried = Some(Instant::now());
        Ok(())
    }
}

/// A file's length; 0 when it does not exist (a WAL is removed when the
/// last connection closes cleanly).
fn file_len(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_stay_within_a_fixed_set() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::HEAD), "HEAD");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "other");
        let mut h = HeaderMap::new();
        assert_eq!(Encoding::of(&h), Encoding::Identity);
        h.insert(header::CONTENT_ENCODING, "zstd".parse().unwrap());
        assert_eq!(Encoding::of(&h), Encoding::Zstd);
        h.insert(header::CONTENT_ENCODING, "gzip".parse().unwrap());
        assert_eq!(Encoding::of(&h), Encoding::Gzip);
        for (i, e) in Encoding::ALL.into_iter().enumerate() {
            assert_eq!(e as usize, i);
        }
    }
}
