//! After a restore: HFS's job records checked against the parts the store
//! holds (feature `helios`).
//!
//! HFS keeps its job state in its own SQLite database (`fhir.db`) and the
//! job's files in this store (`export-output.db`). When the two files are
//! replicated apart (Litestream replicates each database on its own) and
//! restored after a node loss, `fhir.db` can come back from a later moment
//! than the store: HFS then records an export as `complete` whose last
//! parts' finalize commits never reached the replica, and its status URL
//! would hand out a manifest listing files that answer 404.
//!
//! [`check_restored`] finds those jobs, reading `fhir.db` read-only;
//! [`fail_incomplete_exports`] marks them failed the way HFS marks an
//! abandoned export, so that their status URL answers HFS's error (500 with
//! an `OperationOutcome` naming the cause) and the client starts the export
//! again. `export-store hfs` runs both before it serves.
//!
//! # How HFS's file rows map to part keys
//!
//! As HFS 0.2.7's download routes do (helios-persistence,
//! `backends/sqlite/bulk_export.rs` `get_export_file_metadata` and
//! `get_export_manifest`; helios-rest, `handlers/bulk_export.rs`
//! `export_download_handler`), and as the crate's adapter converts them,
//! field for field:
//!
//! - a `bulk_export_files` row of a `bulk_export_jobs` row is the part
//!   `{tenant_id of the job}/{job_id}/{file_type}/{resource_type}-{part_index}`
//!   under the row's `fencing_token`;
//! - a bulk-submit receipt (`bulk_submit_files`, published by its manifest:
//!   the rows HFS's `list_submit_files` returns) is the part HFS's
//!   `submit_artifact_key` names (job `submission_output_job_id`, the
//!   `submit-v1-…` locator as resource type), or, for a row HFS flags as
//!   legacy (no publishing worker), `{resource_type or OperationOutcome}-{part_index}`
//!   under the submission's job id (helios-rest, `handlers/bulk_submit.rs`
//!   `resolve_submit_artifacts`).
//!
//! HFS opens exactly the row's token. A row whose token is not recorded
//! (`0`: rows written before HFS recorded tokens; HFS's claims start at 1)
//! counts as present when its slot holds a finished part under any token.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use helios_persistence::core::{submission_output_job_id, submit_artifact_key, SubmissionId};
use helios_persistence::tenant::{TenantId as HfsTenantId, TenantPermissions};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::error::from_sqlite;
use crate::{
    ErrorKind, ExportJobId, ExportPartKey, SqliteOutputStore, StorageError, StorageResult,
};

/// One file HFS records for a job that the store does not hold as a
/// finished part.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MissingFile {
    /// The part key HFS's download route would open (the token is `0` when
    /// HFS's row does not record one).
    pub key: ExportPartKey,
}

impl MissingFile {
    /// The file's name as HFS's download URL carries it: for an export,
    /// `{resource_type}-{part_index}` (`/export-file/{job}/{this}`), plus its
    /// file type when that is not `output`; for a bulk-submit receipt, the
    /// key's part segment.
    pub fn name(&self) -> String {
        if self.key.file_type == "output" {
            self.key.part_segment()
        } else {
            format!("{} ({})", self.key.part_segment(), self.key.file_type)
        }
    }
}

impl fmt::Display for MissingFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// An export HFS records as `complete` whose files are not all in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct IncompleteExport {
    /// HFS's job id (`bulk_export_jobs.id`, the `/export-status/{job}`
    /// segment).
    pub job_id: String,
    /// The tenant the job belongs to.
    pub tenant_id: String,
    /// The files HFS records for the job that are not finished parts in the
    /// store, in HFS's manifest order (file type, resource type, part index).
    pub missing: Vec<MissingFile>,
    /// How many files HFS records for the job in all.
    pub files: usize,
}

impl IncompleteExport {
    /// The `error_message` [`fail_incomplete_exports`] records for the job:
    /// what HFS's status URL then answers as the `OperationOutcome`'s
    /// diagnostics. Names up to ten missing files.
    pub fn error_message(&self) -> String {
        format!(
            "export output lost: the output store was restored to an earlier moment than the job \
             database, and {} of the job's {} files are missing ({}); start the export again",
            self.missing.len(),
            self.files,
            file_list(&self.missing, 10),
        )
    }
}

