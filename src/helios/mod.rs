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

use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use helios_persistence::core::bulk_export_output as hfs;
use helios_persistence::core::ExportJobId as HfsJobId;
use helios_persistence::error::{BackendError, ResourceError, ValidationError};
use helios_persistence::{StorageError as HfsError, StorageResult as HfsResult, TenantContext};
use tokio::io::AsyncRead;

use crate::{ErrorKind, SqliteOutputStore, StorageError};

/// The `backend_name` this store gives in HFS's `BackendError`s.
pub const BACKEND_NAME: &str = "sqlite-export-store";

/// What a call concerned, so that a not-found or conflict names it the way
/// HFS's `ResourceError` does.
enum Subject<'a> {
    Part(&'a hfs::ExportPartKey),
    Job(&'a HfsJobId),
    Tenant(&'a str),
}

/// Maps one of our errors into HFS's error, by category (see the module
/// docs). The only place the two error types meet.
fn to_hfs(err: StorageError, subject: Subject<'_>) -> HfsError {
    let (resource_type, id) = match subject {
        Subject::Part(k) => (k.resource_type.clone(), k.part_segment()),
        Subject::Job(j) => ("ExportJob".to_string(), j.as_str().to_string()),
        Subject::Tenant(t) => ("Tenant".to_string(), t.to_string()),
    };
    match err.kind() {
        ErrorKind::NotFound => HfsError::Resource(ResourceError::NotFound { resource_type, id }),
        ErrorKind::Conflict => {
            HfsError::Resource(ResourceError::AlreadyExists { resource_type, id })
        }
        ErrorKind::InvalidInput => HfsError::Validation(ValidationError::InvalidResource {
            message: err.to_string(),
            details: Vec::new(),
        }),
        ErrorKind::Unavailable => HfsError::Backend(BackendError::Unavailable {
            backend_name: BACKEND_NAME.to_string(),
            message: err.to_string(),
        }),
        ErrorKind::Corrupt | ErrorKind::Internal => HfsError::Backend(BackendError::Internal {
            backend_name: BACKEND_NAME.to_string(),
            message: err.to_string(),
            source: Some(Box::new(err)),
        }),
    }
}

fn key(k: &hfs::ExportPartKey) -> crate::ExportPartKey {
    crate::ExportPartKey {
        tenant_id: k.tenant_id.clone(),
        job_id: job(&k.job_id),
        resource_type: k.resource_type.clone(),
        file_type: k.file_type.clone(),
        part_index: k.part_index,
        fencing_token: k.fencing_token,
    }
}

fn job(j: &HfsJobId) -> crate::ExportJobId {
    crate::ExportJobId::from_string(j.as_str())
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn part() -> hfs::ExportPartKey {
        hfs::ExportPartKey::output("acme", HfsJobId::from_string("job-1"), "Patient", 3, 7)
    }

    /// Every category lands on the variant HFS's REST layer and workers
    /// read, naming the part; messages are ours, sources kept for logs.
    #[test]
    fn each_category_maps_to_its_hfs_variant() {
        let ours = |kind| StorageError::new(kind, "finalize_part", "why").with_part("acme/job-1");

        match to_hfs(ours(ErrorKind::NotFound), Subject::Part(&part())) {
            HfsError::Resource(ResourceError::NotFound { resource_type, id }) => {
                assert_eq!(
                    (resource_type.as_str(), id.as_str()),
                    ("Patient", "Patient-3")
                );
            }
            other => panic!("{other:?}"),
        }
        match to_hfs(ours(ErrorKind::Conflict), Subject::Part(&part())) {
            HfsError::Resource(ResourceError::AlreadyExists { resource_type, id }) => {
                assert_eq!(
                    (resource_type.as_str(), id.as_str()),
                    ("Patient", "Patient-3")
                );
            }
            other => panic!("{other:?}"),
        }
        match to_hfs(ours(ErrorKind::InvalidInput), Subject::Part(&part())) {
            HfsError::Validation(ValidationError::InvalidResource { message, details }) => {
                assert_eq!(message, "finalize_part of acme/job-1: invalid input: why");
                assert!(details.is_empty());
            }
            other => panic!("{other:?}"),
        }
        let e = to_hfs(ours(ErrorKind::Unavailable), Subject::Part(&part()));
        assert!(e.is_unavailable(), "{e:?}");
        match e {
            HfsError::Backend(BackendError::Unavailable {
                backend_name,
                message,
            }) => {
                assert_eq!(backend_name, BACKEND_NAME);
                assert_eq!(message, "finalize_part of acme/job-1: unavailable: why");
            }
            other => panic!("{other:?}"),
        }
        for kind in [ErrorKind::Corrupt, ErrorKind::Internal] {
            let e = to_hfs(ours(kind), Subject::Part(&part()));
            assert!(!e.is_unavailable());
            match e {
                HfsError::Backend(BackendError::Internal {
                    backend_name,
                    message,
                    source,
                }) => {
                    assert_eq!(backend_name, BACKEND_NAME);
                    let source = source.expect("our error is kept as the source");
                    let back = source
                        .downcast_ref::<StorageError>()
                        .expect("the source is the store's error");
                    assert_eq!(back.kind(), kind);
                    assert_eq!(message, back.to_string());
                }
                other => panic!("{kind:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn jobs_and_tenants_are_named_when_there_is_no_part() {
        let e = || StorageError::new(ErrorKind::NotFound, "delete_job_outputs", "gone");
        match to_hfs(e(), Subject::Job(&HfsJobId::from_string("j-9"))) {
            HfsError::Resource(ResourceError::NotFound { resource_type, id }) => {
                assert_eq!((resource_type.as_str(), id.as_str()), ("ExportJob", "j-9"));
            }
            other => panic!("{other:?}"),
        }
        match to_hfs(e(), Subject::Tenant("acme/research")) {
            HfsError::Resource(ResourceError::NotFound { resource_type, id }) => {
                assert_eq!(
                    (resource_type.as_str(), id.as_str()),
                    ("Tenant", "acme/research")
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn keys_convert_field_for_field() {
        let mut k = hfs::ExportPartKey::error(
            "acme/research",
            HfsJobId::from_string("submit-0123456789abcdef"),
            format!("submit-v1-{}", "ab".repeat(32)),
            u32::MAX,
            u64::MAX,
        );
        let ours = key(&k);
        assert_eq!(ours.tenant_id, "acme/research");
        assert_eq!(ours.job_id.as_str(), "submit-0123456789abcdef");
        assert_eq!(ours.resource_type, k.resource_type);
        assert_eq!(ours.file_type, "error");
        assert_eq!(ours.part_index, u32::MAX);
        assert_eq!(ours.fencing_token, u64::MAX);
        assert_eq!(ours.part_segment(), k.part_segment());
        // Whatever a caller puts in a field travels as is; the store judges.
        k.file_type = "ndjson".into();
        assert_eq!(key(&k).file_type, "ndjson");
    }
}
