//! The workloads behind `export-store bench` and `cargo bench --bench store`
//! (which includes this file): the same data, the same contenders and the
//! same measurement for both.
//!
//! Every figure is measured beside its baselines on the same bytes:
//! - the ceiling: the store's own codec ([`codec::FrameCompressor`] /
//!   [`codec::decompress_into`], zstd with content size and checksum) on
//!   the same chunks, timing only the codec calls: one thread for one part,
//!   every core (each thread its own share of the chunks and its own
//!   context) for parts written at once;
//! - [`LocalFsOutputStore`], HFS's way of writing a part (64 KiB buffered
//!   file, rename), without and with fsync.
//!
//! A part is a run of whole NDJSON lines taken cyclically from a corpus (the
//! Synthea sample, or the synthetic generator's output), so a part of any
//! size costs no memory beyond the corpus, and every contender gets the same
//! lines through `write_line`, as HFS's export worker sends them.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlite_export_store::__test_support::codec;
use sqlite_export_store::__test_support::sample;
use sqlite_export_store::testkit::localfs::LocalFsOutputStore;
use sqlite_export_store::testkit::synthetic::Generator;
use sqlite_export_store::{
    ExportJobId, ExportOutputStore, ExportPartKey, SqliteOutputStore, StoreOptions, TenantContext,
    TenantId,
};
use tokio::io::AsyncReadExt;

/// A boxed error for the bench's plumbing.
pub type BenchResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// The tenant every bench part belongs to.
pub const TENANT: &str = "bench";

/// Lines per HFS-shaped part (`HFS_BULK_EXPORT_BATCH_SIZE`).
pub const HFS_BATCH: usize = 1000;

/// The buffer a download is read through (what a server hands to a socket).
pub const READ_BUFFER: usize = 64 * 1024;

/// A folder of plain Synthea NDJSON for the bench to read, kept as long as
/// this value lives.
pub struct SyntheaDir {
    path: PathBuf,
    /// The temporary folder the vendored sample was decompressed into.
    _temp: Option<tempfile::TempDir>,
}

impl SyntheaDir {
    /// The folder of `Type.000.ndjson` files.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The Synthea data the bench reads: `dir` if given, else the folder
/// `$EXPORT_STORE_SYNTHEA` names (both plain `*.ndjson`), else the sample
/// vendored in this repository ([`sample::synthea_dir`]), decompressed into
/// a temporary folder removed when the returned value is dropped.
pub fn synthea_dir(dir: Option<PathBuf>) -> BenchResult<SyntheaDir> {
    if let Some(path) = dir.or_else(|| std::env::var_os("EXPORT_STORE_SYNTHEA").map(PathBuf::from))
    {
        return Ok(SyntheaDir { path, _temp: None });
    }
    let temp = tempfile::Builder::new()
        .prefix("export-store-synthea-")
        .tempdir()?;
    sample::synthea_to_dir(temp.path())?;
    Ok(SyntheaDir {
        path: temp.path().to_path_buf(),
        _temp: Some(temp),
    })
}

/// NDJSON text split into lines, the source of every part.
pub struct Corpus {
    /// What the data is, for the report.
    pub name: String,
    text: String,
    /// `(start, end)` of each line in `text`, without its newline.
    lines: Vec<(usize, usize)>,
}

impl Corpus {
    /// The FHIR resource files of a bulk export folder (`*.ndjson` whose
    /// first line has a `resourceType`), concatenated in file-name order.
    pub fn synthea(dir: &Path) -> BenchResult<Corpus> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "ndjson"))
            .collect();
        files.sort();
        let mut text = String::new();
        for f in files {
            let body = std::fs::read_to_string(&f)?;
            if !body
                .lines()
                .next()
                .unwrap_or("")
                .contains("\"resourceType\"")
            {
                continue;
            }
            text.push_str(&body);
            if !text.ends_with('\n') {
                text.push('\n');
            }
        }
        if text.is_empty() {
            return Err(format!("no FHIR NDJSON files in {}", dir.display()).into());
        }
        Ok(Corpus::new("synthea".into(), text))
    }

    /// `bytes` of the synthetic generator's mixed-type NDJSON for `seed`.
    pub fn synthetic(seed: u64, bytes: usize) -> Corpus {
        let raw = Generator::new(seed).ndjson_of_size(bytes);
        let text = String::from_utf8(raw).expect("the generator writes UTF-8");
        Corpus::new("synthetic".into(), text)
    }

    fn new(name: String, text: String) -> Corpus {
        let mut lines = Vec::new();
        let mut start = 0;
        for (i, b) in text.bytes().enumerate() {
            if b == b'\n' {
                lines.push((start, i));
                start = i + 1;
            }
        }
        Corpus { name, text, lines }
    }

    /// Bytes of the corpus (newlines included).
    pub fn len(&self) -> usize {
        self.text.len()
    }

    /// Lines of the corpus.
    pub fn line_count(&self) -> usize {
        self.lines.len()
    }

    /// A part of at least `bytes` bytes (whole lines), from the first line.
    pub fn part_of_size(self: &Arc<Self>, bytes: u64) -> Part {
        self.part_of_size_from(0, bytes)
    }

    /// A part of at least `bytes` bytes starting at line `first`.
    pub fn part_of_size_from(self: &Arc<Self>, first: usize, bytes: u64) -> Part {
        let n = self.lines.len();
        let (mut total, mut count) = (0u64, 0usize);
        while total < bytes {
            let (s, e) = self.lines[(first + count) % n];
            total += (e - s + 1) as u64;
            count += 1;
        }
        Part {
            corpus: self.clone(),
            first,
            count,
            bytes: total,
        }
    }

    /// `count` lines starting at line `first` (wrapping around).
    pub fn part_of_lines(self: &Arc<Self>, first: usize, count: usize) -> Part {
        let n = self.lines.len();
        let bytes = (0..count)
            .map(|i| {
                let (s, e) = self.lines[(first + i) % n];
                (e - s + 1) as u64
            })
            .sum();
        Part {
            corpus: self.clone(),
            first,
            count,
            bytes,
        }
    }
}

