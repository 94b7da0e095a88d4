//! `export-store hfs`: the Helios FHIR Server (HFS 0.2.7) itself, with this
//! store as the output of its bulk export and bulk submit.
//!
//! The wiring follows the stock `hfs` binary's SQLite start-up
//! (`helios-hfs` 0.2.7, `start_sqlite`, `build_bulk_export`,
//! `build_bulk_submit` and their worker pools): HFS's `SqliteBackend` holds
//! the resources and the job state, HFS's own workers claim and run the jobs,
//! HFS's routes serve the FHIR API, the status URLs and the file downloads.
//! Only the output store differs. Authentication and audit come from HFS's
//! own `HFS_AUTH_*` and `HFS_AUDIT_*` settings, built as `hfs` builds them
//! (`security.rs`). What is left out (the web UI, other backends) is listed
//! in docs/hfs.md; `/metrics` is served only on the listener of
//! `--metrics-addr` (see `watch.rs`). `--output local-fs-synced`, a
//! measuring baseline, is HFS's local-fs store made durable (`synced.rs`).

mod security;
mod synced;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use helios_persistence::backends::local_fs::LocalFsOutputStore;
use helios_persistence::backends::sqlite::{SqliteBackend, SqliteBackendConfig};
use helios_persistence::core::{
    BulkExportJobStore, BulkSubmitJobStore, DefaultExportWorker, DefaultSubmitWorker,
    DeferredReindexHook, ExportOutputStore, FileTokenProvider, SubmitInputFetcher, WorkerId,
};
use helios_persistence::search::{ReindexOnFinish, ReindexOperation};
use helios_persistence::BackendKind;
use helios_rest::bulk_export_auth::BearerScopeAuth;
use helios_rest::config::{BulkExportConfig, BulkSubmitConfig};
use helios_rest::ServerConfig;
use sqlite_export_store::{SqliteOutputStore, StoreOptions};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Where HFS's bulk export and bulk submit write their files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// This crate's `SqliteOutputStore`, in `--output-db`.
    Sqlite,
    /// HFS's own `LocalFsOutputStore`, in `DATA_DIR/export-files` and
    /// `DATA_DIR/submit-files`.
    LocalFs,
    /// `LocalFsOutputStore` with each finalized file and its folder
    /// fsynced before the finalize returns: a measuring baseline, the cost
    /// of durable files.
    LocalFsSynced,
}

/// Arguments of `export-store hfs`.
#[derive(clap::Args)]
pub struct Args {
    /// The address to listen on; port 0 picks a free port. The address is
    /// printed on the first line of standard output.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// HFS's public base URL, which starts every URL it hands out
    /// (manifests, download URLs). Default: `HFS_BASE_URL`, else
    /// `http://{addr}`.
    #[arg(long, value_name = "URL")]
    base_url: Option<String>,
    /// HFS's data folder: its SQLite database of resources and job state
    /// (`fhir.db`), search-parameter files, and the output store. Created if
    /// missing.
    #[arg(long, default_value = "./hfs-data")]
    data_dir: PathBuf,
    /// The output store's database file. Default: `DATA_DIR/export-output.db`.
    #[arg(long, value_name = "PATH")]
    output_db: Option<PathBuf>,
    /// Resources per export part (HFS's `HFS_BULK_EXPORT_BATCH_SIZE`).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    batch_size: Option<u32>,
    /// Which store holds the export and submit output.
    #[arg(long, value_enum, default_value_t = Output::Sqlite)]
    output: Output,
    /// The content digest the SQLite output store records for each part
    /// it finishes (and serves as its ETag).
    #[arg(long, value_enum, default_value_t = crate::Digest::Xxh3_128)]
    digest: crate::Digest,
    /// Who checkpoints the store's write-ahead log: `store` (the store
    /// itself; the default) or `external`, when Litestream (or another
    /// replicator that reads the log) runs beside the store and checkpoints
    /// it. With `external` the store never checkpoints, so a replicator
    /// never has to upload a fresh full snapshot because of the store.
    #[arg(long, value_enum, default_value_t = crate::Checkpointing::Store)]
    checkpoints: crate::Checkpointing,
    /// Answer export and submit status polls that say "still running" (202)
    /// with this `Retry-After` (in seconds) instead of HFS's 120. For test fixtures and demos: real
    /// clients obey the header, so a small export would otherwise wait two
    /// minutes per poll.
    #[arg(long, value_name = "SECS")]
    retry_after: Option<u32>,
    /// Also serve `GET /metrics` (Prometheus text format: HFS's own request
    /// metrics and uptime, and the output store's parts and sizes) and
    /// `GET /healthz` (200 while HFS's database and the output store answer,
    /// else 503 with the reason) on a listener of their own at this address
    /// (port 0 picks a free port), printed as `metrics on http://ADDR` on
    /// the line after `listening on`. Neither asks for a token: keep it on a
    /// private address. Off by default, and neither path is then served on
    /// any port.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
}

