//! Who the caller is, from something the caller cannot forge: the kernel's peer credentials on
//! the Unix socket ([`local_identity`], fed by `UnixStream::peer_cred()`), or a bearer JWT on
//! WebSocket and gRPC ([`JwtVerifier`], with [`bearer_from_header`] and
//! [`bearer_from_subprotocols`] to find the token). Each is done once per connection, when it
//! is accepted (or when a WebSocket client sends `{"op":"auth"}`; on gRPC, once per call), and
//! gives an [`Identity`].
//!
//! Token rules, stated once (docs/identity.md says the same for users):
//! - The algorithm comes from the keys, never from the token: a shared secret accepts HS256,
//!   HS384 and HS512; an RSA public key the RS* and PS* family; an EC key ES256 (P-256) or
//!   ES384 (P-384); an Ed25519 key EdDSA. `alg: none`, and a token whose algorithm no
//!   configured key takes (an HS256 token signed with the RSA public key as its secret, the
//!   classic confusion), are refused before any signature is looked at.
//! - `exp` and `sub` (a string) are required; `exp` and `nbf` are checked with
//!   [`LEEWAY_SECS`] of leeway for clock skew; `aud` is checked (and required) only when an
//!   audience is configured, and ignored otherwise.
//! - Every refusal is `UNAUTHENTICATED` with a message that says why, and never the token.

use std::collections::HashMap;
use std::ffi::CString;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use nix::unistd::{Gid, Group, Uid, User, getgrouplist};
use serde::Deserialize;

use crate::protocol::{ErrorCode, Frontend, GatewayError, Identity};

/// Seconds of clock skew allowed either side of `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 5;
/// A longer token is refused unread (a JWT is a few hundred bytes; an RSA-signed one with many
/// claims a few kilobytes).
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// The shortest HS256 secret taken: RFC 7518 asks for a key as long as the hash (256 bits).
pub const MIN_SECRET_LEN: usize = 32;
/// The longest `sub` taken; it travels in a header on every message.
pub const MAX_SUB_LEN: usize = 256;

/// The WebSocket subprotocol of this gateway's protocol, selected when a client offers it.
pub const SUBPROTOCOL_V1: &str = "ipc-gateway.v1";
/// A subprotocol entry that carries a token (`bearer.<jwt>`); never selected or echoed.
pub const BEARER_SUBPROTOCOL_PREFIX: &str = "bearer.";

// ---------------------------------------------------------------------------------------------
// Peer credentials

/// The identity of a Unix-socket peer whose credentials the kernel gave (`peer_cred()`): the
/// user name of `uid`, the group name of `gid`, and the user's groups with their names are
/// looked up once, here. A name the databases do not have stays `None` (a uid without a
/// passwd entry has no user and no groups); a failed lookup is treated the same way.
///
/// `groups` comes from the group database (`getgrouplist` for the user name and its passwd
/// primary group), not from the peer process itself: a process that dropped or added groups
/// after login is described by its user's configured groups. Each call reads the user and
/// group databases (with the `files` NSS backend, a scan of /etc/passwd and /etc/group).
pub fn local_identity(uid: u32, gid: u32, pid: Option<i32>) -> Identity {
    let user = User::from_uid(Uid::from_raw(uid)).ok().flatten();
    let group = group_name(gid);
    let groups = user
        .as_ref()
        .and_then(|user| {
            let name = CString::new(user.name.as_bytes()).ok()?;
            getgrouplist(&name, user.gid).ok()
        })
        .unwrap_or_default();
    let group_names = groups
        .iter()
        .filter_map(|g| {
            if g.as_raw() == gid {
                group.clone()
            } else {
                group_name(g.as_raw())
            }
        })
        .collect();
    Identity {
        uid: Some(uid),
        gid: Some(gid),
        pid,
        user: user.map(|user| user.name),
        group,
        groups: groups.iter().map(|g| g.as_raw()).collect(),
        group_names,
        ..Identity::anonymous(Frontend::Uds, None)
    }
}

/// [`local_identity`] with its lookups remembered per (uid, gid) for a while. Measured here
/// (glibc, `files systemd` NSS, 24 users): a lookup costs about 40 µs for a known uid and
/// 140 µs for one without a passwd entry, about as much as a whole request's round trip, so a
/// client that opens a connection per request would pay it every time; with LDAP or sssd behind
/// NSS it can take far longer, and it blocks the calling thread. A miss still looks up
/// synchronously (call it from `spawn_blocking` where NSS may be slow); a hit is a map lookup.
/// Renamed users and changed group memberships are seen after `ttl`.
pub struct LocalIdentities {
    ttl: Duration,
    /// (uid, gid) → when it was looked up, and what was found (`pid` not kept).
    entries: Mutex<HashMap<(u32, u32), (Instant, Identity)>>,
}

impl LocalIdentities {
    /// Distinct (uid, gid) pairs remembered at most; past it the memory starts afresh.
    pub const MAX_ENTRIES: usize = 4096;

