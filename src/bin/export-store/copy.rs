//! `export-store copy --to s3://BUCKET[/PREFIX]`: finished parts into S3 (or
//! any S3-compatible store) under exactly the keys HFS's own
//! `S3OutputStore` uses, `{tenant}/exports/{job}/{file_type}-{Type}-{n}-{token}.ndjson`
//! (helios-persistence 0.2.7), so that an HFS deployment on S3 reads and
//! presigns them as its own: the hand-off when one node is not enough.
//!
//! Each part streams from the store's verifying reader into one object: in
//! one `PUT` up to `--part-size`, in a multipart upload of `--part-size`
//! pieces above it, published only after the reader verified the whole
//! part and aborted otherwise (see `copy/upload.rs`), so nothing partial
//! is ever visible under a part's key. Memory stays bounded: about
//! `--concurrency` × (`IN_FLIGHT` + 1) × `--part-size` at most.
//!
//! Resumable: an object already there with the part's size is skipped
//! (`--force` rewrites it); one of another size is not touched and the part
//! fails with the reason, since S3 objects are never half-written and such
//! an object is some other content. A run cut off in a multipart upload
//! starts that part again; the pieces it had sent stay invisible until the
//! bucket's `AbortIncompleteMultipartUpload` lifecycle rule removes them.
//!
//! Exit status: 0 every part copied or already there (for `--dry-run`:
//! none would fail), 1 the copy could not start (no store, no credentials,
//! the endpoint or bucket unreachable), 2 a bad argument, 3 some parts
//! failed (each named), 4 `--tenant`/`--job` matched no finished part,
//! 130 interrupted (Ctrl-C or SIGTERM; uploads under way are aborted).

mod credentials;
mod target;
mod upload;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};
use serde::Serialize;
use sqlite_export_store::{ExportOutputStore, PartSummary, SqliteOutputStore};
use tokio::sync::watch;

use crate::ops::{plural, show_bytes, Failure, FinishedParts};
use crate::partname;
use credentials::{ProcessEnv, Source};
use target::BucketUrl;
use upload::{Plan, UploadError};

/// The exit status when some parts failed.
pub const SOME_FAILED: u8 = 3;
/// The exit status after Ctrl-C or SIGTERM (128 + SIGINT, as shells do).
pub const INTERRUPTED: u8 = 130;
/// Pieces of one multipart upload on the wire at once.
const IN_FLIGHT: usize = 2;
/// S3's smallest piece of a multipart upload (but the last).
const MIN_PART_SIZE: u64 = 5 << 20;
/// S3's largest piece.
const MAX_PART_SIZE: u64 = 5 << 30;

/// Arguments of `export-store copy`.
#[derive(clap::Args)]
#[command(after_help = "\
Credentials come from the standard AWS chain: AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN); else the AWS_PROFILE (or
default) profile's keys in ~/.aws/credentials or ~/.aws/config; else web
identity, the ECS task role or the EC2 instance role.

Exit status: 0 every part copied or already there, 1 the copy could not
start, 2 a bad argument, 3 some parts failed (named on standard error),
4 --tenant/--job matched no finished part, 130 interrupted.")]
pub struct Args {
    /// The bucket, with an optional key prefix. HFS's S3OutputStore reads
    /// its bucket's root: with a PREFIX, HFS does not find the parts.
    #[arg(long, value_name = "s3://BUCKET[/PREFIX]", value_parser = target::parse_bucket_url)]
    to: BucketUrl,
    /// An S3-compatible endpoint (MinIO, Ceph, moto, ...), addressed
    /// path-style as HFS does with a custom endpoint. Default:
    /// AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, else AWS itself.
    #[arg(long, value_name = "URL", value_parser = parse_endpoint)]
    endpoint: Option<String>,
    /// The bucket's region. Default: AWS_REGION, AWS_DEFAULT_REGION, the
    /// profile's region, else us-east-1.
    #[arg(long)]
    region: Option<String>,
    #[command(flatten)]
    parts: FinishedParts,
    /// Upload even parts whose object is already there (with any size).
    #[arg(long)]
    force: bool,
    /// List what would be uploaded or skipped, and upload nothing (the
    /// bucket is still read, to tell which objects are there).
    #[arg(long)]
    dry_run: bool,
    /// Print the summary as one JSON document on standard output.
    #[arg(long)]
    json: bool,
    /// Parts copied at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    concurrency: u16,
    /// Parts up to this size go up in one PUT; larger ones in a multipart
    /// upload of pieces this size: a number of bytes, or with KiB, MiB or
    /// GiB (5MiB to 5GiB).
    #[arg(long, default_value = "8MiB", value_parser = parse_part_size)]
    part_size: u64,
}

