//! `export-store cat`: one finished part's NDJSON on standard output, as
//! the store's verifying reader hands it out (`export-store cat … | jq`),
//! or with `--frames` its stored zstd frames as they are (`> part.ndjson.zst`).
//!
//! A part is named as `ls` prints it (`TENANT/JOB/FILE_TYPE/TYPE-N@TOKEN`;
//! without `@TOKEN`, the slot's highest finished token), or by its download
//! URL or the URL's path (see [`crate::partname`]). The store is opened
//! read-only: `cat` never migrates or writes it.
//!
//! Each chunk is checked before its bytes are written, and the part's
//! length and digest before its last bytes are; so a damaged part ends in
//! an error and a non-zero exit, never in short output reported as
//! success, though what was written before the damaged chunk stays written
//! (a verified prefix). A reader that closes the pipe early (`| head`) ends
//! the command quietly.
//!
//! Exit status: 0 written whole (or the reader closed the pipe), 1 the
//! store could not be read, 2 a bad argument, 3 the part is damaged, 4 no
//! finished part by that name.

use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use sqlite_export_store::{
    ExportJobId, ExportOutputStore, ExportPartKey, PartFilter, SqliteOutputStore, StorageError,
    StorageResult,
};
use tokio::io::AsyncReadExt;

use crate::ls::{BAD_ARGUMENT, NOTHING_MATCHED};
use crate::ops::{open_read_only, runtime, Failure};
use crate::partname::{self, Target};

/// The exit status when the part is damaged (as `verify`'s problems).
pub const DAMAGED: u8 = 3;

/// Arguments of `export-store cat`.
#[derive(clap::Args)]
pub struct Args {
    /// The part: TENANT/JOB/FILE_TYPE/TYPE-N@TOKEN as `ls` prints it
    /// (without @TOKEN: the slot's highest finished token), or a download
    /// URL or its path, /export-file/JOB/TYPE-N or
    /// /TENANT/export-file/JOB/TYPE-N (percent-encoded as minted; the
    /// output part, else the error part, as the route serves).
    part: String,
    /// The store's database file.
    #[arg(long, default_value = crate::DEFAULT_DB)]
    db: PathBuf,
    /// The tenant of a download URL: by default the path segment before
    /// `export-file`, or `default` when there is none; this wins over both
    /// (for a base URL with a path of its own, https://host/fhir/export-file/…).
    #[arg(long)]
    tenant: Option<String>,
    /// Write the part's stored zstd frames as they are instead of NDJSON: a
    /// .zst stream that `zstd -d` decodes (verified the same way; refused
    /// when standard output is a terminal).
    #[arg(long)]
    frames: bool,
}

/// Runs `cat`.
pub fn run(args: Args) -> Result<ExitCode, Failure> {
    let target = match partname::parse(&args.part, args.tenant.as_deref()) {
        Ok(t) => t,
        Err(message) => {
            eprintln!("export-store cat: {message}");
            return Ok(ExitCode::from(BAD_ARGUMENT));
        }
    };
    if args.frames && io::stdout().is_terminal() {
        eprintln!(
            "export-store cat: --frames writes binary zstd frames; redirect standard output to \
             a file or a pipe (`> part.ndjson.zst`, `| zstd -d`)"
        );
        return Ok(ExitCode::from(BAD_ARGUMENT));
    }
    let store = open_read_only(&args.db)?;
    let rt = runtime()?;
    rt.block_on(async {
        let key = match resolve(&store, &target).await {
            Ok(key) => key,
            Err(e) => return Ok(failed(e)),
        };
        let reader = if args.frames {
            store.open_frames(&key).await
        } else {
            store.open_reader(&key).await
        };
        let mut reader = match reader {
            Ok(r) => r,
            Err(e) => return Ok(failed(e)),
        };
        let mut out = io::stdout().lock();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match reader.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    let _ = out.flush();
                    return Ok(failed(StorageError::from_io("read", e)));
                }
            };
            if let Err(e) = out.write_all(&buf[..n]) {
                return quiet_on_broken_pipe(e);
            }
        }
        match out.flush() {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(e) => quiet_on_broken_pipe(e),
        }
    })
}

