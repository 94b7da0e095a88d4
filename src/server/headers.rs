//! Reading the request headers a download depends on: content coding,
//! byte ranges and validators (RFC 9110).

use std::ops::Range;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The form a body is sent in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Coding {
    /// Plain NDJSON.
    Identity,
    /// The stored zstd frames, untouched.
    Zstd,
    /// gzip made on the fly.
    Gzip,
}

impl Coding {
    /// The `Content-Encoding` value, if any.
    pub fn content_encoding(self) -> Option<&'static str> {
        match self {
            Coding::Identity => None,
            Coding::Zstd => Some("zstd"),
            Coding::Gzip => Some("gzip"),
        }
    }
}

/// Picks a coding from `Accept-Encoding`: the one of zstd and gzip with the
/// higher quality (zstd on a tie) when it is above zero, else identity.
/// Only codings named explicitly count: `*` does not select one.
pub(super) fn negotiate(accept_encoding: Option<&str>, allow_zstd: bool) -> Coding {
    let (mut zstd, mut gzip) = (0.0f32, 0.0f32);
    for item in accept_encoding.unwrap_or("").split(',') {
        let mut params = item.split(';');
        let name = params.next().unwrap_or("").trim();
        let mut q = 1.0f32;
        for p in params {
            if let Some((k, v)) = p.split_once('=') {
                if k.trim().eq_ignore_ascii_case("q") {
                    q = v
                        .trim()
                        .parse()
                        .ok()
                        .filter(|q| (0.0..=1.0).contains(q))
                        .unwrap_or(0.0);
                }
            }
        }
        if name.eq_ignore_ascii_case("zstd") {
            zstd = zstd.max(q);
        } else if name.eq_ignore_ascii_case("gzip") || name.eq_ignore_ascii_case("x-gzip") {
            gzip = gzip.max(q);
        }
    }
    if allow_zstd && zstd > 0.0 && zstd >= gzip {
        Coding::Zstd
    } else if gzip > 0.0 {
        Coding::Gzip
    } else {
        Coding::Identity
    }
}

/// What a `Range` header asks of a representation of `len` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum RangeAsk {
    /// Bytes `start..end` (non-empty, within the representation).
    Bytes(Range<u64>),
    /// A single range that starts at or past the end (`416`).
    Unsatisfiable,
}

/// Parses a single `bytes=` range against `len` bytes. `None` means the
/// header is to be ignored (another unit, several ranges, bad syntax), which
/// RFC 9110 allows: the whole representation is sent.
pub(super) fn parse_range(value: &str, len: u64) -> Option<RangeAsk> {
    let (unit, set) = value.trim().split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") || set.contains(',') {
        return None;
    }
    let (first, last) = set.trim().split_once('-')?;
    let (first, last) = (first.trim(), last.trim());
    let number = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        // All digits: only overflow can fail; a huge number means "past the end".
        Some(s.parse().unwrap_or(u64::MAX))
    };
    if first.is_empty() {
        let suffix = number(last)?;
        if suffix == 0 || len == 0 {
            return Some(RangeAsk::Unsatisfiable);
        }
        return Some(RangeAsk::Bytes(len - suffix.min(len)..len));
    }
    let start = number(first)?;
    let end = if last.is_empty() {
        len
    } else {
        let last = number(last)?;
        if last < start {
            return None;
        }
        last.saturating_add(1).min(len)
    };
    if start >= len {
        return Some(RangeAsk::Unsatisfiable);
    }
    Some(RangeAsk::Bytes(start..end))
}

/// The opaque part of an entity tag (without `W/`).
fn opaque(tag: &str) -> &str {
    tag.trim().strip_prefix("W/").unwrap_or(tag.trim())
}

/// `If-None-Match` against the current ETag, with weak comparison.
pub(super) fn none_match(header: &str, etag: &str) -> bool {
    let header = header.trim();
    header == "*" || header.split(',').any(|t| opaque(t) == opaque(etag))
}

/// `If-Range`: whether the range may be served. A strong ETag must equal
/// `strong_etag` exactly; a date must equal `last_modified` exactly (to the
/// second); a weak ETag or anything else sends the whole part.
pub(super) fn if_range_holds(value: &str, strong_etag: &str, last_modified: SystemTime) -> bool {
    let value = value.trim();
    if value.starts_with('"') {
        return value == strong_etag;
    }
    if value.starts_with("W/") {
        return false;
    }
    httpdate::parse_http_date(value).is_ok_and(|d| d == last_modified)
}

