//! The download route: resolve, authorise, negotiate, then answer with
//! headers only (`HEAD`, `304`, `416`) or a streamed body.

use std::ops::Range;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{RawPathParams, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures::{StreamExt, TryStreamExt};
use percent_encoding::percent_decode_str;
use tokio_util::io::{ReaderStream, StreamReader};

use super::auth::Denied;
use super::download::{self, ByteStream};
use super::headers::{self, Coding, RangeAsk};
use super::outcome::{no_part, outcome, storage_error};
use super::App;
use crate::error::StorageError;
use crate::key::check_id;
use crate::store::sql::PartRow;
use crate::store::url::route_path;

const NDJSON: &str = "application/fhir+ndjson";

/// What a route names.
struct Target {
    tenant: String,
    job: String,
    resource_type: String,
    part_index: u32,
}

/// `GET`/`HEAD /export-file/{job_id}/{file}`: the default tenant.
pub(super) async fn default_tenant(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    params: RawPathParams,
) -> Response {
    let tenant = app.default_tenant.clone();
    download(app, method, uri, headers, params, Some(tenant)).await
}

/// `GET`/`HEAD /{tenant}/export-file/{job_id}/{file}`.
pub(super) async fn named_tenant(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    params: RawPathParams,
) -> Response {
    download(app, method, uri, headers, params, None).await
}

/// Any other method on a download route.
pub(super) async fn method_not_allowed() -> Response {
    let mut r = outcome(
        StatusCode::METHOD_NOT_ALLOWED,
        "not-supported",
        "export files are read with GET or HEAD",
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    r
}

/// Any path that is no download route.
pub(super) async fn no_route() -> Response {
    no_part()
}

fn decode(raw: &str) -> Option<String> {
    percent_decode_str(raw)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

/// Splits `{resource_type}-{part_index}` at its last `-`; the index must be
/// written canonically (as `download_url` writes it).
fn split_file(file: &str) -> Option<(String, u32)> {
    let (resource_type, index) = file.rsplit_once('-')?;
    let n: u32 = index.parse().ok()?;
    (n.to_string() == index && !resource_type.is_empty()).then(|| (resource_type.to_string(), n))
}

/// Why a path names no part.
enum BadPath {
    /// Not valid percent-encoded UTF-8.
    NotUtf8,
    /// Not the shape of a download route.
    NoPart,
    /// An id the store refuses.
    Invalid(StorageError),
}

impl BadPath {
    fn response(self) -> Response {
        match self {
            BadPath::NotUtf8 => outcome(
                StatusCode::BAD_REQUEST,
                "invalid",
                "the path is not valid percent-encoded UTF-8",
            ),
            BadPath::NoPart => no_part(),
            BadPath::Invalid(e) => storage_error(&e),
        }
    }
}

fn target(params: &RawPathParams, tenant: Option<String>) -> Result<Target, BadPath> {
    let mut tenant = tenant;
    let (mut job, mut file) = (None, None);
    for (name, raw) in params {
        let value = decode(raw).ok_or(BadPath::NotUtf8)?;
        match name {
            "tenant" => tenant = Some(value),
            "job_id" => job = Some(value),
            "file" => file = Some(value),
            _ => {}
        }
    }
    let (Some(tenant), Some(job), Some(file)) = (tenant, job, file) else {
        return Err(BadPath::NoPart);
    };
    let (resource_type, part_index) = split_file(&file).ok_or(BadPath::NoPart)?;
    for (what, v) in [
        ("tenant id", &tenant),
        ("job id", &job),
        ("resource type", &resource_type),
    ] {
        check_id("download", what, v).map_err(BadPath::Invalid)?;
    }
    Ok(Target {
        tenant,
        job,
        resource_type,
        part_index,
    })
}

fn denied(d: Denied) -> Response {
    const REALM: &str = "Bearer realm=\"export-file\"";
    let (status, code, text, challenge) = match d {
        Denied::Missing => (
            StatusCode::UNAUTHORIZED,
            "login",
            "an access token or a signed URL is required",
            Some(REALM.to_string()),
        ),
        Denied::BadToken => (
            StatusCode::UNAUTHORIZED,
            "login",
            "the access token is not valid",
            Some(format!("{REALM}, error=\"invalid_token\"")),
        ),
        Denied::OtherTenant => (
            StatusCode::FORBIDDEN,
            "forbidden",
            "the access token does not grant this tenant",
            Some(format!("{REALM}, error=\"insufficient_scope\"")),
        ),
        Denied::Expired => (
            StatusCode::FORBIDDEN,
            "expired",
            "the signed URL has expired",
            None,
        ),
        Denied::BadSignature => (
            StatusCode::FORBIDDEN,
            "forbidden",
            "the signed URL's signature is not valid",
            None,
        ),
    };
    let mut r = outcome(status, code, text);
    if let Some(c) = challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, c);
    }
    r
}

fn header_str(headers: &HeaderMap, name: HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The representation chosen for a request, and its validators.
struct Representation {
    coding: Coding,
    etag: String,
    strong_etag: String,
    last_modified: SystemTime,
}

async fn download(
    app: Arc<App>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    params: RawPathParams,
    tenant: Option<String>,
) -> Response {
    let t = match target(&params, tenant) {
        Ok(t) => t,
        Err(bad) => return bad.response(),
    };
    let path = route_path(&t.job, &t.resource_type, t.part_index);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    if let Err(d) = app.auth.check(&t.tenant, &path, &headers, uri.query(), now) {
        return denied(d);
    }
    let part = match app
        .reads
        .resolve(&t.tenant, &t.job, &t.resource_type, t.part_index)
        .await
    {
        Ok(Some(p)) => p,
        Ok(None) => return no_part(),
        Err(e) => return failed(&e),
    };
    respond(&app, &method, &headers, part).await
}

/// Logs a storage failure for the operator and answers it.
fn failed(e: &StorageError) -> Response {
    if e.is_not_found() || e.is_invalid_input() {
        tracing::debug!(error = %e, "download refused");
    } else {
        tracing::warn!(error = %e, source = ?std::error::Error::source(e), "download failed");
    }
    storage_error(e)
}

async fn respond(app: &App, method: &Method, headers: &HeaderMap, part: PartRow) -> Response {
    // The digest becomes the ETag: it must be what finalize records.
    if part.digest.len() != part.digest_algorithm.hex_len()
        || !part.digest.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return failed(&StorageError::corrupt(
            "download",
            "the part's recorded digest is malformed",
        ));
    }
    let range_header = header_str(headers, header::RANGE);
    // Ranges are served of the identity form only; an empty part has no
    // frames to send.
    let coding = if range_header.is_some() || app.identity_only || part.byte_count == 0 {
        Coding::Identity
    } else {
        headers::negotiate(header_str(headers, header::ACCEPT_ENCODING), true)
    };
    let strong_etag = format!("\"{}\"", part.digest);
    let rep = Representation {
        coding,
        etag: match coding {
            Coding::Identity => strong_etag.clone(),
            Coding::Zstd => format!("W/\"{}+zstd\"", part.digest),
            Coding::Gzip => format!("W/\"{}+gzip\"", part.digest),
        },
        strong_etag,
        last_modified: headers::to_http_second(part.finalized_at_ms),
    };
    let mut out = HeaderMap::new();
    common_headers(&mut out, &rep);

    let unchanged = match header_str(headers, header::IF_NONE_MATCH) {
        Some(inm) => headers::none_match(inm, &rep.etag),
        None => header_str(headers, header::IF_MODIFIED_SINCE)
            .is_some_and(|ims| headers::not_modified_since(ims, rep.last_modified)),
    };
    if unchanged {
        // A 304 carries validators and caching fields, not body metadata.
        out.remove(header::CONTENT_TYPE);
        out.remove(header::ACCEPT_RANGES);
        return (StatusCode::NOT_MODIFIED, out).into_response();
    }

    let len = part.byte_count;
    let mut status = StatusCode::OK;
    let mut range = 0..len;
    let ranged = range_header
        .filter(|_| {
            header_str(headers, header::IF_RANGE)
                .is_none_or(|v| headers::if_range_holds(v, &rep.strong_etag, rep.last_modified))
        })
        .and_then(|h| headers::parse_range(h, len));
    match ranged {
        Some(RangeAsk::Unsatisfiable) => {
            let mut r = outcome(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "invalid",
                "the requested range starts at or past the end of the file",
            );
            // The validators and Accept-Ranges still apply; the body is JSON.
            out.remove(header::CONTENT_TYPE);
            out.remove(header::CACHE_CONTROL);
            r.headers_mut().extend(out);
            r.headers_mut()
                .insert(header::CONTENT_RANGE, value(&format!("bytes */{len}")));
            return r;
        }
        Some(RangeAsk::Bytes(r)) => {
            out.insert(
                header::CONTENT_RANGE,
                value(&format!("bytes {}-{}/{len}", r.start, r.end - 1)),
            );
            status = StatusCode::PARTIAL_CONTENT;
            range = r;
        }
        None => {}
    }
    match rep.coding {
        Coding::Identity => {
            out.insert(
                header::CONTENT_LENGTH,
                value(&(range.end - range.start).to_string()),
            );
        }
        Coding::Zstd => {
            out.insert(
                header::CONTENT_LENGTH,
                value(&part.stored_bytes.to_string()),
            );
        }
        Coding::Gzip => {}
    }
    if let Some(enc) = rep.coding.content_encoding() {
        out.insert(header::CONTENT_ENCODING, HeaderValue::from_static(enc));
    }
    if method == Method::HEAD {
        return (status, out).into_response();
    }
    let body = match body(app, &part, rep.coding, range).await {
        Ok(b) => b,
        Err(e) => return failed(&e),
    };
    (status, out, body).into_response()
}

fn value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).expect("digits, quotes and ASCII letters only")
}