/// What became of one part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Action {
    /// Uploaded in this run.
    Uploaded,
    /// Its object was already there with its size.
    Skipped,
    /// Not copied: see the error.
    Failed,
    /// `--dry-run`: would be uploaded.
    WouldUpload,
    /// `--dry-run`: would be skipped.
    WouldSkip,
    /// Not started before the run was interrupted.
    NotStarted,
}

/// One part in the summary.
#[derive(Debug, Serialize)]
struct PartResult {
    /// The part, as `export-store ls` names it.
    part: String,
    /// The object key.
    key: String,
    /// NDJSON bytes.
    bytes: u64,
    action: Action,
    /// Pieces of its multipart upload (0: one PUT, or none).
    pieces: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The summary, printed as text or (`--json`) as one document.
#[derive(Debug, Serialize)]
struct Summary {
    to: String,
    endpoint: Option<String>,
    dry_run: bool,
    parts: u64,
    uploaded: u64,
    skipped: u64,
    failed: u64,
    not_started: u64,
    bytes_uploaded: u64,
    bytes_skipped: u64,
    multipart_uploads: u64,
    seconds: f64,
    interrupted: bool,
    results: Vec<PartResult>,
}

/// Runs `copy`.
pub fn run(args: Args) -> Result<ExitCode, Failure> {
    let (store, rt, parts) = match args.parts.select("copy")? {
        Ok(selected) => selected,
        Err(code) => return Ok(code),
    };

    let resolved = credentials::resolve(&ProcessEnv, args.region.as_deref())?;
    let endpoint = args.endpoint.clone().or_else(endpoint_from_env);
    rt.block_on(preflight(&args.to, endpoint.as_deref(), &resolved))?;
    let s3 = connect(&args.to, endpoint.as_deref(), &resolved)?;

    let started = Instant::now();
    let (cancel_tx, cancel) = watch::channel(false);
    let summary = rt.block_on(async {
        let copying = copy_all(&store, &s3, &args, parts, cancel);
        tokio::pin!(copying);
        tokio::select! {
            summary = &mut copying => summary,
            () = crate::signal() => {
                eprintln!("export-store copy: interrupted: aborting the uploads under way");
                let _ = cancel_tx.send(true);
                copying.await
            }
        }
    });
    let mut summary = Summary {
        to: args.to.to_string(),
        endpoint,
        seconds: started.elapsed().as_secs_f64(),
        ..summary
    };
    summary.interrupted = *cancel_tx.borrow();
    report(&summary, args.json)?;
    Ok(if summary.interrupted {
        ExitCode::from(INTERRUPTED)
    } else if summary.failed > 0 {
        ExitCode::from(SOME_FAILED)
    } else {
        ExitCode::SUCCESS
    })
}

/// Copies (or, `--dry-run`, plans) every part, `--concurrency` at once.
async fn copy_all(
    store: &SqliteOutputStore,
    s3: &Arc<dyn ObjectStore>,
    args: &Args,
    parts: Vec<PartSummary>,
    cancel: watch::Receiver<bool>,
) -> Summary {
    let total: u64 = parts.iter().map(|p| p.byte_count).sum();
    let bar = (std::io::stderr().is_terminal() && !args.dry_run).then(|| {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} copying [{bar:32}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg} ({eta} left)",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar
    });
    let count = parts.len();
    let done = AtomicU64::new(0);
    let plan = Plan {
        part_size: args.part_size as usize,
        in_flight: IN_FLIGHT,
    };
    let bar_ref = &bar;
    let done_ref = &done;
    let mut results: Vec<PartResult> = stream::iter(parts)
        .map(|part| {
            let cancel = cancel.clone();
            async move {
                let advance = |n: u64| {
                    if let Some(bar) = bar_ref {
                        bar.inc(n);
                    }
                };
                let result = copy_part(store, s3, args, &part, plan, &advance, cancel).await;
                if result.action == Action::Failed {
                    let line = format!(
                        "export-store copy: {} -> {}: {}",
                        result.part,
                        result.key,
                        result.error.as_deref().unwrap_or("")
                    );
                    match bar_ref {
                        Some(bar) => bar.println(line),
                        None => eprintln!("{line}"),
                    }
                }
                if let Some(bar) = bar_ref {
                    if matches!(result.action, Action::Skipped) {
                        bar.inc(result.bytes);
                    }
                    let n = done_ref.fetch_add(1, Ordering::Relaxed) + 1;
                    bar.set_message(format!("{n}/{count} parts"));
                }
                result
            }
        })
        .buffer_unordered(usize::from(args.concurrency))
        .collect()
        .await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    results.sort_by(|a, b| a.key.cmp(&b.key));
    let sum = |action: Action| results.iter().filter(move |r| r.action == action);
    Summary {
        to: String::new(),
        endpoint: None,
        dry_run: args.dry_run,
        parts: results.len() as u64,
        uploaded: sum(Action::Uploaded).count() as u64,
        skipped: sum(Action::Skipped).count() as u64,
        failed: sum(Action::Failed).count() as u64,
        not_started: sum(Action::NotStarted).count() as u64,
        bytes_uploaded: sum(Action::Uploaded).map(|r| r.bytes).sum(),
        bytes_skipped: sum(Action::Skipped).map(|r| r.bytes).sum(),
        multipart_uploads: sum(Action::Uploaded).filter(|r| r.pieces > 0).count() as u64,
        seconds: 0.0,
        interrupted: false,
        results,
    }
}

