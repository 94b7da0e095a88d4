//! What a store holds, as an operator (or a tool that copies parts out)
//! sees it: tenants, jobs and parts with their states and sizes, and the
//! database file's own figures.
//!
//! What a caller may rely on is on the `impl` block below.

use std::path::Path;

use super::maintenance::SpaceStats;
use super::sql::{self, ListScope, ListedPart, ListedTotals};
use super::SqliteOutputStore;
use crate::error::{from_sqlite, StorageResult};
use crate::key::{check_id, ExportJobId, ExportPartKey};
use crate::store::digest::DigestAlgorithm;

/// Which parts a listing covers. The default covers every part of every
/// tenant, staged and finished.
///
/// Build it with [`PartFilter::default`] and the builder methods (or a
/// literal ending in `..PartFilter::default()`), so that a field added
/// later does not break your code.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartFilter {
    /// Only this tenant's parts (exactly this tenant: `acme` is not
    /// `acme/research`).
    pub tenant: Option<String>,
    /// Only parts of this job (within [`tenant`](Self::tenant) if set,
    /// else of any tenant).
    pub job: Option<ExportJobId>,
    /// Only finished parts: the ones a reader can read.
    pub finished_only: bool,
}

impl PartFilter {
    /// Every part (the default).
    pub fn all() -> Self {
        Self::default()
    }

    /// Only `tenant`'s parts.
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    /// Only parts of `job`.
    pub fn job(mut self, job: impl Into<ExportJobId>) -> Self {
        self.job = Some(job.into());
        self
    }

    /// Only finished parts.
    pub fn finished_only(mut self) -> Self {
        self.finished_only = true;
        self
    }

    /// Checks the ids as the store checks a key's, then borrows them.
    fn scope(&self, op: &'static str) -> StorageResult<ListScope<'_>> {
        if let Some(t) = &self.tenant {
            check_id(op, "tenant id", t)?;
        }
        if let Some(j) = &self.job {
            check_id(op, "job id", j.as_str())?;
        }
        Ok(ListScope {
            tenant: self.tenant.as_deref(),
            job: self.job.as_ref().map(ExportJobId::as_str),
            finished_only: self.finished_only,
        })
    }
}

/// One part (one key, fencing token included) as
/// [`list_parts`](SqliteOutputStore::list_parts) reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartSummary {
    /// The part's key, fencing token included: what `open_reader` takes.
    pub key: ExportPartKey,
    /// Finished (readable, immutable) rather than staged (a writer at
    /// work, or one that died: `reclaim_abandoned` removes those).
    pub finished: bool,
    /// Lines (resources) recorded at finalize; `None` while staged.
    pub line_count: Option<u64>,
    /// NDJSON bytes: recorded at finalize for a finished part; for a staged
    /// part, the bytes stored so far (a writer may hold a few chunks more).
    pub byte_count: u64,
    /// Compressed bytes (the stored zstd frames), likewise.
    pub stored_bytes: u64,
    /// Chunks (zstd frames), likewise.
    pub chunk_count: u64,
    /// When the part was opened, Unix milliseconds.
    pub created_at_ms: i64,
    /// When the part was finalized, Unix milliseconds.
    pub finished_at_ms: Option<i64>,
    /// When the part last received chunks while it was staged, Unix
    /// milliseconds (`None` before its first chunk; a finished part keeps
    /// the value it had, and a part copied by
    /// [`mirror_from`](crate::SqliteOutputStore::mirror_from) has none).
    pub touched_at_ms: Option<i64>,
    /// The content digest of a finished part, lowercase hex in
    /// [`digest_algorithm`](Self::digest_algorithm): what
    /// [`PartInfo::digest`](crate::PartInfo::digest) reports (what
    /// `xxhsum -H2`, `b3sum` or `sha256sum` prints for the NDJSON).
    pub digest: Option<String>,
    /// The algorithm of [`digest`](Self::digest), once finished.
    pub digest_algorithm: Option<DigestAlgorithm>,
}

impl From<ListedPart> for PartSummary {
    fn from(p: ListedPart) -> Self {
        let (digest, digest_algorithm) = match p.digest {
            Some((hex, algorithm)) => (Some(hex), Some(algorithm)),
            None => (None, None),
        };
        PartSummary {
            key: p.key,
            finished: p.finished,
            line_count: p.line_count,
            byte_count: p.byte_count,
            stored_bytes: p.stored_bytes,
            chunk_count: p.chunk_count,
            created_at_ms: p.created_at_ms,
            finished_at_ms: p.finalized_at_ms,
            touched_at_ms: p.touched_at_ms,
            digest,
            digest_algorithm,
        }
    }
}

