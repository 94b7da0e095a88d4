//! `export-store serve`: HFS's download route over HTTP, from a store file.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use sqlite_export_store::server::{self, ServerConfig, DEFAULT_TENANT, MIN_TOKEN_BYTES};
use sqlite_export_store::{SqliteOutputStore, StoreOptions, MAX_ID_BYTES};

/// The exit status when a token file is refused (as for a bad argument).
const BAD_TOKEN_FILE: u8 = 2;
/// The largest token file read, in bytes: a token file holds a few lines.
const MAX_TOKEN_FILE_BYTES: u64 = 1 << 20;

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
    /// files (at least 16 visible ASCII characters). Repeatable. Every local
    /// user can read a command line (`ps`): `--token-file` keeps the secret
    /// out of it.
    #[arg(long = "token", value_name = "SECRET")]
    tokens: Vec<String>,
    /// Grants `Authorization: Bearer SECRET` access to one tenant's files
    /// (split at the first `=`). Repeatable. Every local user can read a
    /// command line (`ps`): `--tenant-token-file` keeps the secret out of it.
    #[arg(long = "tenant-token", value_name = "TENANT=SECRET")]
    tenant_tokens: Vec<String>,
    /// Like `--token`, for every secret in the file: one per line; blank
    /// lines, lines starting with `#` and whitespace around a line are
    /// ignored. Read once at start. Repeatable, and adds to `--token`. A
    /// file other users can read or change is used, with a warning.
    #[arg(long = "token-file", value_name = "PATH")]
    token_files: Vec<PathBuf>,
    /// Like `--tenant-token`, for every `TENANT=SECRET` line in the file
    /// (comments and blank lines as in `--token-file`). The tenant id ends
    /// at the first `=`, so a tenant id holding `=` cannot be granted here;
    /// a secret may hold `=`. Repeatable, and adds to `--tenant-token`.
    #[arg(long = "tenant-token-file", value_name = "PATH")]
    tenant_token_files: Vec<PathBuf>,
    /// Accept signed URLs verified with this key (the file's bytes, less a
    /// trailing line end; at least 16 bytes), as minted by a store opened
    /// with the same key.
    #[arg(long, value_name = "FILE")]
    signing_key_file: Option<PathBuf>,
    /// The base URL download URLs point at; routes are served under its
    /// path. Default: `http://{addr}`.
    #[arg(long, value_name = "URL")]
    base_url: Option<String>,
    /// Who checkpoints the store's write-ahead log: `store` (the store
    /// itself; the default) or `external`, when Litestream (or another
    /// replicator that reads the log) runs beside the store and checkpoints
    /// it. With `external` the store never checkpoints, so a replicator
    /// never has to upload a fresh full snapshot because of the store.
    #[arg(long, value_enum, default_value_t = crate::Checkpointing::Store)]
    checkpoints: crate::Checkpointing,
    /// The tenant of `/export-file/...` requests (`/{tenant}/export-file/...`
    /// names its own).
    #[arg(long, default_value = DEFAULT_TENANT)]
    tenant: String,
    /// Never compress on the wire (for clients that mishandle multi-frame
    /// zstd or gzip).
    #[arg(long)]
    identity_only: bool,
    /// Also serve `GET /metrics` (Prometheus text format: requests, bytes
    /// sent by encoding, download durations, open downloads, the store's
    /// parts and sizes) and `GET /healthz` (200 while the database answers,
    /// else 503 with the reason) on a listener of their own at this address
    /// (port 0 picks a free port), printed as `metrics on http://ADDR` on
    /// the line after `listening on`. Neither asks for a token: keep it on a
    /// private address. Off by default, and neither path is then served on
    /// any port.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Open the store read-only, for a copy of the file another process or
    /// node writes (a replica a Litestream restore keeps current) or a file
    /// or folder this process may not write: nothing is created, migrated
    /// or written (no checkpoints, no space reclamation), and a file at
    /// another schema version is refused at start. Parts appear as the
    /// writer finalizes them. In a folder it may not write, the store's
    /// `-wal` and `-shm` files must already exist beside it (a writer that
    /// has the store open keeps them); a file in rollback-journal mode (an
    /// `export-store backup` copy) needs neither.
    #[arg(long)]
    read_only: bool,
}

