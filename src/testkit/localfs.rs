//! [`LocalFsOutputStore`]: plain NDJSON files, written the way HFS's own
//! local-filesystem store writes them. It is the baseline every throughput
//! and latency figure of this crate is measured against.
//!
//! Per part, a `.tmp` file is written through a 64 KiB buffered
//! `tokio::fs::File`; finalizing flushes and shuts the writer down,
//! optionally fsyncs the file, renames it to its final name and (with fsync)
//! fsyncs the folder, so that the rename itself is durable. A reader is the
//! file; deleting a job removes its folder. That is what HFS's
//! `LocalFsOutputStore` (crate `helios-persistence` 0.2.7) does, minus its
//! fsync-less publication, which [`LocalFsOutputStore::with_fsync`] lets a
//! comparison turn on or off.
//!
//! It is a correct store in its own right, not a mock:
//!
//! - keys are validated before any I/O, and every id is escaped into one
//!   path component, so no key can reach outside the store's root
//!   (`..`, `/`, hierarchical tenants such as `acme/research`, ids of up to
//!   [`MAX_ID_BYTES`](crate::MAX_ID_BYTES) bytes all map to distinct,
//!   legal file names);
//! - each writer stages into its own temporary file, so a retried or
//!   abandoned writer never mixes bytes with another one; nothing staged is
//!   readable, and dropping a writer without finalizing removes its file;
//! - finalizing checks that the file holds `writer.byte_count` bytes before
//!   it publishes, and publishing is one atomic rename, which also replaces
//!   an earlier version of the same key;
//! - a reader is the part's file; if the part was deleted or replaced while
//!   it was read, the read ends in an error (checked when the file's end is
//!   reached), never in bytes reported as the current part;
//! - deletes are idempotent and scoped to exactly one tenant (and job).
//!
//! What it does not do, as HFS's store does not: store-side fencing (a part
//! is still kept under its own token, so a fenced-out worker cannot
//! overwrite the live worker's part), compression, and verification of the
//! content on read.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};

use crate::contract::{DownloadUrl, ExportOutputStore, ExportPartWriter, FinalizedPart};
use crate::error::{StorageError, StorageResult};
use crate::key::{check_id, ExportJobId, ExportPartKey, TenantContext};
use crate::store::codec::to_hex;
use crate::store::url::UrlMinter;
use crate::store::writer::{check_opened_for, sink_address};

/// The write buffer in front of each part's file: 64 KiB, as in HFS.
const WRITE_BUFFER_CAPACITY: usize = 64 * 1024;

/// Everything but ASCII letters, digits, `-` and `_` is escaped in a name,
/// so that an escaped id never is `.` or `..`, never holds a separator, and
/// never contains `~` (which marks a hashed name).
const NAME: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_');

/// Escaped ids longer than this are replaced by `~` and their SHA-256, so
/// that every file name stays under the usual 255-byte limit.
const MAX_ESCAPED: usize = 150;

/// How often a job-folder removal is retried when a writer finalizing into
/// it at that moment keeps it non-empty, and how long it pauses in between.
const REMOVE_ATTEMPTS: usize = 20;
const REMOVE_PAUSE: Duration = Duration::from_millis(50);

/// One path component for an id: distinct ids give distinct components.
fn component(id: &str) -> String {
    let escaped = utf8_percent_encode(id, NAME).to_string();
    if escaped.len() <= MAX_ESCAPED {
        escaped
    } else {
        format!("~{}", to_hex(&Sha256::digest(id.as_bytes())))
    }
}

/// A writer's temporary file and the key it was opened for.
#[derive(Debug)]
struct Staged {
    key: ExportPartKey,
    tmp: PathBuf,
    published: bool,
}

/// Live writers by the address of their boxed sink (as in the SQLite
/// store): `finalize_part` only receives the boxed `AsyncWrite`.
type Registry = Arc<Mutex<HashMap<usize, Staged>>>;

fn registry_with<R>(r: &Registry, f: impl FnOnce(&mut HashMap<usize, Staged>) -> R) -> R {
    let mut map = r.lock().unwrap_or_else(|p| p.into_inner());
    f(&mut map)
}