/// Runs HFS until Ctrl-C or SIGTERM, then stops the workers claiming, lets
/// them hand their jobs back and the open requests finish.
pub fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    crate::init_logging();
    std::fs::create_dir_all(&args.data_dir).map_err(|e| {
        format!(
            "cannot create the data folder {}: {e}",
            args.data_dir.display()
        )
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(args))
}

async fn serve(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.addr))?;
    let addr = listener.local_addr()?;
    let metrics_listener = match args.metrics_addr {
        Some(a) => Some(crate::watch::bind(a).await?),
        None => None,
    };
    let config = server_config(&args, addr)?;

    write_search_parameters(&args.data_dir)?;
    // Before HFS creates it: a data folder without `fhir.db` is fresh, and
    // has no job to check against the store.
    let fhir_db = PathBuf::from(config.database_url.as_deref().unwrap_or("fhir.db"));
    let fresh = !fhir_db.exists();
    let backend = Arc::new(sqlite_backend(&config)?);
    let security = security::from_env(&config, |url| {
        let mut audit_db = config.clone();
        audit_db.database_url = Some(url.to_owned());
        let storage: Arc<dyn helios_persistence::core::ResourceStorage> =
            Arc::new(sqlite_backend(&audit_db).map_err(|e| format!("the audit database: {e}"))?);
        Ok(storage)
    })
    .await
    .map_err(|e| format!("cannot start: {e}"))?;
    seed_default_tenant(backend.as_ref(), &config).await;
    spawn_wal_maintenance(backend.clone());

    let workers = Workers::default();
    let (export_output, submit_output, our_output) =
        output_stores(&args, &config, security.authenticates())?;
    if let (Some(store), false) = (&our_output, fresh) {
        // Before any worker claims or any route serves.
        check_restored(&fhir_db, store).await;
    }
    let export = export_bundle(&config, &backend, export_output, &workers);
    let submit = submit_bundle(&config, &backend, submit_output, &workers)?;

    if let Some(audit) = &security.audit_state {
        helios_audit::lifecycle::record_startup(
            &*audit.sink,
            &audit.config.source_observer,
            vec![
                ("storage-backend", "sqlite".to_string()),
                ("fhir-version", format!("{:?}", config.default_fhir_version)),
                ("auth-enabled", security.authenticates().to_string()),
                ("audit-backend", audit.config.backend.to_string()),
            ],
        )
        .await;
    }
    let authenticates = security.authenticates();
    let app = helios_rest::create_app_with_auth_and_bulk(
        backend.clone(),
        config.clone(),
        security.auth_config,
        security.auth_state,
        security.audit_state,
        export,
        submit,
    );
    // Only "still running" answers (202) get the shorter wait: a 429 or 503
    // keeps HFS's own Retry-After, or a rate-limited client would loop.
    let app = match args.retry_after {
        Some(secs) => app.layer(axum::middleware::map_response(
            move |mut response: axum::response::Response| async move {
                let accepted = response.status() == axum::http::StatusCode::ACCEPTED;
                let headers = response.headers_mut();
                if accepted && headers.contains_key(axum::http::header::RETRY_AFTER) {
                    headers.insert(axum::http::header::RETRY_AFTER, secs.into());
                }
                response
            },
        )),
        None => app,
    };
    // HFS's recorder and request metrics, as the stock `hfs` binary
    // installs them, only when someone can scrape them.
    let watch = metrics_listener.map(|listener| {
        let mut checks = vec![("HFS database", backend_check(backend.clone()))];
        if let Some(store) = &our_output {
            checks.push(("store", crate::watch::store_check(store.clone())));
        }
        (listener, crate::watch::for_hfs(our_output.as_ref(), checks))
    });
    let app = match watch {
        Some(_) => app.layer(axum::middleware::from_fn(
            helios_observability::middleware::track,
        )),
        None => app,
    };

    println!("listening on http://{addr}");
    if let Some((listener, router)) = watch {
        crate::watch::spawn(listener, router)?;
    }
    tracing::info!(
        %addr,
        base_url = %config.base_url,
        data_dir = %args.data_dir.display(),
        output = ?args.output,
        auth_enabled = authenticates,
        "Helios FHIR Server started"
    );
    let stop = workers.stop.clone();
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        crate::signal().await;
        tracing::info!("shutting down: the workers stop claiming and hand back their jobs");
        stop.cancel();
    })
    .await?;

    if !workers.drain(drain_timeout()).await {
        tracing::warn!(
            "bulk workers did not stop in time (HFS_WORKER_SHUTDOWN_TIMEOUT); their leases \
             lapse and the jobs resume after the lease duration"
        );
    }
    if let Err(e) = backend.checkpoint_wal_at_shutdown().await {
        tracing::warn!("SQLite WAL checkpoint at shutdown failed: {e}");
    }
    Ok(ExitCode::SUCCESS)
}

