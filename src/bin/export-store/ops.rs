//! `export-store gc` and `export-store verify`: what an operator runs on a
//! store's file, beside or instead of the server that uses it.
//!
//! Both refuse a path where no store exists (they never create one). `gc`
//! deletes abandoned staging and gives free pages back to the file system;
//! `verify` opens the store read-only (it migrates and writes nothing, and
//! works on a replica or a file it may not write), reads every finished
//! part and checks the database, showing a
//! progress bar on a terminal and nothing but its summary when piped.
//! `verify` exits 0 when all is well, 3 when it found a problem, and 1 when
//! it could not run.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use sqlite_export_store::VerifyProgress;
use sqlite_export_store::{PartFilter, PartSummary, SqliteOutputStore, StoreOptions};

use crate::ls::{BAD_ARGUMENT, NOTHING_MATCHED};

/// The exit status of `verify` when it found a problem.
const PROBLEMS_FOUND: u8 = 3;

/// Arguments of `export-store gc`.
#[derive(clap::Args)]
pub struct GcArgs {
    /// Delete staged parts that received no chunk for longer than this (or
    /// were opened that long ago, with no chunk yet): a number with a unit
    /// (`ms`, `s`, `m`, `h`, `d`), e.g. `90s`, `30m`, `1h`, `1h30m`. It must
    /// exceed the longest pause of a writer of any process between chunks.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    older_than: Duration,
    /// The store's database file.
    #[arg(long, default_value = crate::DEFAULT_DB)]
    db: PathBuf,
    /// Who checkpoints the store's write-ahead log: `store` (the store
    /// itself; the default) or `external`, when Litestream (or another
    /// replicator that reads the log) runs beside the store and checkpoints
    /// it. With `external` the store never checkpoints, so a replicator
    /// never has to upload a fresh full snapshot because of the store.
    #[arg(long, value_enum, default_value_t = crate::Checkpointing::Store)]
    checkpoints: crate::Checkpointing,
}

/// Arguments of `export-store verify`.
#[derive(clap::Args)]
pub struct VerifyArgs {
    /// The store's database file.
    #[arg(long, default_value = crate::DEFAULT_DB)]
    db: PathBuf,
}

pub(crate) type Failure = Box<dyn std::error::Error>;

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Opens an existing store; the URL base is irrelevant to these commands.
pub(crate) fn open(db: &Path) -> Result<SqliteOutputStore, Failure> {
    open_checkpointing(db, crate::Checkpointing::Store)
}

/// [`open`], with `--checkpoints` of a command that writes the store.
pub(crate) fn open_checkpointing(
    db: &Path,
    checkpoints: crate::Checkpointing,
) -> Result<SqliteOutputStore, Failure> {
    if !db.is_file() {
        return Err(format!("no store at {} (no such file)", db.display()).into());
    }
    Ok(SqliteOutputStore::open_with(
        db,
        "http://localhost",
        StoreOptions::default().with_checkpoints(checkpoints.option()),
    )?)
}

/// Opens an existing store read-only ([`SqliteOutputStore::open_read_only`]),
/// for the commands that only read it (`ls`, `cat`, `verify`): they never
/// create, migrate or write the file.
pub(crate) fn open_read_only(db: &Path) -> Result<SqliteOutputStore, Failure> {
    if !db.is_file() {
        return Err(format!("no store at {} (no such file)", db.display()).into());
    }
    Ok(SqliteOutputStore::open_read_only(db, "http://localhost")?)
}

/// The parts `--tenant` and `--job` select (every part when neither is
/// given), `finished` ones only or staged ones too.
pub(crate) fn part_filter(tenant: Option<&str>, job: Option<&str>, finished: bool) -> PartFilter {
    let mut filter = PartFilter::all();
    if finished {
        filter = filter.finished_only();
    }
    if let Some(t) = tenant {
        filter = filter.tenant(t);
    }
    if let Some(j) = job {
        filter = filter.job(j);
    }
    filter
}

/// The options of the commands that take finished parts out of a store
/// (`export`, `copy`): which store, and which of its parts.
#[derive(clap::Args)]
pub(crate) struct FinishedParts {
    /// The store's database file.
    #[arg(long, default_value = crate::DEFAULT_DB)]
    db: PathBuf,
    /// Only this tenant's parts.
    #[arg(long)]
    tenant: Option<String>,
    /// Only this job's parts (within --tenant, or of every tenant).
    #[arg(long)]
    job: Option<String>,
}

/// An opened store, a runtime to drive it, and the parts selected.
pub(crate) type Selected = (SqliteOutputStore, tokio::runtime::Runtime, Vec<PartSummary>);

