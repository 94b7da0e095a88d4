//! A token issuer for the auth tests: RSA and EC signing keys made at run
//! time, their JWKS served on 127.0.0.1:0 (every fetch counted), and SMART
//! backend-services tokens signed with them, well-formed or broken in the
//! ways an attacker or a misconfigured client breaks them.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// The issuer every good token names (`HFS_AUTH_ISSUER`).
pub const ISSUER: &str = "https://issuer.example.test";
/// The audience every good token names (`HFS_AUTH_AUDIENCE`).
pub const AUDIENCE: &str = "https://fhir.example.test";

/// One signing key: its `kid`, its private key for jsonwebtoken, its JWK.
struct Key {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
    /// The public key as PEM (for the HS256-with-the-public-key attack).
    public_pem: Vec<u8>,
}

/// Which key signs a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signer {
    /// RSA 2048, RS256, in the JWKS.
    Rs256,
    /// The same RSA key with RS384.
    Rs384,
    /// P-256, ES256, in the JWKS.
    Es256,
    /// P-384, ES384, in the JWKS.
    Es384,
    /// An RSA key that is not in the JWKS, under a `kid` that is not either.
    Unknown,
    /// The key that is not in the JWKS, under the `kid` of the RS256 key.
    Impostor,
}

/// The issuer: keys and the JWKS server.
pub struct Idp {
    /// `http://127.0.0.1:PORT/jwks.json`.
    pub jwks_url: String,
    fetches: Arc<AtomicUsize>,
    rsa: Key,
    rsa384: Key,
    ec256: Key,
    ec384: Key,
    unknown: Key,
}

/// What a token says. Start from [`Claims::new`] and change what the test
/// needs.
#[derive(Clone, Debug)]
pub struct Claims {
    pub sub: Option<String>,
    pub iss: String,
    pub aud: Option<String>,
    /// Seconds from now (negative: already expired); `None`: no `exp`.
    pub exp_in: Option<i64>,
    pub scope: String,
    /// The `tenant_id` claim.
    pub tenant: Option<String>,
    pub signer: Signer,
}

impl Claims {
    /// A good token for `tenant`: system scopes to read and write
    /// everything (SMART v2), valid for ten minutes, signed RS256.
    pub fn new(tenant: &str) -> Claims {
        Claims {
            sub: Some("bulk-client".into()),
            iss: ISSUER.into(),
            aud: Some(AUDIENCE.into()),
            exp_in: Some(600),
            scope: "system/*.cruds".into(),
            tenant: Some(tenant.into()),
            signer: Signer::Rs256,
        }
    }

    pub fn scope(mut self, scope: &str) -> Claims {
        self.scope = scope.into();
        self
    }

    pub fn signer(mut self, signer: Signer) -> Claims {
        self.signer = signer;
        self
    }

    fn payload(&self) -> Value {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let mut p = json!({
            "iss": self.iss,
            "iat": now - 5,
            "scope": self.scope,
            "jti": format!("jti-{}", uuid::Uuid::new_v4()),
        });
        if let Some(sub) = &self.sub {
            p["sub"] = json!(sub);
        }
        if let Some(aud) = &self.aud {
            p["aud"] = json!(aud);
        }
        if let Some(exp) = self.exp_in {
            p["exp"] = json!(now + exp);
        }
        if let Some(t) = &self.tenant {
            p["tenant_id"] = json!(t);
        }
        p
    }
}