/// HFS's configuration: its environment variables (`HFS_*`, as the `hfs`
/// binary reads them, but never this process's arguments), then this
/// command's flags over them.
fn server_config(args: &Args, addr: SocketAddr) -> Result<ServerConfig, String> {
    let (mut config, _) = ServerConfig::try_parse_from_with_provenance(["export-store hfs"])
        .map_err(|e| format!("HFS configuration from the environment: {e}"))?;
    config.host = addr.ip().to_string();
    config.port = addr.port();
    config.base_url = args
        .base_url
        .clone()
        .or_else(|| std::env::var("HFS_BASE_URL").ok())
        .unwrap_or_else(|| format!("http://{addr}"));
    config
        .normalize_public_base_url()
        .map_err(|e| format!("--base-url: {e}"))?;
    config.data_dir = Some(args.data_dir.clone());
    config.database_url = Some(path_str(&args.data_dir.join("fhir.db"))?);
    config.storage_backend = "sqlite".into();
    config.ui_enabled = false;
    if std::env::var_os("HFS_EXPORT_DIR").is_none() {
        // HFS's `$sql-export` sink defaults to `./exports`: keep it with the
        // rest of the server's files.
        config.export_dir = path_str(&args.data_dir.join("sql-exports"))?;
    }
    if let Some(n) = args.batch_size {
        config.bulk_export.batch_size = n;
    }
    // HFS's own output-backend switch names its stores; the output here is
    // chosen by `--output`, so keep HFS's validation of the rest meaningful.
    config.bulk_export.output_backend = "local-fs".into();
    config.bulk_submit.output_backend = "local-fs".into();
    config.bulk_export.enabled = true;
    config.validate().map_err(|errors| errors.join("; "))?;
    Ok(config)
}

fn path_str(path: &Path) -> Result<String, String> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("{} is not valid UTF-8", path.display()))
}

/// FHIR R4's search-parameter bundle (HL7, CC0), zstd-compressed; see
/// `data/fhir-r4/README.md`.
const SEARCH_PARAMETERS_R4: &[u8] =
    include_bytes!("../../../data/fhir-r4/search-parameters-r4.json.zst");

/// The file HFS reads its R4 search parameters from, in its data folder.
const SEARCH_PARAMETERS_FILE: &str = "search-parameters-r4.json";

/// Writes FHIR R4's search parameters to `DATA_DIR/search-parameters-r4.json`
/// unless a file is there (an operator's own stays). HFS builds its search
/// registry from that file: without it, it refuses conditional references
/// such as `Practitioner?identifier=…` and its Patient and Group exports
/// find no compartment member but the patients. Written to a temporary name
/// and renamed, so a crash never leaves half a file for HFS to read.
fn write_search_parameters(data_dir: &Path) -> Result<(), String> {
    let path = data_dir.join(SEARCH_PARAMETERS_FILE);
    if path.exists() {
        return Ok(());
    }
    let json = zstd::decode_all(SEARCH_PARAMETERS_R4)
        .map_err(|e| format!("the built-in search parameters are damaged: {e}"))?;
    let tmp = data_dir.join(format!("{SEARCH_PARAMETERS_FILE}.tmp"));
    std::fs::write(&tmp, json)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    tracing::info!(path = %path.display(), "wrote FHIR R4's search parameters for HFS");
    Ok(())
}

