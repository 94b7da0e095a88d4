//! Identifiers: tenants, export jobs and the key of one output part.
//!
//! These mirror the types HFS (`helios-persistence`) passes to an
//! `ExportOutputStore`, field for field, and add the validation the store
//! applies before any I/O (see [`ExportPartKey::validate`]).

use std::fmt;

use crate::error::{StorageError, StorageResult};

/// The largest tenant id, job id or resource type the store accepts, in bytes.
pub const MAX_ID_BYTES: usize = 256;

/// The id of one bulk export (or bulk submit) job.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExportJobId(String);

impl ExportJobId {
    /// A fresh random id (a UUID v4 in hyphenated form).
    pub fn new() -> Self {
        ExportJobId(uuid::Uuid::new_v4().to_string())
    }
    /// Wraps an existing id as is (no validation: the store validates keys).
    pub fn from_string(id: impl Into<String>) -> Self {
        ExportJobId(id.into())
    }
    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for ExportJobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for ExportJobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for ExportJobId {
    fn from(s: String) -> Self {
        ExportJobId(s)
    }
}

impl From<&str> for ExportJobId {
    fn from(s: &str) -> Self {
        ExportJobId(s.to_string())
    }
}

/// A tenant's id. Hierarchical ids such as `acme/research` are legal and
/// distinct from `acme`: tenants match exactly, never by prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(String);

impl TenantId {
    /// Wraps a tenant id (validated by the store when used).
    pub fn new(id: &str) -> Self {
        TenantId(id.to_string())
    }
    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The tenant a request acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantContext {
    tenant_id: TenantId,
}

impl TenantContext {
    /// A context for `tenant_id`.
    pub fn new(tenant_id: TenantId) -> Self {
        TenantContext { tenant_id }
    }
    /// The tenant this context acts for.
    pub fn tenant_id(&self) -> &TenantId {
        &self.tenant_id
    }
}

/// A stable identifier for a single output part.
///
/// The `fencing_token` is embedded so a zombie worker (one that lost its
/// lease) writes to a *different* key than the live worker holding the
/// reclaimed job, preventing output corruption.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ExportPartKey {
    /// The tenant the job belongs to.
    pub tenant_id: String,
    /// The export job this part belongs to.
    pub job_id: ExportJobId,
    /// The FHIR resource type contained in the part.
    pub resource_type: String,
    /// `"output"` or `"error"`.
    pub file_type: String,
    /// The zero-based part index within `(job, file_type, resource_type)`.
    pub part_index: u32,
    /// The fencing token of the worker that produced the part.
    pub fencing_token: u64,
}

impl ExportPartKey {
    /// Creates a new output part key (`file_type = "output"`).
    pub fn output(
        tenant_id: impl Into<String>,
        job_id: ExportJobId,
        resource_type: impl Into<String>,
        part_index: u32,
        fencing_token: u64,
    ) -> Self {
        Self {
            tenant_id: tenant_id.into(),
            job_id,
            resource_type: resource_type.into(),
            file_type: "output".to_string(),
            part_index,
            fencing_token,
        }
    }

    /// Creates a new error part key (`file_type = "error"`).
    pub fn error(
        tenant_id: impl Into<String>,
        job_id: ExportJobId,
        resource_type: impl Into<String>,
        part_index: u32,
        fencing_token: u64,
    ) -> Self {
        Self {
            tenant_id: tenant_id.into(),
            job_id,
            resource_type: resource_type.into(),
            file_type: "error".to_string(),
            part_index,
            fencing_token,
        }
    }

    /// The `{resource_type}-{part_index}` segment used in download routes.
    pub fn part_segment(&self) -> String {
        format!("{}-{}", self.resource_type, self.part_index)
    }

    /// Checks the key as the store does before any I/O: tenant, job id and
    /// resource type non-empty UTF-8 without control characters, at most
    /// [`MAX_ID_BYTES`] bytes each; file type 1 to [`MAX_FILE_TYPE_BYTES`]
    /// bytes of `[a-z0-9_-]` starting with a letter (`output` and `error`
    /// for exports; HFS's bulk submit also writes `deleted`).
    pub fn validate(&self, op: &'static str) -> StorageResult<()> {
        let fail = |e: StorageError| e.with_part(KeyDisplay(self));
        check_id(op, "tenant id", &self.tenant_id).map_err(fail)?;
        check_id(op, "job id", self.job_id.as_str()).map_err(fail)?;
        check_id(op, "resource type", &self.resource_type).map_err(fail)?;
        check_file_type(op, &self.file_type).map_err(fail)
    }

    /// A short display form for messages and logs:
    /// `tenant/job/file_type/Type-n@token`, with fields over 64 bytes
    /// elided and control characters escaped.
    pub fn display(&self) -> impl fmt::Display + '_ {
        KeyDisplay(self)
    }
}

struct KeyDisplay<'a>(&'a ExportPartKey);

impl fmt::Display for KeyDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = self.0;
        write!(
            f,
            "{}/{}/{}/{}-{}@{}",
            Short(&k.tenant_id),
            Short(k.job_id.as_str()),
            Short(&k.file_type),
            Short(&k.resource_type),
            k.part_index,
            k.fencing_token
        )
    }
}