/// `If-Modified-Since`: whether the part is unchanged since the date.
pub(super) fn not_modified_since(value: &str, last_modified: SystemTime) -> bool {
    httpdate::parse_http_date(value.trim()).is_ok_and(|d| last_modified <= d)
}

/// A finalize time in milliseconds, truncated to the second as
/// `Last-Modified` carries it.
pub(super) fn to_http_second(finalized_at_ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs((finalized_at_ms.max(0) / 1000) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codings_follow_quality_and_names() {
        use Coding::*;
        let cases = [
            (None, Identity),
            (Some(""), Identity),
            (Some("zstd"), Zstd),
            (Some("gzip, deflate, br, zstd"), Zstd),
            (Some("gzip;q=1, zstd;q=0.5"), Gzip),
            (Some("zstd;q=0, gzip"), Gzip),
            (Some("ZSTD;Q=0.8"), Zstd),
            (Some("x-gzip"), Gzip),
            (Some("*"), Identity),
            (Some("br, identity"), Identity),
            (Some("zstd;q=abc"), Identity),
            (Some("zstd;q=2"), Identity),
        ];
        for (h, want) in cases {
            assert_eq!(negotiate(h, true), want, "{h:?}");
        }
        assert_eq!(negotiate(Some("zstd, gzip;q=0.1"), false), Gzip);
    }

    #[test]
    fn ranges_cover_every_form_and_edge() {
        use RangeAsk::*;
        let len = 100;
        let cases: &[(&str, Option<RangeAsk>)] = &[
            ("bytes=0-0", Some(Bytes(0..1))),
            ("bytes=99-99", Some(Bytes(99..100))),
            ("bytes=10-", Some(Bytes(10..100))),
            ("bytes=-1", Some(Bytes(99..100))),
            ("bytes=-100", Some(Bytes(0..100))),
            ("bytes=-500", Some(Bytes(0..100))),
            ("bytes=50-1000", Some(Bytes(50..100))),
            ("bytes=0-99999999999999999999999", Some(Bytes(0..100))),
            ("Bytes = 1-2 ", Some(Bytes(1..3))),
            ("bytes=100-", Some(Unsatisfiable)),
            ("bytes=100-200", Some(Unsatisfiable)),
            ("bytes=99999999999999999999999-", Some(Unsatisfiable)),
            ("bytes=-0", Some(Unsatisfiable)),
            ("bytes=5-4", None),
            ("bytes=0-1,5-6", None),
            ("items=0-1", None),
            ("bytes=a-b", None),
            ("bytes=-", None),
            ("bytes=+1-2", None),
            ("bytes 0-1", None),
        ];
        for (h, want) in cases {
            assert_eq!(&parse_range(h, len), want, "{h}");
        }
        assert_eq!(parse_range("bytes=0-", 0), Some(Unsatisfiable));
        assert_eq!(parse_range("bytes=-5", 0), Some(Unsatisfiable));
    }

    #[test]
    fn validators() {
        let etag = "\"abc\"";
        assert!(none_match("\"abc\"", etag));
        assert!(none_match("W/\"abc\"", etag));
        assert!(none_match("\"x\", \"abc\"", etag));
        assert!(none_match("*", etag));
        assert!(!none_match("\"abcd\"", etag));
        assert!(none_match("\"abc+zstd\"", "W/\"abc+zstd\""));

        let lm = to_http_second(1_700_000_000_999);
        let date = httpdate::fmt_http_date(lm);
        assert!(if_range_holds(etag, etag, lm));
        assert!(!if_range_holds("W/\"abc\"", etag, lm));
        assert!(!if_range_holds("\"abd\"", etag, lm));
        assert!(if_range_holds(&date, etag, lm));
        let later = httpdate::fmt_http_date(lm + Duration::from_secs(1));
        assert!(!if_range_holds(&later, etag, lm));
        assert!(!if_range_holds("yesterday", etag, lm));
        assert!(not_modified_since(&date, lm));
        assert!(not_modified_since(&later, lm));
        let earlier = httpdate::fmt_http_date(lm - Duration::from_secs(1));
        assert!(!not_modified_since(&earlier, lm));
    }
}
