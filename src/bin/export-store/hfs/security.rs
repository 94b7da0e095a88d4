//! Authentication and audit for `export-store hfs`, built from HFS's own
//! settings exactly as the stock `hfs` binary builds them (`helios-hfs`
//! 0.2.7, `init_audit` and `init_auth_with_audit`):
//!
//! - `HFS_AUTH_ENABLED`, `HFS_AUTH_JWKS_URL`, `HFS_AUTH_ISSUER`,
//!   `HFS_AUTH_AUDIENCE`, `HFS_AUTH_ALGORITHMS`, `HFS_AUTH_TENANT_CLAIM` and
//!   the other `HFS_AUTH_*` variables, read by `AuthConfig::from_env`,
//!   checked by `AuthConfig::validate`; the JWKS is fetched once before the
//!   server listens (and refreshed in the background by HFS's cache), and
//!   every request is checked by HFS's `JwksBearerAuthProvider` and its
//!   SMART scope middleware;
//! - `HFS_AUDIT_BACKEND` (`none`, `file`, `database`) and its
//!   `HFS_AUDIT_*` settings, read by `AuditConfig::from_env`, behind HFS's
//!   bounded audit queue.
//!
//! An enabled but broken configuration is an error that stops the server
//! before it listens: it never falls back to serving without
//! authentication.

use std::sync::Arc;

use helios_audit::{AuditBackend, AuditConfig, AuditMiddlewareState, AuditSink, ExclusionFilter};
use helios_auth::{AuthConfig, JwksBearerAuthProvider, JwksCache};
use helios_persistence::core::ResourceStorage;
use helios_persistence::TenantContext;
use helios_rest::{AuthMiddlewareState, ServerConfig};

/// The signing algorithms HFS 0.2.7's bearer-token check verifies
/// (`helios_auth::provider::jwks_bearer`): asymmetric ones only.
const ALGORITHMS: &[&str] = &["RS256", "RS384", "RS512", "ES256", "ES384"];

/// What the server runs with: HFS's auth configuration, and the middleware
/// states its router takes (`None` when that part is off).
pub struct Security {
    /// HFS's auth settings (disabled unless `HFS_AUTH_ENABLED`).
    pub auth_config: AuthConfig,
    /// The bearer-token check every request passes through; `Some` exactly
    /// when authentication is on.
    pub auth_state: Option<Arc<AuthMiddlewareState>>,
    /// The audit middleware; `Some` when `HFS_AUDIT_BACKEND` names a sink.
    pub audit_state: Option<Arc<AuditMiddlewareState>>,
}

impl Security {
    /// Whether requests must carry a valid bearer token: the auth state the
    /// router was given, not a variable read again.
    pub fn authenticates(&self) -> bool {
        self.auth_state.is_some()
    }
}

/// Builds the audit sink and the authentication state from HFS's
/// environment. `audit_storage` opens the database an audit sink of
/// `HFS_AUDIT_BACKEND=database` writes to (HFS's `fhir.db`, or
/// `HFS_AUDIT_DATABASE_URL`).
pub async fn from_env(
    config: &ServerConfig,
    audit_storage: impl FnOnce(&str) -> Result<Arc<dyn ResourceStorage>, String>,
) -> Result<Security, String> {
    let (audit_sink, audit_state) = audit(config, audit_storage).await?;
    let auth_config = AuthConfig::from_env();
    if !auth_config.enabled {
        tracing::warn!(
            "Authentication is DISABLED (HFS_AUTH_ENABLED is not true): every request is \
             served without a token"
        );
        return Ok(Security {
            auth_config,
            auth_state: None,
            audit_state,
        });
    }
    auth_config
        .validate()
        .map_err(|errors| format!("invalid auth configuration: {}", errors.join("; ")))?;
    // HFS drops a name it does not know with a warning: a typo would leave
    // fewer algorithms than the operator meant, or none (every token
    // refused). Refuse it here instead.
    let unknown: Vec<&str> = auth_config
        .allowed_algorithms
        .iter()
        .map(String::as_str)
        .filter(|alg| !ALGORITHMS.contains(alg))
        .collect();
    if !unknown.is_empty() {
        return Err(format!(
            "HFS_AUTH_ALGORITHMS names {unknown:?}, which HFS does not verify: list some of {}",
            ALGORITHMS.join(", ")
        ));
    }
    if auth_config.web_client_id.is_some() {
        // The browser login belongs to HFS's web UI, which this command does
        // not serve: refuse rather than half-configure it.
        return Err(
            "HFS_UI_LOGIN_CLIENT_ID is set, but export-store hfs serves no web UI and \
                    has no browser login: unset it (API clients send bearer tokens)"
                .into(),
        );
    }
    let jwks_url = auth_config
        .jwks_url
        .clone()
        .expect("validate() requires HFS_AUTH_JWKS_URL when auth is enabled");
    if auth_config.expected_audience.is_none() {
        tracing::warn!(
            "HFS_AUTH_AUDIENCE is not set: every token from this issuer will be accepted, \
             including tokens minted for other clients of the same issuer. Set \
             HFS_AUTH_AUDIENCE to restrict tokens to this server."
        );
    }
    let safe_url = helios_observability::redact::redact_url(&jwks_url);
    let jwks = Arc::new(JwksCache::new(
        &jwks_url,
        auth_config.jwks_min_refresh_interval,
    ));
    jwks.initial_fetch().await.map_err(|e| {
        format!("HFS_AUTH_JWKS_URL ({safe_url}): the JWKS could not be fetched: {e}")
    })?;
    let provider = JwksBearerAuthProvider::new(jwks, &auth_config);
    tracing::info!(
        jwks_url = %safe_url,
        issuer = ?auth_config.expected_issuer,
        audience = ?auth_config.expected_audience,
        tenant_claim = %auth_config.tenant_claim,
        algorithms = ?auth_config.allowed_algorithms,
        "Authentication ENABLED: every request but /metadata and the health checks needs a \
         valid bearer token"
    );
    let audit_config = AuditConfig::from_env();
    let auth_state = Arc::new(AuthMiddlewareState {
        provider: Arc::new(provider),
        config: Arc::new(auth_config.clone()),
        audit_sink,
        audit_source_observer: audit_config.source_observer.clone(),
        audit_exclusion_filter: ExclusionFilter::new(audit_config.exclusions.clone()),
        tenant_url_routing: config.multitenancy.routing_mode.supports_url_path(),
        sessions: None,
    });
    Ok(Security {
        auth_config,
        auth_state: Some(auth_state),
        audit_state,
    })
}

