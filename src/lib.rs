//! A SQLite-backed output store for FHIR bulk export.
//!
//! [`SqliteOutputStore`] implements [`ExportOutputStore`], the trait through
//! which the Helios FHIR Server (HFS) writes `$export` (and bulk submit)
//! NDJSON output: open a writer for a part, write lines, finalize the part,
//! mint a download URL, stream it back, delete a job's (or a tenant's) parts.
//!
//! Parts live in one SQLite file as independent zstd frames of about 1 MiB
//! of NDJSON each, one row per frame, under a parent row keyed by the full
//! part key (fencing token included). Finalizing flips an immutable flag
//! inside one durable transaction; until then nothing of a part is readable.
//! Downloads go through HFS-served URLs, `{base}/export-file/{job}/{Type}-{n}`.
//!
//! ```no_run
//! use std::time::Duration;
//! use sqlite_export_store::{ExportJobId, ExportOutputStore, ExportPartKey, SqliteOutputStore};
//! use tokio::io::AsyncReadExt;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let store = SqliteOutputStore::temporary("http://127.0.0.1:8080")?;
//! let key = ExportPartKey::output("default", ExportJobId::new(), "Patient", 0, 1);
//! let mut writer = store.open_writer(&key).await?;
//! writer.write_line(r#"{"resourceType":"Patient","id":"p1"}"#).await?;
//! let part = store.finalize_part(&key, writer).await?;
//! assert_eq!(part.line_count, 1);
//!
//! let url = store.download_url(&key, Duration::from_secs(3600)).await?;
//! assert!(url.url.ends_with("/Patient-0"));
//!
//! let mut ndjson = String::new();
//! store.open_reader(&key).await?.read_to_string(&mut ndjson).await?;
//! assert_eq!(ndjson, "{\"resourceType\":\"Patient\",\"id\":\"p1\"}\n");
//! # Ok(()) }
//! ```
//!
//! # Public API
//!
//! What the crate promises, by audience. Everything else is private.
//!
//! ## Using the store
//!
//! [`SqliteOutputStore`] and the contract it implements:
//! [`ExportOutputStore`], [`ExportPartWriter`], [`FinalizedPart`],
//! [`DownloadUrl`], and the keys [`ExportPartKey`], [`ExportJobId`],
//! [`TenantContext`], [`TenantId`] (limits: [`MAX_ID_BYTES`],
//! [`MAX_FILE_TYPE_BYTES`]). Its settings: [`StoreOptions`]
//! ([`DEFAULT_CHUNK_SIZE`], [`MAX_CHUNK_SIZE`], [`DOWNLOAD_READ_AHEAD`]).
//! What it reports about a part: [`PartInfo`] and its [`DigestAlgorithm`]
//! ([`ContentDigest`] computes the same digest over bytes you hold). Its
//! errors: [`StorageError`], [`ErrorKind`], [`StorageResult`]. The
//! operator's calls (`reclaim_abandoned`, `prune_superseded`,
//! `reclaim_space`, `space`, `verify`) are methods of the store; they report
//! [`VerifyReport`], [`VerifyProblem`], [`VerifyProgress`], [`SpaceReport`]
//! and [`SpaceStats`], and [`JOB_FENCE_MIN_AGE`] is the least time deleted
//! jobs' fence marks are kept. What the store holds (`list_parts`,
//! `list_jobs`, `list_tenants`, `file_stats`): [`PartFilter`] in,
//! [`PartSummary`], [`JobSummary`], [`TenantSummary`] (with their
//! [`PartTotals`]) and [`FileStats`] out; `open_frames` reads a part as its
//! stored zstd frames (a verified `.zst` stream). Several staged parts are
//! published in one transaction, all or none, by `finalize_parts` (and
//! `finalize_new_job`, for a job that must not exist yet). An online copy
//! of the store: `backup_to` with [`BackupOptions`] ([`DEFAULT_BACKUP_STEP_PAGES`],
//! [`DEFAULT_BACKUP_PAUSE`]), reporting [`BackupProgress`] and a
//! [`BackupReport`].
//!
//! ## The test kit
//!
//! [`testkit`]: `testkit::conformance`, the contract as scenarios any
//! `ExportOutputStore` can run, and `testkit::memory`, the in-memory
//! reference store the suite is checked against (both feature
//! `conformance`); [`testkit::localfs`], the HFS-style local-filesystem
//! store every figure is compared with; [`testkit::synthetic`], a seeded
//! generator of realistic FHIR R4 NDJSON.
//!
//! ## The HTTP server
//!
//! `server` (feature `server`, on by default): `router` and `serve` over a
//! store, configured by `ServerConfig` (`DEFAULT_TENANT`,
//! `MIN_TOKEN_BYTES`, `read_signing_key_file`); `measure_throughput`
//! (`Throughput`, `WireForm`) for a bench report; `server::metrics`
//! (`ServerMetrics`, given to `ServerConfig::with_metrics`, `StoreGauges`,
//! the metric names and buckets) and `check_health` (`HEALTH_TIMEOUT`), for
//! a `/metrics` and `/healthz` of the caller's.
//!
//! ## The HFS adapter
//!
//! `helios` (feature `helios`): with it, [`SqliteOutputStore`] implements
//! HFS's own `helios_persistence::core::bulk_export_output::ExportOutputStore`;
//! `helios::BACKEND_NAME` is the `backend_name` of the errors it returns.
//! `helios::restore` checks HFS's job records (its `fhir.db`) against the
//! store after a restore (`check_restored`, reporting a `RestoreReport`)
//! and fails the exports whose files are missing (`fail_incomplete_exports`).
//!
//! ## Not API
//!
//! The hidden module `__test_support`: the internals this crate's own
//! tests, benches and `export-store bench` reach. No stability promise; it
//! may change in any release.
//!
//! # Layout
//!
//! At the root of `src/`, the contract every part of the crate shares:
//! `contract.rs` (the trait and its types), `key.rs` (keys and their
//! validation), `error.rs` (the error and its categories). Then one folder
//! per layer, each using only the layers below it: `store/` (the SQLite
//! store), and on top of it `server/` (the download route), `testkit/`
//! (suite, reference and baseline stores, generator) and `helios/` (the HFS
//! adapter), which do not use each other.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod contract;
mod error;
#[cfg(feature = "helios")]
pub mod helios;
mod key;
#[cfg(feature = "server")]
pub mod server;
mod store;
pub mod testkit;