/// HFS's SQLite backend for resources and job state, as `hfs` opens it.
fn sqlite_backend(config: &ServerConfig) -> Result<SqliteBackend, Box<dyn std::error::Error>> {
    let path = config.database_url.as_deref().unwrap_or("fhir.db");
    let backend = SqliteBackend::with_config(
        path,
        SqliteBackendConfig {
            fhir_version: config.default_fhir_version,
            data_dir: config.data_dir.clone(),
            ..Default::default()
        },
    )?;
    backend.init_schema()?;
    Ok(backend)
}

/// Provisions the default tenant and seeds it with the spec's search
/// parameters and compartment definitions, as `hfs` does at start-up.
async fn seed_default_tenant(backend: &SqliteBackend, config: &ServerConfig) {
    use helios_persistence::ResourceStorage;
    let tenant = config.default_tenant.clone();
    if backend.supports_tenant_registry() {
        match backend.get_tenant(&tenant).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                if let Err(e) = backend.register_tenant(&tenant, None).await {
                    tracing::warn!(%tenant, "provisioning the default tenant failed: {e}");
                }
            }
            Err(e) => tracing::warn!(%tenant, "checking the default tenant failed: {e}"),
        }
    }
    if config.seed_conformance {
        let data_dir = config.data_dir.clone().unwrap_or_default();
        helios_persistence::search::seed_tenant_conformance(
            backend,
            config.default_fhir_version,
            &data_dir,
            &tenant,
            None,
        )
        .await;
    }
}

/// Keeps HFS's WAL bounded, as `hfs` does every 2 s.
fn spawn_wal_maintenance(backend: Arc<SqliteBackend>) {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_secs(2));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            if let Err(e) = backend.maintain_wal().await {
                tracing::warn!("SQLite WAL maintenance failed; the next pass retries: {e}");
            }
        }
    });
}

/// The export and submit stores, and ours when they are ours (for
/// `--metrics-addr`).
type Outputs = (
    Arc<dyn ExportOutputStore>,
    Arc<dyn ExportOutputStore>,
    Option<SqliteOutputStore>,
);

/// The output stores of bulk export and bulk submit.
///
/// The export store says a token is needed exactly when HFS's setting says
/// so (`HFS_BULK_EXPORT_REQUIRES_ACCESS_TOKEN`; `auto`, the default,
/// follows `authenticates`: whether the router was really given HFS's
/// bearer-token check, never a variable read again). The URL is HFS's own
/// `/export-file/{job}/{Type}-{n}` route either way; the flag tells clients
/// whether to send their token there. The submit store always says a token
/// is needed, as in HFS: only then does HFS advertise its
/// `/bulk-submit-file/...` route, which is the one that serves receipts.
fn output_stores(
    args: &Args,
    config: &ServerConfig,
    authenticates: bool,
) -> Result<Outputs, Box<dyn std::error::Error>> {
    let export_token = match config.bulk_export.requires_access_token.as_str() {
        "true" => true,
        "false" => false,
        _ => authenticates,
    };
    let base = config.base_url.clone();
    Ok(match args.output {
        Output::Sqlite => {
            let path = args
                .output_db
                .clone()
                .unwrap_or_else(|| args.data_dir.join("export-output.db"));
            let options = StoreOptions::default()
                .with_digest(args.digest.algorithm())
                .with_checkpoints(args.checkpoints.option());
            let store = SqliteOutputStore::open_with(&path, &base, options)
                .map_err(|e| format!("cannot open the output store {}: {e}", path.display()))?;
            spawn_reclaim_abandoned(
                store.clone(),
                Duration::from_secs(config.bulk_export.cleanup_interval_secs),
            );
            (
                Arc::new(store.clone().with_access_token_required(export_token)),
                Arc::new(store.clone().with_access_token_required(true)),
                Some(store),
            )
        }
        Output::LocalFs | Output::LocalFsSynced => {
            let exports = args.data_dir.join("export-files");
            let submits = args.data_dir.join("submit-files");
            let export_store = LocalFsOutputStore::new(path_str(&exports)?, base.clone())
                .with_access_token_required(export_token);
            let submit_store = LocalFsOutputStore::new(path_str(&submits)?, base);
            if args.output == Output::LocalFsSynced {
                (
                    Arc::new(synced::SyncedLocalFs::new(export_store, exports)),
                    Arc::new(synced::SyncedLocalFs::new(submit_store, submits)),
                    None,
                )
            } else {
                (Arc::new(export_store), Arc::new(submit_store), None)
            }
        }
    })
}

