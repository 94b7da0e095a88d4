//! The only place HFS's types and the crate's meet: keys, job ids and
//! errors, converted field for field and category by category (the table
//! is in the [module docs](super)).

use helios_persistence::core::bulk_export_output as hfs;
use helios_persistence::core::ExportJobId as HfsJobId;
use helios_persistence::error::{BackendError, ResourceError, ValidationError};
use helios_persistence::StorageError as HfsError;

use super::BACKEND_NAME;
use crate::{ErrorKind, StorageError};

/// What a call concerned, so that a not-found or conflict names it the way
/// HFS's `ResourceError` does.
pub(super) enum Subject<'a> {
    Part(&'a hfs::ExportPartKey),
    Job(&'a HfsJobId),
    Tenant(&'a str),
}

/// Maps one of our errors into HFS's error, by category (see the module
/// docs). The only place the two error types meet.
pub(super) fn to_hfs(err: StorageError, subject: Subject<'_>) -> HfsError {
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

pub(super) fn key(k: &hfs::ExportPartKey) -> crate::ExportPartKey {
    crate::ExportPartKey {
        tenant_id: k.tenant_id.clone(),
        job_id: job(&k.job_id),
        resource_type: k.resource_type.clone(),
        file_type: k.file_type.clone(),
        part_index: k.part_index,
        fencing_token: k.fencing_token,
    }
}

pub(super) fn job(j: &HfsJobId) -> crate::ExportJobId {
    crate::ExportJobId::from_string(j.as_str())
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
