//! The store's one public error type.
//!
//! Every failure falls into one [`ErrorKind`] a caller can act on (retry,
//! report 404, report 409, …), answered by a predicate on [`StorageError`].
//! Messages name the operation and the part; they never contain file paths or
//! SQL, because HFS may show them to the owner of an export job. The
//! underlying cause (a SQLite error, an I/O error) is kept as the error's
//! [`source`](std::error::Error::source) for logs.

use std::fmt;

/// The result type of every fallible call in this crate.
pub type StorageResult<T> = Result<T, StorageError>;

/// What kind of failure a [`StorageError`] is, and so what a caller can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The part is missing, not finalized yet, or was deleted (HFS: 404).
    NotFound,
    /// The caller was fenced out: a part in the same slot carries a higher
    /// fencing token (HFS: 409).
    Conflict,
    /// The call's arguments are invalid (bad key, empty tenant, bad option,
    /// counters that disagree with the bytes written). Nothing was changed
    /// (HFS: 400).
    InvalidInput,
    /// Transient: the database stayed busy after retries, or no connection
    /// could be had in time. Retrying the whole operation may succeed
    /// (HFS: 503; its worker retries the job).
    Unavailable,
    /// Stored data failed verification: digest, length or zstd frame
    /// mismatch. No wrong bytes were returned as success (HFS: 500).
    Corrupt,
    /// Anything else, including a full disk or a read-only database
    /// (HFS: 500).
    Internal,
}

impl ErrorKind {
    fn label(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Internal => "internal error",
        }
    }
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error from the store: a [`kind`](StorageError::kind), the operation
/// that failed, the part it concerned (when there is one) and a message.
///
/// `Display` reads like `finalize_part of t/j/output/Patient-0@3: not found:
/// no staged part under this key`. It carries no file paths and no SQL.
pub struct StorageError {
    kind: ErrorKind,
    op: &'static str,
    part: Option<String>,
    message: String,
    source: Option<Source>,
}

impl StorageError {
    /// Creates an error of `kind` for operation `op` with a message.
    pub fn new(kind: ErrorKind, op: &'static str, message: impl Into<String>) -> Self {
        StorageError {
            kind,
            op,
            part: None,
            message: message.into(),
            source: None,
        }
    }

    /// Names the part the error concerns (a key's display form).
    pub fn with_part(mut self, part: impl fmt::Display) -> Self {
        self.part = Some(part.to_string());
        self
    }

    /// Attaches the underlying cause, kept for logs and `source()`.
    pub fn with_source(mut self, source: impl Into<Source>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Replaces the operation name (used where a lower layer did not know it).
    pub(crate) fn in_op(mut self, op: &'static str) -> Self {
        self.op = op;
        self
    }

    /// Sets the part unless one is already named.
    pub(crate) fn or_part(mut self, part: impl fmt::Display) -> Self {
        if self.part.is_none() {
            self.part = Some(part.to_string());
        }
        self
    }

    pub(crate) fn not_found(op: &'static str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, op, message)
    }
    pub(crate) fn conflict(op: &'static str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, op, message)
    }
    pub(crate) fn invalid(op: &'static str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, op, message)
    }
    pub(crate) fn unavailable(op: &'static str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, op, message)
    }
    pub(crate) fn corrupt(op: &'static str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, op, message)
    }
    pub(crate) fn internal(op: &'static str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, op, message)
    }

    /// The category of this error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    /// The operation that failed, e.g. `"finalize_part"`.
    pub fn operation(&self) -> &'static str {
        self.op
    }
    /// The part the error concerns, in a key's display form, if any.
    pub fn part(&self) -> Option<&str> {
        self.part.as_deref()
    }
    /// The message, without operation and part.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The part is missing, unfinished or deleted.
    pub fn is_not_found(&self) -> bool {
        self.kind == ErrorKind::NotFound
    }
    /// The caller was fenced out by a higher token.
    pub fn is_conflict(&self) -> bool {
        self.kind == ErrorKind::Conflict
    }
    /// The arguments were invalid; nothing was changed.
    pub fn is_invalid_input(&self) -> bool {
        self.kind == ErrorKind::InvalidInput
    }
    /// A transient failure: retrying the operation may succeed.
    pub fn is_unavailable(&self) -> bool {
        self.kind == ErrorKind::Unavailable
    }
    /// Stored data failed verification.
    pub fn is_corrupt(&self) -> bool {
        self.kind == ErrorKind::Corrupt
    }
    /// Any other failure.
    pub fn is_internal(&self) -> bool {
        self.kind == ErrorKind::Internal
    }

