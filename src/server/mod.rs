//! The HTTP download server: HFS's file route, served from a
//! [`SqliteOutputStore`] over real HTTP (feature `server`).
//!
//! [`router`] builds an axum [`Router`] that answers `GET` and `HEAD` on
//!
//! - `{prefix}/export-file/{job_id}/{resource_type}-{part_index}`, for the
//!   configured default tenant (the URLs `download_url` mints), and
//! - `{prefix}/{tenant}/export-file/{job_id}/{resource_type}-{part_index}`,
//!   for the tenant named in the path (percent-encoded, so `acme%2Fresearch`
//!   names the tenant `acme/research`).
//!
//! The route serves the finished part with the highest fencing token in
//! that slot (file type `output`, else `error`). What a client may rely on:
//!
//! - **Headers**: `Content-Type: application/fhir+ndjson`, `Content-Length`
//!   (except for gzip, which is made on the fly), `ETag`, `Last-Modified`
//!   (the finalize time), `Cache-Control: private`, `Accept-Ranges: bytes`,
//!   `Vary: Accept-Encoding`, `X-Request-Id`. The identity ETag is strong:
//!   the quoted hex part digest (by default the XXH3-128 of the NDJSON,
//!   as `xxhsum -H2` prints it; BLAKE3, as `b3sum` prints it, for parts
//!   of a store opened with it and parts finished under schemas 2 to 5;
//!   SHA-256 for parts finished under schema 1). Encoded forms
//!   carry weak ETags derived from it (`W/"{digest}+zstd"`, `W/"{digest}+gzip"`).
//! - **Encodings**: when `Accept-Encoding` accepts `zstd` (and no `Range` is
//!   sent), the stored zstd frames are sent as they are, with
//!   `Content-Encoding: zstd` and `Content-Length` = the stored size: no
//!   decompression at all. Otherwise gzip (fastest level, made on the fly)
//!   if accepted, else identity. [`ServerConfig::with_identity_only`] turns
//!   both off for clients that mishandle multi-frame zstd.
//! - **Ranges**: one `bytes=` range (`a-b`, `a-`, `-n`) of the identity
//!   form gets `206` with `Content-Range`, streaming from the frame that
//!   holds byte `a` without decoding the frames before it; a range starting
//!   at or past the end gets `416` with `Content-Range: bytes */{size}`.
//!   `If-Range` (strong ETag or the exact `Last-Modified` date) is honoured;
//!   several ranges or a malformed one are ignored (a whole `200`).
//! - **Conditionals**: `If-None-Match` (weak comparison, `*` too) and, when
//!   it is absent, `If-Modified-Since` answer `304 Not Modified`.
//! - **Errors**: a FHIR `OperationOutcome` JSON body
//!   (`application/fhir+json`), never a file path or SQL. A missing, staged
//!   or deleted part is `404`; an invalid id `400`; a busy store `503`.
//! - **Failures mid-body** abort the connection: a client sees a failed
//!   download, never a short or mixed file reported as complete.
//! - **Access**: see [`ServerConfig`]. A tenant never reads another tenant's
//!   part: parts are looked up under the tenant the request resolved to,
//!   and every credential is bound to one tenant.
//! - **Resources**: memory per download is bounded by a few chunks; a slow
//!   client holds no database connection.
//! - **Logs**: one `tracing` event per response, when its body ends, with
//!   request id, method, path, status, bytes sent, duration and outcome.
//!
//! In this folder: `mod.rs` (the router and [`ServerConfig`]), `route.rs`
//! (the handlers), `download.rs` (a route resolved to a finished part and
//! streamed: NDJSON, a byte range or the stored zstd frames, verified),
//! `headers.rs` (encodings, ranges, conditionals), `auth.rs` (tokens and
//! signed URLs), `outcome.rs` (`OperationOutcome` errors), `logging.rs`
//! (one event per response), `throughput.rs` ([`measure_throughput`]),
//! [`metrics`] (what the route records, given [`ServerConfig::with_metrics`],
//! and the store's gauges) and `health.rs` ([`check_health`]).
//! The server uses the store's read path and the crate's contract; nothing
//! else in the crate uses the server.

mod auth;
mod download;
mod headers;
mod health;
mod logging;
pub mod metrics;
mod outcome;
mod route;
mod throughput;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use axum::routing::get;
use axum::Router;

use crate::error::{StorageError, StorageResult};
use crate::key::check_id;
use crate::SqliteOutputStore;
use download::Reads;

pub use self::metrics::{ServerMetrics, StoreGauges};
pub use health::{check_health, HEALTH_TIMEOUT};
pub use throughput::{measure_throughput, Throughput, WireForm};

/// The tenant a request resolves to when its path names none, unless
/// configured otherwise: `default`.
pub const DEFAULT_TENANT: &str = "default";