/// An `ExportOutputStore` over plain NDJSON files under one root folder, as
/// HFS's local-filesystem store keeps them: the baseline of this crate's
/// benchmarks (see the [module docs](self) for what it guarantees).
///
/// Layout: `{root}/{tenant}/{job}/{file_type}-{resource_type}-{part_index}-{token}.ndjson`,
/// each id escaped into one path component. Cheap to clone; clones share
/// their live writers.
#[derive(Clone)]
pub struct LocalFsOutputStore {
    root: PathBuf,
    urls: UrlMinter,
    access_token_required: bool,
    fsync: bool,
    live: Registry,
}

impl std::fmt::Debug for LocalFsOutputStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalFsOutputStore")
            .field("root", &self.root)
            .field("urls", &self.urls)
            .field("access_token_required", &self.access_token_required)
            .field("fsync", &self.fsync)
            .finish()
    }
}

impl LocalFsOutputStore {
    /// A store under `root` (created on first write), minting URLs under
    /// `base_url` (`http://` or `https://`, else invalid input). Without
    /// fsync, like HFS's store: a part is published by a rename only.
    pub fn new(root: impl Into<PathBuf>, base_url: &str) -> StorageResult<Self> {
        Ok(LocalFsOutputStore {
            root: root.into(),
            urls: UrlMinter::new(base_url, None)?,
            access_token_required: true,
            fsync: false,
            live: Arc::default(),
        })
    }

    /// With `true`, `finalize_part` fsyncs the part's file before the rename
    /// and its folder after it (and a new folder's parents when a writer
    /// creates it), so that a part whose finalize returned `Ok` survives a
    /// crash of the machine, as this crate's SQLite store promises.
    pub fn with_fsync(mut self, fsync: bool) -> Self {
        self.fsync = fsync;
        self
    }

    /// What `download_url` advertises as `requires_access_token`. Default
    /// `true`.
    pub fn with_access_token_required(mut self, required: bool) -> Self {
        self.access_token_required = required;
        self
    }

    /// The root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether finalize fsyncs (see [`with_fsync`](Self::with_fsync)).
    pub fn fsync(&self) -> bool {
        self.fsync
    }

    /// The final file of a finished part under exactly `key` (which may not
    /// exist). For inspection and tests; readers should use `open_reader`.
    pub fn part_path(&self, key: &ExportPartKey) -> PathBuf {
        self.job_dir(&key.tenant_id, key.job_id.as_str())
            .join(format!("{}.ndjson", part_stem(key)))
    }

    /// Live (not yet finalized or dropped) writers of this store.
    pub fn live_writers(&self) -> usize {
        registry_with(&self.live, |m| m.len())
    }

    fn tenant_dir(&self, tenant: &str) -> PathBuf {
        self.root.join(component(tenant))
    }

    fn job_dir(&self, tenant: &str, job: &str) -> PathBuf {
        self.tenant_dir(tenant).join(component(job))
    }
}

fn part_stem(key: &ExportPartKey) -> String {
    format!(
        "{}-{}-{}-{}",
        key.file_type,
        component(&key.resource_type),
        key.part_index,
        key.fencing_token
    )
}

/// An I/O failure as a categorized error without the path in its message
/// (messages may reach a job's owner); the `io::Error` stays as the source.
fn io_failure(op: &'static str, what: &str, e: io::Error) -> StorageError {
    let category = StorageError::from_io(op, e.kind().into()).kind();
    StorageError::new(category, op, format!("cannot {what}: {}", e.kind())).with_source(e)
}

fn join_failure(op: &'static str) -> StorageError {
    StorageError::internal(op, "a file task panicked or was cancelled")
}

