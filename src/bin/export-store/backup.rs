//! `export-store backup --to FILE`: an online, consistent copy of a store
//! while HFS (or anything else) keeps writing to it.
//!
//! The copy is the database as it was when the backup began, without the
//! parts that were still being written; it is verified like
//! `export-store verify` before it appears under FILE, by a rename, synced
//! to disk (see `SqliteOutputStore::backup_to`). A progress bar shows on a
//! terminal; when piped, only the summary (`--json`: one JSON document).
//!
//! Exit status: 0 the copy is at FILE; 2 refused (FILE exists and `--force`
//! is not given, FILE is the store's own file, or its folder is missing;
//! `--db` is not a store);
//! 3 the copy failed verification and was not written; 1 any other
//! failure. In every case but 0, FILE is untouched and no temporary file
//! is left beside it.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use rusqlite::{Connection, OpenFlags};
use serde::Serialize;
use sqlite_export_store::{BackupOptions, BackupProgress, SqliteOutputStore, StoreOptions};

/// The exit status when the destination is refused (as for a bad argument).
const REFUSED: u8 = 2;
/// The exit status when the copy failed verification (as `verify`'s).
const PROBLEMS_FOUND: u8 = 3;

/// Arguments of `export-store backup`.
#[derive(clap::Args)]
pub struct Args {
    /// The file to write the copy to (it must not exist, unless `--force`).
    #[arg(long, value_name = "FILE")]
    to: PathBuf,
    /// The store's database file.
    #[arg(long, default_value = crate::DEFAULT_DB)]
    db: PathBuf,
    /// Replace FILE if it exists.
    #[arg(long)]
    force: bool,
    /// Pages copied per step (4 KiB each).
    #[arg(long, default_value_t = sqlite_export_store::DEFAULT_BACKUP_STEP_PAGES,
          value_parser = clap::value_parser!(u32).range(1..))]
    step_pages: u32,
    /// Pause between two steps, in milliseconds (spares the disk for the
    /// store's writers).
    #[arg(long, default_value_t = sqlite_export_store::DEFAULT_BACKUP_PAUSE.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pause_ms: u64,
    /// Print the summary as one JSON document.
    #[arg(long)]
    json: bool,
}

/// The `--json` summary.
#[derive(Serialize)]
struct Summary {
    to: PathBuf,
    pages: u64,
    page_size: u64,
    steps: u64,
    longest_step_ms: f64,
    copy_seconds: f64,
    staged_parts_left_out: u64,
    parts_verified: u64,
    chunks_verified: u64,
    ndjson_bytes_verified: u64,
    verify_seconds: f64,
    file_bytes: u64,
    total_seconds: f64,
}

type Failure = Box<dyn std::error::Error>;

/// Runs `backup`: a summary on stdout, progress on stderr.
pub fn run(args: Args) -> Result<ExitCode, Failure> {
    if !args.db.is_file() {
        return Err(format!("no store at {} (no such file)", args.db.display()).into());
    }
    if let Err(why) = check_is_store(&args.db) {
        eprintln!(
            "export-store: backup refused: {} is not an export store ({why})",
            args.db.display()
        );
        return Ok(ExitCode::from(REFUSED));
    }
    let store = SqliteOutputStore::open_with(&args.db, "http://localhost", StoreOptions::default())
        .map_err(|e| format!("cannot open the store {}: {e}", args.db.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let options = BackupOptions::default()
        .with_overwrite(args.force)
        .with_pages_per_step(args.step_pages)
        .with_pause(Duration::from_millis(args.pause_ms));
    let bar = progress_bar();
    let shown = bar.clone();
    let outcome = runtime.block_on(store.backup_with_progress(&args.to, &options, move |p| {
        if let Some(bar) = &shown {
            show(bar, p);
        }
    }));
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let to = args.to.display();
    let report = match outcome {
        Ok(report) => report,
        Err(e) if e.is_invalid_input() || e.is_conflict() => {
            eprintln!("export-store: backup to {to} refused: {e}");
            return Ok(ExitCode::from(REFUSED));
        }
        Err(e) if e.is_corrupt() => {
            eprintln!("export-store: backup to {to} not written: {e}");
            return Ok(ExitCode::from(PROBLEMS_FOUND));
        }
        Err(e) => return Err(format!("backup to {to} failed, nothing written: {e}").into()),
    };
    if args.json {
        let summary = Summary {
            to: args.to.clone(),
            pages: report.pages,
            page_size: report.page_size,
            steps: report.steps,
            longest_step_ms: report.longest_step.as_secs_f64() * 1000.0,
            copy_seconds: report.copy_time.as_secs_f64(),
            staged_parts_left_out: report.staged_parts_dropped,
            parts_verified: report.verify.parts_checked,
            chunks_verified: report.verify.chunks_checked,
            ndjson_bytes_verified: report.verify.bytes_checked,
            verify_seconds: report.verify_time.as_secs_f64(),
            file_bytes: report.file_bytes,
            total_seconds: report.total_time.as_secs_f64(),
        };
        println!("{}", serde_json::to_string(&summary)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    println!(
        "backup: copy {:.3} s ({} pages, {:.1} MiB, in {} steps, the longest {:.1} ms), \
         {} staged part{} left out",
        report.copy_time.as_secs_f64(),
        report.pages,
        mib(report.pages * report.page_size),
        report.steps,
        report.longest_step.as_secs_f64() * 1000.0,
        report.staged_parts_dropped,
        if report.staged_parts_dropped == 1 {
            ""
        } else {
            "s"
        },
    );
    println!(
        "backup: verify {:.3} s ({} finished parts, {} chunks, {:.1} MiB of NDJSON): no problems found",
        report.verify_time.as_secs_f64(),
        report.verify.parts_checked,
        report.verify.chunks_checked,
        mib(report.verify.bytes_checked),
    );
    println!(
        "backup: wrote {} ({:.1} MiB) in {:.3} s",
        display(&args.to),
        mib(report.file_bytes),
        report.total_time.as_secs_f64(),
    );
    Ok(ExitCode::SUCCESS)
}

/// Checks, without writing to it, that `db` is a SQLite database holding
/// this crate's tables: opening anything else as a store would turn it
/// into one.
fn check_is_store(db: &Path) -> Result<(), String> {
    let mut header = [0_u8; 16];
    let mut file = std::fs::File::open(db).map_err(|e| format!("cannot read it: {}", e.kind()))?;
    std::io::Read::read_exact(&mut file, &mut header)
        .map_err(|_| "not a SQLite database".to_string())?;
    if &header != b"SQLite format 3\0" {
        return Err("not a SQLite database".into());
    }
    let c = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|_| "a SQLite database that cannot be opened".to_string())?;
    let tables: i64 = c
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name IN ('parts', 'chunks')",
            [],
            |r| r.get(0),
        )
        .map_err(|_| "a SQLite database that cannot be read".to_string())?;
    if tables != 2 {
        return Err("a SQLite database without the store's tables".into());
    }
    Ok(())
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

fn progress_bar() -> Option<ProgressBar> {
    std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} [{bar:32}] {pos}/{len} ({eta} left)")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar
    })
}

fn show(bar: &ProgressBar, p: &BackupProgress) {
    match p {
        BackupProgress::Copying {
            pages_done,
            pages_total,
        } => {
            bar.set_message("copying pages");
            bar.set_length(*pages_total);
            bar.set_position(*pages_done);
        }
        BackupProgress::Verifying(v) => {
            bar.set_message("verifying the copy (KiB)");
            bar.set_length(v.bytes_total / 1024);
            bar.set_position(v.bytes_done / 1024);
        }
        _ => {}
    }
}
