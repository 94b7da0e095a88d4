//! `export-store`: run a demo export into a store, import bulk NDJSON, serve
//! downloads, check, clean and back up a store, keep a replica's parts
//! current (`mirror`), and compare its speed with the baselines.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod backup;
mod bench;
mod cat;
#[cfg(feature = "s3")]
mod copy;
mod demo;
mod export;
#[cfg(feature = "hfs")]
mod hfs;
mod import;
mod ls;
mod manifest;
#[cfg(feature = "server")]
mod mirror;
mod ops;
mod partname;
#[cfg(feature = "server")]
mod serve;
#[cfg(feature = "server")]
mod watch;

/// A SQLite store for FHIR bulk-export output.
#[derive(Parser)]
#[command(name = "export-store", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a synthetic FHIR R4 export the way HFS does and print its manifest.
    Demo(demo::Args),
    /// Serve parts over HTTP at HFS's download route.
    #[cfg(feature = "server")]
    Serve(serve::Args),
    /// Run the Helios FHIR Server (HFS 0.2.7) with this store as its bulk
    /// export and bulk submit output.
    #[cfg(feature = "hfs")]
    Hfs(hfs::Args),
    /// Delete staged parts whose writer is gone.
    Gc(ops::GcArgs),
    /// Check every finished part and the database's integrity (exit status
    /// 0: all well; 3: problems found; 1: the check could not run).
    Verify(ops::VerifyArgs),
    /// List what the store holds: tenants, one tenant's jobs (--tenant),
    /// one job's parts (--job), with states, sizes and ages (exit status 4:
    /// --tenant/--job matched nothing).
    Ls(ls::Args),
    /// Write one finished part's verified NDJSON (or, --frames, its zstd
    /// frames) to standard output (exit status 3: the part is damaged; 4:
    /// no such part).
    Cat(cat::Args),
    /// Write finished parts as files in HFS's local-fs layout, for its
    /// LocalFsOutputStore (exit status 3: some parts failed).
    Export(export::Args),
    /// Copy finished parts into S3 under the keys HFS's S3 output store
    /// reads (exit status 3: some parts failed; 4: --tenant/--job matched
    /// nothing; 130: interrupted).
    #[cfg(feature = "s3")]
    Copy(copy::Args),
    /// Load a folder of bulk NDJSON (`Type.ndjson`, `Type.000.ndjson`, …,
    /// plain, `.gz` or `.zst`; a client's `error/` and `deleted/`
    /// subfolders too) as one new finished export job and print its
    /// manifest; all or nothing (exit status 2: input refused, nothing
    /// imported).
    Import(import::Args),
    /// Copy the store online, while writers keep writing, into a verified
    /// single file (exit status 2: refused; 3: the copy failed
    /// verification; in both cases nothing is written).
    Backup(backup::Args),
    /// Measure the store beside its baselines and print one table.
    Bench(bench::Args),
    /// Keep a replica store's finished parts equal to another store file's
    /// (e.g. the copy `litestream restore -f` keeps current), pass after
    /// pass, each part checked before it appears, for `serve --read-only`
    /// (--once: one pass; exit status 3: some part failed its check).
    #[cfg(feature = "server")]
    Mirror(mirror::Args),
    /// `hfs` in a build without the `hfs` feature: says how to get it.
    #[cfg(not(feature = "hfs"))]
    #[command(hide = true)]
    Hfs(NotBuilt),
    /// `serve` in a build without the `server` feature.
    #[cfg(not(feature = "server"))]
    #[command(hide = true)]
    Serve(NotBuilt),
    /// `copy` in a build without the `s3` feature.
    #[cfg(not(feature = "s3"))]
    #[command(hide = true)]
    Copy(NotBuilt),
    /// `mirror` in a build without the `server` feature.
    #[cfg(not(feature = "server"))]
    #[command(hide = true)]
    Mirror(NotBuilt),
}

