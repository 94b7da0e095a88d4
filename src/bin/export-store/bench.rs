//! `export-store bench`: the store beside its baselines, in one table.
//!
//! Runs the comparisons of `cargo bench --bench store` quickly, without
//! criterion: a few repetitions of each, contenders interleaved so that
//! noise falls on all of them alike, medians reported. Every ratio is taken
//! between figures of the same run. The `serve` group downloads a finished
//! part over loopback HTTP from the store's router (feature `server`),
//! beside the same NDJSON sent from memory. `--memory-gib N` instead writes and
//! reads back one part of N GiB and reports the process's peak RSS (run it
//! under `/usr/bin/time -v` to confirm).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlite_export_store::{
    ExportJobId, ExportOutputStore, FinalizeTiming, SqliteOutputStore, StoreOptions,
    DEFAULT_CHUNK_SIZE,
};

mod workload;

use workload::{
    codec_parallel, codec_parallel_cpu, codec_run, delete_job, digest_run, discard, fill_job,
    hfs_parts, key, mb_per_s, process_threads_cpu, quantile, read_part, settle, write_concurrently,
    write_part, write_part_timed, BenchResult, Contenders, Corpus, Part, Producer, Which,
    HFS_BATCH, READ_BUFFER,
};

/// Arguments of `export-store bench`.
#[derive(clap::Args)]
pub struct Args {
    /// NDJSON per part in the write and read comparisons, in MiB.
    #[arg(long, default_value_t = 64)]
    size_mib: u64,
    /// Also write one part of this many MiB of the first data set (with at
    /// most 3 repetitions); 0 or `--quick` skips it.
    #[arg(long, default_value_t = 512)]
    large_mib: u64,
    /// Fewer repetitions, fewer small parts, no large part.
    #[arg(long)]
    quick: bool,
    /// Repetitions of each throughput figure (default 5, or 3 with --quick).
    #[arg(long)]
    reps: Option<usize>,
    /// Folder for the database and the baseline's files (default: the
    /// system's temporary folder). Put it on the disk you want measured.
    #[arg(long)]
    db_dir: Option<PathBuf>,
    /// A Synthea bulk-export folder (plain `*.ndjson`); default
    /// `$EXPORT_STORE_SYNTHEA` or the sample vendored in this repository
    /// (`data/synthea-10-patients`).
    #[arg(long)]
    synthea: Option<PathBuf>,
    /// Which data: `synthea`, `synthetic` or `both`.
    #[arg(long, default_value = "both")]
    data: String,
    /// Comma-separated groups to run: write, concurrent, read, small,
    /// delete, ratio, serve (default: all).
    #[arg(long)]
    groups: Option<String>,
    /// HFS-shaped parts (1,000 resources each) timed per store in the
    /// latency comparison (default 100, or 30 with --quick).
    #[arg(long)]
    small_parts: Option<usize>,
    /// Instead of the table: write then read one part of this many GiB and
    /// report throughput and the process's peak RSS.
    #[arg(long)]
    memory_gib: Option<f64>,
    /// With `--memory-gib`: write that many parts at once instead (a task
    /// each, line by line, the GiB split between them), then read them
    /// back one after the other.
    #[arg(long, default_value_t = 1)]
    memory_parts: usize,
    /// Store option: raw KiB per chunk (default: the store's default).
    #[arg(long)]
    chunk_kib: Option<usize>,
    /// Store option: chunks in flight per writer.
    #[arg(long)]
    in_flight: Option<usize>,
    /// Store option: chunks read ahead per reader.
    #[arg(long)]
    read_ahead: Option<usize>,
    /// Store option: zstd level (default: the store's default).
    #[arg(long, default_value_t = sqlite_export_store::DEFAULT_COMPRESSION_LEVEL)]
    level: i32,
}

/// Runs the command.
pub fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(main(args))
        .map_err(|e| -> Box<dyn std::error::Error> { e })?;
    Ok(ExitCode::SUCCESS)
}

struct Plan {
    size: u64,
    large: u64,
    reps: usize,
    small_parts: usize,
    chunk: usize,
    level: i32,
    options: StoreOptions,
    dir: PathBuf,
    groups: Vec<String>,
}

impl Plan {
    fn runs(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }
}

