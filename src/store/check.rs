//! The running check of one finished part's content against its row, for
//! `verify` (chunks read back through the read pool) and the mirror
//! (frames read from another store file, checked before they are copied).
//!
//! A [`PartCheck`] takes the part's chunks in order and refuses the first
//! one that does not start where the previous one ended; [`PartCheck::finish`]
//! then compares what it saw with what the row recorded at finalize: the
//! number of chunk rows (and that they run without a gap), the content's
//! byte count, the frames' byte count and the content digest. Every refusal
//! is a [`StorageError`] of kind `Corrupt` whose message names what differs.

use super::codec;
use super::digest::{hash_chunk, PartHasher};
use super::sql::{ChunkRow, PartRow};
use crate::error::{StorageError, StorageResult};

/// What the part's chunk rows amount to, as [`PartCheck::finish`] compares
/// them with the part's row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRows {
    /// How many chunk rows the part has.
    pub count: u64,
    /// Whether their sequence numbers run from 0 without a gap.
    pub contiguous: bool,
    /// The bytes their frames take.
    pub stored_bytes: u64,
}

/// One finished part's chunks checked as they come; see the module.
pub struct PartCheck {
    op: &'static str,
    row: PartRow,
    hasher: Option<PartHasher>,
    received: u64,
    stored: u64,
    seen: u64,
    buf: Vec<u8>,
}

impl PartCheck {
    /// A check of the part `row` describes; `op` names the operation in its
    /// errors.
    pub fn new(op: &'static str, row: &PartRow) -> PartCheck {
        PartCheck {
            op,
            row: row.clone(),
            hasher: Some(PartHasher::new(row.digest_algorithm)),
            received: 0,
            stored: 0,
            seen: 0,
            buf: Vec::new(),
        }
    }

    /// The next chunk's content, already decoded, which starts at byte
    /// `offset` of the part.
    pub fn push_content(&mut self, offset: u64, content: &[u8]) -> StorageResult<()> {
        self.expect_offset(offset)?;
        self.take(offset, content)
    }

    /// The next chunk row as stored: refused if it does not start where the
    /// previous one ended, then its frame is decoded (to exactly its
    /// recorded length, or the chunk is refused) and its content checked
    /// as [`PartCheck::push_content`] does; the frame's bytes are counted.
    pub fn push_frame(&mut self, chunk: &ChunkRow) -> StorageResult<()> {
        self.expect_offset(chunk.raw_offset)?;
        let seq = self.seen;
        let mut buf = std::mem::take(&mut self.buf);
        let taken = codec::decompress_into(&chunk.frame, chunk.raw_len as usize, &mut buf)
            .map_err(|e| StorageError::corrupt(self.op, format!("chunk {seq}: {}", e.message())))
            .and_then(|()| self.take(chunk.raw_offset, &buf));
        self.buf = buf;
        taken?;
        self.stored += chunk.frame.len() as u64;
        Ok(())
    }

    fn expect_offset(&self, offset: u64) -> StorageResult<()> {
        if offset == self.received {
            return Ok(());
        }
        Err(StorageError::corrupt(
            self.op,
            format!(
                "chunk {} starts at byte {offset} where byte {} was expected",
                self.seen, self.received
            ),
        ))
    }

    /// Hashes and counts the next chunk's content (its offset checked).
    fn take(&mut self, offset: u64, content: &[u8]) -> StorageResult<()> {
        let alg = self.row.digest_algorithm;
        if let Some(h) = self.hasher.as_mut() {
            h.push(content, hash_chunk(alg, offset, content))?;
        }
        self.received += content.len() as u64;
        self.seen += 1;
        Ok(())
    }

    /// What the chunks pushed so far amount to: as many rows as were
    /// pushed, in sequence, and the frame bytes [`PartCheck::push_frame`]
    /// counted.
    pub fn pushed(&self) -> ChunkRows {
        ChunkRows {
            count: self.seen,
            contiguous: true,
            stored_bytes: self.stored,
        }
    }

