//! Whether the store answers: [`check_health`], for a health route such as
//! `export-store serve --metrics-addr`'s `GET /healthz`.

use std::time::Duration;

use crate::error::{from_sqlite, StorageError, StorageResult};
use crate::store::sql;
use crate::SqliteOutputStore;

/// How long [`check_health`] waits for the database before it reports it
/// unavailable: less than the store's busy timeout, and than the probe
/// timeouts of common orchestrators.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads the database's header (page size, page count, free pages) through
/// the store's read pool, as any download's first read would: `Ok` when it
/// answered within [`HEALTH_TIMEOUT`]. Fails when the file was removed or
/// replaced under the store, when another process holds it locked, when no
/// pooled connection comes free, or when SQLite reports an error; the
/// error's message says which, without file paths or SQL.
pub async fn check_health(store: &SqliteOutputStore) -> StorageResult<()> {
    let op = "health";
    let read = store
        .db()
        .read(op, move |c| sql::pages(c).map_err(|e| from_sqlite(op, e)));
    match tokio::time::timeout(HEALTH_TIMEOUT, read).await {
        Ok(answer) => answer.map(|_| ()),
        Err(_) => Err(StorageError::unavailable(
            op,
            format!(
                "the database did not answer within {} s",
                HEALTH_TIMEOUT.as_secs()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_removed_database_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let store = SqliteOutputStore::open(&path, "http://h").unwrap();
        check_health(&store).await.unwrap();
        std::fs::remove_file(&path).unwrap();
        let e = check_health(&store).await.unwrap_err();
        assert!(e.to_string().contains("removed or replaced"), "{e}");
        assert!(!e.to_string().contains(dir.path().to_str().unwrap()), "{e}");
    }
}