async fn main(args: Args) -> BenchResult<()> {
    let mut options = StoreOptions::default().with_compression_level(args.level);
    let chunk = args.chunk_kib.map_or(DEFAULT_CHUNK_SIZE, |k| k * 1024);
    options = options.with_chunk_size(chunk);
    if let Some(n) = args.in_flight {
        options = options.with_in_flight_chunks(n);
    }
    if let Some(n) = args.read_ahead {
        options = options.with_read_ahead(n);
    }
    let dir = args.db_dir.clone().unwrap_or_else(std::env::temp_dir);
    println!("{}", machine_line());

    let mut corpora = Vec::new();
    let mut synthea_dir = None;
    if args.data == "synthea" || args.data == "both" {
        let loaded = workload::synthea_dir(args.synthea.clone())
            .and_then(|d| Ok((Corpus::synthea(d.path())?, d)));
        match loaded {
            Ok((c, d)) => {
                corpora.push(Arc::new(c));
                synthea_dir = Some(d);
            }
            Err(e) if args.data == "both" => println!("(no Synthea sample: {e})"),
            Err(e) => return Err(e),
        }
    }
    // The memory check measures the whole process: it holds one data set.
    let wanted = args.data == "synthetic" || args.data == "both";
    if wanted && (args.memory_gib.is_none() || corpora.is_empty()) {
        corpora.push(Arc::new(Corpus::synthetic(42, 16 << 20)));
    }
    if corpora.is_empty() {
        return Err(format!("--data {} names no data set", args.data).into());
    }

    if let Some(gib) = args.memory_gib {
        let bytes = (gib.max(0.0) * (1u64 << 30) as f64) as u64;
        return memory_check(&corpora[0], bytes, args.memory_parts.max(1), options, &dir).await;
    }

    let all = "write,concurrent,read,small,delete,ratio,serve";
    let plan = Plan {
        size: args.size_mib << 20,
        large: if args.quick { 0 } else { args.large_mib << 20 },
        reps: args.reps.unwrap_or(if args.quick { 3 } else { 5 }).max(1),
        small_parts: args
            .small_parts
            .unwrap_or(if args.quick { 30 } else { 100 })
            .max(1),
        chunk,
        level: args.level,
        options,
        dir,
        groups: args
            .groups
            .as_deref()
            .unwrap_or(all)
            .split(',')
            .map(|s| s.trim().to_string())
            .collect(),
    };
    if let Some(g) = plan
        .groups
        .iter()
        .find(|g| !all.split(',').any(|a| a == *g))
    {
        return Err(format!("--groups: no group {g:?} (there are {all})").into());
    }
    println!(
        "store: {} KiB chunks, zstd {}, {:?}; files in {}",
        plan.chunk >> 10,
        plan.level,
        plan.options,
        plan.dir.display()
    );
    for c in &corpora {
        println!(
            "data {}: {:.1} MiB sample, {} lines, repeated to size",
            c.name,
            c.len() as f64 / (1 << 20) as f64,
            c.line_count()
        );
    }
    println!(
        "median of {} runs per figure; MB/s = 10^6 bytes of NDJSON per second; a ratio \
         between contenders measured in the same run is the median of their per-run ratios\n",
        plan.reps
    );

    let mut table = Table::default();
    if plan.runs("write") {
        for corpus in &corpora {
            write_group(&plan, corpus, plan.size, plan.reps, &mut table).await?;
        }
    }
    let primary = &corpora[0];
    if plan.large > 0 && plan.runs("write") {
        write_group(&plan, primary, plan.large, plan.reps.min(3), &mut table).await?;
    }
    if plan.runs("concurrent") {
        concurrent_group(&plan, primary, &mut table).await?;
    }
    if plan.runs("read") {
        for corpus in &corpora {
            read_group(&plan, corpus, &mut table).await?;
        }
    }
    if plan.runs("small") {
        small_group(&plan, primary, &mut table).await?;
    }
    if plan.runs("delete") {
        delete_group(&plan, primary, &mut table).await?;
    }
    if let Some(synthea) = synthea_dir.filter(|_| plan.runs("ratio") && primary.name == "synthea") {
        ratio_group(&plan, synthea.path(), &mut table).await?;
    }
    // Last, because its baseline holds a whole part in memory.
    let rss_before_serve = peak_rss_mib();
    let served = plan.runs("serve") && serve_group(&plan, primary, &mut table).await?;
    table.row(
        "memory",
        "peak RSS of this run (VmHWM)",
        format!("{:.1} MiB", peak_rss_mib()),
        "",
        "",
    );
    if served {
        table.row(
            "memory",
            "peak RSS before serve (its baseline holds the part)",
            format!("{rss_before_serve:.1} MiB"),
            "",
            "",
        );
    }
    table.print();
    println!("\n{}", load_line());
    println!("\ntargets:");
    for t in &table.targets {
        println!("  {t}");
    }
    Ok(())
}

/// One contender's figures over the repetitions.
#[derive(Default)]
struct Samples(Vec<Duration>);

impl Samples {
    /// How many times faster these samples are than `base`'s, run by run
    /// (`base[i] / self[i]`), as the median of the per-run ratios: each
    /// run measures every contender back to back, so a disturbance that
    /// slows one run down slows both sides of its ratio.
    fn paired(&self, base: &Samples) -> f64 {
        let mut r: Vec<f64> = base
            .0
            .iter()
            .zip(&self.0)
            .map(|(b, s)| b.as_secs_f64() / s.as_secs_f64().max(1e-12))
            .collect();
        r.sort_by(f64::total_cmp);
        if r.is_empty() {
            return f64::NAN;
        }
        let middle = &r[(r.len() - 1) / 2..=r.len() / 2];
        middle.iter().sum::<f64>() / middle.len() as f64
    }

    fn median(&self) -> Duration {
        quantile(&self.0, 0.5)
    }
    fn spread(&self, bytes: u64) -> String {
        let lo = self.0.iter().max().copied().unwrap_or_default();
        let hi = self.0.iter().min().copied().unwrap_or_default();
        format!("{:.0}–{:.0}", mb_per_s(bytes, lo), mb_per_s(bytes, hi))
    }
}

/// Writes `part` as part `index` of `job`; returns the time taken.
async fn timed_write(
    c: &Contenders,
    which: Which,
    part: &Part,
    job: &ExportJobId,
    index: u32,
) -> BenchResult<Duration> {
    settle();
    let t = Instant::now();
    write_part(c.get(which), &key(job, index), part).await?;
    let spent = t.elapsed();
    discard(c, which, job).await?;
    Ok(spent)
}

