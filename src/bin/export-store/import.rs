//! `export-store import DIR --tenant T`: a folder of bulk NDJSON loaded as
//! one finished export job, the way HFS would have written it, then its
//! Bulk Data completion manifest.
//!
//! The folder holds `Type.ndjson` or numbered `Type.000.ndjson`,
//! `Type.001.ndjson`, … files, each possibly gzip (`.ndjson.gz`) or zstd
//! (`.ndjson.zst`) compressed. A type's files are read in order (the
//! unnumbered one first, then by number) and their resources cut into parts
//! of `--per-part` resources, part index from 0 per type, file type
//! `output`, fencing token `--token`. The `error/` and `deleted/`
//! subfolders a Bulk Data client such as smart-fetch writes are read the
//! same way, as `error` parts (OperationOutcomes) and `deleted` parts
//! (Bundles), and listed in the manifest's `error` and `deleted` arrays.
//! Files whose name starts with a dot are ignored, and so are the companion
//! files of a download or a published data set (smart-fetch's `log.ndjson`,
//! `manifest.json`, `README*`, `LICENSE*`, `NOTICE*`: each named on standard
//! error); anything else in the folder is refused.
//!
//! Every line must be one FHIR resource: a JSON object with a string
//! `resourceType` equal to the file name's type and a string `id` that is a
//! FHIR id (1 to 64 of `A-Z a-z 0-9 - .`: an exported resource always has
//! one). A line is imported byte for byte (a `\r` before its `\n` is
//! dropped); blank lines carry nothing and are skipped.
//!
//! All or nothing: one thread reads and checks the files while the store
//! stages parts with its normal writers; only when every file has been read
//! without a fault does `SqliteOutputStore::finalize_new_job` publish every
//! part in one durable transaction. A refused line, a damaged file, a
//! failure or a kill before that publishes nothing (staging left by a kill
//! is what `export-store gc` reclaims). The job must be new: a job id that
//! already has parts in the store is refused before anything is read, and
//! again, atomically, at the publish.
//!
//! Exit status: 0 imported; 2 refused (a file or line of the folder, named
//! with its 1-based line number, an empty folder, a job that exists, a bad
//! argument), nothing imported; 1 any other failure, nothing imported.

use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use sqlite_export_store::{
    ExportJobId, ExportOutputStore, ExportPartKey, ExportPartWriter, FinalizedPart, PartFilter,
    SqliteOutputStore, StorageError, StoreOptions,
};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// The exit status when the input is refused (as for a bad argument).
const REFUSED: u8 = 2;

/// The longest line read; a longer one is refused rather than held in
/// memory (a file with no line breaks, say).
const MAX_LINE_BYTES: usize = 256 << 20;

/// Lines handed from the reading thread to the writers at once.
const BATCH_LINES: usize = 256;

/// Batches that may wait between the reading thread and the writers.
const BATCHES_IN_FLIGHT: usize = 8;

/// Arguments of `export-store import`.
#[derive(clap::Args)]
pub struct Args {
    /// The folder of bulk NDJSON files: `Type.ndjson` or `Type.000.ndjson`,
    /// `Type.001.ndjson`, …, each possibly `.gz` or `.zst` compressed, and
    /// the same in its `error/` and `deleted/` subfolders (a Bulk Data
    /// client's download folder, such as smart-fetch's, imports as it is).
    dir: PathBuf,
    /// Tenant the job belongs to.
    #[arg(long)]
    tenant: String,
    /// The job's id (default: a new UUID). It must not have parts in the
    /// store yet.
    #[arg(long)]
    job: Option<String>,
    /// Resources per part (HFS writes 1,000).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    per_part: u64,
    /// The store's database file (created if missing).
    #[arg(long, default_value = crate::DEFAULT_DB)]
    db: PathBuf,
    /// Base URL of the server that serves the parts (HFS or `export-store serve`).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    base_url: String,
    /// The parts' fencing token (HFS's first claim of a job is 1).
    #[arg(long, default_value_t = 1)]
    token: u64,
    /// The content digest recorded for each part (and served as its ETag).
    #[arg(long, value_enum, default_value_t = crate::Digest::Xxh3_128)]
    digest: crate::Digest,
    /// Who checkpoints the store's write-ahead log: `store` (the store
    /// itself; the default) or `external`, when Litestream (or another
    /// replicator that reads the log) runs beside the store and checkpoints
    /// it. With `external` the store never checkpoints, so a replicator
    /// never has to upload a fresh full snapshot because of the store.
    #[arg(long, value_enum, default_value_t = crate::Checkpointing::Store)]
    checkpoints: crate::Checkpointing,
}

