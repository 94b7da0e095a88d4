//! Structured request logs: a request id on every response
//! (`X-Request-Id`), and one `tracing` event when the response body ends,
//! naming request id, method, path, status, bytes sent, duration and how
//! the body ended (`complete`, `aborted` by an error, or `disconnected` by
//! the client).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, HttpBody};
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tracing::Instrument;

/// The header carrying the request id, both ways.
pub(super) const REQUEST_ID: &str = "x-request-id";

/// An incoming id is kept if it is short, visible ASCII (as a proxy sets
/// it); otherwise a fresh one is made.
fn request_id(req: &Request) -> String {
    req.headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
}

/// The middleware: tags the request, times it, and logs when its body ends.
pub(super) async fn log_requests(req: Request, next: Next) -> Response {
    let id = request_id(&req);
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let span = tracing::info_span!("request", request_id = %id, %method, %path);
    let start = Instant::now();
    let resp = next.run(req).instrument(span).await;
    let (mut parts, body) = resp.into_parts();
    if let Ok(v) = HeaderValue::from_str(&id) {
        parts.headers.insert(REQUEST_ID, v);
    }
    let expected = parts
        .headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let body = Body::new(Logged {
        inner: body,
        expected,
        id,
        method,
        path,
        status: parts.status,
        start,
        bytes: 0,
        ended: false,
    });
    Response::from_parts(parts, body)
}

/// A response body that counts what it sends and logs when it ends.
struct Logged {
    inner: Body,
    /// `Content-Length`, when sent: hyper stops polling once it is reached.
    expected: Option<u64>,
    id: String,
    method: String,
    path: String,
    status: StatusCode,
    start: Instant,
    bytes: u64,
    ended: bool,
}

impl Logged {
    fn log(&mut self, outcome: &str, error: Option<&axum::Error>) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        let duration_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        let status = self.status.as_u16();
        let (id, method, path, bytes) = (&self.id, &self.method, &self.path, self.bytes);
        if let Some(e) = error {
            tracing::warn!(
                request_id = %id, %method, %path, status, bytes, duration_ms, outcome,
                error = %e, "response aborted"
            );
        } else if self.status.is_server_error() {
            tracing::warn!(
                request_id = %id, %method, %path, status, bytes, duration_ms, outcome,
                "response sent"
            );
        } else {
            tracing::info!(
                request_id = %id, %method, %path, status, bytes, duration_ms, outcome,
                "response sent"
            );
        }
    }
}

impl HttpBody for Logged {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
            }
            Poll::Ready(Some(Err(e))) => self.log("aborted", Some(e)),
            Poll::Ready(None) => self.log("complete", None),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        // A body may be dropped unpolled at its end (empty, or its length
        // reached); one dropped before that lost its client.
        let outcome = if self.inner.is_end_stream() || self.expected == Some(self.bytes) {
            "complete"
        } else {
            "disconnected"
        };
        self.log(outcome, None);
    }
}