/// The totals of a group of parts (a job's, a tenant's), every token
/// counted: a slot rewritten under a later claim counts once per token
/// until `prune_superseded` or a delete removes the older ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartTotals {
    /// Parts, staged and finished.
    pub parts: u64,
    /// Finished parts.
    pub finished_parts: u64,
    /// Staged parts.
    pub staged_parts: u64,
    /// Lines of the finished parts.
    pub line_count: u64,
    /// NDJSON bytes (see [`PartSummary::byte_count`]: staged parts count
    /// what they have stored so far).
    pub byte_count: u64,
    /// Compressed bytes, likewise.
    pub stored_bytes: u64,
    /// Chunks, likewise.
    pub chunk_count: u64,
    /// When the group's first part was opened, Unix milliseconds.
    pub first_created_at_ms: i64,
    /// When the group's latest part was finalized, Unix milliseconds.
    pub last_finished_at_ms: Option<i64>,
    /// The group's latest change (a part opened, written to or finalized),
    /// Unix milliseconds.
    pub last_active_at_ms: i64,
}

impl From<&ListedTotals> for PartTotals {
    fn from(t: &ListedTotals) -> Self {
        PartTotals {
            parts: t.parts,
            finished_parts: t.finished_parts,
            staged_parts: t.parts - t.finished_parts,
            line_count: t.line_count,
            byte_count: t.byte_count,
            stored_bytes: t.stored_bytes,
            chunk_count: t.chunk_count,
            first_created_at_ms: t.first_created_at_ms,
            last_finished_at_ms: t.last_finalized_at_ms,
            last_active_at_ms: t.last_active_at_ms,
        }
    }
}

/// One tenant, as [`list_tenants`](SqliteOutputStore::list_tenants)
/// reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TenantSummary {
    /// The tenant id.
    pub tenant: String,
    /// Jobs with at least one part in the listing.
    pub jobs: u64,
    /// The tenant's parts in the listing, summed.
    pub totals: PartTotals,
}

/// One job of one tenant, as [`list_jobs`](SqliteOutputStore::list_jobs)
/// reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct JobSummary {
    /// The job's tenant.
    pub tenant: String,
    /// The job id.
    pub job: ExportJobId,
    /// The job's parts in the listing, summed.
    pub totals: PartTotals,
}

/// The database file's figures (see
/// [`file_stats`](SqliteOutputStore::file_stats)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileStats {
    /// Pages and free pages, as [`space`](SqliteOutputStore::space)
    /// reports them.
    pub space: SpaceStats,
    /// The database file's size on disk. It can differ from
    /// [`SpaceStats::database_bytes`] while the write-ahead log holds
    /// changes not yet copied back.
    pub file_bytes: u64,
    /// The write-ahead log's size on disk (the `-wal` file beside the
    /// database; 0 when there is none). An idle store truncates it.
    pub wal_bytes: u64,
}

/// Listing: what the store holds, for an operator (`export-store ls`) or a
/// tool that copies parts out.
///
/// What a caller may rely on:
///
/// - each call is one read query on the read pool (a consistent snapshot:
///   a part finalized meanwhile is either listed as finished or not yet,
///   never half) and never reads or decompresses a chunk's frame, so it
///   costs the same whatever the parts' sizes;
/// - parts come ordered by tenant, job, file type, resource type, part
///   index and fencing token (a staged version of a key before its
///   finished one); tenants and jobs in id order;
/// - a part listed as finished can be read with `open_reader` under its
///   key until it is deleted or pruned (listing holds nothing: a delete
///   may win the race, and the read is then not found);
/// - every token of a slot is listed: use the highest finished token of a
///   slot for what a download serves;
/// - filter ids are checked as keys are (an empty or over-long id, or one
///   with a control character, is invalid input); an id that matches
///   nothing gives an empty list.
impl SqliteOutputStore {
    /// The parts `filter` covers, in key order (see above). Staged parts
    /// report what they have stored so far.
    pub async fn list_parts(&self, filter: &PartFilter) -> StorageResult<Vec<PartSummary>> {
        let op = "list_parts";
        filter.scope(op)?;
        let filter = filter.clone();
        self.db()
            .read(op, move |c| {
                let scope = filter.scope(op)?;
                let parts = sql::list_parts(c, &scope).map_err(|e| from_sqlite(op, e))?;
                Ok(parts.into_iter().map(PartSummary::from).collect())
            })
            .await
    }

    /// The jobs with parts `filter` covers, each with its totals, in tenant
    /// and job order.
    pub async fn list_jobs(&self, filter: &PartFilter) -> StorageResult<Vec<JobSummary>> {
        let op = "list_jobs";
        let rows = self.totals(op, filter, true).await?;
        Ok(rows
            .iter()
            .map(|t| JobSummary {
                tenant: t.tenant.clone(),
                job: ExportJobId::from_string(t.job.clone().unwrap_or_default()),
                totals: PartTotals::from(t),
            })
            .collect())
    }