/// Creates `dir` and its missing parents; with `durable`, fsyncs the parent
/// of every folder it created, so the new entries survive a crash.
fn create_dirs(dir: &Path, durable: bool) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut p = dir;
    while !p.exists() {
        missing.push(p.to_path_buf());
        match p.parent() {
            Some(parent) => p = parent,
            None => break,
        }
    }
    std::fs::create_dir_all(dir)?;
    if durable {
        for created in missing {
            if let Some(parent) = created.parent() {
                sync_dir(parent)?;
            }
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Removes `dir` and everything in it; a missing folder is `Ok`. A part
/// renamed into the folder during the walk makes the last `rmdir` fail with
/// "directory not empty": that is retried a bounded number of times.
async fn remove_dir(op: &'static str, dir: PathBuf) -> StorageResult<()> {
    for attempt in 1.. {
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty && attempt < REMOVE_ATTEMPTS => {
                tokio::time::sleep(REMOVE_PAUSE).await;
            }
            Err(e) => return Err(io_failure(op, "remove folder", e)),
        }
    }
    unreachable!("the loop returns")
}

/// The writer behind an [`ExportPartWriter`] of a [`LocalFsOutputStore`]:
/// HFS's 64 KiB `BufWriter` over the part's temporary file.
struct FileSink {
    file: BufWriter<tokio::fs::File>,
    live: Registry,
}

impl AsyncWrite for FileSink {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.file).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_shutdown(cx)
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        let addr = sink_address(&*self);
        let Some(staged) = registry_with(&self.live, |m| m.remove(&addr)) else {
            return;
        };
        if staged.published {
            return;
        }
        // Best effort: an unfinished part's file is removed; a leftover one
        // is never readable and goes with its job's folder.
        let tmp = staged.tmp;
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(move || std::fs::remove_file(tmp));
            }
            Err(_) => {
                let _ = std::fs::remove_file(tmp);
            }
        }
    }
}

/// The reader behind `open_reader`: the part's file, plus one check at its
/// end that the name still leads to the file that was read (on Unix, where a
/// reader can outlive a delete or a rename over its file).
struct FileReader {
    file: tokio::fs::File,
    path: PathBuf,
    opened: Option<std::fs::Metadata>,
    check: Option<tokio::task::JoinHandle<bool>>,
    done: bool,
}

fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        a.dev() == b.dev() && a.ino() == b.ino()
    }
    #[cfg(not(unix))]
    {
        // Elsewhere an open file cannot be deleted or replaced.
        let _ = (a, b);
        true
    }
}

