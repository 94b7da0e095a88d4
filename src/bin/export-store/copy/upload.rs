//! Streams one finished part from the store's verifying reader to one S3
//! object, in bounded memory, and publishes the object only after the
//! reader verified the whole part.
//!
//! A part of at most one piece (`part_size`) goes up in one `PUT`, sent
//! after the reader reached its verified end. A larger part goes up in a
//! multipart upload of `part_size` pieces, at most `in_flight` of them on the
//! wire while the next is read, and is completed only after the reader's
//! end; a read error (a damaged chunk, a digest mismatch, the part deleted
//! meanwhile), a failed piece or an interruption aborts the upload instead,
//! once the pieces on the wire have landed (S3 may store a piece that
//! arrives after the abort). S3 shows an
//! object only once a `PUT` or a `CompleteMultipartUpload` succeeds, so no
//! reader of the bucket ever sees part of a part under its key. Memory per
//! part: at most `in_flight + 1` pieces.

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, Attributes, MultipartUpload, ObjectStore, PutMultipartOpts, PutOptions, PutPayload,
};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;

/// The content type HFS's `S3OutputStore` gives its objects.
pub const CONTENT_TYPE: &str = "application/fhir+ndjson";

/// How a part goes up.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// The size of each piece of a multipart upload, and the largest part
    /// sent in one `PUT`.
    pub part_size: usize,
    /// Pieces of one upload on the wire at once.
    pub in_flight: usize,
}

/// How a part went up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// NDJSON bytes uploaded.
    pub bytes: u64,
    /// Pieces of the multipart upload; 0 for a single `PUT`.
    pub pieces: u32,
}

/// Why a part did not go up.
#[derive(Debug)]
pub enum UploadError {
    /// Reading the part from the store failed (nothing was published).
    Read(std::io::Error),
    /// S3 refused or failed a request (nothing was published).
    S3(object_store::Error),
    /// The copy was interrupted (nothing was published).
    Interrupted,
}

impl std::fmt::Display for UploadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UploadError::Read(e) => write!(f, "reading the part from the store failed: {e}"),
            UploadError::S3(e) => write!(f, "{e}"),
            UploadError::Interrupted => f.write_str("interrupted"),
        }
    }
}

/// Copies everything `reader` yields to `path`; `progress` hears of each
/// piece once S3 has it. Returns once the object is published, or with an
/// error once anything begun has been aborted.
pub async fn upload(
    s3: &Arc<dyn ObjectStore>,
    path: &ObjectPath,
    mut reader: Pin<Box<dyn AsyncRead + Send>>,
    plan: Plan,
    progress: &(dyn Fn(u64) + Sync),
    mut cancel: watch::Receiver<bool>,
) -> Result<Sent, UploadError> {
    let interrupted = async move {
        // Resolves when the flag is raised, never when the sender is gone.
        if cancel.wait_for(|c| *c).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(interrupted);

    // Two pieces tell a single PUT from a multipart upload.
    let first = tokio::select! {
        r = fill(&mut reader, plan.part_size) => r.map_err(UploadError::Read)?,
        _ = &mut interrupted => return Err(UploadError::Interrupted),
    };
    let second = if first.len() < plan.part_size {
        Bytes::new()
    } else {
        tokio::select! {
            r = fill(&mut reader, plan.part_size) => r.map_err(UploadError::Read)?,
            _ = &mut interrupted => return Err(UploadError::Interrupted),
        }
    };
    if second.is_empty() {
        // The reader reached its verified end: publish in one request.
        let bytes = first.len() as u64;
        let opts = PutOptions {
            attributes: attributes(),
            ..PutOptions::default()
        };
        tokio::select! {
            r = s3.put_opts(path, PutPayload::from(first), opts) => r.map_err(UploadError::S3)?,
            _ = &mut interrupted => return Err(UploadError::Interrupted),
        };
        progress(bytes);
        return Ok(Sent { bytes, pieces: 0 });
    }

    let opts = PutMultipartOpts {
        attributes: attributes(),
        ..PutMultipartOpts::default()
    };
    let mut upload = tokio::select! {
        r = s3.put_multipart_opts(path, opts) => r.map_err(UploadError::S3)?,
        _ = &mut interrupted => return Err(UploadError::Interrupted),
    };
    let pumped = pump(
        upload.as_mut(),
        &mut reader,
        first,
        second,
        plan,
        progress,
        interrupted.as_mut(),
    )
    .await;
    match pumped {
        Ok(sent) => {
            upload.complete().await.map_err(UploadError::S3)?;
            Ok(sent)
        }
        Err(e) => {
            // Best effort: an upload left behind is invisible, and the
            // bucket's lifecycle rule (AbortIncompleteMultipartUpload)
            // removes its pieces.
            let _ = upload.abort().await;
            Err(e)
        }
    }
}

/// Sends `first`, `second` and the rest of `reader` as pieces, at most
/// `plan.in_flight` on the wire while the next one is read; returns once
/// every piece is acknowledged and the reader reached its verified end.
/// On an error or an interruption it first lets the pieces on the wire
/// land, so that none is stored after the caller's abort.
async fn pump<F: std::future::Future<Output = ()>>(
    upload: &mut dyn MultipartUpload,
    reader: &mut Pin<Box<dyn AsyncRead + Send>>,
    first: Bytes,
    second: Bytes,
    plan: Plan,
    progress: &(dyn Fn(u64) + Sync),
    mut interrupted: Pin<&mut F>,
) -> Result<Sent, UploadError> {
    let mut in_flight = FuturesUnordered::new();
    let mut sent = Sent {
        bytes: 0,
        pieces: 0,
    };
    let result = async {
        let mut piece = first;
        let mut read_ahead = Some(second);
        loop {
            let last = piece.len() < plan.part_size;
            while in_flight.len() >= plan.in_flight.max(1) {
                tokio::select! {
                    Some(done) = in_flight.next() => acknowledge(done, &mut sent, progress)?,
                    () = interrupted.as_mut() => return Err(UploadError::Interrupted),
                }
            }
            let len = piece.len() as u64;
            let part = upload.put_part(PutPayload::from(piece));
            in_flight.push(async move { part.await.map(|()| len) });
            if last {
                break;
            }
            let next = match read_ahead.take() {
                Some(next) => next,
                None => {
                    // Read the next piece while the sent ones travel.
                    let read = fill(reader, plan.part_size);
                    tokio::pin!(read);
                    loop {
                        tokio::select! {
                            r = &mut read => break r.map_err(UploadError::Read)?,
                            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                                acknowledge(done, &mut sent, progress)?;
                            }
                            () = interrupted.as_mut() => return Err(UploadError::Interrupted),
                        }
                    }
                }
            };
            if next.is_empty() {
                break;
            }
            piece = next;
        }
        while !in_flight.is_empty() {
            tokio::select! {
                Some(done) = in_flight.next() => acknowledge(done, &mut sent, progress)?,
                () = interrupted.as_mut() => return Err(UploadError::Interrupted),
            }
        }
        Ok(())
    }
    .await;
    if result.is_err() {
        while in_flight.next().await.is_some() {}
    }
    result.map(|()| sent)
}