/// Copies one part: looks for its object, then uploads it unless it is
/// there with the part's size (or, `--force`, whatever is there).
async fn copy_part(
    store: &SqliteOutputStore,
    s3: &Arc<dyn ObjectStore>,
    args: &Args,
    part: &PartSummary,
    plan: Plan,
    advance: &(dyn Fn(u64) + Sync),
    cancel: watch::Receiver<bool>,
) -> PartResult {
    let key = args.to.object_key(&part.key);
    let mut result = PartResult {
        part: partname::name(&part.key),
        key: key.clone(),
        bytes: part.byte_count,
        action: Action::Failed,
        pieces: 0,
        error: None,
    };
    if *cancel.borrow() {
        result.action = Action::NotStarted;
        return result;
    }
    let fail = |mut r: PartResult, why: String| {
        r.action = Action::Failed;
        r.error = Some(why);
        r
    };
    // The client would encode what S3 keeps literally; such a key is not
    // HFS's, so it is refused rather than changed.
    let path = match ObjectPath::parse(&key) {
        Ok(p) if p.as_ref() == key => p,
        _ => {
            return fail(
                result,
                "refused: the key has an empty, `.` or `..` segment or a control character, \
                 and cannot be stored exactly as HFS names it"
                    .into(),
            )
        }
    };
    let there = match s3.head(&path).await {
        Ok(meta) => Some(meta.size as u64),
        Err(object_store::Error::NotFound { .. }) => None,
        Err(e) => return fail(result, format!("cannot look for the object: {e}")),
    };
    match there {
        Some(size) if size == part.byte_count && !args.force => {
            result.action = if args.dry_run {
                Action::WouldSkip
            } else {
                Action::Skipped
            };
            return result;
        }
        Some(size) if !args.force => {
            return fail(
                result,
                format!(
                    "an object of {size} bytes is already there (the part has {}): left as it \
                     is; --force replaces it",
                    part.byte_count
                ),
            )
        }
        _ => {}
    }
    if args.dry_run {
        result.action = Action::WouldUpload;
        return result;
    }
    let reader = match store.open_reader(&part.key).await {
        Ok(r) => r,
        Err(e) => return fail(result, format!("cannot read the part: {e}")),
    };
    match upload::upload(s3, &path, reader, plan, advance, cancel).await {
        Ok(sent) if sent.bytes == part.byte_count => {
            result.action = Action::Uploaded;
            result.pieces = sent.pieces;
            result
        }
        Ok(sent) => fail(
            result,
            format!(
                "the store's reader gave {} bytes where the part has {}; the object holds what was read",
                sent.bytes, part.byte_count
            ),
        ),
        Err(UploadError::Interrupted) => {
            result.action = Action::NotStarted;
            result.error = Some("interrupted; the upload was aborted".into());
            result
        }
        Err(e) => fail(result, format!("not uploaded: {e}")),
    }
}

