//! JWT verification (`core::auth::JwtVerifier::verify`) with a fixed HS256 secret and a P-256
//! public key (ES256). The invariant: nothing is accepted unless it is a token correctly signed
//! for one of those keys, checked independently of jsonwebtoken: an accepted HS* token's
//! signature is the HMAC of `header.payload` under the secret (computed here with hmac/sha2)
//! and a verifier with another secret refuses it; an accepted ES256 token's signature verifies
//! with the p256 crate; `alg: none` is never accepted; the claims given back are the token's
//! (`sub`, `exp`, and `exp` not past). Every refusal is UNAUTHENTICATED and never quotes the
//! token.
//!
//! The first byte picks how the rest is read: 0 a token as it is; 1 (2) a header and claims,
//! separated by the first line break, which the target signs with the right (a wrong) secret
//! using the header's HS* algorithm, so that the fuzzer reaches the claim checks.
#![no_main]

use std::sync::LazyLock;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use ipc_gateway::core::auth::{JwtVerifier, LEEWAY_SECS, Verified};
use ipc_gateway::protocol::ErrorCode;
use libfuzzer_sys::fuzz_target;
use p256::ecdsa::signature::Verifier as _;
use p256::pkcs8::DecodePublicKey;
use sha2::{Sha256, Sha384, Sha512};

const SECRET: &[u8] = b"fuzz-secret-0123456789abcdef-0123456789";
const OTHER_SECRET: &[u8] = b"another-secret-0123456789abcdef-01234567";
const P256_PUBLIC: &[u8] = include_bytes!("../../tests/fixtures/keys/p256.pub.pem");

static VERIFIER: LazyLock<JwtVerifier> = LazyLock::new(|| {
    JwtVerifier::new(Some(SECRET), Some(P256_PUBLIC), None)
        .expect("the keys are valid")
        .expect("a key is given")
});
static OTHER: LazyLock<JwtVerifier> = LazyLock::new(|| {
    JwtVerifier::new(Some(OTHER_SECRET), None, None)
        .expect("the secret is valid")
        .expect("a key is given")
});
static P256_KEY: LazyLock<p256::ecdsa::VerifyingKey> = LazyLock::new(|| {
    let pem = std::str::from_utf8(P256_PUBLIC).expect("PEM is text");
    p256::PublicKey::from_public_key_pem(pem)
        .expect("the fixture is a P-256 public key")
        .into()
});

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    let (token, wrong_key) = match mode % 3 {
        0 => (String::from_utf8_lossy(rest).into_owned(), false),
        mode => {
            let secret = if mode == 1 { SECRET } else { OTHER_SECRET };
            let at = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
            let (header, claims) = (&rest[..at], rest.get(at + 1..).unwrap_or_default());
            (signed(header, claims, secret), mode == 2)
        }
    };
    match VERIFIER.verify(&token) {
        Ok(verified) => {
            assert!(
                !wrong_key,
                "a token signed with another secret was accepted"
            );
            accepted(&token, &verified);
        }
        Err(error) => {
            assert_eq!(error.code, ErrorCode::Unauthenticated, "{error}");
            assert!(!error.message.is_empty());
            // No refusal's text has a '.', so a token with one is in it only if quoted (a
            // token without one may be the very words of a refusal).
            if token.len() >= 24 && token.contains('.') {
                assert!(
                    !error.message.contains(&token),
                    "the refusal quotes the token"
                );
            }
        }
    }
});

/// `header.claims.signature`, the signature an HMAC under `secret` with the header's hash.
fn signed(header: &[u8], claims: &[u8], secret: &[u8]) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let alg = serde_json::from_slice::<serde_json::Value>(header)
        .ok()
        .and_then(|h| h.get("alg")?.as_str().map(str::to_owned));
    let mac = mac_of(alg.as_deref().unwrap_or("HS256"), secret, input.as_bytes())
        .unwrap_or_else(|| mac_of("HS256", secret, input.as_bytes()).expect("HS256"));
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(mac))
}

fn mac_of(alg: &str, secret: &[u8], message: &[u8]) -> Option<Vec<u8>> {
    fn mac<M: Mac + KeyInit>(secret: &[u8], message: &[u8]) -> Vec<u8> {
        let mut mac = <M as KeyInit>::new_from_slice(secret).expect("HMAC takes any key length");
        mac.update(message);
        mac.finalize().into_bytes().to_vec()
    }
    Some(match alg {
        "HS256" => mac::<Hmac<Sha256>>(secret, message),
        "HS384" => mac::<Hmac<Sha384>>(secret, message),
        "HS512" => mac::<Hmac<Sha512>>(secret, message),
        _ => return None,
    })
}

/// An accepted token, checked without jsonwebtoken.
fn accepted(token: &str, verified: &Verified) {
    let parts: Vec<&str> = token.split('.').collect();
    let [header, payload, signature] = parts[..] else {
        panic!("accepted a token of {} parts", parts.len());
    };
    let json = |part: &str| -> serde_json::Value {
        let bytes = URL_SAFE_NO_PAD
            .decode(part)
            .expect("an accepted part is base64url");
        serde_json::from_slice(&bytes).expect("an accepted part is JSON")
    };
    let alg = json(header)["alg"]
        .as_str()
        .expect("alg is a string")
        .to_owned();
    assert!(!alg.eq_ignore_ascii_case("none"), "accepted alg none");
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .expect("signature is base64url");
    let message = format!("{header}.{payload}");
    match alg.as_str() {
        "HS256" | "HS384" | "HS512" => {
            let expected = mac_of(&alg, SECRET, message.as_bytes()).expect("an HS algorithm");
            assert_eq!(
                signature, expected,
                "accepted an {alg} token with a wrong MAC"
            );
            assert!(
                OTHER.verify(token).is_err(),
                "another secret accepts it too"
            );
        }
        "ES256" => {
            let signature = p256::ecdsa::Signature::from_slice(&signature)
                .expect("an accepted ES256 signature is r || s");
            P256_KEY
                .verify(message.as_bytes(), &signature)
                .expect("accepted an ES256 token the key did not sign");
        }
        other => panic!("accepted algorithm {other}, which no configured key takes"),
    }
    let claims = json(payload);
    assert_eq!(claims["sub"].as_str(), Some(verified.sub.as_str()));
    let exp = &claims["exp"];
    let exp = exp.as_u64().or_else(|| exp.as_f64().map(|f| f as u64));
    assert_eq!(exp, Some(verified.exp));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // A minute of slack: the clock moved on since `verify` read it.
    assert!(
        verified.exp.saturating_add(LEEWAY_SECS + 60) >= now,
        "accepted an expired token"
    );
}
