//! `export-store mirror`: keep a replica store's finished parts equal to
//! another store file's, pass after pass, for `serve --read-only` to serve.
//!
//! A thin loop over [`SqliteOutputStore::mirror_from`]: the source is
//! typically the file `litestream restore -f` keeps current on the replica
//! node, which must not be served itself (Litestream rewrites its pages in
//! place); the mirror copies each finished part out of it, checked, into a
//! store of its own (created if missing), and `export-store serve
//! --read-only` serves that store. A pass that changes something prints
//! one line; a failing pass (the source not there yet, not a store) prints
//! its reason once and the loop tries again. Ctrl-C or SIGTERM stops it
//! between passes. `--once` runs one pass: exit status 0, or 3 when some
//! part of the source failed its check.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use sqlite_export_store::{MirrorReport, SqliteOutputStore, StoreOptions};

use crate::ops::{parse_duration, plural, runtime, show_bytes, show_duration, Failure};

const PROBLEMS_FOUND: u8 = 3;

#[derive(clap::Args)]
pub struct Args {
    /// The store file to copy from (read only, through short read
    /// transactions; e.g. the output of `litestream restore -f`).
    #[arg(long)]
    from: PathBuf,
    /// The replica store to keep equal to it (created if missing; it
    /// should have no other writer).
    #[arg(long, default_value = crate::DEFAULT_DB)]
    db: PathBuf,
    /// The pause between two passes.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    every: Duration,
    /// Run one pass and exit.
    #[arg(long)]
    once: bool,
}

/// Runs `mirror`.
pub fn run(args: Args) -> Result<ExitCode, Failure> {
    let rt = runtime()?;
    let store =
        SqliteOutputStore::open_with(&args.db, "http://localhost", StoreOptions::default())?;
    if args.once {
        let report = rt.block_on(store.mirror_from(&args.from))?;
        println!("{}", summary(&report));
        for p in &report.problems {
            eprintln!("export-store mirror: {p}");
        }
        return Ok(if report.problems.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(PROBLEMS_FOUND)
        });
    }
    println!(
        "mirroring {} into {}, every {}",
        args.from.display(),
        args.db.display(),
        show_duration(args.every)
    );
    rt.block_on(async {
        let stop = crate::signal();
        tokio::pin!(stop);
        let mut last_error = String::new();
        let mut last_problems = Vec::new();
        loop {
            match store.mirror_from(&args.from).await {
                Ok(report) => {
                    last_error.clear();
                    if report.changed() {
                        println!("{}", summary(&report));
                    }
                    let problems: Vec<String> =
                        report.problems.iter().map(|p| p.to_string()).collect();
                    if problems != last_problems {
                        for p in &problems {
                            eprintln!("export-store mirror: {p}");
                        }
                        last_problems = problems;
                    }
                }
                Err(e) => {
                    let shown = e.to_string();
                    if shown != last_error {
                        eprintln!("export-store mirror: {shown} (trying again every pass)");
                        last_error = shown;
                    }
                }
            }
            tokio::select! {
                _ = &mut stop => break,
                _ = tokio::time::sleep(args.every) => {}
            }
        }
    });
    Ok(ExitCode::SUCCESS)
}

/// One line for a pass.
fn summary(r: &MirrorReport) -> String {
    format!(
        "mirrored: {} part{} added ({}, {} stored), {} removed, {} unchanged, {} failed their \
         check; {} finished in the source; {} ms",
        r.parts_added,
        plural(r.parts_added),
        show_bytes(r.bytes_added),
        show_bytes(r.stored_bytes_added),
        r.parts_removed,
        r.parts_unchanged,
        r.problems.len(),
        r.source_parts,
        r.elapsed.as_millis()
    )
}
