//! `export-store serve`: HFS's download route over HTTP, from a store file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use sqlite_export_store::server::{self, ServerConfig, DEFAULT_TENANT};
use sqlite_export_store::{SqliteOutputStore, StoreOptions};

/// Arguments of `export-store serve`.
#[derive(clap::Args)]
pub struct Args {
    /// The store's database file (it must exist).
    #[arg(long, default_value = crate::DEFAULT_DB)]
    db: PathBuf,
    /// The address to listen on; port 0 picks a free port. The address is
    /// printed on the first line of standard output.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Grants `Authorization: Bearer SECRET` access to the default tenant's
    /// files (at least 16 visible ASCII characters). Repeatable.
    #[arg(long = "token", value_name = "SECRET")]
    tokens: Vec<String>,
    /// Grants `Authorization: Bearer SECRET` access to one tenant's files
    /// (split at the first `=`). Repeatable.
    #[arg(long = "tenant-token", value_name = "TENANT=SECRET")]
    tenant_tokens: Vec<String>,
    /// Accept signed URLs verified with this key (the file's bytes, less a
    /// trailing line end; at least 16 bytes), as minted by a store opened
    /// with the same key.
    #[arg(long, value_name = "FILE")]
    signing_key_file: Option<PathBuf>,
    /// The base URL download URLs point at; routes are served under its
    /// path. Default: `http://{addr}`.
    #[arg(long, value_name = "URL")]
    base_url: Option<String>,
    /// The tenant of `/export-file/...` requests (`/{tenant}/export-file/...`
    /// names its own).
    #[arg(long, default_value = DEFAULT_TENANT)]
    tenant: String,
    /// Never compress on the wire (for clients that mishandle multi-frame
    /// zstd or gzip).
    #[arg(long)]
    identity_only: bool,
}

/// Runs the command: serves until Ctrl-C or SIGTERM, then lets open
/// downloads finish (a second signal stops at once).
pub fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if !args.db.is_file() {
        return Err(format!("no store at {}", args.db.display()).into());
    }
    let mut options = StoreOptions::default();
    if let Some(f) = &args.signing_key_file {
        let key = server::read_signing_key_file(f)
            .map_err(|e| format!("cannot read the signing key file {}: {e}", f.display()))?;
        options = options.with_signing_key(key);
    }
    let mut config = ServerConfig::new()
        .with_default_tenant(args.tenant.clone())
        .with_identity_only(args.identity_only);
    for secret in &args.tokens {
        config = config.with_token(args.tenant.clone(), secret.as_bytes());
    }
    for grant in &args.tenant_tokens {
        let (tenant, secret) = grant
            .split_once('=')
            .ok_or("--tenant-token takes TENANT=SECRET")?;
        config = config.with_token(tenant, secret.as_bytes());
    }
    let open =
        args.tokens.is_empty() && args.tenant_tokens.is_empty() && args.signing_key_file.is_none();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.addr)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", args.addr))?;
        let addr = listener.local_addr()?;
        let base_url = args.base_url.unwrap_or_else(|| format!("http://{addr}"));
        let store = SqliteOutputStore::open_with(&args.db, &base_url, options)?;
        let router = server::router(store, config)?;
        if open && !addr.ip().is_loopback() {
            tracing::warn!(%addr, "serving without any token or signing key on a non-loopback address");
        }
        println!("listening on http://{addr}");
        tracing::info!(%addr, %base_url, db = %args.db.display(), "serving export files");

        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut serving = tokio::spawn(server::serve(listener, router, async move {
            let _ = stopped.await;
        }));
        tokio::select! {
            r = &mut serving => return r?.map(|()| ExitCode::SUCCESS).map_err(Into::into),
            () = signal() => {}
        }
        tracing::info!("shutting down: waiting for open downloads (signal again to stop now)");
        let _ = stop.send(());
        tokio::select! {
            r = serving => r??,
            () = signal() => tracing::warn!("stopped with downloads still open"),
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Ctrl-C, or SIGTERM on Unix.
async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