/// A bulk submission whose published receipts or outputs are not all in the
/// store.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct IncompleteSubmission {
    /// The tenant the submission belongs to.
    pub tenant_id: String,
    /// The submitter (`bulk_submissions.submitter`).
    pub submitter: String,
    /// The submission id (`bulk_submissions.submission_id`).
    pub submission_id: String,
    /// The submission's status in HFS (`bulk_submissions.status`).
    pub status: String,
    /// The published files that are not finished parts in the store.
    pub missing: Vec<MissingFile>,
    /// How many published files HFS records for the submission in all.
    pub files: usize,
}

/// What [`check_restored`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RestoreReport {
    /// Exports HFS records as `complete` that were checked.
    pub exports_checked: usize,
    /// Of those, the ones with files missing from the store, by job id.
    pub exports: Vec<IncompleteExport>,
    /// Bulk submissions with published files that were checked.
    pub submissions_checked: usize,
    /// Of those, the ones with files missing from the store.
    pub submissions: Vec<IncompleteSubmission>,
}

impl RestoreReport {
    /// `true` when every checked job's files are all in the store.
    pub fn is_consistent(&self) -> bool {
        self.exports.is_empty() && self.submissions.is_empty()
    }
}

/// The first `max` names of `files`, and how many more there are.
pub(crate) fn file_list(files: &[MissingFile], max: usize) -> String {
    let mut names: Vec<String> = files.iter().take(max).map(MissingFile::name).collect();
    if files.len() > max {
        names.push(format!("and {} more", files.len() - max));
    }
    names.join(", ")
}

const OP: &str = "check_restored";

/// Checks HFS's job records in `fhir_db` (HFS 0.2.7's SQLite database)
/// against the finished parts of `store`.
///
/// Returns every export HFS records as `complete` and every bulk submission
/// with published files (receipts, outputs) whose files are not all
/// finished parts in the store, with the files that are missing (see the
/// [module docs](self) for how HFS's rows map to part keys). Jobs in any
/// other state are not looked at: HFS serves no files for them.
///
/// `fhir_db` is opened read-only (HFS may be running on it) and never
/// changed; the store is only read. A database without HFS's bulk tables
/// reports nothing. Errors: `fhir_db` missing is `NotFound`; a database
/// that cannot be read, or a store that cannot answer, is the error's own
/// category. Must be called inside a Tokio runtime.
pub async fn check_restored(
    fhir_db: &Path,
    store: &SqliteOutputStore,
) -> StorageResult<RestoreReport> {
    let rows = read_fhir_db(fhir_db)?;
    let mut report = RestoreReport {
        exports_checked: rows.exports.len(),
        submissions_checked: rows.submissions.len(),
        ..RestoreReport::default()
    };
    for ((tenant_id, job_id), keys) in rows.exports {
        let missing = missing_of(store, &keys).await?;
        if !missing.is_empty() {
            report.exports.push(IncompleteExport {
                job_id,
                tenant_id,
                missing,
                files: keys.len(),
            });
        }
    }
    for ((tenant_id, submitter, submission_id), (status, keys)) in rows.submissions {
        let missing = missing_of(store, &keys).await?;
        if !missing.is_empty() {
            report.submissions.push(IncompleteSubmission {
                tenant_id,
                submitter,
                submission_id,
                status,
                missing,
                files: keys.len(),
            });
        }
    }
    Ok(report)
}