/// Shows at most 64 bytes of an id, escaping anything unprintable, so that a
/// hostile key cannot flood or garble a log line.
pub(crate) struct Short<'a>(pub &'a str);

impl fmt::Display for Short<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut used = 0;
        for c in self.0.chars() {
            if used + c.len_utf8() > 64 {
                return f.write_str("…");
            }
            used += c.len_utf8();
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

/// The longest file type a key may carry.
pub const MAX_FILE_TYPE_BYTES: usize = 32;

/// A file type is a short lower-case word: it becomes part of file names
/// and object keys in other stores, so it is kept to `[a-z0-9_-]`.
fn check_file_type(op: &'static str, file_type: &str) -> StorageResult<()> {
    let ok = file_type.len() <= MAX_FILE_TYPE_BYTES
        && file_type
            .as_bytes()
            .first()
            .is_some_and(u8::is_ascii_lowercase)
        && file_type
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(StorageError::invalid(
            op,
            format!(
                "file type must be 1 to {MAX_FILE_TYPE_BYTES} bytes of a-z, 0-9, '_' or '-', \
                 starting with a letter (such as \"output\", \"error\" or \"deleted\")"
            ),
        ))
    }
}

/// Validates one id field of a key or a tenant id argument.
pub(crate) fn check_id(op: &'static str, what: &str, value: &str) -> StorageResult<()> {
    if value.is_empty() {
        return Err(StorageError::invalid(op, format!("{what} is empty")));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(StorageError::invalid(
            op,
            format!(
                "{what} is {} bytes; at most {MAX_ID_BYTES} allowed",
                value.len()
            ),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(StorageError::invalid(
            op,
            format!("{what} contains a control character"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ExportPartKey {
        ExportPartKey::output("acme", ExportJobId::from("job-1"), "Patient", 3, 7)
    }

    #[test]
    fn valid_keys_pass_including_bulk_submit_shapes() {
        key().validate("t").unwrap();
        let submit = ExportPartKey::output(
            "acme/research",
            ExportJobId::from(format!("submit-{}", "0123456789abcdef")),
            format!("submit-v1-{}", "ab".repeat(32)),
            u32::MAX,
            u64::MAX,
        );
        assert_eq!(submit.resource_type.len(), 74);
        submit.validate("t").unwrap();
    }

    type Mutation = Box<dyn Fn(&mut ExportPartKey)>;

    #[test]
    fn invalid_keys_are_rejected_by_category() {
        let cases: Vec<(&str, Mutation)> = vec![
            ("empty tenant", Box::new(|k| k.tenant_id.clear())),
            ("empty job", Box::new(|k| k.job_id = ExportJobId::from(""))),
            ("empty type", Box::new(|k| k.resource_type.clear())),
            ("nul", Box::new(|k| k.tenant_id = "a\0b".into())),
            (
                "newline",
                Box::new(|k| k.resource_type = "Pat\nient".into()),
            ),
            ("long", Box::new(|k| k.job_id = "x".repeat(257).into())),
            ("empty file type", Box::new(|k| k.file_type.clear())),
            (
                "file type case",
                Box::new(|k| k.file_type = "Output".into()),
            ),
            ("file type digit", Box::new(|k| k.file_type = "1st".into())),
            ("file type dash", Box::new(|k| k.file_type = "-x".into())),
            (
                "file type slash",
                Box::new(|k| k.file_type = "out/put".into()),
            ),
            ("file type dots", Box::new(|k| k.file_type = "..".into())),
            (
                "file type space",
                Box::new(|k| k.file_type = "out put".into()),
            ),
            ("file type é", Box::new(|k| k.file_type = "sortie-é".into())),
            ("file type long", Box::new(|k| k.file_type = "a".repeat(33))),
        ];
        for (name, mutate) in cases {
            let mut k = key();
            mutate(&mut k);
            let err = k.validate("open_writer").unwrap_err();
            assert!(err.is_invalid_input(), "{name}: {err}");
            assert_eq!(err.operation(), "open_writer");
        }
        let mut k = key();
        k.job_id = "y".repeat(256).into();
        k.validate("t").unwrap();
        for file_type in ["output", "error", "deleted", "a", "x_1-b", &"z".repeat(32)] {
            let mut k = key();
            k.file_type = file_type.to_string();
            k.validate("t")
                .unwrap_or_else(|e| panic!("file type {file_type:?}: {e}"));
        }
    }

    #[test]
    fn display_is_short_and_escaped() {
        let mut k = key();
        k.tenant_id = format!("a\nb{}", "z".repeat(1000));
        let shown = k.display().to_string();
        assert!(shown.len() < 200, "{shown}");
        assert!(!shown.contains('\n'));
        assert!(shown.starts_with("a\\nb"));
    }

    #[test]
    fn job_id_constructors() {
        let a = ExportJobId::new();
        assert_ne!(a, ExportJobId::new());
        assert_eq!(
            uuid::Uuid::parse_str(a.as_str()).unwrap().get_version_num(),
            4
        );
        assert_eq!(ExportJobId::from_string("x").to_string(), "x");
        assert_eq!(ExportJobId::from(String::from("y")).as_str(), "y");
    }
}