/// The shortest bearer token secret accepted, in bytes.
pub const MIN_TOKEN_BYTES: usize = 16;

/// How the server authenticates and serves. Build with
/// [`ServerConfig::new`] and the `with_*` methods; [`router`] checks it.
///
/// Access: with no token and no signing key, every request is served (for
/// a single-user deployment on a trusted network or a test fixture). As
/// soon as a token or a signing key is configured (the store's own signing
/// key counts), each request needs either
///
/// - `Authorization: Bearer {secret}` with a secret granted to the tenant
///   the request resolves to (else `401` with `WWW-Authenticate`, or `403`
///   for a secret granted to another tenant), or
/// - a signed URL (`?expires=…&signature=…`, as `download_url` mints in
///   signed mode) whose HMAC covers this tenant and route path and has not
///   expired (else `403`).
///
/// Secrets are compared in constant time and are never logged or shown by
/// `Debug`.
#[derive(Clone)]
pub struct ServerConfig {
    default_tenant: String,
    grants: Vec<(String, Vec<u8>)>,
    signing_key: Option<Vec<u8>>,
    identity_only: bool,
    path_prefix: Option<String>,
    metrics: Option<ServerMetrics>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tenants: Vec<&str> = self.grants.iter().map(|(t, _)| t.as_str()).collect();
        f.debug_struct("ServerConfig")
            .field("default_tenant", &self.default_tenant)
            .field("token_tenants", &tenants)
            .field("signing_key", &self.signing_key.as_ref().map(|_| "<set>"))
            .field("identity_only", &self.identity_only)
            .field("path_prefix", &self.path_prefix)
            .field("metrics", &self.metrics)
            .finish()
    }
}

impl ServerConfig {
    /// Open access, default tenant [`DEFAULT_TENANT`], zstd and gzip
    /// allowed, routes under the store's base URL path.
    pub fn new() -> Self {
        ServerConfig {
            default_tenant: DEFAULT_TENANT.to_string(),
            grants: Vec::new(),
            signing_key: None,
            identity_only: false,
            path_prefix: None,
            metrics: None,
        }
    }

    /// The tenant of requests whose path names none (`/export-file/…`).
    pub fn with_default_tenant(mut self, tenant: impl Into<String>) -> Self {
        self.default_tenant = tenant.into();
        self
    }

    /// Grants `Authorization: Bearer {secret}` access to `tenant`'s parts
    /// (only those). May be called many times; a tenant may have several
    /// secrets. The secret must be at least [`MIN_TOKEN_BYTES`] bytes of
    /// visible ASCII.
    pub fn with_token(mut self, tenant: impl Into<String>, secret: impl Into<Vec<u8>>) -> Self {
        self.grants.push((tenant.into(), secret.into()));
        self
    }

    /// The key signed URLs are verified with (at least 16 bytes). Without
    /// it, the store's own signing key (from its options) is used, if any.
    pub fn with_signing_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.signing_key = Some(key.into());
        self
    }

    /// Serve identity only, whatever the client accepts (for clients that
    /// mishandle multi-frame zstd or on-the-fly gzip).
    pub fn with_identity_only(mut self, on: bool) -> Self {
        self.identity_only = on;
        self
    }

    /// The path the routes live under, e.g. `/fhir` (or `""` for the root).
    /// By default, the path of the store's base URL, so that the server
    /// answers exactly where `download_url` points. Set `""` behind a proxy
    /// that strips the prefix.
    pub fn with_path_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.path_prefix = Some(prefix.into());
        self
    }

    /// Records the route's [`metrics`] (requests, bytes sent, download
    /// durations, open downloads). Off by default: the router then records
    /// nothing.
    pub fn with_metrics(mut self, metrics: ServerMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn check(&self) -> StorageResult<()> {
        let op = "server";
        check_id(op, "default tenant", &self.default_tenant)?;
        for (tenant, secret) in &self.grants {
            check_id(op, "token tenant", tenant)?;
            if secret.len() < MIN_TOKEN_BYTES {
                return Err(StorageError::invalid(
                    op,
                    format!("a token secret must be at least {MIN_TOKEN_BYTES} bytes"),
                ));
            }
            if !secret.iter().all(u8::is_ascii_graphic) {
                return Err(StorageError::invalid(
                    op,
                    "a token secret must be visible ASCII (it travels in a header)",
                ));
            }
        }
        if matches!(&self.signing_key, Some(k) if k.len() < 16) {
            return Err(StorageError::invalid(
                op,
                "a signing key must be at least 16 bytes",
            ));
        }
        if let Some(p) = &self.path_prefix {
            check_prefix(p)?;
        }
        Ok(())
    }
}

