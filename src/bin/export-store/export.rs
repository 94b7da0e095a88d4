//! `export-store export --to DIR`: finished parts as NDJSON files in HFS's
//! own local-filesystem layout, so that HFS's `LocalFsOutputStore` rooted
//! at DIR serves them: `DIR/{tenant}/{job}/{file_type}-{Type}-{n}-{token}.ndjson`
//! (helios-persistence 0.2.7, `backends/local_fs`).
//!
//! Each file is written to `….ndjson.tmp` beside it (HFS's own staging
//! name), fsynced, renamed into place, and its folder fsynced; every folder
//! made (DIR and its missing parents included) has its entry fsynced in
//! the folder above it. A crash or power cut leaves either the whole file
//! or none under its name, and once `export` exited 0 every file is on
//! disk. Every token of a slot is exported (each has its own file name).
//! A part whose tenant or job id is not one plain path component (HFS
//! keeps a tenant's parts in a folder of that name) or whose resource type
//! holds a path separator is refused and named; a part that cannot be read
//! (damaged) or written is named with its error; the others go on. An
//! existing file of the part's size is taken as exported and left alone
//! (`--force` rewrites it); one of another size is replaced.
//!
//! Exit status: 0 every part exported (or already there), 1 the store
//! could not be read or DIR not made, 2 a bad argument, 3 some parts failed
//! (each named on standard error), 4 `--tenant`/`--job` matched no finished
//! part.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use sqlite_export_store::{
    ExportOutputStore, ExportPartKey, PartSummary, SqliteOutputStore, StorageError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::ops::{plural, show_bytes, Failure, FinishedParts};
use crate::partname;

/// The exit status when some parts could not be exported.
pub const SOME_FAILED: u8 = 3;

/// Arguments of `export-store export`.
#[derive(clap::Args)]
pub struct Args {
    /// The folder to write into (made if missing): the root of HFS's
    /// local-fs output store.
    #[arg(long)]
    to: PathBuf,
    #[command(flatten)]
    parts: FinishedParts,
    /// Rewrite files that are already there with the part's size.
    #[arg(long)]
    force: bool,
    /// Print the summary as one JSON document.
    #[arg(long)]
    json: bool,
}

/// What became of the parts.
#[derive(Default, Serialize)]
struct Summary {
    to: PathBuf,
    exported: u64,
    exported_bytes: u64,
    already_there: u64,
    failed: u64,
    failures: Vec<Failed>,
}

#[derive(Serialize)]
struct Failed {
    part: String,
    error: String,
}

/// Runs `export`.
pub fn run(args: Args) -> Result<ExitCode, Failure> {
    let (store, rt, parts) = match args.parts.select("export")? {
        Ok(selected) => selected,
        Err(code) => return Ok(code),
    };
    make_root(&args.to)?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(parts.iter().map(|p| p.byte_count).sum());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} exporting [{bar:32}] {bytes}/{total_bytes} {msg} ({eta} left)",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar
    });
    let mut summary = Summary {
        to: args.to.clone(),
        ..Summary::default()
    };
    let mut made = Folders::default();
    for (i, part) in parts.iter().enumerate() {
        let name = partname::name(&part.key);
        let outcome = rt.block_on(export_part(&store, part, &args.to, args.force, &mut made));
        match outcome {
            Ok(Done::Written) => {
                summary.exported += 1;
                summary.exported_bytes += part.byte_count;
            }
            Ok(Done::AlreadyThere) => summary.already_there += 1,
            Err(error) => {
                let line = format!("export-store export: {name}: {error}");
                match &bar {
                    Some(bar) => bar.println(line),
                    None => eprintln!("{line}"),
                }
                summary.failed += 1;
                summary.failures.push(Failed { part: name, error });
            }
        }
        if let Some(bar) = &bar {
            bar.inc(part.byte_count);
            bar.set_message(format!("{}/{} parts", i + 1, parts.len()));
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "exported {} part{}, {} bytes of NDJSON ({}) to {}; {} already there (same size), {} failed",
            summary.exported,
            plural(summary.exported),
            summary.exported_bytes,
            show_bytes(summary.exported_bytes),
            args.to.display(),
            summary.already_there,
            summary.failed
        );
    }
    Ok(if summary.failed > 0 {
        ExitCode::from(SOME_FAILED)
    } else {
        ExitCode::SUCCESS
    })
}

enum Done {
    Written,
    AlreadyThere,
}

/// Folders made (and whose entries were fsynced) so far.
#[derive(Default)]
struct Folders(HashSet<PathBuf>);

impl Folders {
    /// Makes `root/tenant/job`, fsyncing each folder that gained an entry,
    /// once per run.
    fn make(&mut self, root: &Path, tenant: &str, job: &str) -> Result<PathBuf, String> {
        let dir = root.join(tenant).join(job);
        if self.0.contains(&dir) {
            return Ok(dir);
        }
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
        for d in [root.to_path_buf(), root.join(tenant)] {
            sync_dir(&d)?;
        }
        self.0.insert(dir.clone());
        Ok(dir)
    }
}