type Failure = Box<dyn std::error::Error>;

/// Why an import stopped: the input was refused (exit 2), or it could not
/// run (exit 1).
enum Stop {
    Refused(String),
    Failed(Failure),
}

impl From<StorageError> for Stop {
    fn from(e: StorageError) -> Self {
        Stop::Failed(e.into())
    }
}

impl From<String> for Stop {
    fn from(e: String) -> Self {
        Stop::Failed(e.into())
    }
}

impl From<serde_json::Error> for Stop {
    fn from(e: serde_json::Error) -> Self {
        Stop::Failed(e.into())
    }
}

/// A store error: what the caller gave is refused (exit 2) when the store
/// says the input is invalid or conflicts with what it holds.
fn store_stop(e: StorageError) -> Stop {
    if e.is_invalid_input() || e.is_conflict() {
        Stop::Refused(e.to_string())
    } else {
        Stop::Failed(e.into())
    }
}

/// Runs `import`: the manifest goes to stdout, progress and a summary to
/// stderr.
pub fn run(args: Args) -> Result<ExitCode, Failure> {
    let runtime = tokio::runtime::Runtime::new()?;
    match runtime.block_on(import(args)) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(Stop::Refused(message)) => {
            eprintln!("export-store: import refused, nothing imported: {message}");
            Ok(ExitCode::from(REFUSED))
        }
        Err(Stop::Failed(e)) => Err(format!("import failed, nothing imported: {e}").into()),
    }
}

