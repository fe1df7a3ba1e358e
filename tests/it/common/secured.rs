//! What a secured nats-server needs, made by the test: a CA with a server and a client
//! certificate (rcgen, PEM files in a temporary directory), and an operator → account → user
//! chain of nkeys and NATS JWTs with the user's `.creds` file.
//!
//! The JWTs are encoded by hand as nats-jwt v2 writes them: the header
//! `{"typ":"JWT","alg":"ed25519-nkey"}`, claims with `jti` (base32 of the SHA-512/256 of the
//! claims without it), `iat`, `iss`, `sub`, `name` and `nats: {type, version: 2, ...}`, and the
//! issuer's ed25519 signature of `header.claims`, all base64url without padding.

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nkeys::KeyPair;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyUsagePurpose,
};
use serde_json::{Value, json};

/// Writes `text` to `name` in `dir` and returns its path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a test file");
    path
}

/// A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate, as PEM
/// files in their own directory.
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A second CA that signed nothing here: a gateway that trusts only it must refuse.
    pub other_ca: PathBuf,
    /// Holds the files; removed with the `Pki`.
    _dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let (ca_pem, issuer) = ca("ipc-gateway test CA");
        let (other_ca_pem, _) = ca("another CA");
        let (server_pem, server_key) = leaf(
            &issuer,
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_pem, client_key) = leaf(
            &issuer,
            &["ipc-gateway"],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let at = |name: &str, text: &str| write(dir.path(), name, text);
        Pki {
            ca: at("ca.pem", &ca_pem),
            other_ca: at("other-ca.pem", &other_ca_pem),
            server_cert: at("server.pem", &server_pem),
            server_key: at("server.key", &server_key),
            client_cert: at("client.pem", &client_pem),
            client_key: at("client.key", &client_key),
            _dir: dir,
        }
    }

    /// nats-server's `tls { ... }` block with this server certificate, plus `extra` lines.
    pub fn server_tls(&self, extra: &str) -> String {
        format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  {extra}\n}}\n",
            self.server_cert, self.server_key
        )
    }
}

fn ca(name: &str) -> (String, Issuer<'static, rcgen::KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = rcgen::KeyPair::generate().expect("CA key");
    let cert = params.self_signed(&key).expect("CA certificate");
    (cert.pem(), Issuer::new(params, key))
}

fn leaf(
    issuer: &Issuer<'static, rcgen::KeyPair>,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
    let mut params = CertificateParams::new(names.clone()).expect("leaf parameters");
    params
        .distinguished_name
        .push(DnType::CommonName, &names[0]);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    let key = rcgen::KeyPair::generate().expect("leaf key");
    let cert = params.signed_by(&key, issuer).expect("leaf certificate");
    (cert.pem(), key.serialize_pem())
}

/// An operator, one account and its users, for nats-server in operator mode with the memory
/// resolver.
pub struct Operator {
    account: KeyPair,
    operator_jwt: String,
    account_jwt: String,
}

impl Operator {
    pub fn new() -> Operator {
        let operator = KeyPair::new_operator();
        let account = KeyPair::new_account();
        let operator_jwt = jwt(
            &operator,
            &operator.public_key(),
            "test-operator",
            json!({"type": "operator", "version": 2}),
        );
        let account_jwt = jwt(
            &operator,
            &account.public_key(),
            "test-account",
            json!({
                "limits": {
                    "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                    "wildcards": true, "conn": -1, "leaf": -1
                },
                "default_permissions": {"pub": {}, "sub": {}},
                "type": "account",
                "version": 2
            }),
        );
        Operator {
            account,
            operator_jwt,
            account_jwt,
        }
    }

    /// nats-server's configuration lines for operator mode with this account preloaded.
    pub fn server_config(&self) -> String {
        format!(
            "operator: {}\nresolver: MEMORY\nresolver_preload: {{\n  {}: {}\n}}\n",
            self.operator_jwt,
            self.account.public_key(),
            self.account_jwt
        )
    }

    /// A new user of the account, as the text of its `.creds` file.
    pub fn user_creds(&self, name: &str) -> String {
        let user = KeyPair::new_user();
        let user_jwt = jwt(
            &self.account,
            &user.public_key(),
            name,
            json!({
                "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
                "type": "user", "version": 2
            }),
        );
        creds(&user_jwt, &user.seed().expect("user seed"))
    }
}

/// The standard `.creds` format (as `nsc` writes it).
pub fn creds(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}

/// A NATS JWT (nats-jwt v2) that `issuer` signs about `subject`.
fn jwt(issuer: &KeyPair, subject: &str, name: &str, nats: Value) -> String {
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let mut claims = json!({
        "jti": "",
        "iat": iat,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let digest = ring::digest::digest(
        &ring::digest::SHA512_256,
        serde_json::to_string(&claims).expect("claims").as_bytes(),
    );
    claims["jti"] = Value::from(base32(digest.as_ref()));
    let header = URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_string(&claims).expect("claims"));
    let signed = format!("{header}.{body}");
    let signature = issuer.sign(signed.as_bytes()).expect("sign the JWT");
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// RFC 4648 base32 without padding, as nats-jwt writes a `jti`.
fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &byte in bytes {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}