impl FinishedParts {
    /// Opens the store and lists the finished parts `--tenant` and `--job`
    /// select, for `command`: `Err(code)` once the reason is printed, when
    /// the selection is a bad argument (exit 2) or names what holds no
    /// finished part (exit 4).
    pub(crate) fn select(&self, command: &str) -> Result<Result<Selected, ExitCode>, Failure> {
        let store = open(&self.db)?;
        let rt = runtime()?;
        let (tenant, job) = (self.tenant.as_deref(), self.job.as_deref());
        let filter = part_filter(tenant, job, true);
        let parts = match rt.block_on(store.list_parts(&filter)) {
            Ok(p) => p,
            Err(e) if e.is_invalid_input() => {
                eprintln!("export-store {command}: {}", e.message());
                return Ok(Err(ExitCode::from(BAD_ARGUMENT)));
            }
            Err(e) => return Err(e.into()),
        };
        if parts.is_empty() && (tenant.is_some() || job.is_some()) {
            eprintln!("export-store {command}: no finished parts match --tenant/--job");
            return Ok(Err(ExitCode::from(NOTHING_MATCHED)));
        }
        Ok(Ok((store, rt, parts)))
    }
}

/// Runs `gc`.
pub fn gc(args: GcArgs) -> Result<ExitCode, Failure> {
    let store = open_checkpointing(&args.db, args.checkpoints)?;
    let rt = runtime()?;
    let (staged, space, after) = rt.block_on(async {
        let staged = store.reclaim_abandoned(args.older_than).await?;
        let space = store.reclaim_space().await?;
        let after = store.space().await?;
        Ok::<_, sqlite_export_store::StorageError>((staged, space, after))
    })?;
    println!(
        "reclaimed {staged} abandoned staged part{} (opened more than {} ago)",
        plural(staged),
        show_duration(args.older_than)
    );
    println!(
        "gave back {} ({} pages) to the file system; the database holds {}",
        show_bytes(space.bytes_freed),
        space.pages_freed,
        show_bytes(after.database_bytes())
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs `verify`.
pub fn verify(args: VerifyArgs) -> Result<ExitCode, Failure> {
    let store = open_read_only(&args.db)?;
    let rt = runtime()?;
    let started = Instant::now();
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} verifying [{bar:32}] {bytes}/{total_bytes} {msg} ({eta} left)",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar
    });
    let shown = bar.clone();
    let report = rt.block_on(store.verify_with_progress(move |p: &VerifyProgress| {
        if let Some(bar) = &shown {
            bar.set_length(p.bytes_total);
            bar.set_position(p.bytes_done);
            bar.set_message(format!("{}/{} parts", p.parts_done, p.parts_total));
        }
    }))?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    println!(
        "verified {} finished part{} ({} chunks, {} of NDJSON) and the database in {:.1} s",
        report.parts_checked,
        plural(report.parts_checked),
        report.chunks_checked,
        show_bytes(report.bytes_checked),
        started.elapsed().as_secs_f64()
    );
    if report.parts_skipped > 0 {
        println!(
            "{} part{} deleted while being checked (not a problem)",
            report.parts_skipped,
            plural(report.parts_skipped)
        );
    }
    if report.staged_parts > 0 {
        println!(
            "{} staged part{} (writers at work, or abandoned: `export-store gc` removes those)",
            report.staged_parts,
            plural(report.staged_parts)
        );
    }
    for problem in &report.problems {
        println!("problem: {problem}");
    }
    if report.is_ok() {
        println!("no problems found");
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "{} problem{} found",
            report.problems.len(),
            plural(report.problems.len() as u64)
        );
        Ok(ExitCode::from(PROBLEMS_FOUND))
    }
}

pub(crate) fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Parses `90s`, `30m`, `1h`, `2d`, `500ms`, `1h30m`, `0s`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration like 90s, 30m, 1h or 1h30m");
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let one = match &rest[..unit] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86_400),
            _ => return Err(bad()),
        };
        let part = one
            .checked_mul(u32::try_from(n).map_err(|_| bad())?)
            .ok_or_else(bad)?;
        total = total.checked_add(part).ok_or_else(bad)?;
        rest = &rest[unit..];
    }
    Ok(total)
}

pub(crate) fn show_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{} ms", d.as_millis()),
        s if s % 86_400 == 0 => format!("{} d", s / 86_400),
        s if s % 3600 == 0 => format!("{} h", s / 3600),
        s if s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

pub(crate) fn show_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_an_operator_writes_them() {
        let h = Duration::from_secs(3600);
        assert_eq!(parse_duration("1h").unwrap(), h);
        assert_eq!(parse_duration("1h30m").unwrap(), h + h / 2);
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("2d").unwrap(), h * 48);
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        for bad in ["", "1", "h", "1x", "-1h", "1.5h", "99999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(show_duration(h), "1 h");
        assert_eq!(show_bytes(3 << 20), "3.0 MiB");
    }
}