async fn import(args: Args) -> Result<(), Stop> {
    let started = Instant::now();
    let (plan, skipped) = plan(&args.dir).map_err(Stop::Refused)?;
    let job = args
        .job
        .as_deref()
        .map(ExportJobId::from)
        .unwrap_or_default();
    let key = |file_type: &str, ty: &str, index: u32| ExportPartKey {
        file_type: file_type.to_string(),
        ..ExportPartKey::output(&args.tenant, job.clone(), ty, index, args.token)
    };
    // Ids checked before the store is opened, so that a bad one creates no file.
    key(plan[0].file_type, &plan[0].resource_type, 0)
        .validate("import")
        .map_err(store_stop)?;
    let options = StoreOptions::default()
        .with_digest(args.digest.algorithm())
        .with_checkpoints(args.checkpoints.option());
    let store = SqliteOutputStore::open_with(&args.db, &args.base_url, options)
        .map_err(|e| format!("cannot open the store {}: {e}", args.db.display()))?;
    // Refused before anything is read: a job that exists is never joined
    // (the publish checks it again, atomically).
    let held = store
        .list_parts(&PartFilter::all().tenant(&args.tenant).job(job.clone()))
        .await?;
    if !held.is_empty() {
        return Err(Stop::Refused(format!(
            "job {job} of tenant {} already has {} part{} in the store; import into a new job id",
            args.tenant,
            held.len(),
            if held.len() == 1 { "" } else { "s" }
        )));
    }

    let total_bytes: u64 = plan.iter().flat_map(|t| &t.files).map(|f| f.size).sum();
    let bar = progress_bar(total_bytes);
    // Cleared however the import ends, so that an error is not printed
    // beside a half-drawn bar.
    let _clear = ClearOnDrop(bar.clone());
    for path in &skipped {
        eprintln!("import: skipped {} (not export data)", path.display());
    }
    let types: Vec<(&'static str, String)> = plan
        .iter()
        .map(|t| (t.file_type, t.resource_type.clone()))
        .collect();
    let (tx, mut rx) = mpsc::channel::<Batch>(BATCHES_IN_FLIGHT);
    let reader_bar = bar.clone();
    let reading = tokio::task::spawn_blocking(move || read_all(&plan, &tx, reader_bar.as_ref()));

    let mut staged: Vec<(ExportPartKey, ExportPartWriter)> = Vec::new();
    let mut current: Option<(usize, ExportPartKey, ExportPartWriter)> = None;
    let mut next_index = vec![0_u32; types.len()];
    while let Some(batch) = rx.recv().await {
        for line in batch.lines {
            let full = current
                .as_ref()
                .is_some_and(|(t, _, w)| *t != batch.type_index || w.line_count >= args.per_part);
            if full {
                let (_, k, w) = current.take().expect("checked above");
                staged.push(seal(k, w).await.map_err(store_stop)?);
            }
            if current.is_none() {
                let index = next_index[batch.type_index];
                next_index[batch.type_index] += 1;
                let (file_type, ty) = &types[batch.type_index];
                let k = key(file_type, ty, index);
                let w = store.open_writer(&k).await.map_err(store_stop)?;
                current = Some((batch.type_index, k, w));
            }
            let (_, _, w) = current.as_mut().expect("opened above");
            w.write_line(&line)
                .await
                .map_err(|e| store_stop(StorageError::from_io("write_line", e)))?;
        }
    }
    // Every line was read and checked, or the reading failed: only in the
    // first case is anything published.
    reading
        .await
        .map_err(|e| format!("the reading thread failed: {e}"))?
        .map_err(Stop::Refused)?;
    if let Some((_, k, w)) = current.take() {
        staged.push(seal(k, w).await.map_err(store_stop)?);
    }
    if staged.is_empty() {
        return Err(Stop::Refused(format!(
            "{}: its files hold no resource",
            args.dir.display()
        )));
    }
    let finished = store.finalize_new_job(staged).await.map_err(store_stop)?;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }

    // The request names the exported types: those of the output files.
    let type_names: Vec<&str> = types
        .iter()
        .filter(|(f, _)| *f == "output")
        .map(|(_, t)| t.as_str())
        .collect();
    let of = |file_type: &str| -> Vec<FinalizedPart> {
        finished
            .iter()
            .filter(|p| p.key.file_type == file_type)
            .cloned()
            .collect()
    };
    let manifest = crate::manifest::manifest_with_deleted(
        &store,
        &type_names,
        &of("output"),
        &of("error"),
        &of("deleted"),
    )
    .await?;
    println!("{}", serde_json::to_string_pretty(&manifest)?);

    let resources: u64 = finished.iter().map(|p| p.line_count).sum();
    let ndjson: u64 = finished.iter().map(|p| p.size_bytes).sum();
    let mut stored = 0;
    for p in &finished {
        stored += store.part_info(&p.key).await?.stored_bytes;
    }
    let mut imported_types: Vec<&str> = finished.iter().map(|p| p.resource_type.as_str()).collect();
    imported_types.dedup();
    eprintln!(
        "import: {} resources of {} types in {} parts, {} NDJSON bytes, {} stored bytes, \
         {:.1} s (job {job}, tenant {}, db {})",
        resources,
        imported_types.len(),
        finished.len(),
        ndjson,
        stored,
        started.elapsed().as_secs_f64(),
        args.tenant,
        args.db.display(),
    );
    Ok(())
}

/// Shuts a written part's writer down, so that its buffers go while the
/// next parts are written; the store keeps its staging until the publish.
async fn seal(
    key: ExportPartKey,
    mut writer: ExportPartWriter,
) -> Result<(ExportPartKey, ExportPartWriter), StorageError> {
    writer
        .writer
        .shutdown()
        .await
        .map_err(|e| StorageError::from_io("write", e))?;
    Ok((key, writer))
}

/// Clears the progress bar when dropped.
struct ClearOnDrop(Option<ProgressBar>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

fn progress_bar(total: u64) -> Option<ProgressBar> {
    std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} importing [{bar:32}] {bytes}/{total_bytes} {msg} ({eta} left)",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar
    })
}

// ------------------------------------------------------------ the folder

