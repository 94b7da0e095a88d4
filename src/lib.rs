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
mod testkit;

pub use store::{codec, digest, failpoint, maintenance, schema, sql, url};
#[cfg(feature = "conformance")]
pub use testkit::conformance;
#[doc(hidden)]
pub use testkit::sample;
pub use testkit::{localfs, synthetic};

pub use contract::{DownloadUrl, ExportOutputStore, ExportPartWriter, FinalizedPart};
pub use digest::{ContentDigest, DigestAlgorithm};
pub use error::{ErrorKind, StorageError, StorageResult};
pub use key::{
    ExportJobId, ExportPartKey, TenantContext, TenantId, MAX_FILE_TYPE_BYTES, MAX_ID_BYTES,
};
pub use store::options::{StoreOptions, DEFAULT_CHUNK_SIZE, DOWNLOAD_READ_AHEAD, MAX_CHUNK_SIZE};
pub use store::{PartInfo, SqliteOutputStore};

// The README's examples compile and run as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