/// Write one part of `size` bytes.
async fn write_group(
    plan: &Plan,
    corpus: &Arc<Corpus>,
    size: u64,
    reps: usize,
    table: &mut Table,
) -> BenchResult<()> {
    let part = corpus.part_of_size(size);
    let bytes = part.bytes();
    let c = Contenders::open(&plan.dir, plan.options.clone())?;
    let (mut ceiling, mut digest) = (Samples::default(), Samples::default());
    let mut by = [Samples::default(), Samples::default(), Samples::default()];
    let order = [Which::Store, Which::Fs, Which::FsSync];
    let job = ExportJobId::new();
    for rep in 0..reps {
        ceiling
            .0
            .push(codec_run(&part, plan.chunk, plan.level, false).compress);
        digest.0.push(digest_run(&part));
        for (i, w) in order.iter().enumerate() {
            by[i]
                .0
                .push(timed_write(&c, *w, &part, &job, rep as u32).await?);
        }
    }
    let runs = if reps == plan.reps {
        String::new()
    } else {
        format!(" ({reps} runs)")
    };
    let group = format!("write 1 part, {} MiB {}{runs}", bytes >> 20, corpus.name);
    let ceil = ceiling.median();
    table.row(
        &group,
        &format!("zstd-{} compress, 1 thread (ceiling)", plan.level),
        mbs(bytes, ceil, &ceiling),
        "1.00×",
        times(ceiling.paired(&by[2])),
    );
    table.row(
        &group,
        &format!(
            "{} digest, 1 thread (reference)",
            sqlite_export_store::DigestAlgorithm::CURRENT.label()
        ),
        mbs(bytes, digest.median(), &digest),
        times(digest.paired(&ceiling)),
        "",
    );
    for (i, w) in order.iter().enumerate() {
        let m = by[i].median();
        table.row(
            &group,
            w.label(),
            mbs(bytes, m, &by[i]),
            times(by[i].paired(&ceiling)),
            times(by[i].paired(&by[2])),
        );
    }
    table.target(
        &format!(
            "write 1 part ({} MiB {}) ≥ 0.90× zstd-{} 1 thread",
            bytes >> 20,
            corpus.name,
            plan.level
        ),
        by[0].paired(&ceiling),
        0.90,
    );
    table.target(
        &format!(
            "write 1 part ({} MiB {}) ≥ 2.5× local fs + fsync",
            bytes >> 20,
            corpus.name
        ),
        by[0].paired(&by[2]),
        2.5,
    );
    Ok(())
}

