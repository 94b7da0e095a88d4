//! One stored chunk read back: its row fetched by one short query, a
//! missing one explained (the part went away: not found; the part lost a
//! chunk: corrupt), its frame decoded. The one read path under the reader,
//! verify and downloads.

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::Connection;

use super::codec;
use super::db::read_blocking;
use super::sql::{self, ChunkRow};
use crate::error::{from_sqlite, StorageError, StorageResult};

type Pool = r2d2::Pool<SqliteConnectionManager>;

/// Fetches and decodes chunk `seq` of part `part_id`.
pub(crate) fn fetch_chunk(pool: &Pool, part_id: i64, seq: u64) -> StorageResult<(u64, Vec<u8>)> {
    fetch_chunk_into(pool, part_id, seq, Vec::new())
}

/// [`fetch_chunk`], decoding into `buf`'s allocation.
fn fetch_chunk_into(
    pool: &Pool,
    part_id: i64,
    seq: u64,
    buf: Vec<u8>,
) -> StorageResult<(u64, Vec<u8>)> {
    let row = read_blocking(pool, "read", |c| fetch_row(c, part_id, seq))?;
    decode(row, buf)
}

/// Chunk `seq` of part `part_id` as stored.
pub(crate) fn fetch_row(c: &Connection, part_id: i64, seq: u64) -> StorageResult<ChunkRow> {
    sql::chunk(c, part_id, seq)
        .map_err(|e| from_sqlite("read", e))?
        .ok_or_else(|| missing_chunk(c, "read", "read", part_id, seq))
}

/// Why chunk `seq` of part `part_id` is not there, for operation `op`
/// (that was `doing` it): the part went away (not found), or the part is
/// there without that chunk (corrupt).
pub(crate) fn missing_chunk(
    c: &Connection,
    op: &'static str,
    doing: &str,
    part_id: i64,
    seq: u64,
) -> StorageError {
    match sql::part_state(c, part_id) {
        Ok(None) => StorageError::not_found(
            op,
            format!("the part was deleted or replaced while it was being {doing}"),
        ),
        Ok(Some(_)) => StorageError::corrupt(op, format!("chunk {seq} of the part is missing")),
        Err(e) => from_sqlite(op, e),
    }
}

/// Decodes a stored chunk into `buf`'s allocation: `(raw_offset, bytes)`.
pub(crate) fn decode(row: ChunkRow, mut buf: Vec<u8>) -> StorageResult<(u64, Vec<u8>)> {
    codec::decompress_into(&row.frame, row.raw_len as usize, &mut buf)
        .map_err(|e| e.in_op("read"))?;
    Ok((row.raw_offset, buf))
}