    /// Recovers a `StorageError` carried inside an `io::Error` (as the
    /// writer and reader return them), or wraps a foreign I/O error as
    /// internal.
    pub fn from_io(op: &'static str, err: std::io::Error) -> Self {
        if err.get_ref().is_some_and(|e| e.is::<StorageError>()) {
            match err.into_inner().map(|e| e.downcast::<StorageError>()) {
                Some(Ok(e)) => return *e,
                Some(Err(other)) => {
                    return Self::internal(op, "I/O error").with_source(other);
                }
                None => unreachable!("checked get_ref above"),
            }
        }
        let kind = match err.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData => {
                ErrorKind::InvalidInput
            }
            std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::Interrupted => ErrorKind::Unavailable,
            _ => ErrorKind::Internal,
        };
        Self::new(kind, op, format!("I/O error: {}", err.kind())).with_source(err)
    }
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.op)?;
        if let Some(part) = &self.part {
            write!(f, " of {part}")?;
        }
        write!(f, ": {}: {}", self.kind.label(), self.message)
    }
}

impl fmt::Debug for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("StorageError");
        d.field("kind", &self.kind)
            .field("op", &self.op)
            .field("part", &self.part)
            .field("message", &self.message);
        if let Some(s) = &self.source {
            d.field("source", &s.to_string());
        }
        d.finish()
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|s| s.as_ref() as &(dyn std::error::Error + 'static))
    }
}

impl From<StorageError> for std::io::Error {
    /// Wraps the error so that [`StorageError::from_io`] can recover it; the
    /// I/O kind follows the category.
    fn from(err: StorageError) -> Self {
        let kind = match err.kind {
            ErrorKind::NotFound => std::io::ErrorKind::NotFound,
            ErrorKind::InvalidInput => std::io::ErrorKind::InvalidInput,
            ErrorKind::Corrupt => std::io::ErrorKind::InvalidData,
            ErrorKind::Unavailable => std::io::ErrorKind::TimedOut,
            ErrorKind::Conflict | ErrorKind::Internal => std::io::ErrorKind::Other,
        };
        std::io::Error::new(kind, err)
    }
}

/// Maps a SQLite error into a category, in one place. The SQLite message is
/// kept only as the source: it may quote SQL.
pub(crate) fn from_sqlite(op: &'static str, err: rusqlite::Error) -> StorageError {
    use rusqlite::ErrorCode as C;
    if let rusqlite::Error::SqliteFailure(e, _) = &err {
        let (kind, msg) = match e.code {
            C::DatabaseBusy | C::DatabaseLocked => {
                (ErrorKind::Unavailable, "the database stayed busy")
            }
            C::DiskFull => (ErrorKind::Internal, "the database or disk is full"),
            C::ReadOnly => (ErrorKind::Internal, "the database is read-only"),
            C::CannotOpen => (ErrorKind::Internal, "the database file cannot be opened"),
            C::NotADatabase => (ErrorKind::Internal, "the file is not a SQLite database"),
            C::DatabaseCorrupt => (ErrorKind::Corrupt, "the database file is malformed"),
            C::SystemIoFailure => (ErrorKind::Internal, "a disk I/O error occurred"),
            C::OutOfMemory => (ErrorKind::Internal, "SQLite ran out of memory"),
            C::ConstraintViolation => (ErrorKind::Internal, "a database constraint failed"),
            _ => (ErrorKind::Internal, "a database error occurred"),
        };
        return StorageError::new(kind, op, msg).with_source(err);
    }
    StorageError::internal(op, "a database error occurred").with_source(err)
}

/// Maps a connection-pool failure: the pool gave no connection in time.
pub(crate) fn from_pool(op: &'static str, err: r2d2::Error) -> StorageError {
    StorageError::unavailable(op, "no database connection became free in time").with_source(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_round_trip_keeps_category_and_message() {
        let e = StorageError::conflict("open_writer", "fenced out").with_part("t/j");
        let io: std::io::Error = e.into();
        let back = StorageError::from_io("finalize_part", io);
        assert!(back.is_conflict());
        assert_eq!(back.operation(), "open_writer");
        assert_eq!(back.part(), Some("t/j"));
        assert_eq!(back.to_string(), "open_writer of t/j: conflict: fenced out");
    }

    #[test]
    fn foreign_io_errors_get_a_category() {
        let e = StorageError::from_io("x", std::io::Error::other("boom"));
        assert!(e.is_internal());
        let e = StorageError::from_io("x", std::io::ErrorKind::TimedOut.into());
        assert!(e.is_unavailable());
    }

    #[test]
    fn sqlite_messages_stay_out_of_display() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let err = conn
            .execute("SELECT * FROM secret_table_name", [])
            .unwrap_err();
        let e = from_sqlite("part_info", err);
        assert!(e.is_internal());
        assert!(!e.to_string().contains("secret_table_name"));
        assert!(std::error::Error::source(&e)
            .unwrap()
            .to_string()
            .contains("secret_table_name"));
    }
}