/// Parts written at once, each by a task of its own, line by line (as
/// HFS's export workers write them), for 1, 2, 4 and 16 parts holding
/// `--size-mib` in all. The ceiling is every core compressing the same
/// chunks (each thread its own contiguous share, its own context: see
/// [`codec_parallel`]); one core doing it all is shown beside it. Each
/// repetition measures every part count, its ceilings and its contenders
/// back to back, so the ratios (the median of per-run ratios) compare
/// figures taken moments apart, the part counts among themselves too.
async fn concurrent_group(plan: &Plan, corpus: &Arc<Corpus>, table: &mut Table) -> BenchResult<()> {
    const COUNTS: [usize; 4] = [1, 2, 4, 16];
    #[derive(Default)]
    struct Figures {
        one_core: Samples,
        cores: Samples,
        by: [Samples; 3],
        /// Per run: the CPU the ceiling's threads spent, and the CPU every
        /// thread of the process spent while the store wrote.
        cores_cpu: Vec<Duration>,
        store_cpu: Vec<Duration>,
    }
    let c = Contenders::open(&plan.dir, plan.options.clone())?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let order = [Which::Store, Which::Fs, Which::FsSync];
    let sets: Vec<Vec<Part>> = COUNTS
        .iter()
        .map(|&n| {
            (0..n)
                .map(|i| {
                    corpus.part_of_size_from(i * corpus.line_count() / n, plan.size / n as u64)
                })
                .collect()
        })
        .collect();
    let mut figures: Vec<Figures> = COUNTS.iter().map(|_| Figures::default()).collect();
    for _ in 0..plan.reps {
        for (parts, f) in sets.iter().zip(&mut figures) {
            f.one_core
                .0
                .push(codec_parallel(parts, plan.chunk, plan.level, 1));
            let (wall, cpu) = codec_parallel_cpu(parts, plan.chunk, plan.level, threads);
            f.cores.0.push(wall);
            f.cores_cpu.push(cpu);
            for (i, w) in order.iter().enumerate() {
                settle();
                let cpu = process_threads_cpu();
                let (spent, job) = write_concurrently(c.shared(*w), parts).await?;
                if *w == Which::Store {
                    f.store_cpu.push(process_threads_cpu().saturating_sub(cpu));
                }
                f.by[i].0.push(spent);
                discard(&c, *w, &job).await?;
            }
        }
    }
    let bytes: Vec<u64> = sets
        .iter()
        .map(|parts| parts.iter().map(Part::bytes).sum())
        .collect();
    for (k, (&n, f)) in COUNTS.iter().zip(&figures).enumerate() {
        let group = format!(
            "write {n} part{} at once, line by line, {} MiB {}",
            if n == 1 { "" } else { "s" },
            bytes[k] >> 20,
            corpus.name
        );
        table.row(
            &group,
            &format!(
                "zstd-{} compress, {threads} threads, a share each (ceiling)",
                plan.level
            ),
            mbs(bytes[k], f.cores.median(), &f.cores),
            "1.00×",
            times(f.cores.paired(&f.by[2])),
        );
        table.row(
            &group,
            &format!("zstd-{} compress, 1 thread (reference)", plan.level),
            mbs(bytes[k], f.one_core.median(), &f.one_core),
            times(f.one_core.paired(&f.cores)),
            "",
        );
        for (i, w) in order.iter().enumerate() {
            table.row(
                &group,
                w.label(),
                mbs(bytes[k], f.by[i].median(), &f.by[i]),
                times(f.by[i].paired(&f.cores)),
                times(f.by[i].paired(&f.by[2])),
            );
        }
        // Where the gap to the ceiling goes: the store's CPU for the same
        // bytes over the ceiling's (overhead), and how many cores each kept
        // busy (idleness), run by run.
        let per_run = |a: &[Duration], b: &[Duration]| {
            let mut r: Vec<f64> = a
                .iter()
                .zip(b)
                .map(|(a, b)| a.as_secs_f64() / b.as_secs_f64().max(1e-12))
                .collect();
            r.sort_by(f64::total_cmp);
            r.get(r.len().saturating_sub(1) / 2)
                .copied()
                .unwrap_or(f64::NAN)
        };
        table.row(
            &group,
            "store CPU (all threads) over the ceiling's",
            times(per_run(&f.store_cpu, &f.cores_cpu)),
            "",
            "",
        );
        table.row(
            &group,
            "cores busy (CPU / wall): store, ceiling",
            format!(
                "{:.2}, {:.2}",
                per_run(&f.store_cpu, &f.by[0].0),
                per_run(&f.cores_cpu, &f.cores.0)
            ),
            "",
            "",
        );
        if n > 1 {
            // Throughput over the store's own with one part, run by run.
            let vs_one = f.by[0].paired(&figures[0].by[0]) * bytes[k] as f64 / bytes[0] as f64;
            table.row(
                &group,
                "store, over its own figure with 1 part",
                times(vs_one),
                "",
                "",
            );
            table.target(
                &format!("{n} parts at once ≥ 1 part of the same bytes (store)"),
                vs_one,
                1.0,
            );
        }
        let need = match n {
            4 => Some(0.85),
            16 => Some(0.80),
            _ => None,
        };
        if let Some(need) = need {
            table.target(
                &format!(
                    "{n} parts at once, line by line ≥ {need:.2}× zstd-{} on {threads} threads",
                    plan.level
                ),
                f.by[0].paired(&f.cores),
                need,
            );
            // The same bytes cannot go faster than the ceiling's CPU time
            // over the store's allows with every core busy, however idle
            // the machine: this holds whatever the load.
            table.target(
                &format!(
                    "{n} parts at once: the ceiling's CPU time over the store's (all threads)"
                ),
                per_run(&f.cores_cpu, &f.store_cpu),
                need,
            );
        }
        let busy = per_run(&f.cores_cpu, &f.cores.0);
        if busy < 0.9 * threads as f64 {
            table.note(&format!(
                "{n} part{}: the ceiling's {threads} threads kept only {busy:.2} cores busy (the \
                 machine had other work): ratios to it overstate the store's",
                if n == 1 { "" } else { "s" }
            ));
        }
    }
    Ok(())
}

async fn read_group(plan: &Plan, corpus: &Arc<Corpus>, table: &mut Table) -> BenchResult<()> {
    let part = corpus.part_of_size(plan.size);
    let bytes = part.bytes();
    let c = Contenders::open(&plan.dir, plan.options.clone())?;
    let job = ExportJobId::new();
    let k = key(&job, 0);
    for w in [Which::Store, Which::Fs] {
        write_part(c.get(w), &k, &part).await?;
    }
    let mut buf = vec![0u8; READ_BUFFER];
    let (mut ceiling, mut store, mut fs) =
        (Samples::default(), Samples::default(), Samples::default());
    for _ in 0..plan.reps {
        ceiling
            .0
            .push(codec_run(&part, plan.chunk, plan.level, true).decompress);
        for (w, s) in [(Which::Store, &mut store), (Which::Fs, &mut fs)] {
            let t = Instant::now();
            let n = read_part(c.get(w), &k, &mut buf).await?;
            s.0.push(t.elapsed());
            if n != bytes {
                return Err(format!("{} read {n} bytes of {bytes}", w.label()).into());
            }
        }
    }
    let group = format!("read 1 part, {} MiB {}", bytes >> 20, corpus.name);
    let ceil = ceiling.median();
    table.row(
        &group,
        "zstd decompress, 1 thread (ceiling)",
        mbs(bytes, ceil, &ceiling),
        "1.00×",
        "",
    );
    table.row(
        &group,
        Which::Store.label(),
        mbs(bytes, store.median(), &store),
        times(store.paired(&ceiling)),
        "",
    );
    table.row(
        &group,
        "local fs (the file, page cache)",
        mbs(bytes, fs.median(), &fs),
        times(fs.paired(&ceiling)),
        "",
    );
    table.target(
        &format!(
            "read 1 part ({}) ≥ 0.80× zstd decompress 1 thread",
            corpus.name
        ),
        store.paired(&ceiling),
        0.80,
    );
    Ok(())
}