fn common_headers(out: &mut HeaderMap, rep: &Representation) {
    out.insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    out.insert(header::ETAG, value(&rep.etag));
    out.insert(
        header::LAST_MODIFIED,
        value(&httpdate::fmt_http_date(rep.last_modified)),
    );
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static("private"));
    out.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    out.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
}

/// The body stream. Its first piece is fetched before the headers go out,
/// so a part deleted just after it was resolved is still a clean `404`.
async fn body(
    app: &App,
    part: &PartRow,
    coding: Coding,
    range: Range<u64>,
) -> Result<Body, StorageError> {
    let stream: ByteStream = match coding {
        Coding::Zstd => download::zstd_frames(&app.reads, part),
        Coding::Identity | Coding::Gzip => download::identity(&app.reads, part, range).await?,
    };
    let mut stream = stream.peekable();
    if let Some(Err(_)) = std::pin::Pin::new(&mut stream).peek().await {
        if let Some(Err(e)) = stream.next().await {
            return Err(e);
        }
    }
    // A failure from here on aborts the response; the request log names it.
    Ok(match coding {
        Coding::Gzip => {
            let reader = StreamReader::new(stream.map_err(std::io::Error::from));
            let gzip = async_compression::tokio::bufread::GzipEncoder::with_quality(
                reader,
                async_compression::Level::Fastest,
            );
            Body::from_stream(ReaderStream::with_capacity(gzip, 64 * 1024))
        }
        Coding::Identity | Coding::Zstd => Body::from_stream(stream),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_segments_split_at_the_last_dash_and_need_a_canonical_index() {
        assert_eq!(split_file("Patient-0"), Some(("Patient".into(), 0)));
        let submit = format!("submit-v1-{}-12", "ab".repeat(32));
        assert_eq!(
            split_file(&submit),
            Some((format!("submit-v1-{}", "ab".repeat(32)), 12))
        );
        for bad in [
            "Patient",
            "Patient-",
            "-1",
            "Patient-01",
            "Patient-+1",
            "Patient-4294967296",
        ] {
            assert_eq!(split_file(bad), None, "{bad}");
        }
    }
}
