//! `--metrics-addr` of `serve` and `hfs`: `GET /metrics` (Prometheus text
//! format) and `GET /healthz` on a listener of their own, so that an
//! operator can keep them off the public port. Neither needs a token;
//! without the flag neither path is served on any port.
//!
//! - `serve` records into a Prometheus recorder of its own (no global
//!   recorder is installed): the download route's metrics and the store's
//!   gauges (`sqlite_export_store::server::metrics`).
//! - `hfs` installs HFS's own recorder (`helios_observability::metrics::init`,
//!   as the stock `hfs` binary does), instruments HFS's router with HFS's
//!   own middleware, and registers the store's gauges with that recorder:
//!   `/metrics` is HFS's exposition (`http_requests_total`,
//!   `http_request_duration_seconds`, `uptime_seconds`, all labelled
//!   `service="hfs"`) with the store's gauges beside it.
//!
//! `/healthz` answers `200 {"status":"ok"}` when every check passes, else
//! `503 {"status":"unavailable","reason":"…"}` naming the first that failed.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use sqlite_export_store::server::{self, ServerMetrics, StoreGauges};
use sqlite_export_store::SqliteOutputStore;
use tokio::net::TcpListener;

/// The content type of the Prometheus text format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How often the recorder of `serve` folds recorded durations into its
/// histograms, so that they take no memory between scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// One named check of `/healthz`: `Err(reason)` when it fails.
pub type Check =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// The output store's check: a read through its read pool.
pub fn store_check(store: SqliteOutputStore) -> Check {
    Arc::new(move || {
        let store = store.clone();
        Box::pin(async move {
            server::check_health(&store)
                .await
                .map_err(|e| e.to_string())
        })
    })
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr} (--metrics-addr): {e}"))
}

/// Serves `router` on `listener` in the background, for as long as the
/// runtime runs (through the main listener's drain too, so that an
/// operator can watch the open downloads go down), and prints its address
/// on standard output: call it right after the `listening on` line.
pub fn spawn(listener: TcpListener, router: Router) -> std::io::Result<SocketAddr> {
    let addr = listener.local_addr()?;
    println!("metrics on http://{addr}");
    tracing::info!(%addr, "serving /metrics and /healthz");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!("the metrics listener stopped: {e}");
        }
    });
    Ok(addr)
}

/// `serve`'s metrics: the download route's (to give to its
/// `ServerConfig`) and the router of the metrics listener, both over one
/// Prometheus recorder of its own. Spawns the recorder's upkeep.
pub fn for_serve(store: &SqliteOutputStore) -> (ServerMetrics, Router) {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(server::metrics::DOWNLOAD_DURATION.to_string()),
            server::metrics::DOWNLOAD_DURATION_BUCKETS,
        )
        .expect("the buckets are not empty")
        .build_recorder();
    let handle = recorder.handle();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_EVERY);
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    let gauges = StoreGauges::new(store.clone(), &recorder);
    let route = ServerMetrics::new(Arc::new(recorder));
    let exposition = Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            async move { prometheus_text(handle.render()) }
        }),
    );
    let router = with_health(
        with_gauges(exposition, Some(gauges)),
        vec![("store", store_check(store.clone()))],
    );
    (route, router)
}

/// `hfs`'s metrics listener: HFS's recorder (installed here, once), the
/// store's gauges when the output store is ours, and `/healthz` over
/// `checks`. HFS's requests are counted once its router is layered with
/// `helios_observability::middleware::track`.
#[cfg(feature = "hfs")]
pub fn for_hfs(store: Option<&SqliteOutputStore>, checks: Vec<(&'static str, Check)>) -> Router {
    helios_observability::uptime::init();
    helios_observability::metrics::init("hfs");
    let gauges = store.map(|s| metrics::with_recorder(|r| StoreGauges::new(s.clone(), r)));
    with_health(
        with_gauges(helios_observability::metrics::router(), gauges),
        checks,
    )
}

fn prometheus_text(text: String) -> Response {
    ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], text).into_response()
}

/// Refreshes `gauges` before each request to `exposition` (its `/metrics`).
fn with_gauges(exposition: Router, gauges: Option<StoreGauges>) -> Router {
    let Some(gauges) = gauges else {
        return exposition;
    };
    exposition.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let gauges = gauges.clone();
            async move {
                if let Err(e) = gauges.refresh().await {
                    tracing::warn!("the store's figures could not be read for /metrics: {e}");
                }
                next.run(req).await
            }
        },
    ))
}

/// Adds `GET /healthz` over `checks`, run in order.
fn with_health(router: Router, checks: Vec<(&'static str, Check)>) -> Router {
    let checks = Arc::new(checks);
    router.route(
        "/healthz",
        get(move || {
            let checks = checks.clone();
            async move { health(&checks).await }
        }),
    )
}

/// Runs the checks in order, each for at most [`server::HEALTH_TIMEOUT`].
async fn health(checks: &[(&'static str, Check)]) -> Response {
    for (name, check) in checks {
        let answer = tokio::time::timeout(server::HEALTH_TIMEOUT, check())
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "no answer within {} s",
                    server::HEALTH_TIMEOUT.as_secs()
                ))
            });
        if let Err(reason) = answer {
            tracing::warn!(check = name, %reason, "/healthz: unavailable");
            let body = serde_json::json!({
                "status": "unavailable",
                "reason": format!("{name}: {reason}"),
            });
            return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
        }
    }
    (
        StatusCode::OK,
        axum::Json(serde_json::json!({"status": "ok"})),
    )
        .into_response()
}