/// A closed pipe means the reader has what it wanted (`| head`).
fn quiet_on_broken_pipe(e: io::Error) -> Result<ExitCode, Failure> {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(format!("cannot write to standard output: {e}").into())
    }
}

/// Reports a store error with the exit status its category calls for.
fn failed(e: StorageError) -> ExitCode {
    if e.is_corrupt() {
        eprintln!(
            "export-store cat: the part is damaged: {e} (anything written before this error \
             was checked chunk by chunk, but the part is not whole)"
        );
        ExitCode::from(DAMAGED)
    } else if e.is_not_found() {
        eprintln!("export-store cat: {}", e.message());
        ExitCode::from(NOTHING_MATCHED)
    } else if e.is_invalid_input() {
        eprintln!("export-store cat: {e}");
        ExitCode::from(BAD_ARGUMENT)
    } else {
        eprintln!("export-store cat: {e}");
        ExitCode::FAILURE
    }
}

/// The finished part a target names: its key as given, or the highest
/// finished token of its slot (for a route: of the output slot, else of
/// the error slot).
async fn resolve(store: &SqliteOutputStore, target: &Target) -> StorageResult<ExportPartKey> {
    let (slots, token, route) = match target {
        Target::Key { key, token } => (vec![key.clone()], *token, false),
        Target::Route {
            tenant,
            job,
            resource_type,
            part_index,
        } => {
            let job = ExportJobId::from(job.as_str());
            let output = ExportPartKey::output(
                tenant.as_str(),
                job.clone(),
                resource_type.as_str(),
                *part_index,
                0,
            );
            let error =
                ExportPartKey::error(tenant.as_str(), job, resource_type.as_str(), *part_index, 0);
            (vec![output, error], None, true)
        }
    };
    if let Some(token) = token {
        let key = ExportPartKey {
            fencing_token: token,
            ..slots[0].clone()
        };
        return match store.part_info(&key).await {
            Ok(_) => Ok(key),
            Err(e) if e.is_not_found() => {
                let what = format!("no finished part {}", partname::name(&key));
                Err(not_found(store, &key, true, what).await)
            }
            Err(e) => Err(e),
        };
    }
    for slot in &slots {
        match store.latest_in_slot(slot).await {
            Ok(info) => {
                return Ok(ExportPartKey {
                    fencing_token: info.fencing_token,
                    ..slot.clone()
                })
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    let key = &slots[0];
    let what = if route {
        format!(
            "no finished part at this download route (tenant {}, job {}, {}-{}: neither an \
             output nor an error part, under any token)",
            key.tenant_id, key.job_id, key.resource_type, key.part_index
        )
    } else {
        let name = partname::name(key);
        let slot = name
            .rsplit_once('@')
            .map_or(name.as_str(), |(slot, _)| slot);
        format!("no finished part in slot {slot} (under any token)")
    };
    Err(not_found(store, key, false, what).await)
}

/// Why nothing was found: `what`, and whether a staged part is there (a
/// writer at work, or one that died): of exactly `key` if `exact`, else
/// in its slot.
async fn not_found(
    store: &SqliteOutputStore,
    key: &ExportPartKey,
    exact: bool,
    what: String,
) -> StorageError {
    let filter = PartFilter::all()
        .tenant(key.tenant_id.clone())
        .job(key.job_id.clone());
    let staged = store.list_parts(&filter).await.map(|parts| {
        parts.iter().any(|p| {
            !p.finished
                && p.key.resource_type == key.resource_type
                && p.key.part_index == key.part_index
                && (!exact || p.key == *key)
        })
    });
    let hint = if matches!(staged, Ok(true)) {
        "; a staged part is there, which its writer has not finalized (nothing of it can be read)"
    } else {
        ""
    };
    StorageError::new(
        sqlite_export_store::ErrorKind::NotFound,
        "cat",
        format!("{what}{hint}"),
    )
}