    pub fn new(ttl: Duration) -> LocalIdentities {
        LocalIdentities {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The identity of a Unix-socket peer, looked up at most once per `ttl`.
    pub fn resolve(&self, uid: u32, gid: u32, pid: Option<i32>, now: Instant) -> Identity {
        let fresh = |at: Instant| now.saturating_duration_since(at) < self.ttl;
        if let Some((at, identity)) = self.lock().get(&(uid, gid))
            && fresh(*at)
        {
            return Identity {
                pid,
                ..identity.clone()
            };
        }
        // Looked up without the lock held: other peers are not kept waiting on NSS.
        let identity = local_identity(uid, gid, pid);
        let mut entries = self.lock();
        if entries.len() >= Self::MAX_ENTRIES {
            entries.retain(|_, (at, _)| fresh(*at));
            if entries.len() >= Self::MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(
            (uid, gid),
            (
                now,
                Identity {
                    pid: None,
                    ..identity.clone()
                },
            ),
        );
        identity
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(u32, u32), (Instant, Identity)>> {
        // A panic elsewhere while holding it leaves a plain map: still usable.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn group_name(gid: u32) -> Option<String> {
    Group::from_gid(Gid::from_raw(gid))
        .ok()
        .flatten()
        .map(|group| group.name)
}

// ---------------------------------------------------------------------------------------------
// Bearer tokens

/// The token of an `Authorization` header value `Bearer <jwt>` (the scheme in any case).
/// `None` for another scheme, no token, or a token with spaces in it.
pub fn bearer_from_header(value: &str) -> Option<&str> {
    let value = value.trim();
    let (scheme, token) = value.split_once([' ', '\t'])?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    let plain = !token.is_empty() && !token.contains(|c: char| c.is_whitespace() || c == ',');
    plain.then_some(token)
}

/// Reads a `Sec-WebSocket-Protocol` list (`ipc-gateway.v1, bearer.<jwt>`): the token of the
/// first `bearer.` entry, and whether `ipc-gateway.v1` was offered (the one to select; a
/// `bearer.` entry must never be selected, since the answer would echo the token). A JWT is
/// base64url and dots, all valid subprotocol characters. With several headers, pass each (or
/// their values joined with commas).
pub fn bearer_from_subprotocols(list: &str) -> (Option<&str>, bool) {
    let mut token = None;
    let mut wants_v1 = false;
    for entry in list.split(',').map(str::trim) {
        if entry == SUBPROTOCOL_V1 {
            wants_v1 = true;
        } else if let Some(found) = entry.strip_prefix(BEARER_SUBPROTOCOL_PREFIX)
            && !found.is_empty()
            && token.is_none()
        {
            token = Some(found);
        }
    }
    (token, wants_v1)
}

// ---------------------------------------------------------------------------------------------
// JWT verification

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The `sub` claim: the caller's name.
    pub sub: String,
    /// The `exp` claim, in seconds since the Unix epoch.
    pub exp: u64,
}

impl Verified {
    /// The caller's identity on a connection that presented this token.
    pub fn identity(&self, frontend: Frontend, addr: Option<String>) -> Identity {
        Identity {
            sub: Some(self.sub.clone()),
            ..Identity::anonymous(frontend, addr)
        }
    }
}

/// Verifies bearer JWTs against the configured shared secret and/or public key. Cheap to clone
/// (a few small keys); built once at start.
#[derive(Clone)]
pub struct JwtVerifier {
    keys: Vec<Key>,
    audience: Option<String>,
}

/// One configured key and the one way to check tokens with it.
#[derive(Clone)]
struct Key {
    /// For messages: "the HS256 secret", "the Ed25519 public key", ...
    what: &'static str,
    key: DecodingKey,
    /// Its algorithms, the required claims, leeway and audience.
    validation: Validation,
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtVerifier")
            .field(
                "keys",
                &self.keys.iter().map(|k| k.what).collect::<Vec<_>>(),
            )
            .field("audience", &self.audience)
            .finish()
    }
}

impl JwtVerifier {
    /// Reads `--auth-jwt-secret-file` (an HS256 secret: the file's bytes, trailing line
    /// breaks removed, at least [`MIN_SECRET_LEN`] bytes) and `--auth-jwt-public-key-file` (a
    /// PEM public key: RSA, EC P-256/P-384 or Ed25519, told from the PEM). `None` when neither
    /// is given; both may be, and then a token signed either way is accepted. An empty
    /// `audience` is no audience. Errors name the file and say what is wrong with it.
    pub fn from_files(
        secret_file: Option<&Path>,
        public_key_file: Option<&Path>,
        audience: Option<String>,
    ) -> Result<Option<JwtVerifier>, String> {
        let read = |what: &str, path: &Path| {
            std::fs::read(path).map_err(|err| format!("{what} {}: {err}", path.display()))
        };
        let secret = secret_file
            .map(|path| read("JWT secret file", path).map(|bytes| (path, bytes)))
            .transpose()?;
        let public_key = public_key_file
            .map(|path| read("JWT public key file", path).map(|bytes| (path, bytes)))
            .transpose()?;
        let mut keys = Vec::new();
        if let Some((path, bytes)) = &secret {
            keys.push(
                secret_key(bytes)
                    .map_err(|err| format!("JWT secret file {}: {err}", path.display()))?,
            );
        }
        if let Some((path, bytes)) = &public_key {
            keys.push(
                public_key_from_pem(bytes)
                    .map_err(|err| format!("JWT public key file {}: {err}", path.display()))?,
            );
        }
        Ok(JwtVerifier::with_keys(keys, audience))
    }

    /// The same from the contents: `secret` as the secret file holds it, `public_key_pem` as
    /// the public key file does.
    pub fn new(
        secret: Option<&[u8]>,
        public_key_pem: Option<&[u8]>,
        audience: Option<String>,
    ) -> Result<Option<JwtVerifier>, String> {
        let mut keys = Vec::new();
        if let Some(secret) = secret {
            keys.push(secret_key(secret).map_err(|err| format!("JWT secret: {err}"))?);
        }
        if let Some(pem) = public_key_pem {
            keys.push(public_key_from_pem(pem).map_err(|err| format!("JWT public key: {err}"))?);
        }
        Ok(JwtVerifier::with_keys(keys, audience))
    }

    fn with_keys(mut keys: Vec<Key>, audience: Option<String>) -> Option<JwtVerifier> {
        if keys.is_empty() {
            return None;
        }
        // Exactly one backend is compiled in (rust_crypto), so this is the process default
        // already; installing it makes sure a second backend enabled elsewhere in the build
        // can never leave jsonwebtoken without one (it would panic on the first token).
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
        let audience = audience.filter(|aud| !aud.trim().is_empty());
        for key in &mut keys {
            let validation = &mut key.validation;
            validation.leeway = LEEWAY_SECS;
            validation.validate_exp = true;
            validation.validate_nbf = true;
            validation.set_required_spec_claims(&["exp", "sub"]);
            match &audience {
                Some(aud) => {
                    validation.set_audience(&[aud]);
                    validation.required_spec_claims.insert("aud".to_owned());
                }
                None => validation.validate_aud = false,
            }
        }
        Some(JwtVerifier { keys, audience })
    }

    /// The algorithms some configured key accepts, by name.
    pub fn algorithms(&self) -> Vec<&'static str> {
        self.keys
            .iter()
            .flat_map(|key| key.validation.algorithms.iter().map(|alg| alg_name(*alg)))
            .collect()
    }

    /// Checks a token: its algorithm against the configured keys, its signature, `exp`, `nbf`,
    /// `aud` (when configured) and `sub`. Every refusal is `UNAUTHENTICATED`.
    pub fn verify(&self, token: &str) -> Result<Verified, GatewayError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(refused(format!(
                "token is longer than {MAX_TOKEN_LEN} bytes"
            )));
        }
        let alg = header_alg(token)?;
        let Some(key) = self
            .keys
            .iter()
            .find(|key| key.validation.algorithms.contains(&alg))
        else {
            return Err(refused(format!(
                "algorithm {} is not accepted here (accepted: {})",
                alg_name(alg),
                self.algorithms().join(", ")
            )));
        };
        // The claims as a JSON object, typed loosely: a claim of the wrong type is reported by
        // the validation ("no sub claim") rather than as malformed JSON.
        let mut claims = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &key.key,
            &key.validation,
        )
        .map_err(|err| self.why(err.kind(), key))?
        .claims;
        let sub = match claims.remove("sub") {
            Some(serde_json::Value::String(sub)) => sub,
            _ => return Err(refused("token has no sub claim (a string)")),
        };
        check_sub(&sub)?;
        let exp = claims
            .get("exp")
            .and_then(|exp| exp.as_u64().or_else(|| exp.as_f64().map(|f| f as u64)))
            .ok_or_else(|| refused("token has no exp claim"))?;
        Ok(Verified { sub, exp })
    }

    /// A refusal's message, from jsonwebtoken's reason.
    fn why(&self, kind: &ErrorKind, key: &Key) -> GatewayError {
        refused(match kind {
            ErrorKind::InvalidSignature => {
                "bad signature: not signed by a key this gateway trusts".to_owned()
            }
            ErrorKind::ExpiredSignature => "token has expired (exp is past)".to_owned(),
            ErrorKind::ImmatureSignature => {
                "token is not valid yet (nbf is in the future)".to_owned()
            }
            ErrorKind::InvalidAudience => match &self.audience {
                Some(aud) => format!("wrong audience: aud does not name {aud:?}"),
                None => "wrong audience".to_owned(),
            },
            ErrorKind::MissingRequiredClaim(claim) if claim == "sub" => {
                "token has no sub claim (a string)".to_owned()
            }
            ErrorKind::MissingRequiredClaim(claim) => format!("token has no {claim} claim"),
            ErrorKind::InvalidClaimFormat(claim) => {
                format!("token's {claim} claim has the wrong type")
            }
            ErrorKind::InvalidAlgorithm
            | ErrorKind::MissingAlgorithm
            | ErrorKind::UnsupportedAlgorithm => "algorithm is not accepted here".to_owned(),
            ErrorKind::InvalidToken
            | ErrorKind::Base64(_)
            | ErrorKind::Json(_)
            | ErrorKind::Utf8(_) => {
                "malformed token: not three base64url parts with JSON claims".to_owned()
            }
            ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidEddsaKey
            | ErrorKind::InvalidRsaKey(_)
            | ErrorKind::InvalidKeyFormat => {
                format!("token cannot be checked with {}", key.what)
            }
            _ => "token refused".to_owned(),
        })
    }
}

