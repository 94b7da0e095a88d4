//! [`MemoryOutputStore`]: the in-memory reference store the conformance
//! suite is checked against (feature `conformance`).
//!
//! Deliberately simple, so that a scenario only the SQLite store passes
//! shows up as testing an accident, not the contract.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::{
    DownloadUrl, ExportJobId, ExportOutputStore, ExportPartKey, ExportPartWriter, FinalizedPart,
    StorageError, StorageResult, TenantContext,
};

#[derive(Default)]
struct Staging {
    bytes: Vec<u8>,
    cancelled: AtomicBool,
}

struct Finished {
    bytes: Arc<Vec<u8>>,
    lines: u64,
    gone: Arc<AtomicBool>,
}

#[derive(Default)]
struct MemState {
    staged: HashMap<ExportPartKey, Arc<Mutex<Staging>>>,
    finished: HashMap<ExportPartKey, Finished>,
    /// Live sinks by address, as the SQLite store identifies them.
    sinks: HashMap<usize, (ExportPartKey, Arc<Mutex<Staging>>)>,
    /// The highest token of each deleted (tenant, job).
    fences: HashMap<(String, String), u64>,
}

/// A deliberately simple in-memory `ExportOutputStore`: the reference the
/// conformance suite is checked against. Not for production: everything
/// lives in memory and nothing is compressed.
#[derive(Default, Clone)]
pub struct MemoryOutputStore {
    state: Arc<Mutex<MemState>>,
}

impl MemoryOutputStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fenced(st: &MemState, key: &ExportPartKey) -> bool {
        let same_slot = |k: &ExportPartKey| {
            k.tenant_id == key.tenant_id
                && k.job_id == key.job_id
                && k.file_type == key.file_type
                && k.resource_type == key.resource_type
                && k.part_index == key.part_index
                && k.fencing_token > key.fencing_token
        };
        let deleted_claim = st
            .fences
            .get(&(key.tenant_id.clone(), key.job_id.as_str().to_string()))
            .is_some_and(|mark| *mark >= key.fencing_token);
        deleted_claim || st.staged.keys().any(same_slot) || st.finished.keys().any(same_slot)
    }

    /// Removes the parts `f` picks and raises the fence mark of their jobs.
    fn remove_where(&self, f: impl Fn(&ExportPartKey) -> bool) {
        let mut st = self.state();
        let picked: Vec<ExportPartKey> = st
            .staged
            .keys()
            .chain(st.finished.keys())
            .filter(|k| f(k))
            .cloned()
            .collect();
        for k in picked {
            let mark = st
                .fences
                .entry((k.tenant_id.clone(), k.job_id.as_str().to_string()))
                .or_insert(0);
            *mark = (*mark).max(k.fencing_token);
        }
        st.staged.retain(|k, s| {
            let drop = f(k);
            if drop {
                s.lock().unwrap().cancelled.store(true, Ordering::SeqCst);
            }
            !drop
        });
        st.finished.retain(|k, p| {
            let drop = f(k);
            if drop {
                p.gone.store(true, Ordering::SeqCst);
            }
            !drop
        });
    }
}

struct MemSink {
    staging: Arc<Mutex<Staging>>,
    state: Arc<Mutex<MemState>>,
}