/// How a file is compressed, by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    fn label(self) -> &'static str {
        match self {
            Compression::None => "NDJSON",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

/// One file of the folder.
#[derive(Debug, Clone)]
struct InputFile {
    path: PathBuf,
    /// `None` for `Type.ndjson`, `Some(n)` for `Type.00n.ndjson`.
    number: Option<u64>,
    compression: Compression,
    /// Bytes on disk.
    size: u64,
}

/// One resource type's files of one file type, in reading order.
#[derive(Debug, Clone)]
struct TypeFiles {
    /// `output`, or `error` / `deleted` for the files of those subfolders.
    file_type: &'static str,
    resource_type: String,
    files: Vec<InputFile>,
}

const NAMING: &str = "expected Type.ndjson or Type.000.ndjson, optionally .gz or .zst";

/// The subfolders a Bulk Data client writes beside the output files, and
/// the file type their files are imported as (smart-fetch writes
/// `error/OperationOutcome.000.ndjson` and `deleted/Bundle.000.ndjson`).
const SUBFOLDERS: [&str; 2] = ["error", "deleted"];

/// Files that sit beside bulk NDJSON without being part of it, skipped by
/// name: smart-fetch's own `log.ndjson`, a saved manifest, and the notes a
/// published data set carries (`README`, `LICENSE`, `NOTICE`, any
/// extension).
fn is_companion(name: &str) -> bool {
    let stem = name.split('.').next().unwrap_or(name);
    name == "log.ndjson"
        || name == "manifest.json"
        || ["README", "LICENSE", "NOTICE"]
            .iter()
            .any(|c| stem.eq_ignore_ascii_case(c))
}

/// The folder's files by file type and resource type (`output` first, then
/// `error/`, then `deleted/`; types in name order, each type's files
/// unnumbered first, then by number), the companion files skipped, or why
/// the folder is refused.
fn plan(dir: &Path) -> Result<(Vec<TypeFiles>, Vec<PathBuf>), String> {
    let mut types = std::collections::BTreeMap::new();
    let mut skipped = Vec::new();
    scan(dir, "output", true, &mut types, &mut skipped)?;
    if types.is_empty() {
        return Err(format!(
            "{}: holds no NDJSON file ({NAMING})",
            dir.display()
        ));
    }
    let order = |ft: &str| ["output", "error", "deleted"].iter().position(|f| *f == ft);
    let mut plan: Vec<TypeFiles> = types
        .into_iter()
        .map(
            |((file_type, resource_type), mut files): ((&'static str, String), Vec<InputFile>)| {
                files.sort_by_key(|f| f.number);
                TypeFiles {
                    file_type,
                    resource_type,
                    files,
                }
            },
        )
        .collect();
    plan.sort_by(|a, b| {
        (order(a.file_type), &a.resource_type).cmp(&(order(b.file_type), &b.resource_type))
    });
    Ok((plan, skipped))
}

type Found = std::collections::BTreeMap<(&'static str, String), Vec<InputFile>>;

/// Adds the files of `dir` as `file_type` files; at the top (`top`), the
/// `error/` and `deleted/` subfolders too.
fn scan(
    dir: &Path,
    file_type: &'static str,
    top: bool,
    types: &mut Found,
    skipped: &mut Vec<PathBuf>,
) -> Result<(), String> {
    let shown = dir.display();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{shown}: cannot read it: {e}"))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("{shown}: cannot read it: {e}"))?;
        let path = entry.path();
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(format!(
                "{}: not a bulk NDJSON file name ({NAMING})",
                path.display()
            ));
        };
        if name.starts_with('.') {
            continue;
        }
        let meta = std::fs::metadata(&path)
            .map_err(|e| format!("{}: cannot read it: {e}", path.display()))?;
        if meta.is_dir() {
            match SUBFOLDERS.iter().find(|f| **f == name) {
                Some(sub) if top => scan(&path, sub, false, types, skipped)?,
                _ => {
                    return Err(format!(
                        "{}: a folder; import reads the NDJSON files of one folder and of its \
                         error/ and deleted/ subfolders (move it out)",
                        path.display()
                    ))
                }
            }
            continue;
        }
        if is_companion(name) {
            skipped.push(path);
            continue;
        }
        let (resource_type, number, compression) =
            parse_name(name).map_err(|why| format!("{}: {why}", path.display()))?;
        let files = types
            .entry((file_type, resource_type.to_string()))
            .or_default();
        if let Some(other) = files.iter().find(|f| f.number == number) {
            return Err(format!(
                "{} and {} both hold {resource_type} file {}; keep one",
                other.path.display(),
                path.display(),
                number.map_or("without a number".to_string(), |n| n.to_string())
            ));
        }
        files.push(InputFile {
            path,
            number,
            compression,
            size: meta.len(),
        });
    }
    Ok(())
}

/// `Patient.003.ndjson.gz` → (`Patient`, `Some(3)`, gzip).
fn parse_name(name: &str) -> Result<(&str, Option<u64>, Compression), String> {
    let (stem, compression) = if let Some(s) = name.strip_suffix(".ndjson") {
        (s, Compression::None)
    } else if let Some(s) = name.strip_suffix(".ndjson.gz") {
        (s, Compression::Gzip)
    } else if let Some(s) = name.strip_suffix(".ndjson.zst") {
        (s, Compression::Zstd)
    } else {
        return Err(format!("not a bulk NDJSON file name ({NAMING})"));
    };
    let (ty, number) = match stem.split_once('.') {
        None => (stem, None),
        Some((ty, n)) if !n.is_empty() && n.len() <= 9 && n.bytes().all(|b| b.is_ascii_digit()) => {
            (ty, Some(n.parse().expect("up to nine digits")))
        }
        Some(_) => return Err(format!("not a bulk NDJSON file name ({NAMING})")),
    };
    if !is_resource_type(ty) {
        return Err(format!(
            "{ty:?} is not a FHIR resource type (a resource type is 1 to 64 ASCII letters \
             starting with an upper-case one, such as Patient)"
        ));
    }
    Ok((ty, number, compression))
}

/// FHIR resource type names: ASCII letters, the first upper-case.
fn is_resource_type(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_uppercase())
        && s.bytes().all(|b| b.is_ascii_alphabetic())
}