/// The audit sink (HFS's `NullSink` when off) and the audit middleware
/// state, as HFS's `init_audit` builds them for a SQLite deployment.
async fn audit(
    config: &ServerConfig,
    audit_storage: impl FnOnce(&str) -> Result<Arc<dyn ResourceStorage>, String>,
) -> Result<(Arc<dyn AuditSink>, Option<Arc<AuditMiddlewareState>>), String> {
    let audit = AuditConfig::from_env();
    let sink: Arc<dyn AuditSink> = match audit.backend {
        AuditBackend::None => {
            tracing::info!("Audit logging is DISABLED");
            return Ok((Arc::new(helios_audit::NullSink), None));
        }
        AuditBackend::File => {
            let path = audit
                .file_path
                .as_deref()
                .ok_or("HFS_AUDIT_FILE_PATH is required when HFS_AUDIT_BACKEND=file")?;
            tracing::info!(path, "Audit logging to file");
            Arc::new(
                helios_audit::FileSink::new(path)
                    .await
                    .map_err(|e| format!("HFS_AUDIT_FILE_PATH ({path}): {e}"))?,
            )
        }
        AuditBackend::Database => {
            // HFS's rule for SQLite: a dedicated audit database when
            // HFS_AUDIT_DATABASE_URL is set, else the resources' own file.
            let url = match audit.database_url.as_deref() {
                Some(url) => url.to_owned(),
                None => config
                    .database_url
                    .clone()
                    .unwrap_or_else(|| "fhir.db".into()),
            };
            if audit.database_url.is_none() && url == ":memory:" {
                return Err(
                    "HFS_AUDIT_BACKEND=database cannot share an in-memory database: \
                            set HFS_AUDIT_DATABASE_URL or use HFS_AUDIT_BACKEND=file"
                        .into(),
                );
            }
            tracing::info!(database = %url, "Audit logging to the database");
            let adapter = Arc::new(AuditStorage {
                storage: audit_storage(&url)?,
                tenant: TenantContext::system(),
            });
            let retry = helios_audit::sinks::database::RetryPolicy {
                max_retries: audit.write_retries,
                ..Default::default()
            };
            Arc::new(
                helios_audit::DatabaseSink::new(adapter, config.default_fhir_version)
                    .with_retry(retry),
            )
        }
        AuditBackend::CloudWatch => {
            return Err(
                "HFS_AUDIT_BACKEND=cloudwatch is not built into export-store hfs: use \
                        file or database"
                    .into(),
            )
        }
    };
    tracing::info!(
        capacity = audit.queue.capacity,
        writers = audit.queue.writers,
        overflow = %audit.queue.overflow,
        "Audit events are queued for background writers"
    );
    let sink: Arc<dyn AuditSink> = Arc::new(helios_audit::QueuedSink::new(sink, audit.queue));
    let state = Arc::new(AuditMiddlewareState {
        sink: Arc::clone(&sink),
        config: audit,
        exclusion_filter: ExclusionFilter::default_exclusions(),
    });
    Ok((sink, Some(state)))
}

/// HFS's adapter from its resource storage to the audit sink's: each
/// `AuditEvent` is created in the system tenant.
struct AuditStorage {
    storage: Arc<dyn ResourceStorage>,
    tenant: TenantContext,
}

#[async_trait::async_trait]
impl helios_audit::sinks::database::AuditStorage for AuditStorage {
    async fn create_resource(
        &self,
        resource_type: &str,
        resource: serde_json::Value,
        fhir_version: helios_fhir::FhirVersion,
    ) -> Result<(), helios_audit::sinks::database::AuditStorageError> {
        use helios_audit::sinks::database::AuditStorageError;
        self.storage
            .create(&self.tenant, resource_type, resource, fhir_version)
            .await
            .map(|_| ())
            .map_err(|e| {
                if e.is_unavailable() {
                    AuditStorageError::transient(e.to_string())
                } else {
                    AuditStorageError::permanent(e.to_string())
                }
            })
    }
}