/// A token header's `alg`, read before anything else so that the key is chosen by what the
/// gateway accepts, and `none` gets its own answer.
fn header_alg(token: &str) -> Result<Algorithm, GatewayError> {
    #[derive(Deserialize)]
    struct Header {
        alg: String,
    }
    let malformed = || refused("malformed token: not three base64url parts with JSON claims");
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed());
    };
    let header = URL_SAFE_NO_PAD.decode(header).map_err(|_| malformed())?;
    let header: Header = serde_json::from_slice(&header).map_err(|_| malformed())?;
    if header.alg.eq_ignore_ascii_case("none") {
        return Err(refused(
            "unsigned tokens (alg none) are not accepted".to_owned(),
        ));
    }
    Algorithm::from_str(&header.alg).map_err(|_| {
        let shown =
            if header.alg.len() <= 16 && header.alg.bytes().all(|b| b.is_ascii_alphanumeric()) {
                header.alg.as_str()
            } else {
                "in the header"
            };
        refused(format!("algorithm {shown} is not supported"))
    })
}

/// A `sub` that can travel in a header and be matched by policy as it is.
fn check_sub(sub: &str) -> Result<(), GatewayError> {
    if sub.is_empty() {
        return Err(refused("token's sub claim is empty"));
    }
    if sub.len() > MAX_SUB_LEN {
        return Err(refused(format!(
            "token's sub claim is longer than {MAX_SUB_LEN} bytes"
        )));
    }
    if sub.contains(char::is_control) || sub.trim() != sub {
        return Err(refused(
            "token's sub claim has control characters or surrounding spaces",
        ));
    }
    Ok(())
}