impl Idp {
    /// Makes the keys and serves their JWKS (the RS256, ES256 and ES384
    /// keys; never the unknown one) from a thread of its own, so that it
    /// outlives any one test's runtime.
    pub fn start() -> Idp {
        let rsa = rsa_key("rsa-1", Algorithm::RS256);
        let rsa384 = Key {
            kid: rsa.kid.clone(),
            alg: Algorithm::RS384,
            encoding: rsa.encoding.clone(),
            jwk: rsa.jwk.clone(),
            public_pem: rsa.public_pem.clone(),
        };
        let ec256 = ec_key("ec-256", Algorithm::ES256);
        let ec384 = ec_key("ec-384", Algorithm::ES384);
        let unknown = rsa_key("rsa-unknown", Algorithm::RS256);
        // The JWKS lists each key once, without an `alg`, so one RSA key
        // verifies both RS256 and RS384.
        let jwks = json!({ "keys": [rsa.jwk, ec256.jwk, ec384.jwk] });
        let fetches = Arc::new(AtomicUsize::new(0));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let jwks_url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let counted = fetches.clone();
        let app = axum::Router::new().route(
            "/jwks.json",
            axum::routing::get(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                let body = jwks.clone();
                async move { axum::Json(body) }
            }),
        );
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await
            })
        });
        Idp {
            jwks_url,
            fetches,
            rsa,
            rsa384,
            ec256,
            ec384,
            unknown,
        }
    }

    /// How many times the JWKS was fetched.
    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// HFS's auth settings for this issuer.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("HFS_AUTH_ENABLED", "true"),
            ("HFS_AUTH_JWKS_URL", self.jwks_url.as_str()),
            ("HFS_AUTH_ISSUER", ISSUER),
            ("HFS_AUTH_AUDIENCE", AUDIENCE),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// A signed token saying `claims`.
    pub fn token(&self, claims: &Claims) -> String {
        let (key, kid) = match claims.signer {
            Signer::Rs256 => (&self.rsa, self.rsa.kid.as_str()),
            Signer::Rs384 => (&self.rsa384, self.rsa.kid.as_str()),
            Signer::Es256 => (&self.ec256, self.ec256.kid.as_str()),
            Signer::Es384 => (&self.ec384, self.ec384.kid.as_str()),
            Signer::Unknown => (&self.unknown, self.unknown.kid.as_str()),
            Signer::Impostor => (&self.unknown, self.rsa.kid.as_str()),
        };
        let mut header = Header::new(key.alg);
        header.kid = Some(kid.to_string());
        jsonwebtoken::encode(&header, &claims.payload(), &key.encoding).unwrap()
    }

    /// A token with `alg: none` and no signature, naming the RS256 key.
    pub fn unsigned(&self, claims: &Claims) -> String {
        let header = json!({ "alg": "none", "typ": "JWT", "kid": self.rsa.kid });
        format!(
            "{}.{}.",
            B64.encode(header.to_string()),
            B64.encode(claims.payload().to_string())
        )
    }

    /// A token signed HS256 with the RS256 key's public key (PEM) as the
    /// shared secret: the classic algorithm-confusion attack.
    pub fn hs256_with_public_key(&self, claims: &Claims) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.rsa.kid.clone());
        let key = EncodingKey::from_secret(&self.rsa.public_pem);
        jsonwebtoken::encode(&header, &claims.payload(), &key).unwrap()
    }
}

/// A good token with one byte of its signature changed.
pub fn tamper_signature(token: &str) -> String {
    let (head, sig) = token.rsplit_once('.').unwrap();
    let mut bytes = B64.decode(sig).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    format!("{head}.{}", B64.encode(bytes))
}

/// A good token whose claims were changed (`change` edits them) and whose
/// signature was kept.
pub fn tamper_claims(token: &str, change: impl FnOnce(&mut Value)) -> String {
    let mut parts = token.split('.');
    let (h, p, s) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let mut claims: Value = serde_json::from_slice(&B64.decode(p).unwrap()).unwrap();
    change(&mut claims);
    format!("{h}.{}.{s}", B64.encode(claims.to_string()))
}

fn rsa_key(kid: &str, alg: Algorithm) -> Key {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::pkcs8::{EncodePublicKey, LineEnding};
    use rsa::traits::PublicKeyParts;
    let private = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
    let public = private.to_public_key();
    let der = private.to_pkcs1_der().unwrap();
    Key {
        kid: kid.into(),
        alg,
        encoding: EncodingKey::from_rsa_der(der.as_bytes()),
        jwk: json!({
            "kty": "RSA",
            "kid": kid,
            "use": "sig",
            "n": B64.encode(public.n().to_bytes_be()),
            "e": B64.encode(public.e().to_bytes_be()),
        }),
        public_pem: public
            .to_public_key_pem(LineEnding::LF)
            .unwrap()
            .into_bytes(),
    }
}

fn ec_key(kid: &str, alg: Algorithm) -> Key {
    use ring::signature::{EcdsaKeyPair, KeyPair};
    let (ring_alg, crv, len) = match alg {
        Algorithm::ES256 => (
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            "P-256",
            32,
        ),
        Algorithm::ES384 => (
            &ring::signature::ECDSA_P384_SHA384_FIXED_SIGNING,
            "P-384",
            48,
        ),
        other => panic!("not an EC algorithm: {other:?}"),
    };
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(ring_alg, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(ring_alg, pkcs8.as_ref(), &rng).unwrap();
    // The public key is the uncompressed point: 0x04 ‖ x ‖ y.
    let point = pair.public_key().as_ref();
    assert_eq!(point.len(), 1 + 2 * len);
    Key {
        kid: kid.into(),
        alg,
        encoding: EncodingKey::from_ec_der(pkcs8.as_ref()),
        jwk: json!({
            "kty": "EC",
            "kid": kid,
            "use": "sig",
            "crv": crv,
            "x": B64.encode(&point[1..1 + len]),
            "y": B64.encode(&point[1 + len..]),
        }),
        public_pem: Vec::new(),
    }
}