/// A run of lines of a corpus: what one part holds.
#[derive(Clone)]
pub struct Part {
    corpus: Arc<Corpus>,
    first: usize,
    count: usize,
    bytes: u64,
}

impl Part {
    /// NDJSON bytes of the part (newlines included).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The lines, without newlines.
    pub fn lines(&self) -> impl Iterator<Item = &str> + '_ {
        let c = &self.corpus;
        let n = c.lines.len();
        (0..self.count).map(move |i| {
            let (s, e) = c.lines[(self.first + i) % n];
            &c.text[s..e]
        })
    }

    /// The chunks the store cuts the part into.
    pub fn chunk_count(&self, chunk_size: usize) -> usize {
        self.bytes.div_ceil(chunk_size as u64) as usize
    }

    /// Calls `f` with each `chunk_size` slice of the part's bytes, in order,
    /// as the store cuts them (the last one may be shorter). The slices are
    /// assembled in one reused buffer.
    pub fn for_each_chunk(&self, chunk_size: usize, f: impl FnMut(&[u8])) {
        self.for_each_chunk_in(chunk_size, 0..usize::MAX, f)
    }

    /// [`for_each_chunk`](Self::for_each_chunk) for the chunks whose index
    /// is in `chunks` only; the lines before them are skipped, not copied.
    pub fn for_each_chunk_in(
        &self,
        chunk_size: usize,
        chunks: std::ops::Range<usize>,
        mut f: impl FnMut(&[u8]),
    ) {
        let start = (chunks.start as u64).saturating_mul(chunk_size as u64);
        let end = (chunks.end as u64).saturating_mul(chunk_size as u64);
        let mut buf = Vec::with_capacity(chunk_size);
        let mut pos = 0u64;
        for line in self.lines() {
            let len = line.len() as u64 + 1;
            if pos + len <= start {
                pos += len;
                continue;
            }
            if pos >= end {
                break;
            }
            // The part of this line (and its newline) inside the range.
            let from = start.saturating_sub(pos) as usize;
            let to = (end - pos).min(len) as usize;
            let mut rest = &line.as_bytes()[from.min(line.len())..to.min(line.len())];
            let newline = to as u64 == len;
            pos += len;
            loop {
                let n = rest.len().min(chunk_size - buf.len());
                buf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                if buf.len() == chunk_size {
                    f(&buf);
                    buf.clear();
                }
                if rest.is_empty() {
                    break;
                }
            }
            if newline {
                buf.push(b'\n');
                if buf.len() == chunk_size {
                    f(&buf);
                    buf.clear();
                }
            }
        }
        if !buf.is_empty() {
            f(&buf);
        }
    }
}

