//! `export-store ls`: what a store file holds, level by level: its tenants;
//! one tenant's jobs (`--tenant`); one job's parts (`--job`), or every
//! part in scope (`--parts`); each with its state, sizes and age, then the
//! totals and the file's own figures (size, free pages, write-ahead log).
//!
//! Each level is one listing query plus the file's figures: no part is
//! read or decompressed, so the time grows with the rows listed, not with
//! the bytes stored. A part's NAME is what `export-store cat` takes. The
//! store is opened read-only: `ls` never migrates or writes it.
//!
//! Exit status: 0 listed (an empty store lists nothing and is fine), 1 the
//! store could not be read, 2 a bad argument, 4 `--tenant`/`--job` matched
//! no part.

use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sqlite_export_store::{
    FileStats, JobSummary, PartSummary, PartTotals, StorageError, TenantSummary,
};

use crate::ops::{open_read_only, part_filter, plural, runtime, show_bytes, Failure};
use crate::partname;

/// The exit status when `--tenant` or `--job` matched no part.
pub const NOTHING_MATCHED: u8 = 4;
/// The exit status of a bad argument (as clap's own).
pub const BAD_ARGUMENT: u8 = 2;

/// Arguments of `export-store ls`.
#[derive(clap::Args)]
pub struct Args {
    /// The store's database file.
    #[arg(long, default_value = crate::DEFAULT_DB)]
    db: PathBuf,
    /// List this tenant's jobs (with --job or --parts: its parts).
    #[arg(long)]
    tenant: Option<String>,
    /// List this job's parts (within --tenant, or in every tenant that has
    /// a job of this id).
    #[arg(long)]
    job: Option<String>,
    /// List parts whatever the level: with neither --tenant nor --job,
    /// every part of the file.
    #[arg(long)]
    parts: bool,
    /// Print one JSON document instead of tables (sizes in bytes, times in
    /// Unix milliseconds).
    #[arg(long)]
    json: bool,
}

/// What one call lists.
enum Listing {
    Tenants(Vec<TenantSummary>),
    /// A tenant's jobs.
    Jobs(String, Vec<JobSummary>),
    Parts(Vec<PartSummary>),
}

impl Listing {
    fn is_empty(&self) -> bool {
        match self {
            Listing::Tenants(v) => v.is_empty(),
            Listing::Jobs(_, v) => v.is_empty(),
            Listing::Parts(v) => v.is_empty(),
        }
    }
}