fn refused(message: impl Into<String>) -> GatewayError {
    GatewayError::new(ErrorCode::Unauthenticated, message)
}

fn alg_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::EdDSA => "EdDSA",
        _ => "another algorithm",
    }
}

/// A key with the algorithms it accepts (the rest of its validation is set by `with_keys`).
fn key(what: &'static str, key: DecodingKey, algorithms: &[Algorithm]) -> Key {
    let mut validation = Validation::new(algorithms[0]);
    validation.algorithms = algorithms.to_vec();
    Key {
        what,
        key,
        validation,
    }
}

/// The shared secret: the bytes as given, trailing line breaks removed.
fn secret_key(bytes: &[u8]) -> Result<Key, String> {
    let end = bytes
        .iter()
        .rposition(|b| !matches!(b, b'\n' | b'\r'))
        .map_or(0, |last| last + 1);
    let secret = &bytes[..end];
    if secret.is_empty() {
        return Err("is empty".to_owned());
    }
    if secret.len() < MIN_SECRET_LEN {
        return Err(format!(
            "holds {} bytes; an HS256 secret needs at least {MIN_SECRET_LEN} \
             (e.g. `head -c 32 /dev/urandom | base64 > FILE`)",
            secret.len()
        ));
    }
    let decoding = DecodingKey::from_secret(secret).map_err(|err| err.to_string())?;
    Ok(key(
        "the HS256 secret",
        decoding,
        &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
    ))
}

