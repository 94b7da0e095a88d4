//! Who may read a tenant's parts: bearer tokens bound to one tenant each,
//! and signed URLs whose HMAC covers the tenant and the route path.

use axum::http::{header, HeaderMap};
use sha2::{Digest, Sha256};

use crate::store::url::{self, SignatureError};

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Denied {
    /// No credentials at all.
    Missing,
    /// A bearer token that no grant knows.
    BadToken,
    /// A bearer token granted to another tenant only.
    OtherTenant,
    /// A signed URL past its expiry.
    Expired,
    /// A signed URL whose signature does not match, or is malformed.
    BadSignature,
}

/// The access policy of one router.
pub(super) struct Auth {
    /// (tenant, SHA-256 of the secret): hashing first makes every
    /// comparison the same length.
    grants: Vec<(String, [u8; 32])>,
    signing_key: Option<Vec<u8>>,
}

fn hash(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

/// Equality without an early exit.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Auth {
    pub fn new(grants: &[(String, Vec<u8>)], signing_key: Option<Vec<u8>>) -> Self {
        Auth {
            grants: grants.iter().map(|(t, s)| (t.clone(), hash(s))).collect(),
            signing_key,
        }
    }

    /// Whether any credential is required at all.
    pub fn required(&self) -> bool {
        !self.grants.is_empty() || self.signing_key.is_some()
    }

    /// Decides whether a request for `tenant`'s part at `route_path`
    /// (as [`url::route_path`] spells it) may be served. `now` is Unix
    /// seconds.
    pub fn check(
        &self,
        tenant: &str,
        route_path: &str,
        headers: &HeaderMap,
        query: Option<&str>,
        now: u64,
    ) -> Result<(), Denied> {
        if !self.required() {
            return Ok(());
        }
        let mut token_verdict = Denied::Missing;
        if let Some(secret) = bearer(headers) {
            let given = hash(secret.as_bytes());
            // Every grant is compared, matching or not.
            let (mut mine, mut others) = (false, false);
            for (t, h) in &self.grants {
                let m = same(h, &given);
                mine |= m && t == tenant;
                others |= m && t != tenant;
            }
            if mine {
                return Ok(());
            }
            token_verdict = if others {
                Denied::OtherTenant
            } else {
                Denied::BadToken
            };
        }
        if let (Some(key), Some(signed)) = (&self.signing_key, signed_query(query)) {
            let (expires, signature) = signed.map_err(|()| Denied::BadSignature)?;
            // A signed URL is minted for GET; HEAD reveals less than GET.
            return url::verify(key, "GET", tenant, route_path, expires, signature, now).map_err(
                |e| match e {
                    SignatureError::Expired => Denied::Expired,
                    SignatureError::Invalid => Denied::BadSignature,
                },
            );
        }
        Err(token_verdict)
    }
}

/// The secret of `Authorization: Bearer {secret}`, if that is the header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, secret) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| secret.trim())
        .filter(|s| !s.is_empty())
}

/// The `(expires, signature)` of a signed query, or `Err(())` when its
/// signing parameters are not exactly one well-formed of each.
type SignedQuery<'q> = Result<(u64, &'q str), ()>;

/// The signing parameters of a query; `None` when it carries none.
fn signed_query(query: Option<&str>) -> Option<SignedQuery<'_>> {
    let (mut expires, mut signature, mut seen) = (Vec::new(), Vec::new(), false);
    for pair in query.unwrap_or("").split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "expires" => {
                seen = true;
                expires.push(v);
            }
            "signature" => {
                seen = true;
                signature.push(v);
            }
            _ => {}
        }
    }
    if !seen {
        return None;
    }
    let parsed = match (expires.as_slice(), signature.as_slice()) {
        ([e], [s]) if !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit()) => {
            e.parse::<u64>().map(|e| (e, *s)).map_err(|_| ())
        }
        _ => Err(()),
    };
    Some(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with_bearer(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn tokens_are_bound_to_their_tenant() {
        let grants = vec![
            ("acme".to_string(), b"acme-secret-0123456789".to_vec()),
            ("default".to_string(), b"default-secret-0123456".to_vec()),
        ];
        let a = Auth::new(&grants, None);
        let p = "/export-file/j/Patient-0";
        let ok = with_bearer("Bearer acme-secret-0123456789");
        assert_eq!(a.check("acme", p, &ok, None, 0), Ok(()));
        assert_eq!(
            a.check(
                "acme",
                p,
                &with_bearer("bearer  acme-secret-0123456789 "),
                None,
                0
            ),
            Ok(())
        );
        assert_eq!(
            a.check("default", p, &ok, None, 0),
            Err(Denied::OtherTenant)
        );
        assert_eq!(
            a.check(
                "acme",
                p,
                &with_bearer("Bearer acme-secret-012345678"),
                None,
                0
            ),
            Err(Denied::BadToken)
        );
        assert_eq!(
            a.check("acme", p, &with_bearer("Basic YWNtZQ=="), None, 0),
            Err(Denied::Missing)
        );
        assert_eq!(
            a.check("acme", p, &HeaderMap::new(), None, 0),
            Err(Denied::Missing)
        );
        // Open when nothing is configured.
        let open = Auth::new(&[], None);
        assert_eq!(open.check("x", p, &HeaderMap::new(), None, 0), Ok(()));
    }

    #[test]
    fn signed_queries_are_checked_for_the_resolved_tenant() {
        let key = b"0123456789abcdef0123".to_vec();
        let a = Auth::new(&[], Some(key.clone()));
        let p = "/export-file/j/Patient-0";
        let sig = url::sign(&key, "GET", "acme", p, 100);
        let q = format!("expires=100&signature={sig}");
        let none = HeaderMap::new();
        assert_eq!(a.check("acme", p, &none, Some(&q), 50), Ok(()));
        assert_eq!(
            a.check("acme", p, &none, Some(&q), 101),
            Err(Denied::Expired)
        );
        assert_eq!(
            a.check("other", p, &none, Some(&q), 50),
            Err(Denied::BadSignature)
        );
        for bad in [
            "expires=100",
            "signature=00",
            "expires=x&signature=00",
            "expires=100&expires=100&signature=00",
        ] {
            assert_eq!(
                a.check("acme", p, &none, Some(bad), 50),
                Err(Denied::BadSignature),
                "{bad}"
            );
        }
        assert_eq!(
            a.check("acme", p, &none, Some("x=1"), 50),
            Err(Denied::Missing)
        );
    }
}