/// Marks each export of `report` failed in `fhir_db`, in one transaction,
/// the way HFS marks an export it abandons (helios-persistence 0.2.7,
/// `claim_next`): `status = 'error'`, `error_message` =
/// [`IncompleteExport::error_message`], `completed_at` = now (RFC 3339, as
/// HFS writes it), `current_type`, `worker_id` and `lease_expiry` cleared.
/// HFS's status URL then answers 500 with an `OperationOutcome` carrying
/// that message, and HFS's output sweep removes the job after its output
/// TTL as it does every failed job.
///
/// Only a job still `complete` of the same tenant is changed; returns the
/// exports that were. With an empty report the database is not opened
/// (nothing is written). Bulk submissions are reported by
/// [`check_restored`] but never changed: HFS has no failed state for a
/// submission whose receipts were published.
pub fn fail_incomplete_exports(
    fhir_db: &Path,
    report: &RestoreReport,
) -> StorageResult<Vec<IncompleteExport>> {
    const OP: &str = "fail_incomplete_exports";
    if report.exports.is_empty() {
        return Ok(Vec::new());
    }
    let mut conn = Connection::open_with_flags(
        fhir_db,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| from_sqlite(OP, e))?;
    conn.busy_timeout(std::time::Duration::from_secs(30))
        .map_err(|e| from_sqlite(OP, e))?;
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(|e| from_sqlite(OP, e))?;
    let now = chrono::Utc::now().to_rfc3339();
    let mut failed = Vec::new();
    for job in &report.exports {
        let changed = tx
            .execute(
                "UPDATE bulk_export_jobs
                 SET status = 'error', error_message = ?1, completed_at = ?2,
                     current_type = NULL, worker_id = NULL, lease_expiry = NULL
                 WHERE id = ?3 AND tenant_id = ?4 AND status = 'complete'",
                params![job.error_message(), now, job.job_id, job.tenant_id],
            )
            .map_err(|e| from_sqlite(OP, e))?;
        if changed == 1 {
            failed.push(job.clone());
        }
    }
    tx.commit().map_err(|e| from_sqlite(OP, e))?;
    Ok(failed)
}

/// The parts HFS records, read from `fhir.db`.
#[derive(Default)]
struct Recorded {
    /// Complete exports: (tenant, job) → their files' keys.
    exports: BTreeMap<(String, String), Vec<ExportPartKey>>,
    /// Submissions with published files: (tenant, submitter, submission)
    /// → (status, their files' keys).
    submissions: BTreeMap<(String, String, String), (String, Vec<ExportPartKey>)>,
}

fn read_fhir_db(path: &Path) -> StorageResult<Recorded> {
    if !path.exists() {
        return Err(StorageError::not_found(
            OP,
            "HFS's database does not exist (a fresh data folder)",
        ));
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| from_sqlite(OP, e))?;
    conn.busy_timeout(std::time::Duration::from_secs(30))
        .map_err(|e| from_sqlite(OP, e))?;
    // One read transaction: every row comes from one moment of the file.
    conn.execute_batch("BEGIN")
        .map_err(|e| from_sqlite(OP, e))?;
    let mut recorded = Recorded::default();
    let sql = |e| from_sqlite(OP, e);
    if has_table(&conn, "bulk_export_jobs")? && has_table(&conn, "bulk_export_files")? {
        let mut jobs = conn
            .prepare("SELECT id, tenant_id FROM bulk_export_jobs WHERE status = 'complete'")
            .map_err(sql)?;
        let jobs: Vec<(String, String)> = jobs
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|rows| rows.collect())
            .map_err(sql)?;
        // As HFS's `get_export_manifest` lists them.
        let mut files = conn
            .prepare(
                "SELECT resource_type, file_type, part_index, fencing_token
                 FROM bulk_export_files WHERE job_id = ?1
                 ORDER BY file_type, resource_type, part_index",
            )
            .map_err(sql)?;
        for (job_id, tenant_id) in jobs {
            let keys: Vec<ExportPartKey> = files
                .query_map([&job_id], |r| {
                    Ok(ExportPartKey {
                        tenant_id: tenant_id.clone(),
                        job_id: ExportJobId::from_string(job_id.as_str()),
                        resource_type: r.get(0)?,
                        file_type: r.get(1)?,
                        part_index: r.get::<_, i64>(2)? as u32,
                        fencing_token: r.get::<_, Option<i64>>(3)?.unwrap_or(0) as u64,
                    })
                })
                .and_then(|rows| rows.collect())
                .map_err(sql)?;
            recorded.exports.insert((tenant_id, job_id), keys);
        }
    }
    if has_table(&conn, "bulk_submit_files")?
        && has_table(&conn, "bulk_manifests")?
        && has_table(&conn, "bulk_submissions")?
    {
        read_submissions(&conn, &mut recorded)?;
    }
    conn.execute_batch("COMMIT").map_err(sql)?;
    Ok(recorded)
}