/// Makes `root` and its missing parents, fsyncing the folder that gained
/// each new entry: without it, the files synced below a folder made here
/// are lost with the folder's own entry at a power cut.
fn make_root(root: &Path) -> Result<(), String> {
    let mut missing = Vec::new();
    let mut dir = root;
    while !dir.is_dir() {
        missing.push(dir);
        match dir.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => dir = parent,
            _ => break,
        }
    }
    std::fs::create_dir_all(root).map_err(|e| format!("cannot make {}: {e}", root.display()))?;
    for made in missing.iter().rev() {
        match made.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent)?,
            Some(_) => sync_dir(Path::new("."))?,
            None => {}
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("cannot sync folder {}: {e}", dir.display()))
}

/// An id HFS's local-fs store can hold as one folder: exactly one plain
/// path component (not empty, `.` or `..`, no separator).
fn one_component(id: &str) -> bool {
    let mut parts = Path::new(id).components();
    matches!(
        (parts.next(), parts.next()),
        (Some(Component::Normal(c)), None) if c == id
    ) && !id.contains(['/', '\\'])
}

/// The file HFS's local-fs store keeps `key` in, below its root:
/// `{tenant}/{job}/{file_type}-{Type}-{n}-{token}.ndjson`; or why it
/// cannot hold the part.
fn local_fs_path(key: &ExportPartKey) -> Result<(String, String, String), String> {
    for (what, id) in [
        ("tenant id", &key.tenant_id),
        ("job id", &key.job_id.to_string()),
    ] {
        if !one_component(id) {
            return Err(format!(
                "refused: the {what} {id:?} is not a single plain path component, and HFS's \
                 local-fs store keeps parts in a folder named after it"
            ));
        }
    }
    if key.resource_type.contains(['/', '\\']) {
        return Err(format!(
            "refused: the resource type {:?} holds a path separator, and HFS's local-fs store \
             names the file after it",
            key.resource_type
        ));
    }
    Ok((
        key.tenant_id.clone(),
        key.job_id.to_string(),
        format!(
            "{}-{}-{}-{}.ndjson",
            key.file_type, key.resource_type, key.part_index, key.fencing_token
        ),
    ))
}

async fn export_part(
    store: &SqliteOutputStore,
    part: &PartSummary,
    root: &Path,
    force: bool,
    made: &mut Folders,
) -> Result<Done, String> {
    let (tenant, job, file) = local_fs_path(&part.key)?;
    let dir = made.make(root, &tenant, &job)?;
    let path = dir.join(&file);
    if !force {
        if let Ok(m) = std::fs::metadata(&path) {
            if m.is_file() && m.len() == part.byte_count {
                return Ok(Done::AlreadyThere);
            }
        }
    }
    let tmp = dir.join(format!("{file}.tmp"));
    let written = write_file(store, &part.key, &tmp, part.byte_count).await;
    let published = written.and_then(|()| {
        std::fs::rename(&tmp, &path)
            .map_err(|e| format!("cannot rename {} into place: {e}", tmp.display()))?;
        sync_dir(&dir)
    });
    if published.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    published.map(|()| Done::Written)
}

/// Copies the part's verified NDJSON into `tmp` and fsyncs it.
async fn write_file(
    store: &SqliteOutputStore,
    key: &ExportPartKey,
    tmp: &Path,
    expected: u64,
) -> Result<(), String> {
    let cannot_write = |e: std::io::Error| format!("cannot write {}: {e}", tmp.display());
    let mut reader = store.open_reader(key).await.map_err(show)?;
    let mut file = tokio::fs::File::create(tmp).await.map_err(cannot_write)?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut copied = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .await
            .map_err(|e| show(StorageError::from_io("read", e)))?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n]).await.map_err(cannot_write)?;
        copied += n as u64;
    }
    file.flush().await.map_err(cannot_write)?;
    file.sync_all().await.map_err(cannot_write)?;
    if copied != expected {
        // The reader verifies the length; this guards the copy itself.
        return Err(format!(
            "copied {copied} bytes where {expected} were listed"
        ));
    }
    Ok(())
}

fn show(e: StorageError) -> String {
    if e.is_corrupt() {
        format!("the part is damaged, not exported: {e}")
    } else {
        e.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlite_export_store::ExportJobId;

    #[test]
    fn paths_follow_hfs_local_fs_and_refuse_what_it_cannot_hold() {
        let k = ExportPartKey::output("default", ExportJobId::from("j-1"), "Patient", 3, 7);
        assert_eq!(
            local_fs_path(&k).unwrap(),
            (
                "default".into(),
                "j-1".into(),
                "output-Patient-3-7.ndjson".into()
            )
        );
        for tenant in ["acme/research", ".", "..", "a\\b", "a/", "/a"] {
            let k = ExportPartKey::output(tenant, ExportJobId::from("j"), "P", 0, 1);
            let e = local_fs_path(&k).unwrap_err();
            assert!(e.contains("tenant id"), "{tenant}: {e}");
        }
        let k = ExportPartKey::output("t", ExportJobId::from("../j"), "P", 0, 1);
        assert!(local_fs_path(&k).unwrap_err().contains("job id"));
        let k = ExportPartKey::output("t", ExportJobId::from("j"), "a/b", 0, 1);
        assert!(local_fs_path(&k).unwrap_err().contains("resource type"));
        assert!(one_component("acme research"));
    }
}