/// The codec alone on one thread: time spent in compression and in
/// decompression of a part's chunks, and the sizes.
#[derive(Debug, Clone, Copy, Default)]
pub struct CodecRun {
    /// Time inside `codec::compress`.
    pub compress: Duration,
    /// Time inside `codec::decompress_into`.
    pub decompress: Duration,
    /// Raw bytes.
    pub raw: u64,
    /// Frame bytes.
    pub stored: u64,
}

/// Compresses (and, with `decompress`, decompresses) each chunk of `part`
/// with the store's codec, timing only the codec calls: the ceiling a store
/// built on this codec cannot beat on one thread.
pub fn codec_run(part: &Part, chunk_size: usize, level: i32, decompress: bool) -> CodecRun {
    let mut run = CodecRun::default();
    // One context and one output buffer for every chunk, as a tuned
    // encoder and decoder would use (and the store's chunk workers do).
    let mut ctx = codec::FrameCompressor::new(level).expect("a zstd context");
    let mut back = Vec::new();
    part.for_each_chunk(chunk_size, |chunk| {
        let t = Instant::now();
        let frame = ctx.compress(chunk).expect("compress");
        run.compress += t.elapsed();
        run.raw += chunk.len() as u64;
        run.stored += frame.len() as u64;
        if decompress {
            let t = Instant::now();
            codec::decompress_into(&frame, chunk.len(), &mut back).expect("decompress");
            run.decompress += t.elapsed();
            debug_assert_eq!(back.len(), chunk.len());
        }
    });
    run
}

/// Compresses every chunk of `parts` (the chunks the store cuts them into,
/// part after part) on `threads` threads at once, the ceiling of writing
/// those parts with that many cores: each thread compresses its own
/// contiguous share of the chunks (an equal count) with its own context,
/// nothing shared between the threads but the input, and, like
/// [`codec_run`], only the codec calls are timed. Returns the time of the
/// slowest thread: the threads start together, so that is the time the
/// cores took to compress everything.
pub fn codec_parallel(parts: &[Part], chunk_size: usize, level: i32, threads: usize) -> Duration {
    codec_parallel_cpu(parts, chunk_size, level, threads).0
}

/// [`codec_parallel`], and the CPU time its threads spent in all (each
/// thread's own, from its start line to its last chunk, chunk assembly
/// included): what the store's CPU time for the same parts compares with.
pub fn codec_parallel_cpu(
    parts: &[Part],
    chunk_size: usize,
    level: i32,
    threads: usize,
) -> (Duration, Duration) {
    let threads = threads.max(1);
    let counts: Vec<usize> = parts.iter().map(|p| p.chunk_count(chunk_size)).collect();
    let total: usize = counts.iter().sum();
    // Thread `t` takes chunks `total * t / threads ..` of the whole run,
    // as (part, chunk range within the part).
    let share = |t: usize| {
        let (from, to) = (total * t / threads, total * (t + 1) / threads);
        let mut out = Vec::new();
        let mut first = 0;
        for (i, &n) in counts.iter().enumerate() {
            let (lo, hi) = (from.max(first), to.min(first + n));
            if lo < hi {
                out.push((i, lo - first..hi - first));
            }
            first += n;
        }
        out
    };
    let start = std::sync::Barrier::new(threads);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (mine, start) = (share(t), &start);
                s.spawn(move || {
                    let mut ctx = codec::FrameCompressor::new(level).expect("a zstd context");
                    let mut spent = Duration::ZERO;
                    start.wait();
                    let cpu = thread_cpu();
                    for (i, chunks) in mine {
                        parts[i].for_each_chunk_in(chunk_size, chunks, |chunk| {
                            let t = Instant::now();
                            std::hint::black_box(ctx.compress(chunk).expect("compress"));
                            spent += t.elapsed();
                        });
                    }
                    (spent, thread_cpu().saturating_sub(cpu))
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a compression thread"))
            .fold((Duration::ZERO, Duration::ZERO), |(wall, cpu), (w, c)| {
                (wall.max(w), cpu + c)
            })
    })
}

