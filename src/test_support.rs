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
    pub use crate::store::codec::{compress, decompress_into, FrameCompressor};
}

/// The migrations and the schema version: files of an older or newer
/// schema.
pub mod schema {
    pub use crate::store::schema::{MIGRATIONS, SCHEMA_VERSION};
}

/// The crash-test seam (feature `failpoints`): the variable that arms a
/// point, every point's name, and the variable that weakens the finalize's
/// sync.
pub mod failpoint {
    pub use crate::store::failpoint::{ENV, FINALIZE_SYNC_ENV, POINTS};
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

/// A big store in seconds: finished parts published straight into a
/// store's file, many in one transaction, as `finalize_part` records them
/// (one chunk each, with a real frame and digest, so reads and `verify`
/// pass), for tests of listings over 100,000 parts.
pub mod bulk {
    use std::path::Path;
    use std::time::Duration;

    use crate::store::digest::{ContentDigest, DigestAlgorithm};
    use crate::store::{codec, schema, sql};
    use crate::ExportPartKey;

    /// Publishes one finished part per key into the store file at `db`
    /// (opened as a store once before, so that its schema is there), each
    /// holding `ndjson` (`lines` lines, not empty) as one chunk, finalized
    /// at `now_ms`, in one transaction. Keys must be new. Returns how many
    /// parts were written.
    pub fn insert_finished(
        db: &Path,
        keys: impl IntoIterator<Item = ExportPartKey>,
        ndjson: &[u8],
        lines: u64,
        now_ms: i64,
    ) -> Result<u64, Box<dyn std::error::Error>> {
        assert!(!ndjson.is_empty(), "a part of one chunk holds bytes");
        let frame = codec::compress(ndjson, 3)?;
        let digest = ContentDigest::hex_of(DigestAlgorithm::CURRENT, ndjson);
        let mut c = rusqlite::Connection::open(db)?;
        schema::configure(&c, Duration::from_secs(10))?;
        let tx = c.transaction()?;
        let mut written = 0;
        for key in keys {
            let id = sql::insert_staged(&tx, &key, now_ms)?;
            sql::insert_chunk(&tx, id, 0, 0, ndjson.len() as u64, &frame)?;
            let published = sql::Publish {
                line_count: lines,
                byte_count: ndjson.len() as u64,
                stored_bytes: frame.len() as u64,
                chunk_count: 1,
                digest: &digest,
                digest_algorithm: DigestAlgorithm::CURRENT,
                now_ms,
            };
            sql::publish(&tx, id, &published)?;
            written += 1;
        }
        tx.commit()?;
        Ok(written)
    }
}