/// Runs the command: serves until Ctrl-C or SIGTERM, then lets open
/// downloads finish (a second signal stops at once).
pub fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    crate::init_logging();
    let mut file_grants = Vec::new();
    let files = [
        (TokenFile::Secrets, &args.token_files),
        (TokenFile::TenantSecrets, &args.tenant_token_files),
    ];
    for (kind, paths) in files {
        for path in paths {
            match read_token_file(kind, path) {
                Ok(grants) => file_grants.extend(grants),
                Err(message) => {
                    eprintln!("export-store: {message}");
                    return Ok(ExitCode::from(BAD_TOKEN_FILE));
                }
            }
        }
    }
    if !args.db.is_file() {
        return Err(format!("no store at {}", args.db.display()).into());
    }
    let mut options = StoreOptions::default()
        .with_read_only(args.read_only)
        .with_checkpoints(args.checkpoints.option());
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
    let open = args.tokens.is_empty()
        && args.tenant_tokens.is_empty()
        && file_grants.is_empty()
        && args.signing_key_file.is_none();
    for (tenant, secret) in file_grants {
        let tenant = tenant.unwrap_or_else(|| args.tenant.clone());
        config = config.with_token(tenant, secret.into_bytes());
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.addr)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", args.addr))?;
        let addr = listener.local_addr()?;
        let metrics_listener = match args.metrics_addr {
            Some(a) => Some(crate::watch::bind(a).await?),
            None => None,
        };
        let base_url = args.base_url.unwrap_or_else(|| format!("http://{addr}"));
        let store = SqliteOutputStore::open_with(&args.db, &base_url, options)?;
        let (config, watch) = match metrics_listener {
            Some(listener) => {
                let (metrics, router) = crate::watch::for_serve(&store);
                (config.with_metrics(metrics), Some((listener, router)))
            }
            None => (config, None),
        };
        let router = server::router(store, config)?;
        if open && !addr.ip().is_loopback() {
            tracing::warn!(%addr, "serving without any token or signing key on a non-loopback address");
        }
        println!("listening on http://{addr}");
        if let Some((listener, router)) = watch {
            crate::watch::spawn(listener, router)?;
        }
        tracing::info!(%addr, %base_url, db = %args.db.display(), read_only = args.read_only, "serving export files");

        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut serving = tokio::spawn(server::serve(listener, router, async move {
            let _ = stopped.await;
        }));
        tokio::select! {
            r = &mut serving => return r?.map(|()| ExitCode::SUCCESS).map_err(Into::into),
            () = crate::signal() => {}
        }
        tracing::info!("shutting down: waiting for open downloads (signal again to stop now)");
        let _ = stop.send(());
        tokio::select! {
            r = serving => r??,
            () = crate::signal() => tracing::warn!("stopped with downloads still open"),
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// The two kinds of token file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TokenFile {
    /// `--token-file`: one secret a line, for the default tenant.
    Secrets,
    /// `--tenant-token-file`: one `TENANT=SECRET` a line.
    TenantSecrets,
}

impl TokenFile {
    fn flag(self) -> &'static str {
        match self {
            TokenFile::Secrets => "--token-file",
            TokenFile::TenantSecrets => "--tenant-token-file",
        }
    }
}

/// One grant read from a token file: the tenant (`None`: the default
/// tenant) and the secret.
type Grant = (Option<String>, String);

/// Reads and checks a token file. The error names the flag, the file and,
/// for a bad line, its number, and never shows any of the file's text (a
/// line that is not what it should be may still be a secret). Warns when
/// other users may read or change the file.
fn read_token_file(kind: TokenFile, path: &Path) -> Result<Vec<Grant>, String> {
    let flag = kind.flag();
    let shown = path.display();
    let cannot = |e: std::io::Error| format!("{flag} {shown}: cannot read it: {e}");
    let mut file = std::fs::File::open(path).map_err(cannot)?;
    warn_if_shared(flag, path, &file);
    let mut text = Vec::new();
    file.by_ref()
        .take(MAX_TOKEN_FILE_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(cannot)?;
    if text.len() as u64 > MAX_TOKEN_FILE_BYTES {
        return Err(format!(
            "{flag} {shown}: larger than {MAX_TOKEN_FILE_BYTES} bytes; is this a token file?"
        ));
    }
    let grants = parse_token_file(kind, &text)
        .map_err(|(line, why)| format!("{flag} {shown}: line {line}: {why}"))?;
    if grants.is_empty() {
        return Err(format!(
            "{flag} {shown}: holds no secret (only blank lines and comments)"
        ));
    }
    Ok(grants)
}

/// Parses a token file's text: lines end with `\n` (a `\r` before it goes
/// with the whitespace trimmed from both ends of a line); empty lines and
/// lines starting with `#` are skipped. A bad line fails with its 1-based
/// number and what is wrong, in words that never quote the line.
fn parse_token_file(kind: TokenFile, text: &[u8]) -> Result<Vec<Grant>, (usize, String)> {
    let mut grants = Vec::new();
    for (i, raw) in text.split(|b| *b == b'\n').enumerate() {
        let number = i + 1;
        let line = std::str::from_utf8(raw)
            .map_err(|_| (number, "not UTF-8 text".to_string()))?
            .trim_ascii();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let grant = match kind {
            TokenFile::Secrets => (None, line),
            TokenFile::TenantSecrets => {
                let (tenant, secret) = line.split_once('=').ok_or((
                    number,
                    "expected TENANT=SECRET: there is no `=`".to_string(),
                ))?;
                check_tenant(tenant).map_err(|why| (number, why))?;
                (Some(tenant.to_string()), secret)
            }
        };
        check_secret(grant.1).map_err(|why| (number, why))?;
        grants.push((grant.0, grant.1.to_string()));
    }
    Ok(grants)
}

/// The rules `ServerConfig` applies to a token's tenant, plus no spaces at
/// either end (`acme = secret` is a mistake, not the tenant `acme `).
fn check_tenant(tenant: &str) -> Result<(), String> {
    if tenant.is_empty() {
        return Err("expected TENANT=SECRET: the tenant id before `=` is empty".into());
    }
    if tenant.len() > MAX_ID_BYTES {
        return Err(format!(
            "the tenant id is {} bytes; at most {MAX_ID_BYTES} allowed",
            tenant.len()
        ));
    }
    if tenant.chars().any(char::is_control) {
        return Err("the tenant id contains a control character".into());
    }
    if tenant.ends_with(char::is_whitespace) {
        return Err("the tenant id ends with whitespace (no spaces around `=`)".into());
    }
    Ok(())
}

/// The rules `ServerConfig` applies to a secret: at least
/// [`MIN_TOKEN_BYTES`] bytes of visible ASCII.
fn check_secret(secret: &str) -> Result<(), String> {
    if secret.is_empty() {
        return Err("the secret is empty".into());
    }
    if !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            "the secret must be visible ASCII, without spaces (it travels in a header)".into(),
        );
    }
    if secret.len() < MIN_TOKEN_BYTES {
        return Err(format!(
            "the secret is shorter than {MIN_TOKEN_BYTES} bytes"
        ));
    }
    Ok(())
}