/// The calling thread's CPU time so far (its time on a CPU, from
/// `/proc/thread-self/schedstat`, in nanoseconds); zero where that file
/// does not exist.
pub fn thread_cpu() -> Duration {
    schedstat_cpu("/proc/thread-self/schedstat")
}

/// The CPU time so far of every live thread of this process (their
/// `/proc/self/task/*/schedstat`): around a run whose threads outlive it
/// (the store's chunk workers, writer threads and runtime), the CPU the
/// run took.
pub fn process_threads_cpu() -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    tasks
        .flatten()
        .map(|t| schedstat_cpu(t.path().join("schedstat")))
        .sum()
}

fn schedstat_cpu(path: impl AsRef<std::path::Path>) -> Duration {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map(Duration::from_nanos)
        .unwrap_or_default()
}

/// The content digest (in the algorithm the store records by default) of
/// a part on one thread: what the store's digest costs.
pub fn digest_run(part: &Part) -> Duration {
    use sqlite_export_store::ContentDigest;
    let mut d = ContentDigest::new();
    let mut spent = Duration::ZERO;
    part.for_each_chunk(1 << 20, |chunk| {
        let t = Instant::now();
        d.update(chunk);
        spent += t.elapsed();
    });
    std::hint::black_box(d.finish_hex());
    spent
}

/// The stores compared, all under one folder.
pub struct Contenders {
    /// The SQLite store.
    pub store: SqliteOutputStore,
    /// HFS's way, no fsync.
    pub fs: LocalFsOutputStore,
    /// HFS's way, fsync before the rename (and of the folder after it).
    pub fs_sync: LocalFsOutputStore,
    /// Removed on drop.
    _dir: tempfile::TempDir,
}

/// Which contender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// [`SqliteOutputStore`].
    Store,
    /// [`LocalFsOutputStore`] without fsync.
    Fs,
    /// [`LocalFsOutputStore`] with fsync.
    FsSync,
}

impl Which {
    /// The name in reports.
    pub fn label(self) -> &'static str {
        match self {
            Which::Store => "store (SQLite, zstd)",
            Which::Fs => "local fs",
            Which::FsSync => "local fs + fsync",
        }
    }
}

impl Contenders {
    /// Opens the three stores in a fresh folder under `parent`.
    pub fn open(parent: &Path, options: StoreOptions) -> BenchResult<Contenders> {
        let dir = tempfile::Builder::new()
            .prefix("export-store-bench-")
            .tempdir_in(parent)?;
        let store =
            SqliteOutputStore::open_with(dir.path().join("bench.db"), "http://bench", options)?;
        let fs = LocalFsOutputStore::new(dir.path().join("fs"), "http://bench")?;
        let fs_sync =
            LocalFsOutputStore::new(dir.path().join("fs-sync"), "http://bench")?.with_fsync(true);
        Ok(Contenders {
            store,
            fs,
            fs_sync,
            _dir: dir,
        })
    }

    /// The contender as the trait HFS holds.
    pub fn get(&self, which: Which) -> &dyn ExportOutputStore {
        match which {
            Which::Store => &self.store,
            Which::Fs => &self.fs,
            Which::FsSync => &self.fs_sync,
        }
    }

    /// The contender as HFS shares it between workers.
    pub fn shared(&self, which: Which) -> Arc<dyn ExportOutputStore> {
        match which {
            Which::Store => Arc::new(self.store.clone()),
            Which::Fs => Arc::new(self.fs.clone()),
            Which::FsSync => Arc::new(self.fs_sync.clone()),
        }
    }
}

