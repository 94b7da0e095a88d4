//! The test kit: what a test or a benchmark of an `ExportOutputStore` needs,
//! for this crate's store or any other.
//!
//! - `conformance`: the contract as a suite of scenarios any
//!   `ExportOutputStore` can run, and `memory`, the in-memory reference
//!   store that keeps the suite honest (both feature `conformance`);
//! - [`localfs`]: an HFS-style local-filesystem store, the baseline of every
//!   comparison;
//! - [`synthetic`]: a seeded generator of realistic FHIR R4 NDJSON;
//! - `sample.rs`: the loader of the Synthea sample vendored in the
//!   repository (for this crate's own tests and benches; not API).
//!
//! The test kit uses the crate's contract; the local-filesystem store also
//! mints its URLs and recognises its writers with the store's own helpers.
//! Nothing else in the crate uses the test kit.

#[cfg(feature = "conformance")]
pub mod conformance;
pub mod localfs;
#[cfg(feature = "conformance")]
pub mod memory;
pub(crate) mod sample;
pub mod synthetic;
