//! JWT handling: the algorithm is pinned to the configured list before anything else is
//! trusted, then the signature is verified with the configured key (HS* secret, or an RS*/PS*/
//! ES*/EdDSA public key), then `exp`/`nbf` are checked with a small leeway.
//!
//! Without a key the claims are only decoded (the Redis session equality check is then what
//! authenticates), but the algorithm pin and the time checks still apply, so `alg: none`
//! is refused in every mode. Mixing secret and public-key algorithms is a config error, which
//! rules out HS/RS confusion.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::Failure;

/// The claims of a token.
pub type Claims = Map<String, Value>;

/// What the operator configured for verification.
#[derive(Clone)]
pub struct Verifier {
    algorithms: Vec<Algorithm>,
    key: Option<DecodingKey>,
    validation: Validation,
    leeway_s: u64,
    audience: Option<String>,
    issuer: Option<String>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.algorithms)
            .field("key", &self.key.as_ref().map(|_| "configured"))
            .field("leeway_s", &self.leeway_s)
            .finish()
    }
}

/// The key material named by the config.
pub enum KeySource<'a> {
    None,
    Secret(&'a [u8]),
    /// A secret shorter than 16 bytes the operator accepted (`allow_weak_jwt_secret`).
    WeakSecret(&'a [u8]),
    PublicPem(&'a [u8]),
}

fn is_hmac(a: Algorithm) -> bool {
    matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

impl Verifier {
    /// Build a verifier; the error is a message for the config layer.
    pub fn new(
        algorithms: &[String],
        key: KeySource<'_>,
        leeway_s: u64,
        audience: Option<&str>,
        issuer: Option<&str>,
    ) -> Result<Verifier, String> {
        if algorithms.is_empty() {
            return Err("algorithms must name at least one algorithm (e.g. [\"HS256\"])".into());
        }
        let mut algs = Vec::new();
        for name in algorithms {
            let alg: Algorithm = name.parse().map_err(|_| {
                format!(
                    "{name:?} is not a JWT algorithm (use HS256, HS384, HS512, RS256, ES256, ...)"
                )
            })?;
            algs.push(alg);
        }
        let hmac = algs.iter().filter(|a| is_hmac(**a)).count();
        if hmac != 0 && hmac != algs.len() {
            return Err("mixes HMAC (HS*) and public-key algorithms; pin one family to rule out algorithm confusion".into());
        }
        let weak_ok = matches!(key, KeySource::WeakSecret(_));
        let key = match key {
            KeySource::None => None,
            KeySource::Secret(secret) | KeySource::WeakSecret(secret) => {
                if hmac == 0 {
                    return Err("jwt_secret_env is set but the algorithms are public-key ones; use jwt_public_key_file".into());
                }
                if secret.is_empty() || (secret.len() < 16 && !weak_ok) {
                    return Err("the JWT secret is shorter than 16 bytes".into());
                }
                Some(DecodingKey::from_secret(secret))
            }
            KeySource::PublicPem(pem) => {
                if hmac != 0 {
                    return Err(
                        "jwt_public_key_file is set but the algorithms are HS*; use jwt_secret_env"
                            .into(),
                    );
                }
                let family = family_of(algs[0]);
                if algs.iter().any(|a| family_of(*a) != family) {
                    return Err(
                        "a public key serves one family: do not mix RS/PS, ES and EdDSA".into(),
                    );
                }
                let parsed = match family {
                    "rsa" => DecodingKey::from_rsa_pem(pem),
                    "ec" => DecodingKey::from_ec_pem(pem),
                    _ => DecodingKey::from_ed_pem(pem),
                };
                Some(parsed.map_err(|e| {
                    format!("the public key file is not a valid {family} PEM key: {e}")
                })?)
            }
        };
        let mut validation = Validation::new(algs[0]);
        validation.algorithms = algs.clone();
        validation.leeway = leeway_s;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.required_spec_claims.clear();
        match audience {
            Some(a) => validation.set_audience(&[a]),
            None => validation.validate_aud = false,
        }
        if let Some(i) = issuer {
            validation.set_issuer(&[i]);
        }
        Ok(Verifier {
            algorithms: algs,
            key,
            validation,
            leeway_s,
            audience: audience.map(str::to_string),
            issuer: issuer.map(str::to_string),
        })
    }

    pub fn leeway_s(&self) -> u64 {
        self.leeway_s
    }

    pub fn verifies_signatures(&self) -> bool {
        self.key.is_some()
    }

    /// The token's claims, or why it is refused.
    pub fn claims(&self, token: &str) -> Result<Claims, Failure> {
        let alg = header_alg(token)?;
        if !self.algorithms.iter().any(|a| alg_name(*a) == alg) {
            // Includes "none": never accepted, whatever the mode.
            return Err(Failure::InvalidSignature);
        }
        match &self.key {
            Some(key) => jsonwebtoken::decode::<Claims>(token, key, &self.validation)
                .map(|d| d.claims)
                .map_err(|e| map_error(e.kind())),
            None => {
                let claims: Claims = jsonwebtoken::dangerous::insecure_decode_claims(token)
                    .map_err(|_| Failure::Malformed)?;
                check_times(&claims, self.leeway_s, now_s())?;
                self.check_audience_and_issuer(&claims)?;
                Ok(claims)
            }
        }
    }
}

impl Verifier {
    /// `aud` / `iss` when configured (the key path has jsonwebtoken check them): a token
    /// that names them must name the configured ones, as in the verified mode.
    fn check_audience_and_issuer(&self, claims: &Claims) -> Result<(), Failure> {
        if let (Some(want), Some(aud)) = (&self.audience, claims.get("aud")) {
            let ok = match aud {
                Value::String(s) => s == want,
                Value::Array(list) => list.iter().any(|v| v.as_str() == Some(want)),
                _ => false,
            };
            if !ok {
                return Err(Failure::InvalidSignature);
            }
        }
        if let (Some(want), Some(iss)) = (&self.issuer, claims.get("iss"))
            && iss.as_str() != Some(want)
        {
            return Err(Failure::InvalidSignature);
        }
        Ok(())
    }
}

fn family_of(a: Algorithm) -> &'static str {
    match a {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => "rsa",
        Algorithm::ES256 | Algorithm::ES384 => "ec",
        Algorithm::EdDSA => "ed",
        _ => "hmac",
    }
}

fn alg_name(a: Algorithm) -> &'static str {
    match a {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::EdDSA => "EdDSA",
        // A future algorithm is never in the configured list under a name we know.
        _ => "",
    }
}

/// The `alg` of a token's header, read before anything else is decoded.
fn header_alg(token: &str) -> Result<String, Failure> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Failure::Malformed);
    };
    let raw = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| Failure::Malformed)?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| Failure::Malformed)?;
    v.get("alg")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or(Failure::Malformed)
}

