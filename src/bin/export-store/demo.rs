//! `export-store demo`: a synthetic FHIR R4 `$export` written the way HFS
//! writes it, with a Bulk Data completion manifest at the end.
//!
//! The export is seeded, so the same flags give the same NDJSON. Workers
//! write parts of 1,000 resources concurrently (open, write, finalize); a
//! stale worker from an earlier claim of the job tries to finish a part late
//! and is fenced out by the store, as a zombie would be in HFS.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use sqlite_export_store::testkit::synthetic::{export_plan, Generator};
use sqlite_export_store::{
    ExportJobId, ExportOutputStore, ExportPartKey, FinalizedPart, SqliteOutputStore, StorageError,
};

/// Resources per part, as HFS's `HFS_BULK_EXPORT_BATCH_SIZE` default.
const BATCH: u64 = 1_000;
/// The claim that the stale worker held before the job was reclaimed.
const STALE_TOKEN: u64 = 1;
/// The live claim's fencing token.
const LIVE_TOKEN: u64 = 2;

/// Arguments of `export-store demo`.
#[derive(clap::Args)]
pub struct Args {
    /// The store's database file (created if missing).
    #[arg(long, default_value = crate::DEFAULT_DB)]
    db: String,
    /// Base URL of the server that serves the parts (HFS or `export-store serve`).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    base_url: String,
    /// Tenant the export runs for.
    #[arg(long, default_value = "default")]
    tenant: String,
    /// Synthetic patients in the export (about 330 resources each).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    patients: u64,
    /// Seed of the synthetic data.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Concurrent export workers.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    workers: u64,
}

/// One part to write: its key and the range of resource indexes it holds.
#[derive(Clone)]
struct PartJob {
    key: ExportPartKey,
    first: u64,
    count: u64,
}

/// Runs the demo; the manifest goes to stdout, progress and the summary to
/// stderr (so `demo > manifest.json` gives clean JSON).
pub fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(demo(args))
}

