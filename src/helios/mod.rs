//! HFS's own `ExportOutputStore` for [`SqliteOutputStore`] (feature `helios`).
//!
//! With this feature the store implements
//! [`helios_persistence::core::bulk_export_output::ExportOutputStore`] from
//! `helios-persistence` 0.2.7, so an `Arc<SqliteOutputStore>` goes wherever
//! the Helios FHIR Server takes an `Arc<dyn ExportOutputStore>` (bulk export
//! and bulk submit). The adapter only converts: every call runs the store's
//! own [`crate::ExportOutputStore`] method, so the two traits behave the same
//! in every case the crate's contract describes.
//!
//! - Keys, job ids, tenants, writers, URLs and finalized parts are converted
//!   field for field. A writer's sink moves across unchanged (the same heap
//!   allocation), so the store still recognises the writers it opened, and
//!   still refuses a writer whose sink a caller replaced.
//! - Errors map by category, the way HFS's handlers and workers read them:
//!
//! | our category | HFS error | HFS answers |
//! |---|---|---|
//! | not found | `Resource(ResourceError::NotFound { resource_type, id })` | 404 |
//! | conflict (fenced out) | `Resource(ResourceError::AlreadyExists { resource_type, id })` | 409 |
//! | invalid input | `Validation(ValidationError::InvalidResource { message, .. })` | 400 |
//! | unavailable | `Backend(BackendError::Unavailable { backend_name, message })` | 503, the worker retries |
//! | corrupt, internal | `Backend(BackendError::Internal { backend_name, message, source })` | 500 |
//!
//! For a part, `resource_type` and `id` are the key's resource type and
//! `{resource_type}-{part_index}` segment (as in HFS's download route); for a
//! job they are `"ExportJob"` and the job id; for a tenant, `"Tenant"` and the
//! tenant id. Messages are the store's own `Display` (operation, part,
//! category, reason): no file paths, no SQL. `backend_name` is
//! [`BACKEND_NAME`]. An internal error keeps the store's error as its
//! `source`, for logs.
//!
//! Errors met while streaming a part (a damaged frame, a part deleted during
//! the read) come out of the reader as `std::io::Error`s, as HFS's download
//! route expects; [`crate::StorageError::from_io`] recovers their category.
//!
//! ```no_run
//! use std::sync::Arc;
//! use helios_persistence::core::bulk_export_output::ExportOutputStore;
//! use sqlite_export_store::{SqliteOutputStore, StoreOptions};
//!
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let store = SqliteOutputStore::open_with(
//!     "/var/lib/hfs/export-output.db",
//!     "https://fhir.example.org",
//!     StoreOptions::default().with_access_token_required(true),
//! )?;
//! // Clones share one database; each handle keeps its own token posture.
//! let export_output: Arc<dyn ExportOutputStore> = Arc::new(store.clone());
//! let submit_output: Arc<dyn ExportOutputStore> =
//!     Arc::new(store.with_access_token_required(true));
//! // `export_output` goes into HFS's `BulkExportBundle { output, .. }`,
//! // `submit_output` into `BulkSubmitBundle { output, .. }`.
//! # let _ = (export_output, submit_output);
//! # Ok(()) }
//! ```
//!
//! After a restore in which HFS's database came back from a later moment
//! than the store (two files replicated apart, as Litestream does),
//! [`restore::check_restored`] finds the exports HFS records as complete
//! whose files the store lacks, and [`restore::fail_incomplete_exports`]
//! marks them failed the way HFS marks an abandoned export.
//!
//! In this folder: `mod.rs` (the trait's implementation: each method calls
//! the store's own), `convert.rs` (keys, job ids and errors: the only
//! place the two crates' types meet) and `restore.rs` (the check of HFS's
//! job records against the store). The adapter uses the store's public
//! methods and the crate's contract, nothing else.

mod convert;
pub mod restore;

use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use helios_persistence::core::bulk_export_output as hfs;
use helios_persistence::core::ExportJobId as HfsJobId;
use helios_persistence::{StorageResult as HfsResult, TenantContext};
use tokio::io::AsyncRead;

use crate::SqliteOutputStore;
use convert::{job, key, to_hfs, Subject};

/// The `backend_name` this store gives in HFS's `BackendError`s.
pub const BACKEND_NAME: &str = "sqlite-export-store";

#[async_trait]
impl hfs::ExportOutputStore for SqliteOutputStore {
    async fn open_writer(&self, k: &hfs::ExportPartKey) -> HfsResult<hfs::ExportPartWriter> {
        let w = crate::ExportOutputStore::open_writer(self, &key(k))
            .await
            .map_err(|e| to_hfs(e, Subject::Part(k)))?;
        Ok(hfs::ExportPartWriter {
            writer: w.writer,
            line_count: w.line_count,
            byte_count: w.byte_count,
        })
    }

    async fn finalize_part(
        &self,
        k: &hfs::ExportPartKey,
        w: hfs::ExportPartWriter,
    ) -> HfsResult<hfs::FinalizedPart> {
        // The box moves, never re-boxes: the store knows its writers by the
        // address of this allocation.
        let w = crate::ExportPartWriter {
            writer: w.writer,
            line_count: w.line_count,
            byte_count: w.byte_count,
        };
        let part = crate::ExportOutputStore::finalize_part(self, &key(k), w)
            .await
            .map_err(|e| to_hfs(e, Subject::Part(k)))?;
        Ok(hfs::FinalizedPart {
            key: k.clone(),
            resource_type: part.resource_type,
            line_count: part.line_count,
            size_bytes: part.size_bytes,
        })
    }

    async fn download_url(
        &self,
        k: &hfs::ExportPartKey,
        ttl: Duration,
    ) -> HfsResult<hfs::DownloadUrl> {
        let url = crate::ExportOutputStore::download_url(self, &key(k), ttl)
            .await
            .map_err(|e| to_hfs(e, Subject::Part(k)))?;
        Ok(hfs::DownloadUrl {
            url: url.url,
            requires_access_token: url.requires_access_token,
        })
    }

    async fn open_reader(
        &self,
        k: &hfs::ExportPartKey,
    ) -> HfsResult<Pin<Box<dyn AsyncRead + Send>>> {
        crate::ExportOutputStore::open_reader(self, &key(k))
            .await
            .map_err(|e| to_hfs(e, Subject::Part(k)))
    }

    async fn delete_job_outputs(&self, tenant: &TenantContext, job_id: &HfsJobId) -> HfsResult<()> {
        let ours = crate::TenantContext::new(crate::TenantId::new(tenant.tenant_id().as_str()));
        crate::ExportOutputStore::delete_job_outputs(self, &ours, &job(job_id))
            .await
            .map_err(|e| to_hfs(e, Subject::Job(job_id)))
    }

    async fn delete_tenant_outputs(&self, tenant_id: &str) -> HfsResult<()> {
        crate::ExportOutputStore::delete_tenant_outputs(self, tenant_id)
            .await
            .map_err(|e| to_hfs(e, Subject::Tenant(tenant_id)))
    }
}