/// The arguments of a command this build leaves out, whatever they are.
#[cfg(not(all(feature = "hfs", feature = "server", feature = "s3")))]
#[derive(clap::Args)]
struct NotBuilt {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    _args: Vec<std::ffi::OsString>,
}

/// The exit status of a command this build leaves out (a bad argument, as
/// clap's own).
#[cfg(not(all(feature = "hfs", feature = "server", feature = "s3")))]
const NOT_BUILT: u8 = 2;

/// Says which feature brings `command` in, and how to build it.
#[cfg(not(all(feature = "hfs", feature = "server", feature = "s3")))]
fn not_built(command: &str, feature: &str) -> Result<ExitCode, ops::Failure> {
    eprintln!(
        "export-store: this build has no `{command}` command: it comes with the `{feature}` \
         feature (from a checkout: cargo run --release --features {feature} -- {command} ...)"
    );
    Ok(ExitCode::from(NOT_BUILT))
}

/// The default database path of every command.
pub const DEFAULT_DB: &str = "./export-store.db";

/// `--digest`: the content digest a command records for the parts it
/// finishes.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Digest {
    /// XXH3-128, what `xxhsum -H2` prints: a checksum at a few percent of
    /// compression's cost (the default).
    #[value(name = "xxh3-128")]
    Xxh3_128,
    /// BLAKE3, what `b3sum` prints: cryptographic, about 13–15% of
    /// compression's cost when writing, more than half of decompression's
    /// when reading.
    Blake3,
}

impl Digest {
    /// The store option for this choice.
    pub fn algorithm(self) -> sqlite_export_store::DigestAlgorithm {
        match self {
            Digest::Xxh3_128 => sqlite_export_store::DigestAlgorithm::Xxh3_128,
            Digest::Blake3 => sqlite_export_store::DigestAlgorithm::Blake3,
        }
    }
}

/// `--checkpoints`: who checkpoints the store's write-ahead log, for the
/// commands that write a store.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Checkpointing {
    /// The store itself (the default).
    Store,
    /// Another program that replicates the file (Litestream): the store
    /// never checkpoints.
    External,
}

impl Checkpointing {
    /// The store option for this choice.
    pub fn option(self) -> sqlite_export_store::Checkpoints {
        match self {
            Checkpointing::Store => sqlite_export_store::Checkpoints::Store,
            Checkpointing::External => sqlite_export_store::Checkpoints::External,
        }
    }
}

/// Parses `--db`: any path.
pub fn db_path(p: &str) -> PathBuf {
    PathBuf::from(p)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(a) => demo::run(a),
        #[cfg(feature = "server")]
        Command::Serve(a) => serve::run(a),
        #[cfg(feature = "hfs")]
        Command::Hfs(a) => hfs::run(a),
        Command::Gc(a) => ops::gc(a),
        Command::Verify(a) => ops::verify(a),
        Command::Ls(a) => ls::run(a),
        Command::Cat(a) => cat::run(a),
        Command::Export(a) => export::run(a),
        Command::Import(a) => import::run(a),
        Command::Backup(a) => backup::run(a),
        Command::Bench(a) => bench::run(a),
        #[cfg(feature = "server")]
        Command::Mirror(a) => mirror::run(a),
        #[cfg(feature = "s3")]
        Command::Copy(a) => copy::run(a),
        #[cfg(not(feature = "hfs"))]
        Command::Hfs(_) => not_built("hfs", "hfs"),
        #[cfg(not(feature = "server"))]
        Command::Serve(_) => not_built("serve", "server"),
        #[cfg(not(feature = "s3"))]
        Command::Copy(_) => not_built("copy", "s3"),
        #[cfg(not(feature = "server"))]
        Command::Mirror(_) => not_built("mirror", "server"),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("export-store: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to standard error, at `RUST_LOG`'s levels (default `info`), in
/// colour only on a terminal.
#[cfg(feature = "server")]
fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Resolves on Ctrl-C or, on Unix, SIGTERM.
#[cfg(any(feature = "server", feature = "s3"))]
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