/// The published submit files, as HFS's `list_submit_files` selects them,
/// keyed as its `resolve_submit_artifacts` keys them.
fn read_submissions(conn: &Connection, recorded: &mut Recorded) -> StorageResult<()> {
    let sql = |e| from_sqlite(OP, e);
    let mut stmt = conn
        .prepare(
            "SELECT f.tenant_id, f.submitter, f.submission_id, s.status, f.manifest_id,
                    f.file_type, f.resource_type, f.part_index, f.fencing_token,
                    m.publication_worker_id IS NULL
             FROM bulk_submit_files AS f
             INNER JOIN bulk_manifests AS m
               ON m.tenant_id = f.tenant_id
                  AND m.submitter = f.submitter
                  AND m.submission_id = f.submission_id
                  AND m.manifest_id = f.manifest_id
                  AND m.published_token = f.fencing_token
             INNER JOIN bulk_submissions AS s
               ON s.tenant_id = f.tenant_id
                  AND s.submitter = f.submitter
                  AND s.submission_id = f.submission_id
             WHERE f.manifest_id IS NOT NULL
               AND f.publication_excluded_reason IS NULL
               AND m.published_token IS NOT NULL
               AND m.publication_status IN ('completed', 'failed')
             ORDER BY f.id",
        )
        .map_err(sql)?;
    type Row = (
        String,
        String,
        String,
        String,
        String,
        String,
        Option<String>,
        i64,
        i64,
        bool,
    );
    let rows: Vec<Row> = stmt
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
                r.get(8)?,
                r.get(9)?,
            ))
        })
        .and_then(|rows| rows.collect())
        .map_err(sql)?;
    for (
        tenant,
        submitter,
        submission,
        status,
        manifest,
        file_type,
        resource,
        part,
        token,
        legacy,
    ) in rows
    {
        let id = SubmissionId::new(submitter.as_str(), submission.as_str());
        let hfs_tenant = helios_persistence::tenant::TenantContext::new(
            HfsTenantId::new(tenant.as_str()),
            TenantPermissions::full_access(),
        );
        let part_index = part as u32;
        let token = token as u64;
        let key = if legacy {
            helios_persistence::core::bulk_export_output::ExportPartKey {
                tenant_id: tenant.clone(),
                job_id: submission_output_job_id(&id),
                resource_type: resource.unwrap_or_else(|| "OperationOutcome".into()),
                file_type,
                part_index,
                fencing_token: token,
            }
        } else {
            submit_artifact_key(
                &hfs_tenant,
                &id,
                &manifest,
                &file_type,
                resource.as_deref(),
                part_index,
                token,
            )
        };
        let entry = recorded
            .submissions
            .entry((tenant, submitter, submission))
            .or_insert_with(|| (status, Vec::new()));
        entry.1.push(super::convert::key(&key));
    }
    Ok(())
}

fn has_table(conn: &Connection, name: &str) -> StorageResult<bool> {
    conn.query_row(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [name],
        |_| Ok(()),
    )
    .optional()
    .map(|found| found.is_some())
    .map_err(|e| from_sqlite(OP, e))
}

/// The keys of `keys` the store does not hold as finished parts.
async fn missing_of(
    store: &SqliteOutputStore,
    keys: &[ExportPartKey],
) -> StorageResult<Vec<MissingFile>> {
    let mut missing = Vec::new();
    for key in keys {
        let found = if key.fencing_token == 0 {
            store.latest_in_slot(key).await.map(|_| ())
        } else {
            store.part_info(key).await.map(|_| ())
        };
        match found {
            Ok(()) => {}
            // A key the store refuses as invalid is one it can never hold.
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::InvalidInput) => {
                missing.push(MissingFile { key: key.clone() });
            }
            Err(e) => return Err(e),
        }
    }
    Ok(missing)
}