/// A FHIR id: 1 to 64 of `A-Z a-z 0-9 - .`.
fn is_fhir_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

// ------------------------------------------------------------ the reading

/// Checked lines of one resource type, in order.
struct Batch {
    type_index: usize,
    lines: Vec<String>,
}

/// Reads and checks every file in order, sending its lines in batches.
/// Stops at the first fault, naming the file and line; stops quietly when
/// the writers have gone (they report their own failure).
fn read_all(
    plan: &[TypeFiles],
    tx: &mpsc::Sender<Batch>,
    bar: Option<&ProgressBar>,
) -> Result<(), String> {
    for (type_index, t) in plan.iter().enumerate() {
        for file in &t.files {
            if let Some(bar) = bar {
                bar.set_message(
                    file.path
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
            let mut send =
                |lines: Vec<String>| tx.blocking_send(Batch { type_index, lines }).is_ok();
            if !read_file(file, &t.resource_type, bar, &mut send)? {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Reads one file; `Ok(false)` when `send` found the writers gone.
fn read_file(
    file: &InputFile,
    resource_type: &str,
    bar: Option<&ProgressBar>,
    send: &mut dyn FnMut(Vec<String>) -> bool,
) -> Result<bool, String> {
    let shown = file.path.display();
    let raw = File::open(&file.path).map_err(|e| format!("{shown}: cannot read it: {e}"))?;
    let raw = Counted {
        inner: raw,
        bar: bar.cloned(),
    };
    let mut input: Box<dyn BufRead> = match file.compression {
        Compression::None => Box::new(BufReader::with_capacity(1 << 16, raw)),
        Compression::Gzip => Box::new(BufReader::with_capacity(
            1 << 16,
            flate2::read::MultiGzDecoder::new(BufReader::new(raw)),
        )),
        Compression::Zstd => Box::new(BufReader::with_capacity(
            1 << 16,
            zstd::stream::read::Decoder::new(raw)
                .map_err(|e| format!("{shown}: cannot start reading zstd: {e}"))?,
        )),
    };
    let mut buf = Vec::new();
    let mut batch = Vec::with_capacity(BATCH_LINES);
    let mut line_no = 0_u64;
    loop {
        line_no += 1;
        let at = |why: String| format!("{shown}: line {line_no}: {why}");
        let more = read_line(&mut input, &mut buf).map_err(|e| match e {
            LineError::TooLong => at(format!(
                "longer than {} MiB; not one resource per line?",
                MAX_LINE_BYTES >> 20
            )),
            LineError::Io(e) if file.compression == Compression::None => {
                at(format!("cannot read it: {e}"))
            }
            LineError::Io(e) => at(format!(
                "the {} data is damaged or cut short: {e}",
                file.compression.label()
            )),
        })?;
        if !more {
            break;
        }
        if let Some(line) = check_line(&buf, resource_type).map_err(at)? {
            batch.push(line);
            if batch.len() == BATCH_LINES && !send(std::mem::take(&mut batch)) {
                return Ok(false);
            }
        }
    }
    Ok(batch.is_empty() || send(batch))
}

enum LineError {
    TooLong,
    Io(std::io::Error),
}

/// Reads one line into `buf` without its `\n` (or `\r\n`); `Ok(false)` at
/// the end of the input. The last line may lack its `\n`.
fn read_line(input: &mut dyn BufRead, buf: &mut Vec<u8>) -> Result<bool, LineError> {
    buf.clear();
    let mut read_any = false;
    loop {
        let available = match input.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(LineError::Io(e)),
        };
        if available.is_empty() {
            break;
        }
        read_any = true;
        let (take, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        if buf.len() + take > MAX_LINE_BYTES + 2 {
            return Err(LineError::TooLong);
        }
        buf.extend_from_slice(&available[..take]);
        input.consume(take);
        if done {
            break;
        }
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    }
    Ok(read_any)
}

/// The fields of a resource the import checks; every other field is
/// parsed (the line must be JSON) and skipped.
#[derive(serde::Deserialize)]
struct Head {
    #[serde(rename = "resourceType", default)]
    resource_type: Option<serde_json::Value>,
    #[serde(default)]
    id: Option<serde_json::Value>,
}

/// Checks one line: `Ok(None)` for a blank line, the line as text for a
/// FHIR resource of `resource_type`, or why it is refused.
fn check_line(line: &[u8], resource_type: &str) -> Result<Option<String>, String> {
    let Some(first) = line.iter().position(|b| !b.is_ascii_whitespace()) else {
        return Ok(None);
    };
    let text = std::str::from_utf8(line)
        .map_err(|e| format!("not JSON: invalid UTF-8 at byte {}", e.valid_up_to() + 1))?;
    let head: Result<Head, _> = serde_json::from_str(text);
    let head = match head {
        // A struct also parses from a JSON array: only an object is a resource.
        Ok(_) if line[first] != b'{' => {
            return Err("not a FHIR resource: the line is JSON but not an object".into())
        }
        Ok(head) => head,
        Err(e) if e.is_syntax() || e.is_eof() => {
            return Err(format!(
                "not JSON: {} at column {}",
                json_reason(&e),
                e.column()
            ))
        }
        Err(_) if line[first] != b'{' => {
            return Err("not a FHIR resource: the line is JSON but not an object".into())
        }
        Err(e) => return Err(format!("not a FHIR resource: {}", json_reason(&e))),
    };
    let found = match &head.resource_type {
        Some(serde_json::Value::String(t)) => t.as_str(),
        _ => return Err("not a FHIR resource: it has no string \"resourceType\"".into()),
    };
    if found != resource_type {
        return Err(format!(
            "the resource is a {found}, but the file name says {resource_type}"
        ));
    }
    match &head.id {
        Some(serde_json::Value::String(id)) if is_fhir_id(id) => {}
        Some(serde_json::Value::String(id)) => {
            return Err(format!(
                "the {found}'s id {id:?} is not a FHIR id (1 to 64 of A-Z a-z 0-9 - .)"
            ))
        }
        _ => return Err(format!("the {found} has no string \"id\"")),
    }
    Ok(Some(text.to_string()))
}

/// A serde_json error's reason, without the position it appends.
fn json_reason(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// Counts the bytes read from a file on the progress bar.
struct Counted {
    inner: File,
    bar: Option<ProgressBar>,
}

impl Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(bar) = &self.bar {
            bar.inc(n as u64);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_give_type_number_and_compression() {
        assert_eq!(
            parse_name("Patient.ndjson").unwrap(),
            ("Patient", None, Compression::None)
        );
        assert_eq!(
            parse_name("Observation.012.ndjson.gz").unwrap(),
            ("Observation", Some(12), Compression::Gzip)
        );
        assert_eq!(
            parse_name("Encounter.1.ndjson.zst").unwrap(),
            ("Encounter", Some(1), Compression::Zstd)
        );
        for bad in [
            "Patient.json",
            "Patient.ndjson.bz2",
            "Patient.a.ndjson",
            "Patient..ndjson",
            "Patient.0.1.ndjson",
            "patient.ndjson",
            "Pat-ient.ndjson",
            ".ndjson",
            "Patient.0123456789.ndjson",
            "README.md",
        ] {
            assert!(parse_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn companion_files_are_told_apart_from_data() {
        for name in [
            "log.ndjson",
            "manifest.json",
            "README",
            "README.md",
            "readme.txt",
            "LICENSE",
            "NOTICE.txt",
        ] {
            assert!(is_companion(name), "{name}");
        }
        for name in [
            "Patient.ndjson",
            "Log.ndjson",
            "notes.txt",
            "READMEX.md",
            "log.000.ndjson",
        ] {
            assert!(!is_companion(name), "{name}");
        }
    }

    #[test]
    fn lines_must_be_resources_of_the_file_type_with_an_id() {
        let ok = r#"{"resourceType":"Patient","id":"p-1.x","name":[{"family":"A"}]}"#;
        assert_eq!(check_line(ok.as_bytes(), "Patient").unwrap().unwrap(), ok);
        assert_eq!(check_line(b"  \t", "Patient").unwrap(), None);
        let refused = |line: &str, says: &str| {
            let e = check_line(line.as_bytes(), "Patient").unwrap_err();
            assert!(e.contains(says), "{line}: {e}");
        };
        refused(
            "{\"resourceType\":\"Patient\"",
            "not JSON: EOF while parsing",
        );
        refused("{\"resourceType\":\"Patient\",}", "not JSON");
        refused("{} {}", "not JSON: trailing characters at column 4");
        refused("[\"Patient\", \"p1\"]", "not an object");
        refused("\"Patient\"", "not an object");
        refused("{\"id\":\"p1\"}", "no string \"resourceType\"");
        refused(
            "{\"resourceType\":7,\"id\":\"p1\"}",
            "no string \"resourceType\"",
        );
        refused(
            "{\"resourceType\":\"Observation\",\"id\":\"o1\"}",
            "the resource is a Observation, but the file name says Patient",
        );
        refused(
            "{\"resourceType\":\"Patient\"}",
            "the Patient has no string \"id\"",
        );
        refused(
            "{\"resourceType\":\"Patient\",\"id\":1}",
            "no string \"id\"",
        );
        refused(
            "{\"resourceType\":\"Patient\",\"id\":\"a b\"}",
            "is not a FHIR id",
        );
        refused(
            "{\"resourceType\":\"Patient\",\"id\":\"p\",\"id\":\"q\"}",
            "duplicate field",
        );
        let e = check_line(b"{\"resourceType\":\"Pat\xffient\"}", "Patient").unwrap_err();
        assert!(e.contains("invalid UTF-8 at byte 21"), "{e}");
    }

    #[test]
    fn lines_are_read_without_their_ends_and_a_long_one_is_refused() {
        let mut input: &[u8] = b"a\r\nb\n\nc";
        let mut buf = Vec::new();
        let mut got = Vec::new();
        while read_line(&mut input, &mut buf).ok().unwrap() {
            got.push(String::from_utf8(buf.clone()).unwrap());
        }
        assert_eq!(got, ["a", "b", "", "c"]);
        let long = vec![b'x'; MAX_LINE_BYTES + 10];
        let mut input: &[u8] = &long;
        assert!(matches!(
            read_line(&mut input, &mut buf),
            Err(LineError::TooLong)
        ));
    }
}