async fn demo(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let store = SqliteOutputStore::open(&args.db, &args.base_url)?;
    let job = ExportJobId::new();
    let plan = export_plan(args.patients);
    let total: u64 = plan.iter().map(|(_, n)| n).sum();

    let mut parts = Vec::new();
    for (ty, n) in &plan {
        for (i, first) in (0..*n).step_by(BATCH as usize).enumerate() {
            let key = ExportPartKey::output(&args.tenant, job.clone(), *ty, i as u32, LIVE_TOKEN);
            parts.push(PartJob {
                key,
                first,
                count: BATCH.min(n - first),
            });
        }
    }

    // The stale worker opened the first part under the old claim before it
    // lost its lease; it will try to finish it after the live claim did.
    let stale_key = ExportPartKey {
        fencing_token: STALE_TOKEN,
        ..parts[0].key.clone()
    };
    let mut stale = store.open_writer(&stale_key).await?;
    stale
        .write_line(r#"{"resourceType":"Patient","id":"stale"}"#)
        .await?;

    let progress = Progress::new(total);
    let started = Instant::now();
    let queue = Arc::new(std::sync::Mutex::new(
        parts.into_iter().rev().collect::<Vec<_>>(),
    ));
    let bytes = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.workers {
        let (store, queue, bytes, progress) = (
            store.clone(),
            queue.clone(),
            bytes.clone(),
            progress.clone(),
        );
        let seed = args.seed;
        workers.spawn(async move {
            let mut done = Vec::new();
            loop {
                let next = queue.lock().expect("queue lock").pop();
                let Some(part) = next else { break };
                let finished = write_part(&store, &part, seed).await?;
                bytes.fetch_add(finished.size_bytes, Ordering::Relaxed);
                progress.advance(&finished);
                done.push(finished);
            }
            Ok::<_, StorageError>(done)
        });
    }
    let mut finished: Vec<FinalizedPart> = Vec::new();
    while let Some(r) = workers.join_next().await {
        finished.extend(r??);
    }
    let elapsed = started.elapsed();
    progress.finish();

    let fenced = match store.finalize_part(&stale_key, stale).await {
        Err(e) if e.is_conflict() => format!("stale worker (token {STALE_TOKEN}) fenced out: {e}"),
        Err(e) => return Err(format!("the stale worker failed unexpectedly: {e}").into()),
        Ok(_) => return Err("the stale worker's late write was accepted: fencing failed".into()),
    };

    let error_part = write_error_part(&store, &args.tenant, &job).await?;
    finished.sort_by(|a, b| {
        (&a.resource_type, a.key.part_index).cmp(&(&b.resource_type, b.key.part_index))
    });

    let types: Vec<&str> = plan.iter().map(|(t, _)| *t).collect();
    let manifest =
        crate::manifest::manifest(&store, &types, &finished, std::slice::from_ref(&error_part))
            .await?;
    let mut stored = 0u64;
    for p in &finished {
        stored += store.part_info(&p.key).await?.stored_bytes;
    }
    println!("{}", serde_json::to_string_pretty(&manifest)?);

    let ndjson = bytes.load(Ordering::Relaxed);
    let resources: u64 = finished.iter().map(|p| p.line_count).sum();
    eprintln!("{fenced}");
    eprintln!(
        "demo: {} parts, {} resources, {} NDJSON bytes, {} stored bytes, ratio {:.1}x, {:.0} MB/s \
         (job {job}, tenant {}, db {})",
        finished.len(),
        resources,
        ndjson,
        stored,
        ndjson as f64 / stored.max(1) as f64,
        ndjson as f64 / 1e6 / elapsed.as_secs_f64(),
        args.tenant,
        args.db,
    );
    Ok(ExitCode::SUCCESS)
}

/// Open, write the part's resources line by line, finalize: HFS's loop.
async fn write_part(
    store: &SqliteOutputStore,
    part: &PartJob,
    seed: u64,
) -> Result<FinalizedPart, StorageError> {
    let mut gen = Generator::new(seed);
    let mut w = store.open_writer(&part.key).await?;
    for i in part.first..part.first + part.count {
        let line = gen.resource(&part.key.resource_type, i);
        w.write_line(&line)
            .await
            .map_err(|e| StorageError::from_io("write_line", e))?;
    }
    store.finalize_part(&part.key, w).await
}

/// An error part, as HFS writes one for resources it could not export.
async fn write_error_part(
    store: &SqliteOutputStore,
    tenant: &str,
    job: &ExportJobId,
) -> Result<FinalizedPart, StorageError> {
    let key = ExportPartKey::error(tenant, job.clone(), "OperationOutcome", 0, LIVE_TOKEN);
    let mut w = store.open_writer(&key).await?;
    for (i, why) in [
        "a referenced Practitioner is not visible to this client",
        "a resource failed profile validation",
    ]
    .iter()
    .enumerate()
    {
        let outcome = json!({
            "resourceType": "OperationOutcome",
            "id": format!("export-error-{i}"),
            "issue": [{ "severity": "error", "code": "processing", "diagnostics": why }],
        });
        w.write_line(&outcome.to_string())
            .await
            .map_err(|e| StorageError::from_io("write_line", e))?;
    }
    store.finalize_part(&key, w).await
}

/// A progress bar on a terminal; a plain line per resource type when piped.
#[derive(Clone)]
struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    fn new(total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} resources {msg}",
                )
                .expect("a valid template"),
            );
            b
        });
        Progress { bar }
    }

    fn advance(&self, part: &FinalizedPart) {
        match &self.bar {
            Some(b) => {
                b.inc(part.line_count);
                b.set_message(part.key.part_segment());
            }
            None => {
                eprintln!(
                    "wrote {} ({} resources)",
                    part.key.part_segment(),
                    part.line_count
                );
            }
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
