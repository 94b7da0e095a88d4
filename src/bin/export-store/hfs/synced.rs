//! `--output local-fs-synced`: HFS's own `LocalFsOutputStore`, with each
//! finalized file and its folder fsynced before `finalize_part` returns.
//!
//! A measuring baseline, not a store to run: it is what HFS's files cost
//! once they are made durable, the ceiling a durable store is fairly
//! compared with (`LocalFsOutputStore` itself returns before its bytes
//! reach the disk). The fsync comes after HFS's rename, so a crash between
//! the two can still leave a short file under the final name; the work
//! done, and so the time, is that of a durable write (file data, then the
//! folder entry).

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use helios_persistence::backends::local_fs::LocalFsOutputStore;
use helios_persistence::core::bulk_export::ExportJobId;
use helios_persistence::core::bulk_export_output::{
    DownloadUrl, ExportOutputStore, ExportPartKey, ExportPartWriter, FinalizedPart,
};
use helios_persistence::error::{BackendError, StorageError, StorageResult};
use helios_persistence::tenant::TenantContext;
use tokio::io::AsyncRead;

/// HFS's `LocalFsOutputStore` under `root`, fsyncing what it finalizes.
pub struct SyncedLocalFs {
    inner: LocalFsOutputStore,
    root: PathBuf,
}

impl SyncedLocalFs {
    /// The store over `inner`, whose root folder is `root`.
    pub fn new(inner: LocalFsOutputStore, root: PathBuf) -> Self {
        SyncedLocalFs { inner, root }
    }

    /// Where `LocalFsOutputStore` 0.2.7 puts a finalized part
    /// (`{root}/{tenant}/{job}/{file type}-{Type}-{n}-{token}.ndjson`).
    fn part_path(&self, key: &ExportPartKey) -> PathBuf {
        self.root
            .join(&key.tenant_id)
            .join(key.job_id.as_str())
            .join(format!(
                "{}-{}-{}-{}.ndjson",
                key.file_type, key.resource_type, key.part_index, key.fencing_token
            ))
    }
}

fn sync_err(what: &str, path: &Path, e: std::io::Error) -> StorageError {
    StorageError::Backend(BackendError::Internal {
        backend_name: "local-fs-synced".to_string(),
        message: format!("{what} {}: {e}", path.display()),
        source: None,
    })
}

/// fsyncs the file at `path`, then its folder.
fn sync_file_and_folder(path: &Path) -> StorageResult<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| sync_err("fsync", path, e))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| sync_err("fsync", dir, e))
}

#[async_trait]
impl ExportOutputStore for SyncedLocalFs {
    async fn open_writer(&self, key: &ExportPartKey) -> StorageResult<ExportPartWriter> {
        self.inner.open_writer(key).await
    }

    async fn finalize_part(
        &self,
        key: &ExportPartKey,
        writer: ExportPartWriter,
    ) -> StorageResult<FinalizedPart> {
        let done = self.inner.finalize_part(key, writer).await?;
        let path = self.part_path(key);
        tokio::task::spawn_blocking(move || sync_file_and_folder(&path))
            .await
            .map_err(|e| {
                StorageError::Backend(BackendError::Internal {
                    backend_name: "local-fs-synced".to_string(),
                    message: format!("the fsync task failed: {e}"),
                    source: None,
                })
            })??;
        Ok(done)
    }

    async fn download_url(&self, key: &ExportPartKey, ttl: Duration) -> StorageResult<DownloadUrl> {
        self.inner.download_url(key, ttl).await
    }

    async fn open_reader(
        &self,
        key: &ExportPartKey,
    ) -> StorageResult<std::pin::Pin<Box<dyn AsyncRead + Send>>> {
        self.inner.open_reader(key).await
    }

    async fn delete_job_outputs(
        &self,
        tenant: &TenantContext,
        job_id: &ExportJobId,
    ) -> StorageResult<()> {
        self.inner.delete_job_outputs(tenant, job_id).await
    }

    async fn delete_tenant_outputs(&self, tenant_id: &str) -> StorageResult<()> {
        self.inner.delete_tenant_outputs(tenant_id).await
    }
}