/// Fails each export HFS records as complete whose files the store lacks
/// (the store was restored to an earlier moment than `fhir.db`), one
/// warning per job; warns about bulk submissions with missing receipts. A
/// check that cannot run is logged and the server starts anyway.
async fn check_restored(fhir_db: &Path, store: &SqliteOutputStore) {
    use sqlite_export_store::helios::restore;
    let report = match restore::check_restored(fhir_db, store).await {
        Ok(report) => report,
        Err(e) => {
            tracing::warn!("could not check HFS's jobs against the output store: {e}");
            return;
        }
    };
    let failed = match restore::fail_incomplete_exports(fhir_db, &report) {
        Ok(failed) => failed,
        Err(e) => {
            tracing::error!(
                jobs = report.exports.len(),
                "could not mark the exports whose files the output store lacks failed: {e}"
            );
            return;
        }
    };
    for job in &failed {
        tracing::warn!(
            job = %job.job_id,
            tenant = %job.tenant_id,
            "export {} marked failed: HFS records it complete, but {} of its {} files are not \
             in the output store ({}); the output store was restored to an earlier moment than \
             fhir.db, and the client must start the export again",
            job.job_id,
            job.missing.len(),
            job.files,
            restore_file_list(&job.missing),
        );
    }
    for sub in &report.submissions {
        tracing::warn!(
            tenant = %sub.tenant_id,
            submitter = %sub.submitter,
            submission = %sub.submission_id,
            "bulk submission {} ({}) lists {} of its {} published files that are not in the \
             output store ({}); the output store was restored to an earlier moment than \
             fhir.db, and those receipts answer 404",
            sub.submission_id,
            sub.status,
            sub.missing.len(),
            sub.files,
            restore_file_list(&sub.missing),
        );
    }
    tracing::info!(
        exports = report.exports_checked,
        failed = failed.len(),
        submissions = report.submissions_checked,
        "checked HFS's complete jobs against the output store"
    );
}

/// The missing files' names, the first 50 of them.
fn restore_file_list(files: &[sqlite_export_store::helios::restore::MissingFile]) -> String {
    let mut names: Vec<String> = files.iter().take(50).map(|f| f.name()).collect();
    if files.len() > 50 {
        names.push(format!("and {} more", files.len() - 50));
    }
    names.join(", ")
}

/// `/healthz`'s check of HFS's own database: its backend's health check.
fn backend_check(backend: Arc<SqliteBackend>) -> crate::watch::Check {
    Arc::new(move || {
        let backend = backend.clone();
        Box::pin(async move {
            use helios_persistence::core::Backend;
            backend.health_check().await.map_err(|e| e.to_string())
        })
    })
}

/// How long a staged part may go without a stored chunk before the server
/// takes its writer for dead (a worker killed with its process): far longer
/// than HFS takes to write a part, as `export-store gc` assumes too.
const ABANDONED_AFTER: Duration = Duration::from_secs(3600);

/// Reclaims the staging of writers that died (a killed worker's parts are
/// never served, and would otherwise keep their space), on the export
/// cleanup's schedule.
fn spawn_reclaim_abandoned(store: SqliteOutputStore, every: Duration) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            match store.reclaim_abandoned(ABANDONED_AFTER).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(parts = n, "reclaimed the staging of abandoned writers"),
                Err(e) => tracing::warn!("reclaiming abandoned staging failed: {e}"),
            }
        }
    });
}

