//! Not API: the internals this crate's own tests, benches and
//! `export-store bench` reach, and nothing else. Hidden from the docs, with
//! no stability promise: anything here may change or go in any release.
//!
//! Each item is here because a test must do what no caller of the store
//! can: write or read the database file directly (as another process, or
//! a writer that died, would have left it), arm a crash point, forge a
//! signed URL, or read the Synthea sample vendored in the repository.

/// Statements run straight on a database file: staging left by a dead
/// writer, fence marks, the file's census.
pub mod sql {
    pub use crate::store::sql::{
        census, insert_chunk, insert_staged, job_fence, token_from_sql, token_to_sql, Census,
    };
}

/// The chunk codec: frames for hand-made staging, and the codec ceiling the
/// benchmarks print beside the store's figures.
pub mod codec {
    pub use crate::store::codec::{compress, decompress_into};
}

/// The migrations and the schema version: files of an older or newer
/// schema.
pub mod schema {
    pub use crate::store::schema::{MIGRATIONS, SCHEMA_VERSION};
}

/// The crash-test seam (feature `failpoints`): the variable that arms a
/// point, and every point's name.
pub mod failpoint {
    pub use crate::store::failpoint::{ENV, POINTS};
}

/// Route paths and URL signatures, to forge and check signed URLs.
pub mod url {
    pub use crate::store::url::{route_path, sign, verify};
}

/// The Synthea sample vendored in the repository (`data/`).
pub mod sample {
    pub use crate::testkit::sample::{
        synthea, synthea_dir, synthea_file, synthea_to_dir, SampleFile,
    };
}