/// A PEM public key: Ed25519, EC (P-256 or P-384) or RSA, told from the PEM itself, and tried
/// once so that a key that parses but cannot verify fails at start, not on the first token.
fn public_key_from_pem(pem: &[u8]) -> Result<Key, String> {
    let text = String::from_utf8_lossy(pem);
    if text.contains("PRIVATE KEY-----") {
        return Err(
            "holds a private key; give its public key (`openssl pkey -in KEY -pubout`)".to_owned(),
        );
    }
    if !text.contains("-----BEGIN PUBLIC KEY-----")
        && !text.contains("-----BEGIN RSA PUBLIC KEY-----")
    {
        return Err(
            "is not a PEM public key (a `-----BEGIN PUBLIC KEY-----` block: RSA, EC P-256/P-384 \
             or Ed25519)"
                .to_owned(),
        );
    }
    let key = if let Ok(ed) = DecodingKey::from_ed_pem(pem) {
        key("the Ed25519 public key", ed, &[Algorithm::EdDSA])
    } else if let Ok(ec) = DecodingKey::from_ec_pem(pem) {
        // The uncompressed point: 0x04, then x and y of the curve's size.
        match ec.try_get_as_bytes().map(<[u8]>::len) {
            Ok(65) => key("the EC P-256 public key", ec, &[Algorithm::ES256]),
            Ok(97) => key("the EC P-384 public key", ec, &[Algorithm::ES384]),
            _ => return Err("holds an EC key on a curve other than P-256 or P-384".to_owned()),
        }
    } else if let Ok(rsa) = DecodingKey::from_rsa_pem(pem) {
        key(
            "the RSA public key",
            rsa,
            &[
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
            ],
        )
    } else {
        return Err("holds no RSA, EC or Ed25519 public key that can be read".to_owned());
    };
    let alg = key.validation.algorithms[0];
    // A made-up signature over a made-up message: Ok(false) from a usable key, Err otherwise.
    jsonwebtoken::crypto::verify("AAAA", b"probe", &key.key, alg)
        .map_err(|_| format!("holds {} that cannot be used", key.what))?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode, get_current_timestamp};
    use serde_json::{Value, json};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const ED_PRIVATE: &[u8] = include_bytes!("../../tests/fixtures/keys/ed25519.pem");
    const ED_PUBLIC: &[u8] = include_bytes!("../../tests/fixtures/keys/ed25519.pub.pem");
    const ED_OTHER_PRIVATE: &[u8] = include_bytes!("../../tests/fixtures/keys/ed25519-other.pem");
    const P256_PRIVATE: &[u8] = include_bytes!("../../tests/fixtures/keys/p256.pem");
    const P256_PUBLIC: &[u8] = include_bytes!("../../tests/fixtures/keys/p256.pub.pem");
    const P384_PRIVATE: &[u8] = include_bytes!("../../tests/fixtures/keys/p384.pem");
    const P384_PUBLIC: &[u8] = include_bytes!("../../tests/fixtures/keys/p384.pub.pem");
    const RSA_PRIVATE: &[u8] = include_bytes!("../../tests/fixtures/keys/rsa.pem");
    const RSA_PUBLIC: &[u8] = include_bytes!("../../tests/fixtures/keys/rsa.pub.pem");

    fn now() -> u64 {
        get_current_timestamp()
    }

    fn claims(sub: &str) -> Value {
        json!({"sub": sub, "exp": now() + 600, "iat": now()})
    }

    fn hs256(claims: &Value, secret: &[u8]) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret).unwrap(),
        )
        .unwrap()
    }

    fn eddsa(claims: &Value, private: &[u8]) -> String {
        encode(
            &Header::new(Algorithm::EdDSA),
            claims,
            &EncodingKey::from_ed_pem(private).unwrap(),
        )
        .unwrap()
    }

    fn hs_verifier() -> JwtVerifier {
        JwtVerifier::new(Some(SECRET), None, None).unwrap().unwrap()
    }

    fn ed_verifier() -> JwtVerifier {
        JwtVerifier::new(None, Some(ED_PUBLIC), None)
            .unwrap()
            .unwrap()
    }

    /// The refusal's message, after checking it is UNAUTHENTICATED and does not echo the token.
    fn refusal(verifier: &JwtVerifier, token: &str) -> String {
        let error = verifier.verify(token).expect_err("token was accepted");
        assert_eq!(error.code, ErrorCode::Unauthenticated, "{error}");
        for part in token.split('.').filter(|part| part.len() > 8) {
            assert!(!error.message.contains(part), "{error} echoes the token");
        }
        error.message
    }

    fn b64(json: &Value) -> String {
        URL_SAFE_NO_PAD.encode(json.to_string())
    }

    #[test]
    fn the_current_user_is_resolved_with_names_and_groups() {
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        let identity = local_identity(uid, gid, Some(4242));
        assert_eq!(identity.frontend, Frontend::Uds);
        assert_eq!(
            (identity.uid, identity.gid, identity.pid),
            (Some(uid), Some(gid), Some(4242))
        );
        let passwd = User::from_uid(Uid::from_raw(uid)).unwrap();
        assert_eq!(identity.user, passwd.as_ref().map(|u| u.name.clone()));
        if let Some(passwd) = passwd {
            assert!(identity.user.is_some());
            assert!(
                identity.groups.contains(&passwd.gid.as_raw()),
                "the user's own primary group is among its groups: {identity:?}"
            );
            assert!(!identity.group_names.is_empty());
        }
        if let Some(group) = Group::from_gid(Gid::from_raw(gid)).unwrap() {
            assert_eq!(identity.group.as_deref(), Some(group.name.as_str()));
        }
        assert!(!identity.is_anonymous());
        assert!(identity.short_form().starts_with(&format!("uid={uid} ")));
    }

    #[test]
    fn a_uid_without_a_passwd_entry_keeps_its_numbers_and_no_names() {
        let identity = local_identity(4_000_000, 4_000_000, None);
        assert_eq!(identity.uid, Some(4_000_000));
        assert_eq!(identity.gid, Some(4_000_000));
        assert_eq!(identity.pid, None);
        assert_eq!(identity.user, None);
        assert_eq!(identity.group, None);
        assert!(identity.groups.is_empty() && identity.group_names.is_empty());
        assert!(!identity.is_anonymous(), "the kernel vouches for the uid");
        assert_eq!(identity.short_form(), "uid=4000000");
    }

    #[test]
    fn local_identities_are_remembered_for_their_ttl_with_each_connection_pid() {
        let cache = LocalIdentities::new(Duration::from_secs(60));
        let start = Instant::now();
        let first = cache.resolve(4_000_000, 4_000_000, Some(1), start);
        assert_eq!(first, local_identity(4_000_000, 4_000_000, Some(1)));
        // Plant a name to tell a remembered answer from a new lookup.
        cache
            .lock()
            .get_mut(&(4_000_000, 4_000_000))
            .unwrap()
            .1
            .user = Some("remembered".into());
        let hit = cache.resolve(
            4_000_000,
            4_000_000,
            Some(2),
            start + Duration::from_secs(59),
        );
        assert_eq!(hit.user.as_deref(), Some("remembered"));
        assert_eq!(hit.pid, Some(2), "the pid is the connection's own");
        let other_gid = cache.resolve(4_000_000, 4_000_001, None, start);
        assert_eq!(other_gid.user, None, "keyed by uid and gid");
        let stale = cache.resolve(
            4_000_000,
            4_000_000,
            Some(3),
            start + Duration::from_secs(60),
        );
        assert_eq!(stale.user, None, "looked up again after the ttl");
        assert_eq!(stale.pid, Some(3));
    }

    #[test]
    fn local_identities_stay_bounded() {
        let cache = LocalIdentities::new(Duration::from_secs(60));
        let now = Instant::now();
        for uid in 0..(LocalIdentities::MAX_ENTRIES as u32 + 10) {
            cache.resolve(4_000_000 + uid, 4_000_000, None, now);
        }
        assert!(cache.lock().len() <= LocalIdentities::MAX_ENTRIES);
    }

    #[test]
    fn bearer_header_takes_the_scheme_in_any_case() {
        assert_eq!(
            bearer_from_header("Bearer abc.def.ghi"),
            Some("abc.def.ghi")
        );
        assert_eq!(
            bearer_from_header("bearer abc.def.ghi"),
            Some("abc.def.ghi")
        );
        assert_eq!(
            bearer_from_header("  BEARER   abc.def.ghi  "),
            Some("abc.def.ghi")
        );
        assert_eq!(bearer_from_header("Bearer\tabc"), Some("abc"));
        for value in [
            "",
            "Bearer",
            "Bearer ",
            "Basic dXNlcjpwYXNz",
            "Bearerabc",
            "Bearer a b",
            "Bearer a,b",
            "abc.def.ghi",
        ] {
            assert_eq!(bearer_from_header(value), None, "{value:?}");
        }
    }

    #[test]
    fn subprotocols_give_the_token_and_whether_v1_is_offered() {
        assert_eq!(
            bearer_from_subprotocols("ipc-gateway.v1, bearer.eyJh.eyJz.c2ln"),
            (Some("eyJh.eyJz.c2ln"), true)
        );
        assert_eq!(
            bearer_from_subprotocols("bearer.a-b_c.d.e,ipc-gateway.v1"),
            (Some("a-b_c.d.e"), true)
        );
        assert_eq!(bearer_from_subprotocols("ipc-gateway.v1"), (None, true));
        assert_eq!(
            bearer_from_subprotocols("bearer.x.y.z"),
            (Some("x.y.z"), false)
        );
        assert_eq!(bearer_from_subprotocols("chat, superchat"), (None, false));
        assert_eq!(bearer_from_subprotocols(""), (None, false));
        assert_eq!(
            bearer_from_subprotocols("bearer., ipc-gateway.v1"),
            (None, true)
        );
        assert_eq!(
            bearer_from_subprotocols("bearer.first, bearer.second"),
            (Some("first"), false),
            "the first token is the one"
        );
        assert_eq!(
            bearer_from_subprotocols("IPC-GATEWAY.V1, Bearer.x"),
            (None, false),
            "subprotocol names are compared exactly"
        );
    }

    #[test]
    fn a_valid_hs256_token_gives_its_subject() {
        let exp = now() + 600;
        let token = hs256(&json!({"sub": "bob", "exp": exp}), SECRET);
        let verified = hs_verifier().verify(&token).unwrap();
        assert_eq!(
            verified,
            Verified {
                sub: "bob".into(),
                exp
            }
        );
        let identity = verified.identity(Frontend::Ws, Some("127.0.0.1:5".into()));
        assert_eq!(identity.sub.as_deref(), Some("bob"));
        assert_eq!(identity.short_form(), "sub=bob");
    }

    #[test]
    fn a_valid_eddsa_token_gives_its_subject() {
        let token = eddsa(&claims("alice"), ED_PRIVATE);
        assert_eq!(ed_verifier().verify(&token).unwrap().sub, "alice");
    }

    #[test]
    fn valid_es256_es384_and_rs256_tokens_are_accepted() {
        for (private, public, alg) in [
            (P256_PRIVATE, P256_PUBLIC, Algorithm::ES256),
            (P384_PRIVATE, P384_PUBLIC, Algorithm::ES384),
            (RSA_PRIVATE, RSA_PUBLIC, Algorithm::RS256),
        ] {
            let encoding = match alg {
                Algorithm::RS256 => EncodingKey::from_rsa_pem(private),
                _ => EncodingKey::from_ec_pem(private),
            }
            .unwrap();
            let token = encode(&Header::new(alg), &claims("carol"), &encoding).unwrap();
            let verifier = JwtVerifier::new(None, Some(public), None).unwrap().unwrap();
            assert_eq!(verifier.verify(&token).unwrap().sub, "carol", "{alg:?}");
        }
    }

    #[test]
    fn tokens_made_by_pyjwt_as_docs_identity_md_shows_are_accepted() {
        // PyJWT 2 (`jwt.encode({"sub": "pyjwt-user", "exp": 4102444800}, key, algorithm=...)`)
        // with tests/fixtures/keys/ed25519.pem and with SECRET: another implementation agrees.
        const EDDSA: &str = "eyJhbGciOiJFZERTQSIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJweWp3dC11c2VyIiwiZXhwIjo0MTAyNDQ0ODAwfQ.3hglfRISI8oAd3cknHlqHjFV1Mhmh0fhmIyi6vTo8eGrGF7P5TcMGS75yqBpRl3XXKlo9W0OuNd1D09npju8AQ";
        const HS256: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJweWp3dC11c2VyIiwiZXhwIjo0MTAyNDQ0ODAwfQ.kh2QHjU_9FR7lZhBHslwvZjQrCdridymjKHjpGH5-Ig";
        let expected = Verified {
            sub: "pyjwt-user".into(),
            exp: 4_102_444_800,
        };
        assert_eq!(ed_verifier().verify(EDDSA).unwrap(), expected);
        assert_eq!(hs_verifier().verify(HS256).unwrap(), expected);
    }

    #[test]
    fn with_both_keys_a_token_signed_either_way_is_accepted() {
        let verifier = JwtVerifier::new(Some(SECRET), Some(ED_PUBLIC), None)
            .unwrap()
            .unwrap();
        assert_eq!(verifier.algorithms(), ["HS256", "HS384", "HS512", "EdDSA"]);
        let hs = hs256(&claims("h"), SECRET);
        let ed = eddsa(&claims("e"), ED_PRIVATE);
        assert_eq!(verifier.verify(&hs).unwrap().sub, "h");
        assert_eq!(verifier.verify(&ed).unwrap().sub, "e");
    }

    #[test]
    fn an_expired_token_is_refused() {
        let old = json!({"sub": "bob", "exp": now() - 3600});
        assert!(refusal(&hs_verifier(), &hs256(&old, SECRET)).contains("expired"));
        let just = json!({"sub": "bob", "exp": now() - 1});
        assert!(
            hs_verifier().verify(&hs256(&just, SECRET)).is_ok(),
            "within the leeway"
        );
    }

    #[test]
    fn a_token_not_valid_yet_is_refused() {
        let future = json!({"sub": "bob", "exp": now() + 7200, "nbf": now() + 3600});
        assert!(refusal(&hs_verifier(), &hs256(&future, SECRET)).contains("not valid yet"));
        let almost = json!({"sub": "bob", "exp": now() + 7200, "nbf": now() + 1});
        assert!(
            hs_verifier().verify(&hs256(&almost, SECRET)).is_ok(),
            "within the leeway"
        );
    }

    #[test]
    fn a_forged_token_is_refused() {
        let forged = eddsa(&claims("alice"), ED_OTHER_PRIVATE);
        assert!(refusal(&ed_verifier(), &forged).contains("bad signature"));
        let other_secret = hs256(&claims("alice"), b"another secret of thirty-two byte");
        assert!(refusal(&hs_verifier(), &other_secret).contains("bad signature"));
        // A genuine token whose claims were swapped for others.
        let genuine = hs256(&claims("alice"), SECRET);
        let mut parts: Vec<&str> = genuine.split('.').collect();
        let swapped = b64(&claims("root"));
        parts[1] = &swapped;
        assert!(refusal(&hs_verifier(), &parts.join(".")).contains("bad signature"));
        // Forged and expired: the signature is what is reported.
        let old = eddsa(&json!({"sub": "a", "exp": 1}), ED_OTHER_PRIVATE);
        assert!(refusal(&ed_verifier(), &old).contains("bad signature"));
    }

    /// A token with this payload, correctly signed with `SECRET`.
    fn signed_hs256(payload: &str) -> String {
        let message = format!("{}.{payload}", b64(&json!({"alg": "HS256", "typ": "JWT"})));
        let signature = jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &EncodingKey::from_secret(SECRET).unwrap(),
            Algorithm::HS256,
        )
        .unwrap();
        format!("{message}.{signature}")
    }

    #[test]
    fn a_malformed_token_is_refused() {
        let verifier = hs_verifier();
        let header = b64(&json!({"alg": "HS256", "typ": "JWT"}));
        for token in [
            String::new(),
            "garbage".into(),
            "a.b".into(),
            "a.b.c.d".into(),
            "!!!.e30.sig".into(),
            format!("{}.e30.sig", b64(&json!([1, 2]))),
            format!("{}.e30.sig", b64(&json!({"typ": "JWT"}))),
            signed_hs256("not-json"),
            signed_hs256(&b64(&json!([1, 2]))),
            signed_hs256(&b64(&json!("bob"))),
            signed_hs256("!!!"),
        ] {
            assert!(
                refusal(&verifier, &token).contains("malformed"),
                "{token:?}"
            );
        }
        let long = format!("{header}.{}.sig", "A".repeat(MAX_TOKEN_LEN));
        assert!(refusal(&verifier, &long).contains("longer than"));
        // Junk under a signature that does not match is a bad signature: the signature is
        // checked before the claims are read.
        let unsigned_junk = format!("{header}.not-json.c2ln");
        assert!(refusal(&verifier, &unsigned_junk).contains("bad signature"));
        assert_eq!(
            verifier
                .verify(&signed_hs256(&b64(&claims("bob"))))
                .unwrap()
                .sub,
            "bob",
            "the hand-made signer is right"
        );
    }

    #[test]
    fn an_unsigned_token_is_refused() {
        for alg in ["none", "None", "NONE"] {
            let token = format!(
                "{}.{}.",
                b64(&json!({"alg": alg, "typ": "JWT"})),
                b64(&claims("root"))
            );
            for verifier in [hs_verifier(), ed_verifier()] {
                assert!(refusal(&verifier, &token).contains("alg none"), "{alg}");
            }
        }
        let odd = format!(
            "{}.{}.sig",
            b64(&json!({"alg": "HS1024; drop table"})),
            b64(&claims("root"))
        );
        let message = refusal(&hs_verifier(), &odd);
        assert!(
            message.contains("not supported") && !message.contains("drop"),
            "{message}"
        );
    }

    #[test]
    fn an_hs256_token_keyed_with_the_rsa_public_key_is_refused() {
        // The classic confusion: the attacker signs HS256 with the (public) RSA key's bytes as
        // the secret, hoping the verifier uses its key for whatever algorithm the token names.
        let rsa_only = JwtVerifier::new(None, Some(RSA_PUBLIC), None)
            .unwrap()
            .unwrap();
        let token = hs256(&claims("root"), RSA_PUBLIC);
        let message = refusal(&rsa_only, &token);
        assert!(message.contains("HS256 is not accepted"), "{message}");
        // With a secret configured too, HS256 tokens are checked against the secret only.
        let both = JwtVerifier::new(Some(SECRET), Some(RSA_PUBLIC), None)
            .unwrap()
            .unwrap();
        assert!(refusal(&both, &token).contains("bad signature"));
        // And an EdDSA token is not accepted by an HS256-only gateway.
        let ed = eddsa(&claims("root"), ED_PRIVATE);
        assert!(refusal(&hs_verifier(), &ed).contains("EdDSA is not accepted"));
    }

    #[test]
    fn the_audience_is_checked_and_required_when_configured() {
        let verifier = JwtVerifier::new(Some(SECRET), None, Some("ipc-gateway".into()))
            .unwrap()
            .unwrap();
        let mut right = claims("bob");
        right["aud"] = json!("ipc-gateway");
        assert!(verifier.verify(&hs256(&right, SECRET)).is_ok());
        let mut among = claims("bob");
        among["aud"] = json!(["other", "ipc-gateway"]);
        assert!(verifier.verify(&hs256(&among, SECRET)).is_ok());
        let mut wrong = claims("bob");
        wrong["aud"] = json!("billing");
        let message = refusal(&verifier, &hs256(&wrong, SECRET));
        assert!(message.contains("wrong audience"), "{message}");
        assert!(refusal(&verifier, &hs256(&claims("bob"), SECRET)).contains("no aud claim"));
        // Without a configured audience, aud is not looked at.
        assert!(hs_verifier().verify(&hs256(&wrong, SECRET)).is_ok());
        let blank = JwtVerifier::new(Some(SECRET), None, Some(" ".into()))
            .unwrap()
            .unwrap();
        assert!(
            blank.verify(&hs256(&wrong, SECRET)).is_ok(),
            "blank is none"
        );
    }

    #[test]
    fn a_token_without_a_usable_sub_or_exp_is_refused() {
        let verifier = hs_verifier();
        let no_sub = json!({"exp": now() + 600});
        assert!(refusal(&verifier, &hs256(&no_sub, SECRET)).contains("no sub claim"));
        let number = json!({"sub": 42, "exp": now() + 600});
        assert!(refusal(&verifier, &hs256(&number, SECRET)).contains("no sub claim"));
        for bad in ["", " bob", "bob\n", "a\u{0}b"] {
            let token = hs256(&json!({"sub": bad, "exp": now() + 600}), SECRET);
            assert!(refusal(&verifier, &token).contains("sub claim"), "{bad:?}");
        }
        let long = hs256(&claims(&"x".repeat(MAX_SUB_LEN + 1)), SECRET);
        assert!(refusal(&verifier, &long).contains("longer than"));
        let no_exp = json!({"sub": "bob"});
        assert!(refusal(&verifier, &hs256(&no_exp, SECRET)).contains("no exp claim"));
        let text_exp = json!({"sub": "bob", "exp": "tomorrow"});
        assert!(refusal(&verifier, &hs256(&text_exp, SECRET)).contains("exp"));
    }

    #[test]
    fn keys_are_read_from_files_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, [SECRET, b"\r\n"].concat()).unwrap();
        let public = dir.path().join("ed.pub.pem");
        std::fs::write(&public, ED_PUBLIC).unwrap();
        assert!(JwtVerifier::from_files(None, None, None).unwrap().is_none());
        let verifier = JwtVerifier::from_files(Some(&secret), Some(&public), None)
            .unwrap()
            .unwrap();
        let token = hs256(&claims("bob"), SECRET);
        assert!(
            verifier.verify(&token).is_ok(),
            "the trailing line break is not the secret's"
        );

        let missing = dir.path().join("missing");
        let error = JwtVerifier::from_files(Some(&missing), None, None).unwrap_err();
        assert!(
            error.starts_with(&format!("JWT secret file {}: ", missing.display())),
            "{error}"
        );

        let short = dir.path().join("short");
        std::fs::write(&short, "secret\n").unwrap();
        let error = JwtVerifier::from_files(Some(&short), None, None).unwrap_err();
        assert!(
            error.contains("short") && error.contains("holds 6 bytes"),
            "{error}"
        );
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let error = JwtVerifier::from_files(Some(&empty), None, None).unwrap_err();
        assert!(error.ends_with("is empty"), "{error}");

        let private = dir.path().join("ed.pem");
        std::fs::write(&private, ED_PRIVATE).unwrap();
        let error = JwtVerifier::from_files(None, Some(&private), None).unwrap_err();
        assert!(
            error.starts_with(&format!("JWT public key file {}: ", private.display()))
                && error.contains("private key"),
            "{error}"
        );
        let error = JwtVerifier::from_files(None, Some(&secret), None).unwrap_err();
        assert!(error.contains("not a PEM public key"), "{error}");
        let broken = dir.path().join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        )
        .unwrap();
        let error = JwtVerifier::from_files(None, Some(&broken), None).unwrap_err();
        assert!(
            error.contains("no RSA, EC or Ed25519 public key"),
            "{error}"
        );
    }

    #[test]
    fn the_verifier_never_prints_its_keys() {
        let verifier = JwtVerifier::new(Some(SECRET), Some(ED_PUBLIC), Some("gw".into()))
            .unwrap()
            .unwrap();
        let debug = format!("{verifier:?}");
        assert!(!debug.contains("0123456789abcdef"), "{debug}");
        assert!(
            debug.contains("the HS256 secret") && debug.contains("Ed25519"),
            "{debug}"
        );
    }
}