/// The key of part `index` of `job`.
pub fn key(job: &ExportJobId, index: u32) -> ExportPartKey {
    ExportPartKey::output(TENANT, job.clone(), "Bundle", index, 1)
}

/// Writes `part` under `key` the way HFS's export worker does: open,
/// `write_line` per resource, finalize.
pub async fn write_part(
    store: &dyn ExportOutputStore,
    key: &ExportPartKey,
    part: &Part,
) -> BenchResult<()> {
    let mut w = store.open_writer(key).await?;
    for line in part.lines() {
        w.write_line(line).await?;
    }
    store.finalize_part(key, w).await?;
    Ok(())
}

/// How long writing one part took, and where its finalize went.
#[derive(Debug, Clone, Copy)]
pub struct PartTimes {
    /// `open_writer` to `finalize_part` returned.
    pub total: Duration,
    /// `open_writer` called to the last line written: what the store costs
    /// a producer before its finalize (for [`Producer::Hfs`], the lines were
    /// made before and are not in it).
    pub write: Duration,
    /// Of `write`: `open_writer` alone.
    pub open: Duration,
    /// The last line written to `finalize_part` returned: what a producer
    /// that finalizes each part before it reads the next (HFS's export
    /// worker) waits for.
    pub finalize: Duration,
    /// Of `finalize`: the writer's shutdown (for the store: the open chunk's
    /// last piece compressed and the part's digest finished, the chunk kept
    /// for the publishing transaction; for local files: the last bytes
    /// written).
    pub seal: Duration,
}

/// How a timed writer produces its lines and is finalized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Producer {
    /// As fast as `write_line` takes them; the writer is shut down before
    /// `finalize_part`, as `finalize_part` would do first, so that its two
    /// steps are timed apart.
    Flat,
    /// As HFS 0.2.7's export worker (`DefaultExportWorker`): every line of
    /// the batch is made before the writer is opened (a `String` each, as
    /// its `apply_elements` copies them), then written at once, and
    /// `finalize_part` gets the open writer and shuts it down itself. The
    /// seal is not timed apart.
    Hfs,
}

/// [`write_part`], timed as `producer` says.
pub async fn write_part_timed(
    store: &dyn ExportOutputStore,
    key: &ExportPartKey,
    part: &Part,
    producer: Producer,
) -> BenchResult<PartTimes> {
    use tokio::io::AsyncWriteExt;
    let start = Instant::now();
    let made: Vec<String> = match producer {
        Producer::Flat => Vec::new(),
        Producer::Hfs => part.lines().map(str::to_string).collect(),
    };
    let opening = Instant::now();
    let mut w = store.open_writer(key).await?;
    let opened = Instant::now();
    match producer {
        Producer::Flat => {
            for line in part.lines() {
                w.write_line(line).await?
            }
        }
        Producer::Hfs => {
            for line in &made {
                w.write_line(line).await?
            }
        }
    }
    let written = Instant::now();
    if producer == Producer::Flat {
        w.writer.shutdown().await?;
    }
    let sealed = Instant::now();
    store.finalize_part(key, w).await?;
    let done = Instant::now();
    Ok(PartTimes {
        total: done - start,
        write: written - opening,
        open: opened - opening,
        finalize: done - written,
        seal: sealed - written,
    })
}

/// What one `fsync` of a file just appended `bytes` costs in `dir`, `n`
/// times: the floor of a durable commit that appended as much to SQLite's
/// log (SQLite syncs its log with `fsync`, and the log grows).
pub fn fsync_times(dir: &Path, bytes: usize, n: usize) -> BenchResult<Vec<Duration>> {
    use std::io::Write;
    let file = tempfile::tempfile_in(dir)?;
    let mut f = std::io::BufWriter::new(file);
    let data = vec![b'x'; bytes];
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        f.write_all(&data)?;
        f.flush()?;
        let t = Instant::now();
        f.get_ref().sync_all()?;
        times.push(t.elapsed());
    }
    Ok(times)
}