/// The endpoint the standard AWS variables name, if any.
fn endpoint_from_env() -> Option<String> {
    ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]
        .into_iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.trim().is_empty()))
}

/// The S3 client for the copy: retries with backoff for up to a minute.
fn connect(
    to: &BucketUrl,
    endpoint: Option<&str>,
    resolved: &credentials::Resolved,
) -> Result<Arc<dyn ObjectStore>, Failure> {
    let retry = RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: 5,
        retry_timeout: Duration::from_secs(60),
    };
    Ok(Arc::new(builder(to, endpoint, resolved, retry).build()?))
}

/// Checks, in one request and without retries, that the endpoint answers,
/// the credentials are accepted and the bucket exists, so that a typo
/// fails at once with one message instead of once per part.
async fn preflight(
    to: &BucketUrl,
    endpoint: Option<&str>,
    resolved: &credentials::Resolved,
) -> Result<(), Failure> {
    let retry = RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: 0,
        retry_timeout: Duration::from_secs(10),
    };
    let probe = builder(to, endpoint, resolved, retry).build()?;
    let prefix = to.prefix.as_deref().map(ObjectPath::from);
    let first = probe.list(prefix.as_ref()).next().await;
    match first {
        None | Some(Ok(_)) => Ok(()),
        Some(Err(e)) => Err(format!(
            "cannot list {to} at {} (with {}): {e}",
            endpoint.unwrap_or("AWS"),
            resolved.describe()
        )
        .into()),
    }
}

fn builder(
    to: &BucketUrl,
    endpoint: Option<&str>,
    resolved: &credentials::Resolved,
    retry: RetryConfig,
) -> AmazonS3Builder {
    let http = endpoint.is_some_and(|e| e.starts_with("http://"));
    let mut b = AmazonS3Builder::new()
        .with_bucket_name(&to.bucket)
        .with_region(&resolved.region)
        .with_retry(retry)
        .with_client_options(
            ClientOptions::new()
                .with_allow_http(http)
                .with_connect_timeout(Duration::from_secs(5))
                .with_timeout(Duration::from_secs(300)),
        );
    b = match endpoint {
        // As HFS does with a custom endpoint: path-style requests.
        Some(e) => b
            .with_endpoint(e.trim_end_matches('/'))
            .with_virtual_hosted_style_request(false),
        // AWS: virtual-hosted, but for dotted names (TLS wildcards).
        None => b.with_virtual_hosted_style_request(!to.bucket.contains('.')),
    };
    match &resolved.source {
        Source::Keys(keys, _) => {
            b = b
                .with_access_key_id(&keys.access_key_id)
                .with_secret_access_key(&keys.secret_access_key);
            if let Some(t) = &keys.session_token {
                b = b.with_token(t);
            }
        }
        Source::Role(_) => {
            // Web identity is read from the environment by the builder.
            if let Ok(uri) = std::env::var("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") {
                b = b.with_config(AmazonS3ConfigKey::ContainerCredentialsRelativeUri, uri);
            }
        }
    }
    b
}