    /// The tenants with parts `filter` covers, each with its job count and
    /// totals, in tenant order.
    pub async fn list_tenants(&self, filter: &PartFilter) -> StorageResult<Vec<TenantSummary>> {
        let op = "list_tenants";
        let rows = self.totals(op, filter, false).await?;
        Ok(rows
            .iter()
            .map(|t| TenantSummary {
                tenant: t.tenant.clone(),
                jobs: t.jobs,
                totals: PartTotals::from(t),
            })
            .collect())
    }

    /// The database file's pages, free pages, size on disk and write-ahead
    /// log size.
    pub async fn file_stats(&self) -> StorageResult<FileStats> {
        let op = "file_stats";
        let path = self.path().to_path_buf();
        self.db()
            .read(op, move |c| {
                let (page_size, page_count, free_pages) =
                    sql::pages(c).map_err(|e| from_sqlite(op, e))?;
                Ok(FileStats {
                    space: SpaceStats {
                        page_size,
                        page_count,
                        free_pages,
                    },
                    file_bytes: size_on_disk(&path),
                    wal_bytes: size_on_disk(&wal_path(&path)),
                })
            })
            .await
    }

    async fn totals(
        &self,
        op: &'static str,
        filter: &PartFilter,
        by_job: bool,
    ) -> StorageResult<Vec<ListedTotals>> {
        filter.scope(op)?;
        let filter = filter.clone();
        self.db()
            .read(op, move |c| {
                let scope = filter.scope(op)?;
                sql::list_totals(c, &scope, by_job).map_err(|e| from_sqlite(op, e))
            })
            .await
    }
}

/// SQLite's write-ahead log beside `db`: the same name with `-wal`.
fn wal_path(db: &Path) -> std::path::PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    name.into()
}

/// A file's length, 0 when it is not there (a log truncated and removed).
fn size_on_disk(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_build_and_check_their_ids() {
        let f = PartFilter::all().tenant("acme").job("j1").finished_only();
        assert_eq!(
            f,
            PartFilter {
                tenant: Some("acme".into()),
                job: Some(ExportJobId::from("j1")),
                finished_only: true,
            }
        );
        let scope = f.scope("t").unwrap();
        assert_eq!(
            (scope.tenant, scope.job, scope.finished_only),
            (Some("acme"), Some("j1"), true)
        );
        assert!(PartFilter::all()
            .tenant("")
            .scope("t")
            .unwrap_err()
            .is_invalid_input());
        assert!(PartFilter::all()
            .job("a\nb")
            .scope("t")
            .unwrap_err()
            .is_invalid_input());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_store_lists_what_it_holds() {
        use crate::contract::ExportOutputStore;
        let store = SqliteOutputStore::temporary("http://h").unwrap();
        let done = ExportPartKey::output("acme", ExportJobId::from("j"), "Patient", 0, 1);
        let mut w = store.open_writer(&done).await.unwrap();
        w.write_line("{\"resourceType\":\"Patient\"}")
            .await
            .unwrap();
        store.finalize_part(&done, w).await.unwrap();
        let staged = ExportPartKey::output("acme", ExportJobId::from("k"), "Patient", 0, 1);
        let _open = store.open_writer(&staged).await.unwrap();

        let parts = store.list_parts(&PartFilter::all()).await.unwrap();
        assert_eq!(parts.len(), 2);
        let info = store.part_info(&done).await.unwrap();
        let p = &parts[0];
        assert_eq!((&p.key, p.finished, p.line_count), (&done, true, Some(1)));
        assert_eq!(
            (p.byte_count, p.stored_bytes),
            (info.size_bytes, info.stored_bytes)
        );
        assert_eq!(p.digest.as_deref(), Some(info.digest.as_str()));
        assert_eq!(p.digest_algorithm, Some(info.digest_algorithm));
        assert_eq!((&parts[1].key, parts[1].finished), (&staged, false));
        let finished = PartFilter::all().finished_only();
        assert_eq!(store.list_parts(&finished).await.unwrap().len(), 1);

        let jobs = store.list_jobs(&PartFilter::all()).await.unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!((jobs[0].job.as_str(), jobs[0].totals.line_count), ("j", 1));
        assert_eq!(jobs[1].totals.staged_parts, 1);
        let tenants = store.list_tenants(&PartFilter::all()).await.unwrap();
        assert_eq!(tenants.len(), 1);
        assert_eq!((tenants[0].jobs, tenants[0].totals.parts), (2, 2));
        assert!(store
            .list_parts(&PartFilter::all().tenant(""))
            .await
            .unwrap_err()
            .is_invalid_input());

        let file = store.file_stats().await.unwrap();
        assert!(file.space.page_count > 0);
        assert!(file.file_bytes > 0);
    }

    #[test]
    fn the_log_sits_beside_the_database() {
        assert_eq!(
            wal_path(Path::new("/x/export-store.db")),
            Path::new("/x/export-store.db-wal")
        );
        assert_eq!(size_on_disk(Path::new("/no/such/file")), 0);
    }
}