fn check_prefix(p: &str) -> StorageResult<()> {
    let ok = p.is_empty()
        || (p.starts_with('/')
            && !p.ends_with('/')
            && !p.contains(['{', '}', '*', '?', '#'])
            && !p.chars().any(|c| c.is_whitespace() || c.is_control()));
    if ok {
        Ok(())
    } else {
        Err(StorageError::invalid(
            "server",
            "a path prefix must be empty or start with '/', not end with '/', and hold no \
             '{', '}', '*', '?', '#' or whitespace",
        ))
    }
}

/// The path of a base URL (`http://host:8080/fhir` → `/fhir`).
fn base_path(base_url: &str) -> &str {
    let rest = base_url.split_once("://").map_or(base_url, |(_, r)| r);
    rest.find('/').map_or("", |i| &rest[i..])
}

/// Shared by every request of one router.
struct App {
    /// Keeps the database (and a temporary store's folder) alive as long as
    /// the router.
    _store: SqliteOutputStore,
    reads: Reads,
    auth: auth::Auth,
    default_tenant: String,
    identity_only: bool,
}

/// The download router over `store`, configured by `config`. Serve it with
/// [`serve`] or `axum::serve`; nest or layer it like any axum router.
///
/// Fails with invalid input when `config` holds a bad tenant id, a short or
/// non-ASCII token secret, a short signing key or a bad path prefix.
pub fn router(store: SqliteOutputStore, config: ServerConfig) -> StorageResult<Router> {
    config.check()?;
    let prefix = match &config.path_prefix {
        Some(p) => p.clone(),
        None => {
            let p = base_path(store.base_url()).to_string();
            check_prefix(&p)?;
            p
        }
    };
    let signing_key = config
        .signing_key
        .clone()
        .or_else(|| store.options().signing_key.clone());
    let app = Arc::new(App {
        reads: Reads::new(&store),
        _store: store,
        auth: auth::Auth::new(&config.grants, signing_key),
        default_tenant: config.default_tenant,
        identity_only: config.identity_only,
    });
    let routes = Router::new()
        .route(
            "/export-file/{job_id}/{file}",
            get(route::default_tenant).fallback(route::method_not_allowed),
        )
        .route(
            "/{tenant}/export-file/{job_id}/{file}",
            get(route::named_tenant).fallback(route::method_not_allowed),
        )
        .fallback(route::no_route)
        .with_state(app);
    let routes = if prefix.is_empty() {
        routes
    } else {
        Router::new()
            .nest(&prefix, routes)
            .fallback(route::no_route)
    };
    let routes = routes.layer(axum::middleware::from_fn(logging::log_requests));
    Ok(match config.metrics {
        Some(m) => routes.layer(axum::middleware::from_fn_with_state(m, metrics::track)),
        None => routes,
    })
}

/// Serves `router` on `listener` until `shutdown` completes, then stops
/// accepting connections and waits for the open ones to finish.
pub async fn serve<F>(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: F,
) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Reads a signing key file: its bytes, less trailing `\r` and `\n` (so a
/// key written by `openssl rand -hex 32 > key` works as the 64 hex
/// characters it holds). The minting side must read the file the same way.
pub fn read_signing_key_file(path: impl AsRef<Path>) -> std::io::Result<Vec<u8>> {
    let mut key = std::fs::read(path)?;
    while matches!(key.last(), Some(b'\n' | b'\r')) {
        key.pop();
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_paths_and_prefixes() {
        assert_eq!(base_path("http://h:1"), "");
        assert_eq!(base_path("https://h/fhir/r4"), "/fhir/r4");
        for ok in ["", "/fhir", "/a/b%20c"] {
            check_prefix(ok).unwrap();
        }
        for bad in ["fhir", "/fhir/", "/{x}", "/a b", "/a?b"] {
            assert!(check_prefix(bad).unwrap_err().is_invalid_input(), "{bad}");
        }
    }

    #[test]
    fn bad_configurations_are_invalid_input() {
        let bad = [
            ServerConfig::new().with_default_tenant(""),
            ServerConfig::new().with_token("t", "short"),
            ServerConfig::new().with_token("", "0123456789abcdef"),
            ServerConfig::new().with_token("t", "0123456789 abcdef"),
            ServerConfig::new().with_signing_key(b"short".to_vec()),
            ServerConfig::new().with_path_prefix("x"),
        ];
        for c in bad {
            assert!(c.check().unwrap_err().is_invalid_input(), "{c:?}");
        }
        ServerConfig::new()
            .with_token("acme/research", "0123456789abcdef")
            .check()
            .unwrap();
        let shown = format!(
            "{:?}",
            ServerConfig::new().with_token("t", "very-secret-token-value")
        );
        assert!(!shown.contains("very-secret"), "{shown}");
    }

    #[test]
    fn signing_key_files_lose_their_line_end() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, "00112233445566778899aabbccddeeff\r\n").unwrap();
        assert_eq!(
            read_signing_key_file(&p).unwrap(),
            b"00112233445566778899aabbccddeeff"
        );
    }
}