    /// Compares the part's chunk rows (`rows`) and the content pushed with
    /// the part's row; the first difference is the error. A check finishes
    /// once: its digest is consumed.
    pub fn finish(&mut self, rows: ChunkRows) -> StorageResult<()> {
        let op = self.op;
        let row = &self.row;
        if rows.count != row.chunk_count || !rows.contiguous {
            return Err(StorageError::corrupt(
                op,
                format!(
                    "the part has {} chunk rows{} where {} were recorded",
                    rows.count,
                    if rows.contiguous {
                        ""
                    } else {
                        " out of sequence"
                    },
                    row.chunk_count
                ),
            ));
        }
        if self.received != row.byte_count {
            return Err(StorageError::corrupt(
                op,
                format!(
                    "the part holds {} bytes where {} were recorded",
                    self.received, row.byte_count
                ),
            ));
        }
        if rows.stored_bytes != row.stored_bytes {
            return Err(StorageError::corrupt(
                op,
                format!(
                    "the part's frames take {} bytes where {} were recorded",
                    rows.stored_bytes, row.stored_bytes
                ),
            ));
        }
        let digest = self.hasher.take().map(PartHasher::finish_hex);
        if digest.as_deref() != Some(row.digest.as_str()) {
            return Err(StorageError::corrupt(
                op,
                format!(
                    "the part's content does not match its recorded {} digest",
                    row.digest_algorithm.label()
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::store::digest::DigestAlgorithm;

    const CONTENT: [&[u8]; 2] = [b"{\"a\":1}\n{\"b\":2}\n", b"{\"c\":3}\n"];

    fn chunks() -> Vec<ChunkRow> {
        let mut offset = 0;
        CONTENT
            .iter()
            .map(|raw| {
                let row = ChunkRow {
                    raw_offset: offset,
                    raw_len: raw.len() as u64,
                    frame: codec::compress(raw, 2).unwrap(),
                };
                offset += raw.len() as u64;
                row
            })
            .collect()
    }

    fn part_row(alg: DigestAlgorithm) -> PartRow {
        let cs = chunks();
        let mut h = PartHasher::new(alg);
        for (raw, c) in CONTENT.iter().zip(&cs) {
            h.push(raw, hash_chunk(alg, c.raw_offset, raw)).unwrap();
        }
        PartRow {
            id: 1,
            fencing_token: 1,
            line_count: 3,
            byte_count: CONTENT.iter().map(|c| c.len() as u64).sum(),
            stored_bytes: cs.iter().map(|c| c.frame.len() as u64).sum(),
            chunk_count: 2,
            digest: h.finish_hex(),
            digest_algorithm: alg,
            finalized_at_ms: 0,
        }
    }

    fn refusal(row: &PartRow, cs: &[ChunkRow], rows: Option<ChunkRows>) -> String {
        let mut check = PartCheck::new("verify", row);
        let e = cs
            .iter()
            .try_for_each(|c| check.push_frame(c))
            .and_then(|()| check.finish(rows.unwrap_or_else(|| check.pushed())))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert!(e.to_string().contains("verify"), "{e}");
        e.message().to_string()
    }

    #[test]
    fn a_whole_part_passes_with_either_digest() {
        for alg in [DigestAlgorithm::Xxh3_128, DigestAlgorithm::Blake3] {
            let row = part_row(alg);
            let mut check = PartCheck::new("mirror", &row);
            for c in &chunks() {
                check.push_frame(c).unwrap();
            }
            let pushed = check.pushed();
            assert_eq!(pushed.count, 2);
            assert_eq!(pushed.stored_bytes, row.stored_bytes);
            check.finish(pushed).unwrap();
        }
    }

    #[test]
    fn each_difference_is_refused_with_what_differs() {
        let row = part_row(DigestAlgorithm::Xxh3_128);
        let cs = chunks();
        // A gap between chunks.
        let m = refusal(&row, &cs[1..], None);
        assert!(m.contains("chunk 0 starts at byte 16 where byte 0"), "{m}");
        // A chunk missing at the end.
        let m = refusal(&row, &cs[..1], None);
        assert!(m.contains("1 chunk rows where 2"), "{m}");
        // Rows out of sequence.
        let rows = ChunkRows {
            count: 2,
            contiguous: false,
            stored_bytes: row.stored_bytes,
        };
        let m = refusal(&row, &cs, Some(rows));
        assert!(m.contains("out of sequence"), "{m}");
        // Frames that take other bytes than recorded.
        let short = PartRow {
            stored_bytes: row.stored_bytes + 1,
            ..row.clone()
        };
        assert!(refusal(&short, &cs, None).contains("frames take"));
        // Content of another length than recorded.
        let long = PartRow {
            byte_count: row.byte_count + 1,
            ..row.clone()
        };
        assert!(refusal(&long, &cs, None).contains("holds 24 bytes where 25"));
        // Content that is not what the digest says.
        let other = PartRow {
            digest: "0".repeat(row.digest.len()),
            ..row.clone()
        };
        assert!(refusal(&other, &cs, None).contains("does not match its recorded"));
        // A frame that does not decode to its recorded length.
        let mut bad = cs.clone();
        bad[1].raw_len += 1;
        assert!(refusal(&row, &bad, None).starts_with("chunk 1:"));
        // A chunk out of place is refused before its frame is decoded.
        let mut bad = cs.clone();
        bad[1].raw_offset += 1;
        bad[1].frame = b"not a frame".to_vec();
        assert!(refusal(&row, &bad, None).contains("chunk 1 starts at byte 17"));
        // A frame that is not zstd at all.
        let mut bad = cs.clone();
        bad[0].frame = b"not a frame".to_vec();
        assert!(refusal(&row, &bad, None).starts_with("chunk 0:"));
    }
}