impl AsyncRead for FileReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.check.is_none() && !this.done {
            let before = out.filled().len();
            std::task::ready!(Pin::new(&mut this.file).poll_read(cx, out))?;
            if out.filled().len() > before || out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let (path, opened) = (this.path.clone(), this.opened.take());
            this.check = Some(tokio::task::spawn_blocking(move || {
                match (opened, std::fs::metadata(path)) {
                    (Some(a), Ok(b)) => same_file(&a, &b),
                    _ => false,
                }
            }));
        }
        if let Some(check) = this.check.as_mut() {
            let same = std::task::ready!(Pin::new(check).poll(cx)).unwrap_or(false);
            this.check = None;
            this.done = true;
            if !same {
                let e = StorageError::not_found(
                    "read",
                    "the part was deleted or replaced while it was being read",
                );
                return Poll::Ready(Err(e.into()));
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[async_trait]
impl ExportOutputStore for LocalFsOutputStore {
    async fn open_writer(&self, key: &ExportPartKey) -> StorageResult<ExportPartWriter> {
        let op = "open_writer";
        key.validate(op)?;
        let dir = self.job_dir(&key.tenant_id, key.job_id.as_str());
        let tmp = dir.join(format!(
            "{}.{}.tmp",
            part_stem(key),
            uuid::Uuid::new_v4().simple()
        ));
        let durable = self.fsync;
        let create = dir.clone();
        tokio::task::spawn_blocking(move || create_dirs(&create, durable))
            .await
            .map_err(|_| join_failure(op))?
            .map_err(|e| io_failure(op, "create folder", e).with_part(key.display()))?;
        let file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| io_failure(op, "create file", e).with_part(key.display()))?;
        let sink = Box::pin(FileSink {
            file: BufWriter::with_capacity(WRITE_BUFFER_CAPACITY, file),
            live: self.live.clone(),
        });
        let staged = Staged {
            key: key.clone(),
            tmp,
            published: false,
        };
        registry_with(&self.live, |m| m.insert(sink_address(&*sink), staged));
        Ok(ExportPartWriter::new(sink))
    }

    async fn finalize_part(
        &self,
        key: &ExportPartKey,
        mut writer: ExportPartWriter,
    ) -> StorageResult<FinalizedPart> {
        let op = "finalize_part";
        key.validate(op)?;
        let part = || key.display();
        let fail = |e: io::Error| StorageError::from_io(op, e).in_op(op).or_part(part());
        writer.writer.flush().await.map_err(fail)?;
        writer.writer.shutdown().await.map_err(fail)?;
        let addr = sink_address(&*writer.writer);
        let found = registry_with(&self.live, |m| {
            m.get(&addr).map(|s| (s.key.clone(), s.tmp.clone()))
        });
        check_opened_for(op, key, found.as_ref().map(|(k, _)| k))?;
        let (_, tmp) = found.expect("checked above");
        let (target, durable, expected) = (self.part_path(key), self.fsync, writer.byte_count);
        tokio::task::spawn_blocking(move || publish(op, &tmp, &target, expected, durable))
            .await
            .map_err(|_| join_failure(op))?
            .map_err(|e| e.with_part(part()))?;
        registry_with(&self.live, |m| {
            if let Some(s) = m.get_mut(&addr) {
                s.published = true;
            }
        });
        Ok(FinalizedPart {
            key: key.clone(),
            resource_type: key.resource_type.clone(),
            line_count: writer.line_count,
            size_bytes: writer.byte_count,
        })
    }

    async fn download_url(&self, key: &ExportPartKey, ttl: Duration) -> StorageResult<DownloadUrl> {
        key.validate("download_url")?;
        Ok(self.urls.mint(key, ttl, self.access_token_required))
    }

    async fn open_reader(
        &self,
        key: &ExportPartKey,
    ) -> StorageResult<Pin<Box<dyn AsyncRead + Send>>> {
        let op = "open_reader";
        key.validate(op)?;
        let path = self.part_path(key);
        match tokio::fs::File::open(&path).await {
            Ok(file) => {
                let opened = file
                    .metadata()
                    .await
                    .map_err(|e| io_failure(op, "stat file", e).with_part(key.display()))?;
                Ok(Box::pin(FileReader {
                    file,
                    path,
                    opened: Some(opened),
                    check: None,
                    done: false,
                }))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StorageError::not_found(
                op,
                "no finished part under this key",
            )
            .with_part(key.display())),
            Err(e) => Err(io_failure(op, "open file", e).with_part(key.display())),
        }
    }

    async fn delete_job_outputs(
        &self,
        tenant: &TenantContext,
        job_id: &ExportJobId,
    ) -> StorageResult<()> {
        let op = "delete_job_outputs";
        let t = tenant.tenant_id().as_str();
        check_id(op, "tenant id", t)?;
        check_id(op, "job id", job_id.as_str())?;
        remove_dir(op, self.job_dir(t, job_id.as_str())).await
    }

    async fn delete_tenant_outputs(&self, tenant_id: &str) -> StorageResult<()> {
        let op = "delete_tenant_outputs";
        check_id(op, "tenant id", tenant_id)?;
        remove_dir(op, self.tenant_dir(tenant_id)).await
    }
}

/// Checks the staged file's length, then publishes it by rename (fsyncing
/// file and folder when `durable`).
fn publish(
    op: &'static str,
    tmp: &Path,
    target: &Path,
    expected: u64,
    durable: bool,
) -> StorageResult<()> {
    let gone = || {
        StorageError::not_found(
            op,
            "the staged part no longer exists (its job was deleted meanwhile)",
        )
    };
    let file = match std::fs::File::open(tmp) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(gone()),
        Err(e) => return Err(io_failure(op, "open staged file", e)),
    };
    let len = file
        .metadata()
        .map_err(|e| io_failure(op, "stat staged file", e))?
        .len();
    if len != expected {
        return Err(StorageError::invalid(
            op,
            format!(
                "the part is incomplete: the writer reports {expected} bytes but the file holds {len}"
            ),
        ));
    }
    if durable {
        file.sync_all()
            .map_err(|e| io_failure(op, "fsync staged file", e))?;
    }
    drop(file);
    match std::fs::rename(tmp, target) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(gone()),
        Err(e) => return Err(io_failure(op, "rename staged file", e)),
    }
    if durable {
        if let Some(dir) = target.parent() {
            sync_dir(dir).map_err(|e| io_failure(op, "fsync folder", e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::TenantId;
    use tokio::io::AsyncReadExt;

    fn key(tenant: &str, job: &str, rt: &str, index: u32, token: u64) -> ExportPartKey {
        ExportPartKey::output(tenant, ExportJobId::from(job), rt, index, token)
    }

    async fn read_all(store: &LocalFsOutputStore, k: &ExportPartKey) -> StorageResult<Vec<u8>> {
        let mut out = Vec::new();
        store
            .open_reader(k)
            .await?
            .read_to_end(&mut out)
            .await
            .map_err(|e| StorageError::from_io("read", e))?;
        Ok(out)
    }

    async fn write(
        store: &LocalFsOutputStore,
        k: &ExportPartKey,
        lines: &[&str],
    ) -> StorageResult<FinalizedPart> {
        let mut w = store.open_writer(k).await?;
        for l in lines {
            w.write_line(l).await.unwrap();
        }
        store.finalize_part(k, w).await
    }

    #[tokio::test]
    async fn parts_round_trip_and_nothing_staged_is_readable() {
        for fsync in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let store = LocalFsOutputStore::new(dir.path(), "http://h")
                .unwrap()
                .with_fsync(fsync);
            let k = key("t", "j", "Patient", 0, 1);
            let mut w = store.open_writer(&k).await.unwrap();
            let big = "x".repeat(WRITE_BUFFER_CAPACITY + 3);
            w.write_line("{\"id\":1}").await.unwrap();
            w.write_line(&big).await.unwrap();
            assert!(read_all(&store, &k).await.unwrap_err().is_not_found());
            let f = store.finalize_part(&k, w).await.unwrap();
            assert_eq!((f.line_count, f.size_bytes), (2, 9 + big.len() as u64 + 1));
            assert_eq!(
                read_all(&store, &k).await.unwrap(),
                format!("{{\"id\":1}}\n{big}\n").into_bytes()
            );
            assert_eq!(store.live_writers(), 0);
            let url = store.download_url(&k, Duration::ZERO).await.unwrap();
            assert_eq!(url.url, "http://h/export-file/j/Patient-0");
            assert!(url.requires_access_token);
        }
    }

    #[tokio::test]
    async fn hostile_and_long_ids_stay_inside_the_root_and_distinct() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let store = LocalFsOutputStore::new(&root, "http://h").unwrap();
        let long = "é".repeat(128); // 256 bytes
        let keys = [
            key("..", "..", "..", 0, 1),
            key("acme/research", "j", "P", 0, 1),
            key("acme", "research/j", "P", 0, 1),
            key("acme", "j", "a-1", 2, 3),
            key("acme", "j", "a", 12, 3),
            key("t", &long, &long, u32::MAX, u64::MAX),
            key("t", &"a".repeat(256), "submit-v1-".repeat(7).as_str(), 0, 0),
        ];
        for (i, k) in keys.iter().enumerate() {
            write(&store, k, &[&format!("{{\"n\":{i}}}")])
                .await
                .unwrap();
        }
        for (i, k) in keys.iter().enumerate() {
            let want = format!("{{\"n\":{i}}}\n").into_bytes();
            assert_eq!(read_all(&store, k).await.unwrap(), want, "{k:?}");
            let p = store.part_path(k);
            assert!(p.starts_with(&root), "{p:?}");
            assert!(p.file_name().unwrap().len() < 255);
        }
        // Nothing was written next to the root.
        let beside: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(beside.len(), 1);
        let e = store
            .open_writer(&key("t", "j", "P\n", 0, 1))
            .await
            .unwrap_err();
        assert!(e.is_invalid_input(), "{e}");
    }

    #[tokio::test]
    async fn a_read_that_meets_a_replacement_or_a_delete_ends_in_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalFsOutputStore::new(dir.path(), "http://h").unwrap();
        let k = key("t", "j", "P", 0, 1);
        write(&store, &k, &["old"]).await.unwrap();
        let mut reader = store.open_reader(&k).await.unwrap();
        write(&store, &k, &["new"]).await.unwrap();
        let mut seen = String::new();
        let e = reader.read_to_string(&mut seen).await.unwrap_err();
        assert!(StorageError::from_io("read", e).is_not_found());
        assert_eq!(read_all(&store, &k).await.unwrap(), b"new\n");
        let mut reader = store.open_reader(&k).await.unwrap();
        let acme = TenantContext::new(TenantId::new("t"));
        store
            .delete_job_outputs(&acme, &ExportJobId::from("j"))
            .await
            .unwrap();
        assert!(reader.read_to_end(&mut Vec::new()).await.is_err());
    }

    #[tokio::test]
    async fn a_retry_and_an_abandoned_writer_never_mix_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalFsOutputStore::new(dir.path(), "http://h").unwrap();
        let k = key("t", "j", "P", 0, 1);
        let mut first = store.open_writer(&k).await.unwrap();
        first.write_line("first").await.unwrap();
        let mut second = store.open_writer(&k).await.unwrap();
        second.write_line("second").await.unwrap();
        first.write_line("first again").await.unwrap();
        first.flush().await.unwrap();
        drop(first);
        store.finalize_part(&k, second).await.unwrap();
        assert_eq!(read_all(&store, &k).await.unwrap(), b"second\n");
        // The abandoned writer's file goes away (removed in the background).
        let job = store.part_path(&k).parent().unwrap().to_path_buf();
        for _ in 0..100 {
            if std::fs::read_dir(&job).unwrap().count() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(std::fs::read_dir(&job).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn counters_that_disagree_with_the_bytes_publish_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalFsOutputStore::new(dir.path(), "http://h").unwrap();
        let k = key("t", "j", "P", 0, 1);
        let mut w = store.open_writer(&k).await.unwrap();
        w.writer.write_all(b"raw bytes\n").await.unwrap();
        w.byte_count = 3;
        let e = store.finalize_part(&k, w).await.unwrap_err();
        assert!(e.is_invalid_input(), "{e}");
        assert!(!e.to_string().contains(dir.path().to_str().unwrap()));
        assert!(read_all(&store, &k).await.unwrap_err().is_not_found());
        // A writer opened for another key is refused too.
        let other = key("t", "j", "P", 1, 1);
        let w = store.open_writer(&other).await.unwrap();
        assert!(store
            .finalize_part(&k, w)
            .await
            .unwrap_err()
            .is_invalid_input());
    }

    #[tokio::test]
    async fn deletes_are_idempotent_scoped_and_final() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalFsOutputStore::new(dir.path(), "http://h").unwrap();
        let a = key("acme", "j", "P", 0, 1);
        let b = key("acme/research", "j", "P", 0, 1);
        let c = key("acme", "j2", "P", 0, 1);
        for k in [&a, &b, &c] {
            write(&store, k, &["x"]).await.unwrap();
        }
        let staging = store
            .open_writer(&key("acme", "j", "P", 1, 1))
            .await
            .unwrap();
        let acme = TenantContext::new(TenantId::new("acme"));
        for _ in 0..2 {
            store
                .delete_job_outputs(&acme, &ExportJobId::from("j"))
                .await
                .unwrap();
        }
        assert!(read_all(&store, &a).await.unwrap_err().is_not_found());
        assert_eq!(read_all(&store, &b).await.unwrap(), b"x\n");
        assert_eq!(read_all(&store, &c).await.unwrap(), b"x\n");
        // A writer staging the deleted job cannot bring it back.
        let e = store
            .finalize_part(&key("acme", "j", "P", 1, 1), staging)
            .await
            .unwrap_err();
        assert!(e.is_not_found(), "{e}");
        store.delete_tenant_outputs("acme").await.unwrap();
        assert!(read_all(&store, &c).await.unwrap_err().is_not_found());
        assert_eq!(read_all(&store, &b).await.unwrap(), b"x\n");
        assert!(store
            .delete_tenant_outputs("")
            .await
            .unwrap_err()
            .is_invalid_input());
    }
}