fn acknowledge(
    done: object_store::Result<u64>,
    sent: &mut Sent,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(), UploadError> {
    let len = done.map_err(UploadError::S3)?;
    sent.bytes += len;
    sent.pieces += 1;
    progress(len);
    failpoint::hit("copy.piece_uploaded");
    Ok(())
}

/// Reads until `size` bytes or the end; shorter only at the end, which the
/// store's reader reaches only after verifying the part.
async fn fill(reader: &mut Pin<Box<dyn AsyncRead + Send>>, size: usize) -> std::io::Result<Bytes> {
    let mut buf = Vec::with_capacity(size);
    (&mut *reader)
        .take(size as u64)
        .read_to_end(&mut buf)
        .await?;
    Ok(Bytes::from(buf))
}

fn attributes() -> Attributes {
    let mut a = Attributes::new();
    a.insert(Attribute::ContentType, CONTENT_TYPE.into());
    a
}

/// The copy's crash-test seam (feature `failpoints`, on only in the crate's
/// own test builds): `EXPORT_STORE_COPY_FAILPOINT=NAME[:N]` makes the
/// process say `export-store failpoint NAME paused` on standard error and
/// stop copying the `N`-th time (default: the first) it reaches `NAME`, so
/// that a test can `SIGKILL` it in the middle of a multipart upload. The
/// one point: `copy.piece_uploaded`, a piece of a multipart upload
/// acknowledged by S3. Separate from the store's `EXPORT_STORE_FAILPOINT`,
/// whose list covers the store alone.
mod failpoint {
    #[cfg(not(feature = "failpoints"))]
    #[inline(always)]
    pub fn hit(_name: &'static str) {}

    #[cfg(feature = "failpoints")]
    pub fn hit(name: &'static str) {
        use std::io::Write;
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::OnceLock;

        const POINTS: &[&str] = &["copy.piece_uploaded"];
        static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
        static HITS: AtomicU64 = AtomicU64::new(0);
        let armed = ARMED.get_or_init(|| {
            let spec = std::env::var("EXPORT_STORE_COPY_FAILPOINT").ok()?;
            let (point, n) = match spec.split_once(':') {
                Some((p, n)) => (p.to_string(), n.parse::<u64>().ok().filter(|n| *n > 0)),
                None => (spec.clone(), Some(1)),
            };
            match n {
                Some(n) if POINTS.contains(&point.as_str()) => Some((point, n)),
                _ => {
                    eprintln!("export-store: EXPORT_STORE_COPY_FAILPOINT={spec:?}: expected one of {POINTS:?}, then :N (N > 0)");
                    std::process::exit(2);
                }
            }
        });
        if let Some((point, n)) = armed {
            if point == name && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *n {
                let mut err = std::io::stderr().lock();
                let _ = writeln!(err, "export-store failpoint {name} paused");
                let _ = err.flush();
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                }
            }
        }
    }
}