/// The bulk workers' shutdown signal and the tasks that must end before the
/// process does.
#[derive(Default)]
struct Workers {
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Workers {
    /// Stops claiming and waits for the running jobs to hand back their
    /// leases, at most `timeout`.
    async fn drain(&self, timeout: Duration) -> bool {
        self.stop.cancel();
        self.tasks.close();
        tokio::time::timeout(timeout, self.tasks.wait())
            .await
            .is_ok()
    }
}

/// HFS's own setting for how long shutdown waits for the workers.
fn drain_timeout() -> Duration {
    let secs = std::env::var("HFS_WORKER_SHUTDOWN_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(20);
    Duration::from_secs(secs)
}

/// Waits `pause`, or less if the workers are told to stop: `true` then.
async fn idle(stop: &CancellationToken, pause: Duration) -> bool {
    tokio::select! {
        biased;
        () = stop.cancelled() => true,
        () = tokio::time::sleep(pause) => false,
    }
}

/// How long a worker waits after finding no job, or after a failed claim.
fn claim_pause<T, E: std::fmt::Display>(claim: &Result<Option<T>, E>, what: &str) -> Duration {
    match claim {
        Ok(_) => Duration::from_secs(2),
        Err(e) => {
            tracing::error!("{what} worker claim failed: {e}");
            Duration::from_secs(5)
        }
    }
}

/// Bulk export: the workers (`HFS_BULK_EXPORT_WORKER_CONCURRENCY`), the
/// expired-output sweep, and the bundle HFS's routes use.
fn export_bundle(
    config: &ServerConfig,
    backend: &Arc<SqliteBackend>,
    output: Arc<dyn ExportOutputStore>,
    workers: &Workers,
) -> Option<helios_rest::BulkExportBundle> {
    let cfg: &BulkExportConfig = &config.bulk_export;
    let jobs: Arc<dyn BulkExportJobStore> = backend.clone();
    if cfg.disable_local_worker {
        tracing::info!("bulk export in-process workers are disabled");
    } else {
        let lease = Duration::from_secs(cfg.lease_duration_secs);
        let heartbeat = Duration::from_secs(cfg.heartbeat_interval_secs);
        let max_attempts = cfg.max_attempts;
        let exclude_newly_added = cfg.since_newly_added.eq_ignore_ascii_case("exclude");
        for i in 0..cfg.worker_concurrency {
            let worker_id = WorkerId::new(format!("hfs-worker-{i}"));
            let worker = DefaultExportWorker::new(
                jobs.clone(),
                backend.clone(),
                output.clone(),
                worker_id.clone(),
            )
            .with_exclude_since_newly_added(exclude_newly_added)
            .with_heartbeat_interval(heartbeat)
            .with_max_attempts(max_attempts)
            .with_shutdown(workers.stop.clone());
            let (jobs, stop) = (jobs.clone(), workers.stop.clone());
            workers.tasks.spawn(async move {
                // A claim is never raced against shutdown: one that commits
                // after its future was dropped leaves a job nobody runs.
                while !stop.is_cancelled() {
                    let claim = jobs.claim_next(&worker_id, lease, max_attempts).await;
                    let pause = claim_pause(&claim, "export");
                    if let Ok(Some(claimed)) = claim {
                        if let Err(e) = worker.run_job(claimed).await {
                            tracing::error!("export worker job failed: {e}");
                        }
                        continue;
                    }
                    if idle(&stop, pause).await {
                        break;
                    }
                }
            });
        }
        let (jobs, output) = (jobs.clone(), output.clone());
        let interval = Duration::from_secs(cfg.cleanup_interval_secs);
        let ttl = Duration::from_secs(cfg.output_ttl_secs);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                match jobs
                    .list_expired_exports(chrono::Utc::now(), ttl, 100)
                    .await
                {
                    Ok(expired) => {
                        for job in expired {
                            if let Err(e) =
                                output.delete_job_outputs(&job.tenant, &job.job_id).await
                            {
                                tracing::warn!(job = %job.job_id, "deleting expired export output failed: {e}");
                            }
                            let _ = jobs.delete_export(&job.tenant, &job.job_id).await;
                        }
                    }
                    Err(e) => tracing::error!("export cleanup scan failed: {e}"),
                }
            }
        });
    }
    Some(helios_rest::BulkExportBundle {
        jobs,
        output,
        file_auth: Arc::new(BearerScopeAuth),
    })
}

