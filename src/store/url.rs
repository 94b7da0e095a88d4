//! Download URLs: HFS-served `{base}/export-file/{job}/{Type}-{n}`, plus an
//! optional signed form.
//!
//! Minting is pure string work (HFS calls `download_url` for every part on
//! every status poll). A signed URL appends `?expires={unix seconds}&signature={hex}`,
//! the signature being HMAC-SHA256 over the method, the tenant, the route
//! path and the expiry, so that it cannot be moved to another part, another
//! tenant or another lifetime.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::Sha256;

use super::codec::to_hex;
use crate::contract::DownloadUrl;
use crate::error::{StorageError, StorageResult};
use crate::key::ExportPartKey;

/// Everything but RFC 3986 unreserved characters is escaped in a segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes one path segment.
pub fn encode_segment(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// The route path of a part, as HFS serves it:
/// `/export-file/{job_id}/{resource_type}-{part_index}`, each segment
/// percent-encoded.
pub fn route_path(job_id: &str, resource_type: &str, part_index: u32) -> String {
    format!(
        "/export-file/{}/{}-{}",
        encode_segment(job_id),
        encode_segment(resource_type),
        part_index
    )
}

/// Mints download URLs for one store.
#[derive(Clone)]
pub(crate) struct UrlMinter {
    base: String,
    signing_key: Option<Vec<u8>>,
}

impl std::fmt::Debug for UrlMinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UrlMinter")
            .field("base", &self.base)
            .field("signed", &self.signing_key.is_some())
            .finish()
    }
}

impl UrlMinter {
    /// Checks and keeps the base URL: `http://` or `https://`, no query,
    /// fragment, whitespace or control characters; a trailing `/` is dropped.
    pub fn new(base_url: &str, signing_key: Option<Vec<u8>>) -> StorageResult<Self> {
        let bad = |m: &str| Err(StorageError::invalid("open", format!("base URL {m}")));
        let rest = base_url
            .strip_prefix("http://")
            .or_else(|| base_url.strip_prefix("https://"));
        let Some(rest) = rest else {
            return bad("must start with http:// or https://");
        };
        if rest.is_empty() || rest.starts_with('/') {
            return bad("has no host");
        }
        if base_url
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return bad("contains whitespace or control characters");
        }
        if base_url.contains(['?', '#']) {
            return bad("must not have a query or fragment");
        }
        Ok(UrlMinter {
            base: base_url.trim_end_matches('/').to_string(),
            signing_key,
        })
    }

    /// The base URL, without a trailing slash.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Mints the URL of `key`. Unsigned: HFS-served, `requires_access_token`
    /// as configured. Signed: valid for `ttl` from now, no token needed.
    pub fn mint(&self, key: &ExportPartKey, ttl: Duration, token_required: bool) -> DownloadUrl {
        let path = route_path(key.job_id.as_str(), &key.resource_type, key.part_index);
        match &self.signing_key {
            None => DownloadUrl {
                url: format!("{}{}", self.base, path),
                requires_access_token: token_required,
            },
            Some(secret) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                let expires = now.saturating_add(ttl.as_secs());
                let sig = sign(secret, "GET", &key.tenant_id, &path, expires);
                DownloadUrl {
                    url: format!("{}{}?expires={expires}&signature={sig}", self.base, path),
                    requires_access_token: false,
                }
            }
        }
    }
}

/// The signature of a signed URL: hex HMAC-SHA256 over
/// `method \n tenant \n path \n expires`.
pub fn sign(secret: &[u8], method: &str, tenant: &str, path: &str, expires: u64) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(format!("{method}\n{tenant}\n{path}\n{expires}").as_bytes());
    to_hex(&mac.finalize().into_bytes())
}

/// Why a signed request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureError {
    /// The URL's lifetime is over.
    Expired,
    /// The signature does not match (tampered, or another part or tenant).
    Invalid,
}

/// Checks a signed request in constant time. `now` is Unix seconds.
pub fn verify(
    secret: &[u8],
    method: &str,
    tenant: &str,
    path: &str,
    expires: u64,
    signature_hex: &str,
    now: u64,
) -> Result<(), SignatureError> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(format!("{method}\n{tenant}\n{path}\n{expires}").as_bytes());
    let Some(given) = from_hex(signature_hex) else {
        return Err(SignatureError::Invalid);
    };
    mac.verify_slice(&given)
        .map_err(|_| SignatureError::Invalid)?;
    if now > expires {
        return Err(SignatureError::Expired);
    }
    Ok(())
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::ExportJobId;

    #[test]
    fn plain_urls_follow_the_hfs_route_and_escape_segments() {
        let m = UrlMinter::new("https://fhir.example.org/base/", None).unwrap();
        let k = ExportPartKey::output("t", ExportJobId::from("job 1/../x"), "Pa?ient", 7, 2);
        let u = m.mint(&k, Duration::from_secs(60), true);
        assert_eq!(
            u.url,
            "https://fhir.example.org/base/export-file/job%201%2F..%2Fx/Pa%3Fient-7"
        );
        assert!(u.requires_access_token);
        let k = ExportPartKey::output("t", ExportJobId::from("abc-DEF_1.2~"), "Patient", 0, 1);
        assert_eq!(
            m.mint(&k, Duration::ZERO, false).url,
            "https://fhir.example.org/base/export-file/abc-DEF_1.2~/Patient-0"
        );
    }

    #[test]
    fn bad_base_urls_are_invalid_input() {
        for b in [
            "",
            "ftp://x",
            "http://",
            "http:///x",
            "http://a b",
            "http://h/?q",
            "http://h/#f",
        ] {
            assert!(
                UrlMinter::new(b, None).unwrap_err().is_invalid_input(),
                "{b}"
            );
        }
    }

    #[test]
    fn signed_urls_expire_and_resist_tampering() {
        let key = b"0123456789abcdef0123".to_vec();
        let m = UrlMinter::new("http://h", Some(key.clone())).unwrap();
        let k = ExportPartKey::output("acme", ExportJobId::from("j"), "Patient", 0, 1);
        let u = m.mint(&k, Duration::from_secs(600), true);
        assert!(!u.requires_access_token);
        let (path, query) = u
            .url
            .strip_prefix("http://h")
            .unwrap()
            .split_once('?')
            .unwrap();
        let (exp, sig) = query.split_once("&signature=").unwrap();
        let exp: u64 = exp.strip_prefix("expires=").unwrap().parse().unwrap();
        let now = exp - 600;
        assert_eq!(verify(&key, "GET", "acme", path, exp, sig, now), Ok(()));
        assert_eq!(
            verify(&key, "GET", "acme", path, exp, sig, exp + 1),
            Err(SignatureError::Expired)
        );
        assert_eq!(
            verify(&key, "GET", "other", path, exp, sig, now),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            verify(
                &key,
                "GET",
                "acme",
                "/export-file/j/Patient-1",
                exp,
                sig,
                now
            ),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            verify(&key, "GET", "acme", path, exp + 1, sig, now),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            verify(&key, "GET", "acme", path, exp, "zz", now),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            verify(b"another key 123456", "GET", "acme", path, exp, sig, now),
            Err(SignatureError::Invalid)
        );
    }
}