fn report(summary: &Summary, json: bool) -> Result<(), Failure> {
    if json {
        println!("{}", serde_json::to_string(summary)?);
        return Ok(());
    }
    if summary.dry_run {
        for r in &summary.results {
            let what = match r.action {
                Action::WouldUpload => "would upload",
                Action::WouldSkip => "would skip (there, same size)",
                _ => "would fail",
            };
            println!("{what}: {} -> {} ({})", r.part, r.key, show_bytes(r.bytes));
        }
        let would_upload: Vec<_> = summary
            .results
            .iter()
            .filter(|r| r.action == Action::WouldUpload)
            .collect();
        let n = would_upload.len() as u64;
        let bytes: u64 = would_upload.iter().map(|r| r.bytes).sum();
        println!(
            "dry run: would upload {n} part{} ({}) to {}; {} already there (same size), {} would fail; nothing written",
            plural(n),
            show_bytes(bytes),
            summary.to,
            summary
                .results
                .iter()
                .filter(|r| r.action == Action::WouldSkip)
                .count(),
            summary.failed
        );
        return Ok(());
    }
    let rate = summary.bytes_uploaded as f64 / summary.seconds.max(1e-9) / (1 << 20) as f64;
    println!(
        "copied {} part{} ({}, {:.1} MiB/s) to {} in {:.1} s; {} already there (same size), {} failed{}",
        summary.uploaded,
        plural(summary.uploaded),
        show_bytes(summary.bytes_uploaded),
        rate,
        summary.to,
        summary.seconds,
        summary.skipped,
        summary.failed,
        if summary.interrupted {
            format!("; interrupted, {} not copied", summary.not_started)
        } else {
            String::new()
        }
    );
    Ok(())
}

/// Parses `--endpoint`: an `http://` or `https://` URL.
fn parse_endpoint(s: &str) -> Result<String, String> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or_else(|| format!("{s:?}: expected an http:// or https:// URL"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("{s:?}: no host"));
    }
    Ok(s.to_string())
}

/// Parses `--part-size`: bytes, or a number with KiB, MiB or GiB; 5 MiB
/// to 5 GiB, S3's limits for a piece.
fn parse_part_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected a size such as 8MiB"))?;
    let scale = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => return Err(format!("{s:?}: unknown unit {other:?} (B, KiB, MiB, GiB)")),
    };
    let size = n
        .checked_mul(scale)
        .ok_or_else(|| format!("{s:?} is too large"))?;
    if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&size) {
        return Err(format!("{s:?}: S3 takes multipart pieces of 5MiB to 5GiB"));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_sizes_and_endpoints() {
        assert_eq!(parse_part_size("8MiB").unwrap(), 8 << 20);
        assert_eq!(parse_part_size("5242880").unwrap(), 5 << 20);
        assert_eq!(parse_part_size("1GiB").unwrap(), 1 << 30);
        for bad in ["4MiB", "6GiB", "8MB", "", "x", "99999999999999GiB"] {
            assert!(parse_part_size(bad).is_err(), "{bad}");
        }
        assert!(parse_endpoint("http://127.0.0.1:9000").is_ok());
        assert!(parse_endpoint("https://s3.example.org/").is_ok());
        for bad in ["127.0.0.1:9000", "s3://x", "http://", "ftp://h"] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }
}