/// One finished part of `--size-mib` downloaded over loopback HTTP from the
/// store's router (`measure_throughput`: real connections, bodies read to
/// the end and checked), in each wire form, one download per connection at
/// 1 and at 4 connections, beside the same NDJSON sent from memory by the
/// same HTTP stack with no store behind it (the ceiling). Figures are NDJSON
/// delivered per second, whatever went over the wire. Returns whether it ran.
#[cfg(feature = "server")]
async fn serve_group(plan: &Plan, corpus: &Arc<Corpus>, table: &mut Table) -> BenchResult<bool> {
    use sqlite_export_store::server::{measure_throughput, WireForm};
    let part = corpus.part_of_size(plan.size);
    let bytes = part.bytes();
    let c = Contenders::open(&plan.dir, plan.options.clone())?;
    let k = key(&ExportJobId::new(), 0);
    write_part(&c.store, &k, &part).await?;
    let forms = [
        WireForm::MemoryBaseline,
        WireForm::Identity,
        WireForm::Zstd,
        WireForm::Gzip,
    ];
    for conns in [1usize, 4] {
        let downloads = conns * SERVE_DOWNLOADS_PER_CONNECTION;
        let mut by: [Samples; 4] = Default::default();
        let mut sent = [0u64; 4];
        for _ in 0..plan.reps {
            for (i, form) in forms.iter().enumerate() {
                let t = measure_throughput(&c.store, &k, *form, downloads, conns).await?;
                by[i].0.push(t.elapsed);
                sent[i] = t.wire_bytes / downloads as u64;
            }
        }
        let group = format!(
            "serve 1 part over loopback HTTP, {} MiB {}, {}",
            bytes >> 20,
            corpus.name,
            if conns == 1 {
                "1 connection".to_string()
            } else {
                format!("{conns} connections at once")
            }
        );
        let total = bytes * downloads as u64;
        let ceil = by[0].median();
        let on_wire = |n: u64| format!("{:.1} MB sent per part", n as f64 / 1e6);
        let labels = [
            "same NDJSON from memory, same HTTP stack (ceiling)".to_string(),
            "store, identity (frames decoded as sent)".to_string(),
            format!("store, zstd pass-through ({})", on_wire(sent[2])),
            format!("store, gzip on the fly ({})", on_wire(sent[3])),
        ];
        for (i, label) in labels.iter().enumerate() {
            let m = by[i].median();
            table.row(&group, label, mbs(total, m, &by[i]), ratio(ceil, m), "");
        }
    }
    Ok(true)
}

/// Downloads per connection in one `serve` figure.
#[cfg(feature = "server")]
const SERVE_DOWNLOADS_PER_CONNECTION: usize = 1;

#[cfg(not(feature = "server"))]
async fn serve_group(_: &Plan, _: &Arc<Corpus>, _: &mut Table) -> BenchResult<bool> {
    println!("(no serve group: this build has no feature `server`)");
    Ok(false)
}