/// Reads the part under `key` to its end through a [`READ_BUFFER`]; returns
/// the bytes read.
pub async fn read_part(
    store: &dyn ExportOutputStore,
    key: &ExportPartKey,
    buf: &mut [u8],
) -> BenchResult<u64> {
    let mut r = store.open_reader(key).await?;
    let mut total = 0u64;
    loop {
        let n = r.read(buf).await?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

/// After a timed write, untimed: removes the baseline's files (gigabytes of
/// page cache otherwise pile up and slow every later run down), but keeps
/// the store's parts, because a delete starts the store's idle-time space
/// reclamation, which would run during the next contender's write.
pub async fn discard(c: &Contenders, which: Which, job: &ExportJobId) -> BenchResult<()> {
    if which != Which::Store {
        delete_job(c.get(which), job).await?;
    }
    Ok(())
}

/// Deletes a bench job.
pub async fn delete_job(store: &dyn ExportOutputStore, job: &ExportJobId) -> BenchResult<()> {
    let tenant = TenantContext::new(TenantId::new(TENANT));
    store.delete_job_outputs(&tenant, job).await?;
    Ok(())
}

/// Writes `parts` concurrently (one task each, as concurrent export workers
/// would) into a fresh job; returns the wall time and the job.
pub async fn write_concurrently(
    store: Arc<dyn ExportOutputStore>,
    parts: &[Part],
) -> BenchResult<(Duration, ExportJobId)> {
    let job = ExportJobId::new();
    let t = Instant::now();
    let tasks: Vec<_> = parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (store, job, p) = (store.clone(), job.clone(), p.clone());
            tokio::spawn(async move { write_part(&*store, &key(&job, i as u32), &p).await })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok((t.elapsed(), job))
}

/// `n` HFS-shaped parts of `lines` resources each, spread over the corpus.
pub fn hfs_parts(corpus: &Arc<Corpus>, n: usize, lines: usize) -> Vec<Part> {
    (0..n)
        .map(|i| corpus.part_of_lines((i * 7919 * lines) % corpus.line_count(), lines))
        .collect()
}

/// Fills a fresh job with `parts` parts of `lines` resources each (for the
/// delete benchmark); returns the job.
pub async fn fill_job(
    store: &dyn ExportOutputStore,
    corpus: &Arc<Corpus>,
    parts: usize,
    lines: usize,
) -> BenchResult<ExportJobId> {
    let job = ExportJobId::new();
    for (i, p) in hfs_parts(corpus, parts, lines).iter().enumerate() {
        write_part(store, &key(&job, i as u32), p).await?;
    }
    Ok(job)
}

/// Flushes every file system's dirty pages (`sync`), untimed, before a
/// timed run: otherwise a contender's fsync would wait behind the gigabytes
/// a previous contender left in the page cache.
pub fn settle() {
    let _ = std::process::Command::new("sync").status();
}

/// The value at quantile `q` (0..=1) of `xs`, nearest rank.
pub fn quantile(xs: &[Duration], q: f64) -> Duration {
    let mut v = xs.to_vec();
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Decimal megabytes per second.
pub fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9)
}

#[cfg(test)]
mod tests {
    // No `use super::*`: the criterion bench includes this file with
    // `cfg(test)` set but no test harness, so the import would be unused.
    #[test]
    fn shares_of_chunks_are_the_chunks_the_store_cuts() {
        let corpus = std::sync::Arc::new(super::Corpus::synthetic(7, 200_000));
        let part = corpus.part_of_size_from(3, 150_000);
        let chunk = 4096;
        let mut whole = Vec::new();
        part.for_each_chunk(chunk, |c| whole.push(c.to_vec()));
        assert_eq!(whole.len(), part.chunk_count(chunk));
        assert!(whole[..whole.len() - 1].iter().all(|c| c.len() == chunk));
        let n = whole.len();
        for (from, to) in [
            (0, n),
            (0, 1),
            (1, n),
            (n / 3, 2 * n / 3),
            (n - 1, n),
            (n, n),
        ] {
            let mut got = Vec::new();
            part.for_each_chunk_in(chunk, from..to, |c| got.push(c.to_vec()));
            assert_eq!(got, whole[from..to], "chunks {from}..{to}");
        }
    }
}