#[doc(hidden)]
#[path = "test_support.rs"]
pub mod __test_support;

pub use contract::{DownloadUrl, ExportOutputStore, ExportPartWriter, FinalizedPart};
pub use error::{ErrorKind, StorageError, StorageResult};
pub use key::{
    ExportJobId, ExportPartKey, TenantContext, TenantId, MAX_FILE_TYPE_BYTES, MAX_ID_BYTES,
};
pub use store::backup::{
    BackupOptions, BackupProgress, BackupReport, DEFAULT_BACKUP_PAUSE, DEFAULT_BACKUP_STEP_PAGES,
};
pub use store::digest::{ContentDigest, DigestAlgorithm};
pub use store::finalize::{FinalizeTiming, FINALIZE_TIMINGS_KEPT};
pub use store::listing::{
    FileStats, JobSummary, PartFilter, PartSummary, PartTotals, TenantSummary,
};
pub use store::maintenance::{
    SpaceReport, SpaceStats, VerifyProblem, VerifyProgress, VerifyReport, JOB_FENCE_MIN_AGE,
};
pub use store::mirror::{MirrorReport, MIRROR_BATCH_BYTES};
pub use store::options::{
    Checkpoints, StoreOptions, DEFAULT_CHUNK_SIZE, DEFAULT_COMPRESSION_LEVEL, DOWNLOAD_READ_AHEAD,
    MAX_CHUNK_SIZE,
};
pub use store::{PartInfo, SqliteOutputStore};

// The examples of the README and of docs/ compile and run as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

#[doc = include_str!("../docs/hfs.md")]
#[cfg(doctest)]
pub struct HfsDocDoctests;

#[doc = include_str!("../docs/guarantees.md")]
#[cfg(doctest)]
pub struct GuaranteesDocDoctests;

#[doc = include_str!("../docs/operations.md")]
#[cfg(doctest)]
pub struct OperationsDocDoctests;