async fn small_group(plan: &Plan, corpus: &Arc<Corpus>, table: &mut Table) -> BenchResult<()> {
    let parts = hfs_parts(corpus, plan.small_parts, HFS_BATCH);
    let c = Contenders::open(&plan.dir, plan.options.clone().with_finalize_timings(true))?;
    let order = [Which::Store, Which::FsSync, Which::Fs];
    let mut lat: [Vec<Duration>; 3] = Default::default();
    let mut fin: [Vec<Duration>; 3] = Default::default();
    let mut whole: [Vec<Duration>; 3] = Default::default();
    let mut opens: [Vec<Duration>; 3] = Default::default();
    let mut seal: [Vec<Duration>; 3] = Default::default();
    let jobs: Vec<ExportJobId> = order.iter().map(|_| ExportJobId::new()).collect();
    let mut shut: [Vec<Duration>; 3] = Default::default();
    // Interleaved part by part, so that a disturbance hits every store
    // alike: first as fast as the stores take lines, each writer shut down
    // before its finalize (the seal and publish figures), then as HFS's
    // export worker writes and finalizes a part (the finalize figures).
    for (i, p) in parts.iter().enumerate() {
        for (j, w) in order.iter().enumerate() {
            let t =
                write_part_timed(c.get(*w), &key(&jobs[j], i as u32), p, Producer::Flat).await?;
            lat[j].push(t.total);
            shut[j].push(t.finalize);
            seal[j].push(t.seal);
        }
    }
    let jobs: Vec<ExportJobId> = order.iter().map(|_| ExportJobId::new()).collect();
    // Only the finalizes of HFS's way of writing are broken down.
    c.store.take_finalize_timings();
    for (i, p) in parts.iter().enumerate() {
        for (j, w) in order.iter().enumerate() {
            let k = key(&jobs[j], i as u32);
            let t = write_part_timed(c.get(*w), &k, p, Producer::Hfs).await?;
            fin[j].push(t.finalize);
            whole[j].push(t.write + t.finalize);
            opens[j].push(t.open);
        }
    }
    let mean_bytes = parts.iter().map(Part::bytes).sum::<u64>() / parts.len() as u64;
    let group = format!(
        "{} HFS parts of 1,000 resources (~{:.1} MB), open→finalize",
        parts.len(),
        mean_bytes as f64 / 1e6
    );
    let sync_median = quantile(&lat[1], 0.5);
    for (j, w) in order.iter().enumerate() {
        let (p50, p90, p99) = (
            quantile(&lat[j], 0.5),
            quantile(&lat[j], 0.9),
            quantile(&lat[j], 0.99),
        );
        table.row(
            &group,
            w.label(),
            format!("{} / {} / {} ms", ms(p50), ms(p90), ms(p99)),
            "",
            ratio(sync_median, p50),
        );
    }
    table.target(
        "small part median latency ≤ local fs + fsync (ratio ≥ 1.0)",
        sync_median.as_secs_f64() / quantile(&lat[0], 0.5).as_secs_f64(),
        1.0,
    );

    // What a producer that finalizes each part before it goes on (HFS's
    // export worker) waits for: the last line written to finalize_part
    // returned, and where that time goes.
    let group = "finalize as HFS 0.2.7 writes a part (lines made first, written at once): last line → finalize returned";
    let p50_p99 =
        |xs: &[Duration]| format!("{} / {} ms", ms(quantile(xs, 0.5)), ms(quantile(xs, 0.99)));
    // One row per contender, the ratio against local fs + fsync's median.
    let by_contender = |table: &mut Table,
                        group: &str,
                        xs: &[Vec<Duration>; 3],
                        shown: &dyn Fn(&[Duration]) -> String| {
        let sync = quantile(&xs[1], 0.5);
        for (j, w) in order.iter().enumerate() {
            let figure = format!("{} (p50 / p99)", shown(&xs[j]));
            table.row(
                group,
                w.label(),
                figure,
                "",
                ratio(sync, quantile(&xs[j], 0.5)),
            );
        }
    };
    by_contender(table, group, &fin, &p50_p99);
    // What the store costs HFS's worker per part in all: the writes (into a
    // buffer for the store, through a 64 KiB buffer into a file for local
    // fs) and the finalize.
    let p50_p99_fine = |xs: &[Duration]| {
        format!(
            "{:.2} / {:.2} ms",
            quantile(xs, 0.5).as_secs_f64() * 1e3,
            quantile(xs, 0.99).as_secs_f64() * 1e3
        )
    };
    let group_whole =
        "a part as HFS 0.2.7 writes it: open_writer → finalize returned (lines made before)";
    by_contender(table, group_whole, &whole, &p50_p99_fine);
    for (j, w) in order.iter().enumerate() {
        table.row(
            group_whole,
            &format!("  of which open_writer, {}", w.label()),
            format!("{} (p50 / p99)", p50_p99_fine(&opens[j])),
            "",
            "",
        );
    }
    // Where the store's finalizes went, stage by stage
    // (`StoreOptions::with_finalize_timings`).
    let timings = c.store.take_finalize_timings();
    type Stage = fn(&FinalizeTiming) -> Duration;
    let stages: [(&str, Stage); 6] = [
        ("  store: compressing what was left (both cores)", |t| {
            t.compress
        }),
        ("  store: chunks queued before, stored; wake-up", |t| {
            t.store_chunks
        }),
        ("  store: hand-off to the writer thread", |t| t.hand_off),
        (
            "  store: publish statements (held chunks stored, checks, flip)",
            |t| t.statements,
        ),
        ("  store: durable commit (log written, fsync)", |t| t.commit),
        ("  store: reply back", |t| t.reply),
    ];
    for (label, stage) in stages {
        let xs: Vec<Duration> = timings.iter().map(stage).collect();
        if !xs.is_empty() {
            let (p50, p99) = (quantile(&xs, 0.5), quantile(&xs, 0.99));
            let figure = format!(
                "{:.2} / {:.2} ms",
                p50.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3
            );
            table.row(group, label, figure, "", "");
        }
    }
    let publish: Vec<Duration> = shut[0].iter().zip(&seal[0]).map(|(f, s)| *f - *s).collect();
    table.row(
        group,
        "  store, writer shut down first: seal (what is left compressed and stored)",
        p50_p99(&seal[0]),
        "",
        "",
    );
    table.row(
        group,
        "  store, writer shut down first: publish (checks, durable commit)",
        p50_p99(&publish),
        "",
        "",
    );
    // What a finalize's commit syncs: the part's frames (about a twelfth
    // of its NDJSON) and a few pages, appended to the log.
    let fsync = workload::fsync_times(&plan.dir, mean_bytes as usize / 12, 30)?;
    let fsync_p50 = quantile(&fsync, 0.5);
    table.row(
        group,
        "  one fsync here (a stored part's size appended)",
        p50_p99(&fsync),
        "",
        "",
    );
    // The floor of the compression stage: the whole part compressed on both
    // cores, nothing else (two halves, one thread each, timed as the
    // concurrent group's ceiling is).
    let half = (parts[0].bytes() as usize).div_ceil(2);
    let floor: Vec<Duration> = (0..30)
        .map(|_| codec_parallel(std::slice::from_ref(&parts[0]), half, plan.level, 2))
        .collect();
    table.row(
        group,
        "  floor: the whole part compressed on both cores at the store's level, nothing else",
        p50_p99(&floor),
        "",
        "",
    );
    let over = quantile(&fin[0], 0.5).saturating_sub(fsync_p50);
    table.target(
        "finalize p50 ≤ 0.5 ms + one fsync (0.5 ms ÷ what is left after the fsync)",
        0.5 / (over.as_secs_f64() * 1e3).max(1e-3),
        1.0,
    );
    Ok(())
}