/// Runs `ls`.
pub fn run(args: Args) -> Result<ExitCode, Failure> {
    let filter = part_filter(args.tenant.as_deref(), args.job.as_deref(), false);
    let store = open_read_only(&args.db)?;
    let rt = runtime()?;
    let listed = rt.block_on(async {
        let listing = if args.parts || args.job.is_some() {
            Listing::Parts(store.list_parts(&filter).await?)
        } else if let Some(tenant) = &args.tenant {
            Listing::Jobs(tenant.clone(), store.list_jobs(&filter).await?)
        } else {
            Listing::Tenants(store.list_tenants(&filter).await?)
        };
        let file = store.file_stats().await?;
        Ok::<_, StorageError>((listing, file))
    });
    let (listing, file) = match listed {
        Ok(l) => l,
        Err(e) if e.is_invalid_input() => {
            eprintln!("export-store ls: {}", e.message());
            return Ok(ExitCode::from(BAD_ARGUMENT));
        }
        Err(e) => return Err(e.into()),
    };
    let mut out = BufWriter::with_capacity(1 << 16, io::stdout().lock());
    let written = if args.json {
        write_json(&mut out, &args.db, &listing, &file)
    } else {
        write_tables(&mut out, &listing, &file, now_ms())
    };
    match written.and_then(|()| out.flush()) {
        // `ls | head`: the reader has all it wanted.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(ExitCode::SUCCESS),
        Err(e) => return Err(e.into()),
        Ok(()) => {}
    }
    if listing.is_empty() && (args.tenant.is_some() || args.job.is_some()) {
        let mut scope = Vec::new();
        if let Some(t) = &args.tenant {
            scope.push(format!("tenant {t:?}"));
        }
        if let Some(j) = &args.job {
            scope.push(format!("job {j:?}"));
        }
        eprintln!("export-store ls: no parts of {}", scope.join(" and "));
        return Ok(ExitCode::from(NOTHING_MATCHED));
    }
    Ok(ExitCode::SUCCESS)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Sums of parts, for the totals a listing prints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
struct Sum {
    parts: u64,
    finished_parts: u64,
    staged_parts: u64,
    lines: u64,
    ndjson_bytes: u64,
    stored_bytes: u64,
    chunks: u64,
}

impl Sum {
    fn of(t: &PartTotals) -> Sum {
        Sum {
            parts: t.parts,
            finished_parts: t.finished_parts,
            staged_parts: t.staged_parts,
            lines: t.line_count,
            ndjson_bytes: t.byte_count,
            stored_bytes: t.stored_bytes,
            chunks: t.chunk_count,
        }
    }

    fn add_part(&mut self, p: &PartSummary) {
        self.parts += 1;
        if p.finished {
            self.finished_parts += 1;
        } else {
            self.staged_parts += 1;
        }
        self.lines += p.line_count.unwrap_or(0);
        self.ndjson_bytes += p.byte_count;
        self.stored_bytes += p.stored_bytes;
        self.chunks += p.chunk_count;
    }

    fn add(&mut self, o: &Sum) {
        self.parts += o.parts;
        self.finished_parts += o.finished_parts;
        self.staged_parts += o.staged_parts;
        self.lines += o.lines;
        self.ndjson_bytes += o.ndjson_bytes;
        self.stored_bytes += o.stored_bytes;
        self.chunks += o.chunks;
    }

    /// `12 parts (1 staged), 11000 lines, 11.2 MiB NDJSON in 802.1 KiB (14.3x)`.
    fn line(&self) -> String {
        let staged = if self.staged_parts > 0 {
            format!(" ({} staged)", self.staged_parts)
        } else {
            String::new()
        };
        format!(
            "{} part{}{staged}, {} line{}, {} NDJSON in {} ({})",
            self.parts,
            plural(self.parts),
            self.lines,
            plural(self.lines),
            show_bytes(self.ndjson_bytes),
            show_bytes(self.stored_bytes),
            ratio(self.ndjson_bytes, self.stored_bytes)
        )
    }
}

/// NDJSON bytes per stored byte, `14.3x`; `-` when nothing is stored.
fn ratio(ndjson: u64, stored: u64) -> String {
    if stored == 0 {
        "-".into()
    } else {
        format!("{:.1}x", ndjson as f64 / stored as f64)
    }
}

/// How long ago `then_ms` was: `12s`, `5m`, `3h`, `2d`.
fn age(now_ms: i64, then_ms: i64) -> String {
    let s = (now_ms - then_ms).max(0) / 1000;
    match s {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// A part's last change: its finalize, else its last chunk, else its
/// opening.
fn changed_at(p: &PartSummary) -> i64 {
    p.finished_at_ms
        .or(p.touched_at_ms)
        .unwrap_or(p.created_at_ms)
}

/// A table with a header, numbers right-aligned; notes (a job's totals)
/// are lines of their own between the rows.
struct Table {
    header: &'static [&'static str],
    right: &'static [bool],
    rows: Vec<Vec<String>>,
}

/// A row that is a note: one cell, printed as it is.
fn note(text: String) -> Vec<String> {
    vec![text]
}

impl Table {
    fn write(&self, out: &mut dyn Write) -> io::Result<()> {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in self.rows.iter().filter(|r| r.len() > 1) {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |out: &mut dyn Write, cells: &mut dyn Iterator<Item = &str>| {
            let mut text = String::new();
            for (i, cell) in cells.enumerate() {
                let last = i + 1 == widths.len();
                if i > 0 {
                    text.push_str("  ");
                }
                let pad = widths[i].saturating_sub(cell.chars().count());
                if self.right[i] {
                    text.extend(std::iter::repeat_n(' ', pad));
                    text.push_str(cell);
                } else {
                    text.push_str(cell);
                    if !last {
                        text.extend(std::iter::repeat_n(' ', pad));
                    }
                }
            }
            writeln!(out, "{text}")
        };
        line(out, &mut self.header.iter().copied())?;
        for row in &self.rows {
            match row.as_slice() {
                [text] => writeln!(out, "{text}")?,
                cells => line(out, &mut cells.iter().map(String::as_str))?,
            }
        }
        Ok(())
    }
}

fn size_cells(s: &Sum) -> [String; 4] {
    [
        s.lines.to_string(),
        show_bytes(s.ndjson_bytes),
        show_bytes(s.stored_bytes),
        ratio(s.ndjson_bytes, s.stored_bytes),
    ]
}

fn write_tables(
    out: &mut dyn Write,
    listing: &Listing,
    file: &FileStats,
    now: i64,
) -> io::Result<()> {
    let mut all = Sum::default();
    match listing {
        Listing::Tenants(tenants) => {
            let mut rows = Vec::with_capacity(tenants.len());
            for t in tenants {
                let s = Sum::of(&t.totals);
                all.add(&s);
                let mut row = vec![
                    t.tenant.clone(),
                    t.jobs.to_string(),
                    s.parts.to_string(),
                    s.staged_parts.to_string(),
                ];
                row.extend(size_cells(&s));
                row.push(age(now, t.totals.last_active_at_ms));
                rows.push(row);
            }
            if !rows.is_empty() {
                Table {
                    header: &[
                        "TENANT", "JOBS", "PARTS", "STAGED", "LINES", "NDJSON", "STORED", "RATIO",
                        "ACTIVE",
                    ],
                    right: &[false, true, true, true, true, true, true, true, true],
                    rows,
                }
                .write(out)?;
            }
            let jobs: u64 = tenants.iter().map(|t| t.jobs).sum();
            writeln!(
                out,
                "all tenants: {} tenant{}, {} job{}, {}",
                tenants.len(),
                plural(tenants.len() as u64),
                jobs,
                plural(jobs),
                all.line()
            )?;
        }
        Listing::Jobs(tenant, jobs) => {
            let mut rows = Vec::with_capacity(jobs.len());
            for j in jobs {
                let s = Sum::of(&j.totals);
                all.add(&s);
                let mut row = vec![
                    j.job.as_str().to_string(),
                    s.parts.to_string(),
                    s.staged_parts.to_string(),
                ];
                row.extend(size_cells(&s));
                row.push(age(now, j.totals.first_created_at_ms));
                row.push(age(now, j.totals.last_active_at_ms));
                rows.push(row);
            }
            if !rows.is_empty() {
                Table {
                    header: &[
                        "JOB", "PARTS", "STAGED", "LINES", "NDJSON", "STORED", "RATIO", "CREATED",
                        "ACTIVE",
                    ],
                    right: &[false, true, true, true, true, true, true, true, true],
                    rows,
                }
                .write(out)?;
            }
            writeln!(
                out,
                "tenant {tenant}: {} job{}, {}",
                jobs.len(),
                plural(jobs.len() as u64),
                all.line()
            )?;
        }
        Listing::Parts(parts) => {
            let mut rows = Vec::with_capacity(parts.len() + 16);
            // Each job's parts, then its totals.
            let mut job = Sum::default();
            for (i, p) in parts.iter().enumerate() {
                job.add_part(p);
                let s = Sum {
                    lines: p.line_count.unwrap_or(0),
                    ndjson_bytes: p.byte_count,
                    stored_bytes: p.stored_bytes,
                    ..Sum::default()
                };
                let mut cells = size_cells(&s);
                if !p.finished {
                    cells[0] = "-".into();
                }
                let mut row = vec![if p.finished { "finished" } else { "staged" }.to_string()];
                row.extend(cells);
                row.push(age(now, changed_at(p)));
                row.push(partname::name(&p.key));
                rows.push(row);
                let next = parts.get(i + 1);
                let same_job = next.is_some_and(|n| {
                    n.key.tenant_id == p.key.tenant_id && n.key.job_id == p.key.job_id
                });
                if !same_job {
                    rows.push(note(format!(
                        "  job {}/{}: {}",
                        p.key.tenant_id,
                        p.key.job_id,
                        job.line()
                    )));
                    all.add(&job);
                    job = Sum::default();
                }
            }
            if !rows.is_empty() {
                Table {
                    header: &["STATE", "LINES", "NDJSON", "STORED", "RATIO", "AGE", "NAME"],
                    right: &[false, true, true, true, true, true, false],
                    rows,
                }
                .write(out)?;
            }
            writeln!(out, "listed: {}", all.line())?;
        }
    }
    let s = &file.space;
    writeln!(
        out,
        "file: {} on disk ({} pages of {}, {} free = {}), write-ahead log {}",
        show_bytes(file.file_bytes),
        s.page_count,
        show_bytes(s.page_size),
        s.free_pages,
        show_bytes(s.free_bytes()),
        show_bytes(file.wal_bytes)
    )
}

#[derive(Serialize)]
struct JsonTotals {
    #[serde(flatten)]
    sum: Sum,
    first_created_at_ms: i64,
    last_finished_at_ms: Option<i64>,
    last_active_at_ms: i64,
}

impl From<&PartTotals> for JsonTotals {
    fn from(t: &PartTotals) -> Self {
        JsonTotals {
            sum: Sum::of(t),
            first_created_at_ms: t.first_created_at_ms,
            last_finished_at_ms: t.last_finished_at_ms,
            last_active_at_ms: t.last_active_at_ms,
        }
    }
}

#[derive(Serialize)]
struct JsonTenant<'a> {
    tenant: &'a str,
    jobs: u64,
    #[serde(flatten)]
    totals: JsonTotals,
}

#[derive(Serialize)]
struct JsonJob<'a> {
    tenant: &'a str,
    job: &'a str,
    #[serde(flatten)]
    totals: JsonTotals,
}

#[derive(Serialize)]
struct JsonJobSum<'a> {
    tenant: &'a str,
    job: &'a str,
    #[serde(flatten)]
    sum: Sum,
}