impl AsyncWrite for MemSink {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut s = self.staging.lock().unwrap();
        if s.cancelled.load(Ordering::SeqCst) {
            return Poll::Ready(Err(StorageError::new(
                crate::ErrorKind::NotFound,
                "write",
                "the staged part was deleted",
            )
            .into()));
        }
        s.bytes.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Drop for MemSink {
    fn drop(&mut self) {
        let addr = self as *const MemSink as *const () as usize;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((key, staging)) = st.sinks.remove(&addr) {
            if st
                .staged
                .get(&key)
                .is_some_and(|s| Arc::ptr_eq(s, &staging))
            {
                st.staged.remove(&key);
            }
        }
    }
}

struct MemReader {
    bytes: Arc<Vec<u8>>,
    pos: usize,
    gone: Arc<AtomicBool>,
}

impl AsyncRead for MemReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.gone.load(Ordering::SeqCst) {
            return Poll::Ready(Err(StorageError::new(
                crate::ErrorKind::NotFound,
                "read",
                "the part was deleted or replaced while it was being read",
            )
            .into()));
        }
        // Hand out at most 64 KiB per call, as a streaming store would.
        let n = out
            .remaining()
            .min(self.bytes.len() - self.pos)
            .min(64 * 1024);
        let pos = self.pos;
        out.put_slice(&self.bytes[pos..pos + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

#[async_trait]
impl ExportOutputStore for MemoryOutputStore {
    async fn open_writer(&self, key: &ExportPartKey) -> StorageResult<ExportPartWriter> {
        key.validate("open_writer")?;
        let staging = Arc::new(Mutex::new(Staging::default()));
        let sink = {
            let mut st = self.state();
            if Self::fenced(&st, key) {
                return Err(StorageError::new(
                    crate::ErrorKind::Conflict,
                    "open_writer",
                    "fenced out",
                ));
            }
            if let Some(old) = st.staged.insert(key.clone(), staging.clone()) {
                old.lock().unwrap().cancelled.store(true, Ordering::SeqCst);
            }
            Box::pin(MemSink {
                staging: staging.clone(),
                state: self.state.clone(),
            })
        };
        let addr = &*sink as *const MemSink as *const () as usize;
        self.state().sinks.insert(addr, (key.clone(), staging));
        Ok(ExportPartWriter::new(sink))
    }

    async fn finalize_part(
        &self,
        key: &ExportPartKey,
        mut writer: ExportPartWriter,
    ) -> StorageResult<FinalizedPart> {
        let op = "finalize_part";
        key.validate(op)?;
        writer
            .writer
            .shutdown()
            .await
            .map_err(|e| StorageError::from_io(op, e))?;
        let addr = &*writer.writer as *const (dyn AsyncWrite + Send) as *const () as usize;
        let mut st = self.state();
        let Some((opened_for, staging)) = st.sinks.get(&addr).cloned() else {
            return Err(StorageError::new(
                crate::ErrorKind::InvalidInput,
                op,
                "not this store's writer",
            ));
        };
        if &opened_for != key {
            return Err(StorageError::new(
                crate::ErrorKind::InvalidInput,
                op,
                "writer of another part",
            ));
        }
        if !st.staged.get(key).is_some_and(|s| Arc::ptr_eq(s, &staging)) {
            return Err(StorageError::new(
                crate::ErrorKind::NotFound,
                op,
                "no staged part",
            ));
        }
        let bytes = std::mem::take(&mut staging.lock().unwrap().bytes);
        if bytes.len() as u64 != writer.byte_count {
            st.staged.remove(key);
            return Err(StorageError::new(
                crate::ErrorKind::InvalidInput,
                op,
                "byte count mismatch",
            ));
        }
        if Self::fenced(&st, key) {
            return Err(StorageError::new(
                crate::ErrorKind::Conflict,
                op,
                "fenced out",
            ));
        }
        st.staged.remove(key);
        let old = st.finished.insert(
            key.clone(),
            Finished {
                bytes: Arc::new(bytes),
                lines: writer.line_count,
                gone: Arc::default(),
            },
        );
        if let Some(old) = old {
            old.gone.store(true, Ordering::SeqCst);
        }
        Ok(FinalizedPart {
            key: key.clone(),
            resource_type: key.resource_type.clone(),
            line_count: writer.line_count,
            size_bytes: writer.byte_count,
        })
    }

    async fn download_url(
        &self,
        key: &ExportPartKey,
        _ttl: Duration,
    ) -> StorageResult<DownloadUrl> {
        key.validate("download_url")?;
        Ok(DownloadUrl {
            url: format!(
                "memory:///export-file/{}/{}",
                key.job_id,
                key.part_segment()
            ),
            requires_access_token: true,
        })
    }

    async fn open_reader(
        &self,
        key: &ExportPartKey,
    ) -> StorageResult<Pin<Box<dyn AsyncRead + Send>>> {
        key.validate("open_reader")?;
        let st = self.state();
        let f = st.finished.get(key).ok_or_else(|| {
            StorageError::new(
                crate::ErrorKind::NotFound,
                "open_reader",
                "no finished part",
            )
        })?;
        let _ = f.lines;
        Ok(Box::pin(MemReader {
            bytes: f.bytes.clone(),
            pos: 0,
            gone: f.gone.clone(),
        }))
    }

    async fn delete_job_outputs(
        &self,
        tenant: &TenantContext,
        job_id: &ExportJobId,
    ) -> StorageResult<()> {
        let t = tenant.tenant_id().as_str();
        crate::key::check_id("delete_job_outputs", "tenant id", t)?;
        crate::key::check_id("delete_job_outputs", "job id", job_id.as_str())?;
        self.remove_where(|k| k.tenant_id == t && &k.job_id == job_id);
        Ok(())
    }

    async fn delete_tenant_outputs(&self, tenant_id: &str) -> StorageResult<()> {
        crate::key::check_id("delete_tenant_outputs", "tenant id", tenant_id)?;
        self.remove_where(|k| k.tenant_id == tenant_id);
        Ok(())
    }
}