async fn delete_group(plan: &Plan, corpus: &Arc<Corpus>, table: &mut Table) -> BenchResult<()> {
    const PARTS: usize = 1000;
    const LINES: usize = 100;
    let c = Contenders::open(&plan.dir, plan.options.clone())?;
    let reps = plan.reps.min(3);
    let (mut store, mut fs) = (Samples::default(), Samples::default());
    for _ in 0..reps {
        for (w, s) in [(Which::Store, &mut store), (Which::Fs, &mut fs)] {
            let job = fill_job(c.get(w), corpus, PARTS, LINES).await?;
            let t = Instant::now();
            delete_job(c.get(w), &job).await?;
            s.0.push(t.elapsed());
        }
    }
    let group = format!("delete_job_outputs, {PARTS} parts of {LINES} resources");
    table.row(
        &group,
        Which::Store.label(),
        format!("{} ms", ms(store.median())),
        "",
        ratio(fs.median(), store.median()),
    );
    table.row(
        &group,
        "local fs (remove the folder)",
        format!("{} ms", ms(fs.median())),
        "",
        "1.00×",
    );
    Ok(())
}

/// The Synthea sample as HFS would export it (one part per 1,000 resources
/// of a type): NDJSON bytes over stored frame bytes, and over the size of the
/// database file once the store is closed (pages, indexes and all).
async fn ratio_group(plan: &Plan, synthea: &std::path::Path, table: &mut Table) -> BenchResult<()> {
    let dir = tempfile::Builder::new()
        .prefix("export-store-bench-")
        .tempdir_in(&plan.dir)?;
    let db = dir.path().join("ratio.db");
    let store = SqliteOutputStore::open_with(&db, "http://bench", plan.options.clone())?;
    let job = ExportJobId::new();
    let (mut raw, mut stored, mut parts) = (0u64, 0u64, 0u32);
    let mut files: Vec<PathBuf> = std::fs::read_dir(synthea)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "ndjson"))
        .collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f)?;
        if !text
            .lines()
            .next()
            .unwrap_or("")
            .contains("\"resourceType\"")
        {
            continue;
        }
        let lines: Vec<&str> = text.lines().collect();
        for batch in lines.chunks(HFS_BATCH) {
            let k = key(&job, parts);
            parts += 1;
            let mut w = store.open_writer(&k).await?;
            for l in batch {
                w.write_line(l).await?;
            }
            store.finalize_part(&k, w).await?;
            let info = store.part_info(&k).await?;
            raw += info.size_bytes;
            stored += info.stored_bytes;
        }
    }
    // Closing the store checkpoints the WAL into the file and removes it.
    drop(store);
    let wal = dir.path().join("ratio.db-wal");
    let file = std::fs::metadata(&db)?.len() + std::fs::metadata(&wal).map_or(0, |m| m.len());
    let group = format!(
        "Synthea sample as {parts} HFS parts, {:.1} MB",
        raw as f64 / 1e6
    );
    table.row(
        &group,
        "NDJSON ÷ stored zstd frames",
        format!("{:.1}×", raw as f64 / stored as f64),
        "",
        "",
    );
    table.row(
        &group,
        "NDJSON ÷ database file (closed)",
        format!(
            "{:.1}× ({:.2} MB)",
            raw as f64 / file as f64,
            file as f64 / 1e6
        ),
        "",
        "",
    );
    table.target(
        "stored bytes ≤ 1/12 of the Synthea NDJSON (file, ratio ÷ 12 ≥ 1)",
        raw as f64 / file as f64 / 12.0,
        1.0,
    );
    Ok(())
}

/// Writes `parts` parts of `bytes` in all at once (one part: on this task),
/// streaming from the corpus, then reads them back one after the other,
/// and reports the process's peak RSS.
async fn memory_check(
    corpus: &Arc<Corpus>,
    bytes: u64,
    parts: usize,
    options: StoreOptions,
    dir: &std::path::Path,
) -> BenchResult<()> {
    println!(
        "data: {} ({:.1} MiB in memory), peak RSS before the store: {:.1} MiB",
        corpus.name,
        corpus.len() as f64 / (1 << 20) as f64,
        peak_rss_mib()
    );
    let set: Vec<Part> = (0..parts)
        .map(|i| corpus.part_of_size_from(i * corpus.line_count() / parts, bytes / parts as u64))
        .collect();
    let c = Contenders::open(dir, options)?;
    let threads0 = cpu_by_thread();
    let (t, cpu0) = (Instant::now(), cpu_seconds());
    let job = if parts == 1 {
        let job = ExportJobId::new();
        write_part(&c.store, &key(&job, 0), &set[0]).await?;
        job
    } else {
        write_concurrently(c.shared(Which::Store), &set).await?.1
    };
    let (w, cpu1) = (t.elapsed(), cpu_seconds());
    let threads1 = cpu_by_thread();
    let after_write = peak_rss_mib();
    let mut buf = vec![0u8; READ_BUFFER];
    let t = Instant::now();
    let (mut n, mut chunks, mut stored) = (0u64, 0u64, 0u64);
    for (i, part) in set.iter().enumerate() {
        let k = key(&job, i as u32);
        let got = read_part(&c.store, &k, &mut buf).await?;
        if got != part.bytes() {
            return Err(format!("read {got} bytes of {}", part.bytes()).into());
        }
        let info = c.store.part_info(&k).await?;
        (n, chunks, stored) = (
            n + got,
            chunks + info.chunk_count,
            stored + info.stored_bytes,
        );
    }
    let (r, cpu2) = (t.elapsed(), cpu_seconds());
    println!(
        "wrote {:.2} GiB as {parts} part{} in {:.1} s ({:.0} MB/s), read it back in {:.1} s ({:.0} MB/s); {} chunks, {:.1}× compression",
        n as f64 / (1u64 << 30) as f64,
        if parts == 1 { "" } else { "s at once" },
        w.as_secs_f64(),
        mb_per_s(n, w),
        r.as_secs_f64(),
        mb_per_s(n, r),
        chunks,
        n as f64 / stored as f64
    );
    println!(
        "CPU time (user + system, all threads): {:.2} s writing, {:.2} s reading",
        cpu1 - cpu0,
        cpu2 - cpu1
    );
    println!(
        "CPU time writing, by thread (threads still alive): {}",
        cpu_spent(&threads0, &threads1)
    );
    let peak = peak_rss_mib();
    println!(
        "peak RSS of the whole process (VmHWM): {peak:.1} MiB (target < 64 MiB for one part, \
         < 96 MiB for 16 at once); {after_write:.1} MiB after the write; {} threads",
        proc_status("Threads:").unwrap_or(0.0)
    );
    println!("{}", load_line());
    Ok(())
}