#[derive(Serialize)]
struct JsonPart<'a> {
    name: String,
    tenant: &'a str,
    job: &'a str,
    file_type: &'a str,
    resource_type: &'a str,
    part_index: u32,
    fencing_token: u64,
    state: &'static str,
    lines: Option<u64>,
    ndjson_bytes: u64,
    stored_bytes: u64,
    chunks: u64,
    created_at_ms: i64,
    finished_at_ms: Option<i64>,
    touched_at_ms: Option<i64>,
    digest: Option<&'a str>,
    digest_algorithm: Option<&'static str>,
}

#[derive(Serialize)]
struct JsonFile<'a> {
    path: &'a Path,
    file_bytes: u64,
    wal_bytes: u64,
    page_size: u64,
    page_count: u64,
    free_pages: u64,
    free_bytes: u64,
}

#[derive(Serialize)]
struct JsonListing<'a> {
    level: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    tenants: Option<Vec<JsonTenant<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    jobs: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parts: Option<Vec<JsonPart<'a>>>,
    totals: Sum,
    file: JsonFile<'a>,
}

fn write_json(
    out: &mut dyn Write,
    db: &Path,
    listing: &Listing,
    file: &FileStats,
) -> io::Result<()> {
    let mut doc = JsonListing {
        level: "",
        tenants: None,
        jobs: None,
        parts: None,
        totals: Sum::default(),
        file: JsonFile {
            path: db,
            file_bytes: file.file_bytes,
            wal_bytes: file.wal_bytes,
            page_size: file.space.page_size,
            page_count: file.space.page_count,
            free_pages: file.space.free_pages,
            free_bytes: file.space.free_bytes(),
        },
    };
    match listing {
        Listing::Tenants(tenants) => {
            doc.level = "tenants";
            tenants
                .iter()
                .for_each(|t| doc.totals.add(&Sum::of(&t.totals)));
            doc.tenants = Some(
                tenants
                    .iter()
                    .map(|t| JsonTenant {
                        tenant: &t.tenant,
                        jobs: t.jobs,
                        totals: JsonTotals::from(&t.totals),
                    })
                    .collect(),
            );
        }
        Listing::Jobs(_, jobs) => {
            doc.level = "jobs";
            jobs.iter()
                .for_each(|j| doc.totals.add(&Sum::of(&j.totals)));
            let rows: Vec<JsonJob<'_>> = jobs
                .iter()
                .map(|j| JsonJob {
                    tenant: &j.tenant,
                    job: j.job.as_str(),
                    totals: JsonTotals::from(&j.totals),
                })
                .collect();
            doc.jobs = Some(serde_json::to_value(&rows).map_err(io::Error::from)?);
        }
        Listing::Parts(parts) => {
            doc.level = "parts";
            let mut jobs: Vec<JsonJobSum<'_>> = Vec::new();
            for p in parts {
                doc.totals.add_part(p);
                match jobs.last_mut() {
                    Some(j) if j.tenant == p.key.tenant_id && j.job == p.key.job_id.as_str() => {
                        j.sum.add_part(p)
                    }
                    _ => {
                        let mut sum = Sum::default();
                        sum.add_part(p);
                        jobs.push(JsonJobSum {
                            tenant: &p.key.tenant_id,
                            job: p.key.job_id.as_str(),
                            sum,
                        });
                    }
                }
            }
            doc.jobs = Some(serde_json::to_value(&jobs).map_err(io::Error::from)?);
            doc.parts = Some(
                parts
                    .iter()
                    .map(|p| JsonPart {
                        name: partname::name(&p.key),
                        tenant: &p.key.tenant_id,
                        job: p.key.job_id.as_str(),
                        file_type: &p.key.file_type,
                        resource_type: &p.key.resource_type,
                        part_index: p.key.part_index,
                        fencing_token: p.key.fencing_token,
                        state: if p.finished { "finished" } else { "staged" },
                        lines: p.line_count,
                        ndjson_bytes: p.byte_count,
                        stored_bytes: p.stored_bytes,
                        chunks: p.chunk_count,
                        created_at_ms: p.created_at_ms,
                        finished_at_ms: p.finished_at_ms,
                        touched_at_ms: p.touched_at_ms,
                        digest: p.digest.as_deref(),
                        digest_algorithm: p.digest_algorithm.map(|a| a.as_str()),
                    })
                    .collect(),
            );
        }
    }
    serde_json::to_writer(&mut *out, &doc).map_err(io::Error::from)?;
    writeln!(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_ratios_read_at_a_glance() {
        let now = 10 * 86_400_000;
        assert_eq!(age(now, now - 12_000), "12s");
        assert_eq!(age(now, now - 5 * 60_000 - 1), "5m");
        assert_eq!(age(now, now - 3 * 3_600_000), "3h");
        assert_eq!(age(now, 0), "10d");
        assert_eq!(age(now, now + 5_000), "0s");
        assert_eq!(ratio(143, 10), "14.3x");
        assert_eq!(ratio(0, 0), "-");
    }

    #[test]
    fn tables_align_numbers_right_and_text_left() {
        let t = Table {
            header: &["NAME", "N"],
            right: &[false, true],
            rows: vec![
                vec!["long name".into(), "1".into()],
                note("a note wider than the table".into()),
                vec!["x".into(), "1000".into()],
            ],
        };
        let mut out = Vec::new();
        t.write(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "NAME          N\nlong name     1\na note wider than the table\nx          1000\n"
        );
    }
}