fn map_error(kind: &jsonwebtoken::errors::ErrorKind) -> Failure {
    use jsonwebtoken::errors::ErrorKind as K;
    match kind {
        K::ExpiredSignature | K::ImmatureSignature => Failure::Expired,
        K::InvalidSignature
        | K::InvalidAlgorithm
        | K::InvalidAlgorithmName
        | K::InvalidAudience
        | K::InvalidIssuer => Failure::InvalidSignature,
        _ => Failure::Malformed,
    }
}

pub use crate::clock::now_s;

/// `exp` and `nbf` with leeway (RFC 7519 §4.1.4-5); a non-numeric value is malformed.
fn check_times(claims: &Claims, leeway_s: u64, now: u64) -> Result<(), Failure> {
    if let Some(exp) = claims.get("exp") {
        let exp = exp.as_u64().ok_or(Failure::Malformed)?;
        if exp.saturating_add(leeway_s) < now {
            return Err(Failure::Expired);
        }
    }
    if let Some(nbf) = claims.get("nbf") {
        let nbf = nbf.as_u64().ok_or(Failure::Malformed)?;
        if nbf > now.saturating_add(leeway_s) {
            return Err(Failure::Expired);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn hs256(claims: Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    fn verifier(key: KeySource<'_>) -> Verifier {
        Verifier::new(&["HS256".into()], key, 5, None, None).unwrap()
    }

    #[test]
    fn valid_and_tampered_tokens() {
        let v = verifier(KeySource::Secret(SECRET));
        let t = hs256(json!({"sub": "42", "exp": now_s() + 60}));
        assert_eq!(v.claims(&t).unwrap()["sub"], "42");
        // Flip a character in the middle of the signature (the last one carries padding bits).
        let mut tampered: Vec<char> = t.chars().collect();
        let i = tampered.len() - 10;
        tampered[i] = if tampered[i] == 'A' { 'B' } else { 'A' };
        let tampered: String = tampered.into_iter().collect();
        assert_eq!(v.claims(&tampered).unwrap_err(), Failure::InvalidSignature);
        assert_eq!(v.claims("not.a.jwt").unwrap_err(), Failure::Malformed);
        assert_eq!(v.claims("abc").unwrap_err(), Failure::Malformed);
    }

    #[test]
    fn expiry_and_not_before_use_the_leeway() {
        let v = verifier(KeySource::Secret(SECRET));
        assert_eq!(
            v.claims(&hs256(json!({"sub": "1", "exp": now_s() - 60})))
                .unwrap_err(),
            Failure::Expired
        );
        assert!(
            v.claims(&hs256(json!({"sub": "1", "exp": now_s() - 2})))
                .is_ok(),
            "within leeway"
        );
        assert_eq!(
            v.claims(&hs256(json!({"sub": "1", "nbf": now_s() + 60})))
                .unwrap_err(),
            Failure::Expired
        );
        let unverified = verifier(KeySource::None);
        assert_eq!(
            unverified
                .claims(&hs256(json!({"sub": "1", "exp": now_s() - 60})))
                .unwrap_err(),
            Failure::Expired
        );
    }

    #[test]
    fn alg_none_is_refused_in_every_mode() {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(br#"{"sub":"42"}"#);
        let token = format!("{header}.{payload}.");
        assert_eq!(
            verifier(KeySource::Secret(SECRET))
                .claims(&token)
                .unwrap_err(),
            Failure::InvalidSignature
        );
        assert_eq!(
            verifier(KeySource::None).claims(&token).unwrap_err(),
            Failure::InvalidSignature
        );
    }

    #[test]
    fn audience_and_issuer_apply_without_a_key_too() {
        for key in [KeySource::None, KeySource::Secret(SECRET)] {
            let v = Verifier::new(&["HS256".into()], key, 5, Some("api"), Some("login")).unwrap();
            let exp = now_s() + 60;
            assert!(
                v.claims(&hs256(
                    json!({"sub": "1", "exp": exp, "aud": "api", "iss": "login"})
                ))
                .is_ok()
            );
            assert!(
                v.claims(&hs256(json!({"sub": "1", "exp": exp, "aud": ["x", "api"]})))
                    .is_ok()
            );
            assert_eq!(
                v.claims(&hs256(json!({"sub": "1", "exp": exp, "aud": "other"})))
                    .unwrap_err(),
                Failure::InvalidSignature
            );
            assert_eq!(
                v.claims(&hs256(json!({"sub": "1", "exp": exp, "iss": "evil"})))
                    .unwrap_err(),
                Failure::InvalidSignature
            );
        }
    }

    #[test]
    fn families_cannot_be_mixed_or_confused() {
        assert!(
            Verifier::new(
                &["HS256".into(), "RS256".into()],
                KeySource::None,
                0,
                None,
                None
            )
            .is_err()
        );
        assert!(
            Verifier::new(&["RS256".into()], KeySource::Secret(SECRET), 0, None, None).is_err()
        );
        assert!(
            Verifier::new(&["HS256".into()], KeySource::PublicPem(b"x"), 0, None, None).is_err()
        );
        assert!(
            Verifier::new(
                &["HS256".into()],
                KeySource::Secret(b"short"),
                0,
                None,
                None
            )
            .is_err()
        );
        assert!(Verifier::new(&["none".into()], KeySource::None, 0, None, None).is_err());
    }
}