#[derive(Default)]
struct Table {
    rows: Vec<[String; 5]>,
    last_group: String,
    targets: Vec<String>,
}

impl Table {
    fn row(
        &mut self,
        group: &str,
        who: &str,
        figure: String,
        vs_ceiling: impl Into<String>,
        vs_sync: impl Into<String>,
    ) {
        let shown = if self.last_group == group {
            String::new()
        } else {
            self.last_group = group.to_string();
            group.to_string()
        };
        self.rows
            .push([shown, who.into(), figure, vs_ceiling.into(), vs_sync.into()]);
    }

    fn target(&mut self, what: &str, ratio: f64, at_least: f64) {
        let verdict = if ratio >= at_least { "met" } else { "MISSED" };
        self.targets.push(format!(
            "{verdict:>6}  {what}: measured {ratio:.2} (needs {at_least:.2})"
        ));
    }

    /// A remark printed among the targets.
    fn note(&mut self, what: &str) {
        self.targets.push(format!("{:>6}  {what}", "note"));
    }

    fn print(&self) {
        let head = ["group", "contender", "figure", "vs ceiling", "vs fs+fsync"];
        let mut w = head.map(|h| h.chars().count());
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let line = |cells: [&str; 5]| {
            let mut s = String::new();
            for (i, c) in cells.iter().enumerate() {
                let pad = w[i] - c.chars().count();
                if i >= 2 {
                    s.push_str(&" ".repeat(pad));
                    s.push_str(c);
                } else {
                    s.push_str(c);
                    s.push_str(&" ".repeat(pad));
                }
                s.push_str("  ");
            }
            println!("{}", s.trim_end());
        };
        line(head);
        line(w.map(|n| "-".repeat(n)).each_ref().map(String::as_str));
        for r in &self.rows {
            line(r.each_ref().map(String::as_str));
        }
    }
}

fn mbs(bytes: u64, median: Duration, s: &Samples) -> String {
    format!("{:.0} MB/s ({})", mb_per_s(bytes, median), s.spread(bytes))
}

/// How many times faster `d` is than `base` (`base / d`), as "1.23×".
fn ratio(base: Duration, d: Duration) -> String {
    format!("{:.2}×", base.as_secs_f64() / d.as_secs_f64().max(1e-12))
}

/// A speed ratio as "1.23×".
fn times(r: f64) -> String {
    format!("{r:.2}×")
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

/// Peak resident set of this process so far, from `/proc/self/status`.
fn peak_rss_mib() -> f64 {
    proc_status("VmHWM:").map_or(f64::NAN, |kb| kb / 1024.0)
}

/// CPU time of this process so far (all threads, user + system), from
/// `/proc/self/stat`, in seconds (assuming the usual 100 ticks per second).
fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name; utime and stime
            // are the 14th and 15th fields of the line.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(ticks / 100.0)
        })
        .unwrap_or(f64::NAN)
}

/// CPU time so far of this process's live threads, in seconds, summed by
/// thread name (from `/proc/self/task/*/comm` and `schedstat`, whose first
/// field is the thread's time on a CPU in nanoseconds).
fn cpu_by_thread() -> std::collections::BTreeMap<String, f64> {
    let mut by = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return by;
    };
    for task in tasks.flatten() {
        let read = |f: &str| std::fs::read_to_string(task.path().join(f)).ok();
        let (Some(name), Some(stat)) = (read("comm"), read("schedstat")) else {
            continue;
        };
        let ns = stat
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<f64>().ok());
        if let Some(ns) = ns {
            *by.entry(name.trim().to_string()).or_insert(0.0) += ns / 1e9;
        }
    }
    by
}

/// What each kind of thread spent between two [`cpu_by_thread`] readings,
/// as "name 1.23 s", largest first.
fn cpu_spent(
    before: &std::collections::BTreeMap<String, f64>,
    after: &std::collections::BTreeMap<String, f64>,
) -> String {
    let mut spent: Vec<(String, f64)> = after
        .iter()
        .map(|(name, t)| (name.clone(), t - before.get(name).copied().unwrap_or(0.0)))
        .filter(|(_, t)| *t > 0.0)
        .collect();
    spent.sort_by(|a, b| b.1.total_cmp(&a.1));
    spent
        .iter()
        .map(|(name, t)| format!("{name} {t:.3} s"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A number from a line of `/proc/self/status`.
fn proc_status(field: &str) -> Option<f64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse::<f64>().ok())
        })
}

fn machine_line() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    format!(
        "machine: {cpus} × {model} (nproc {cpus}), Linux {kernel}, {}",
        load_line()
    )
}

fn load_line() -> String {
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    format!("load average {load}")
}