/// Warns when a token file's mode lets users other than its owner read or
/// change it (Unix only).
#[cfg(unix)]
fn warn_if_shared(flag: &str, path: &Path, file: &std::fs::File) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = file.metadata() {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o066 != 0 {
            tracing::warn!(
                file = %path.display(),
                mode = %format!("{mode:03o}"),
                "{flag}: other users can read or change this file; `chmod 600` it"
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_shared(_flag: &str, _path: &Path, _file: &std::fs::File) {}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaa-secret";
    const B: &str = "bbbbbbbbbbbbbbbb=with=equals";

    #[test]
    fn secrets_files_skip_comments_blanks_and_line_ends() {
        let text = format!("# staging tokens\n\n  {A}  \r\n\t# old one\n{B}\r\n");
        let grants = parse_token_file(TokenFile::Secrets, text.as_bytes()).unwrap();
        assert_eq!(grants, vec![(None, A.into()), (None, B.into())]);
    }

    #[test]
    fn tenant_files_split_at_the_first_equals() {
        let text = format!("acme/research={B}\n# x=y\nacme={A}");
        let grants = parse_token_file(TokenFile::TenantSecrets, text.as_bytes()).unwrap();
        assert_eq!(
            grants,
            vec![
                (Some("acme/research".into()), B.into()),
                (Some("acme".into()), A.into())
            ]
        );
    }

    #[test]
    fn bad_lines_are_named_by_number_without_their_text() {
        let secret = "zzzzzzzzzzzzzzzzzzzz";
        let cases: &[(TokenFile, String, usize, &str)] = &[
            (
                TokenFile::Secrets,
                "# c\ntiny-secret".into(),
                2,
                "shorter than 16",
            ),
            (
                TokenFile::Secrets,
                format!("{A}\n\n{secret} {secret}"),
                3,
                "visible ASCII",
            ),
            (TokenFile::TenantSecrets, secret.into(), 1, "no `=`"),
            (
                TokenFile::TenantSecrets,
                format!("={secret}"),
                1,
                "tenant id before `=` is empty",
            ),
            (TokenFile::TenantSecrets, "acme=".into(), 1, "empty"),
            (
                TokenFile::TenantSecrets,
                format!("acme = {secret}"),
                1,
                "ends with whitespace",
            ),
            (
                TokenFile::TenantSecrets,
                format!("ac\tme={secret}"),
                1,
                "control character",
            ),
            (
                TokenFile::TenantSecrets,
                format!("{}={secret}", "t".repeat(MAX_ID_BYTES + 1)),
                1,
                "at most 256",
            ),
        ];
        for (kind, text, line, why) in cases {
            let (n, message) = parse_token_file(*kind, text.as_bytes()).unwrap_err();
            assert_eq!(n, *line, "{text:?}: {message}");
            assert!(message.contains(why), "{text:?}: {message}");
            assert!(!message.contains("zzzz") && !message.contains("tiny"));
        }
        let (n, message) = parse_token_file(TokenFile::Secrets, b"# ok\n\xff\xfe\n").unwrap_err();
        assert_eq!((n, message.as_str()), (2, "not UTF-8 text"));
    }

    #[test]
    fn files_of_only_comments_hold_no_grant() {
        let grants = parse_token_file(TokenFile::Secrets, b"# none yet\n\n").unwrap();
        assert!(grants.is_empty());
    }
}