/// Bulk submit: the input fetcher, the deferred search-index rebuild, the
/// workers (`HFS_BULK_SUBMIT_WORKER_CONCURRENCY`), the expired-submission
/// sweep, and the bundle HFS's routes use. `None` when
/// `HFS_BULK_SUBMIT_ENABLED` is off.
fn submit_bundle(
    config: &ServerConfig,
    backend: &Arc<SqliteBackend>,
    output: Arc<dyn ExportOutputStore>,
    workers: &Workers,
) -> Result<Option<helios_rest::BulkSubmitBundle>, Box<dyn std::error::Error>> {
    let cfg: &BulkSubmitConfig = &config.bulk_submit;
    if !cfg.enabled {
        return Ok(None);
    }
    let jobs: Arc<dyn BulkSubmitJobStore> = backend.clone();
    let token_provider: Option<Arc<dyn FileTokenProvider>> =
        match (cfg.client_id.as_deref(), cfg.private_key.as_deref()) {
            (Some(client_id), Some(pem)) => Some(
                helios_rest::bulk_submit_oauth::JwtClientCredentialsTokenProvider::new(
                    client_id,
                    pem,
                    &cfg.signing_alg,
                )
                .ok_or_else(|| {
                    format!(
                        "HFS_BULK_SUBMIT_PRIVATE_KEY could not be parsed as a {} PEM key",
                        cfg.signing_alg
                    )
                })?,
            ),
            _ => None,
        };
    let decryption_keys = match cfg.decryption_key.as_deref() {
        Some(material) => helios_rest::jwe::load_private_keys(material)
            .map_err(|e| format!("HFS_BULK_SUBMIT_DECRYPTION_KEY is invalid: {e}"))?,
        None => Vec::new(),
    };
    let fetcher: Arc<dyn SubmitInputFetcher> = Arc::new(
        helios_rest::bulk_submit_fetcher::HttpSubmitInputFetcher::new(
            token_provider,
            cfg.outbound_scope.clone(),
        )
        .with_read_timeout(Duration::from_secs(cfg.fetch_read_timeout_secs))
        .with_decryption_keys(decryption_keys),
    );

    if cfg.disable_local_worker {
        tracing::info!("bulk submit in-process workers are disabled");
    } else {
        // HFS defers search indexing during a submission and rebuilds the
        // index of the types it loaded afterwards; the ledger lets a restart
        // finish a rebuild an earlier run left open.
        let reindex: Option<Arc<dyn DeferredReindexHook>> = Some(Arc::new(
            ReindexOnFinish::with_max_concurrency(
                Arc::new(ReindexOperation::new(
                    backend.clone(),
                    backend.tenant_registries().clone(),
                )),
                cfg.worker_concurrency as usize,
            )
            .with_batch_size(config.reindex_batch_size)
            .with_batch_bytes(config.reindex_batch_bytes)
            .with_bulk_index_rebuild(cfg.bulk_index_rebuild)
            .with_ledger(backend.clone()),
        ));
        // SQLite serialises writers: HFS runs one file at a time there.
        let file_concurrency = cfg.effective_file_concurrency(BackendKind::Sqlite).max(1) as usize;
        let lease = Duration::from_secs(cfg.lease_duration_secs);
        for i in 0..cfg.worker_concurrency {
            let worker_id = WorkerId::new(format!("hfs-submit-worker-{i}"));
            let worker = DefaultSubmitWorker::new(
                jobs.clone(),
                fetcher.clone(),
                output.clone(),
                worker_id.clone(),
            )
            .with_deferred_indexing(cfg.defer_indexing, reindex.clone())
            .with_file_concurrency(file_concurrency)
            .with_batch_size(cfg.batch_size)
            .with_skip_unchanged(cfg.skip_unchanged)
            .with_shutdown(workers.stop.clone());
            let (jobs, stop) = (jobs.clone(), workers.stop.clone());
            workers.tasks.spawn(async move {
                while !stop.is_cancelled() {
                    let claim = jobs.claim_next_manifest(&worker_id, lease).await;
                    let pause = claim_pause(&claim, "submit");
                    if let Ok(Some(claimed)) = claim {
                        if let Err(e) = worker.run_job(claimed).await {
                            tracing::error!("submit worker job failed: {e}");
                        }
                        continue;
                    }
                    if idle(&stop, pause).await {
                        break;
                    }
                }
            });
        }
        let (jobs, output) = (jobs.clone(), output.clone());
        let interval = Duration::from_secs(cfg.cleanup_interval_secs);
        let ttl = Duration::from_secs(cfg.output_ttl_secs);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let report =
                    helios_persistence::core::bulk_submit_worker::sweep_expired_submissions(
                        jobs.as_ref(),
                        output.as_ref(),
                        chrono::Utc::now(),
                        ttl,
                        100,
                    )
                    .await;
                tracing::debug!(?report, "submit cleanup pass finished");
            }
        });
    }
    Ok(Some(helios_rest::BulkSubmitBundle {
        jobs,
        fetcher,
        output,
        file_auth: Arc::new(BearerScopeAuth),
    }))
}
