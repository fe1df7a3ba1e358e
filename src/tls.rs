//! TLS on the HTTP port (https, wss://) and the gRPC port: the server configurations read from
//! PEM files, the handshake of one accepted connection, and SIGHUP's reload. rustls with the
//! `ring` provider only (async-nats uses it; a second provider would make rustls's default
//! lookups panic), every configuration built with `builder_with_provider`.
//!
//! - Each port has its own `Tls` (its ALPN: `http/1.1` or `h2`). The configuration for new
//!   handshakes sits behind a lock as an `Arc<ServerConfig>`; a reload builds a whole new one
//!   (certificate, key, client CAs) and swaps it in, so open connections go on with the one
//!   they were made with. A file that does not load keeps the configuration in force, and the
//!   log names the setting and the file.
//! - A handshake runs in the connection's own task and is bounded by `http_header_timeout_ms`,
//!   so a client that never sends its ClientHello holds its place no longer than one that never
//!   sends its headers.
//! - With `tls_client_ca`, a client certificate that chains to it is the client's identity:
//!   its subject in RFC 4514 form (`subject`); one that does not chain fails the handshake.
//!
//! Neither the core nor a front-end lives here: the HTTP port and the gRPC front-end call
//! `accept`, and hand the subject on as plain text.

use std::io::{self, IoSlice};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{error, info};
use x509_cert::der::Decode;

use crate::config::{ClientAuth, Config};
use crate::telemetry::metrics::Metrics;

/// What one port's TLS is read from, each path with the setting that named it (for errors).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Files {
    cert: (&'static str, PathBuf),
    key: (&'static str, PathBuf),
    client_ca: Option<PathBuf>,
    client_auth: ClientAuth,
}

/// One port's TLS: the configuration new handshakes get, and how to read it again.
pub struct Tls {
    /// `http` or `grpc`: in logs, and the expiry gauge's `port` label.
    port: &'static str,
    alpn: &'static [u8],
    files: Files,
    handshake_timeout: Duration,
    current: RwLock<Loaded>,
}

struct Loaded {
    config: Arc<ServerConfig>,
    /// The leaf certificate's not-after, in seconds since the Unix epoch.
    not_after: u64,
}

/// The TLS of both ports, as the configuration asks (each `None` = plain).
pub struct TlsPorts {
    pub http: Option<Arc<Tls>>,
    pub grpc: Option<Arc<Tls>>,
}

/// A verified client certificate's subject (RFC 4514), for the connection's identity. The HTTP
/// port puts it in each request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert(pub Arc<str>);

impl TlsPorts {
    /// Reads every file the configuration names. Errors name the setting and the path.
    pub fn load(config: &Config) -> Result<TlsPorts, String> {
        let timeout = config.http_header_timeout();
        let files = |cert: (&'static str, &Option<PathBuf>),
                     key: (&'static str, &Option<PathBuf>)| {
            match (cert.1, key.1) {
                (Some(cert_path), Some(key_path)) => Some(Files {
                    cert: (cert.0, cert_path.clone()),
                    key: (key.0, key_path.clone()),
                    client_ca: config.tls_client_ca.clone(),
                    client_auth: config.tls_client_auth,
                }),
                _ => None,
            }
        };
        let http = files(
            ("--tls-cert", &config.tls_cert),
            ("--tls-key", &config.tls_key),
        );
        let grpc = files(
            ("--grpc-tls-cert", &config.grpc_tls_cert),
            ("--grpc-tls-key", &config.grpc_tls_key),
        )
        .or_else(|| http.clone());
        let port = |port, alpn, files: Option<Files>| {
            files
                .map(|files| Tls::load(port, alpn, files, timeout).map(Arc::new))
                .transpose()
        };
        Ok(TlsPorts {
            http: port("http", b"http/1.1", http)?,
            grpc: port("grpc", b"h2", grpc)?,
        })
    }

    /// Both ports' TLS, for reloads and the expiry gauge.
    pub fn each(&self) -> impl Iterator<Item = &Arc<Tls>> {
        self.http.iter().chain(self.grpc.iter())
    }
}

impl Tls {
    fn load(
        port: &'static str,
        alpn: &'static [u8],
        files: Files,
        handshake_timeout: Duration,
    ) -> Result<Tls, String> {
        let loaded = build(&files, alpn)?;
        Ok(Tls {
            port,
            alpn,
            files,
            handshake_timeout,
            current: RwLock::new(loaded),
        })
    }

    /// Reads the files again (SIGHUP): new handshakes get the new certificate, key and client
    /// CAs; open connections keep theirs. A file that does not load changes nothing; the log
    /// says which and why. Blocking file I/O: call it off the runtime's threads.
    pub fn reload(&self, metrics: &Metrics) {
        match build(&self.files, self.alpn) {
            Ok(loaded) => {
                let not_after = loaded.not_after;
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = loaded;
                metrics.tls_cert_expiry(self.port, not_after);
                info!(port = self.port, not_after, "TLS certificate reloaded");
            }
            Err(why) => error!(
                port = self.port,
                error = %why,
                "TLS reload failed; the certificate in force stays"
            ),
        }
    }

    /// Sets the expiry gauge to the certificate in force.
    pub fn report_expiry(&self, metrics: &Metrics) {
        let not_after = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .not_after;
        metrics.tls_cert_expiry(self.port, not_after);
    }

    /// The TLS handshake of an accepted connection, within the handshake timeout, with the
    /// configuration in force now. Also the verified client certificate's subject, if any.
    pub async fn accept(&self, stream: TcpStream) -> io::Result<(MaybeTls, Option<PeerCert>)> {
        let config = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .config
            .clone();
        let handshake = TlsAcceptor::from(config).accept(stream);
        let stream = tokio::time::timeout(self.handshake_timeout, handshake)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        // rustls only hands over a certificate its verifier accepted; the leaf comes first.
        let cert = match stream.get_ref().1.peer_certificates() {
            Some([leaf, ..]) => Some(PeerCert(
                subject(leaf)
                    .map_err(|why| io::Error::new(io::ErrorKind::InvalidData, why))?
                    .into(),
            )),
            _ => None,
        };
        Ok((MaybeTls::Tls(Box::new(stream)), cert))
    }
}

/// The one crypto provider.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build(files: &Files, alpn: &[u8]) -> Result<Loaded, String> {
    let chain = certs(files.cert.0, &files.cert.1)?;
    let key = PrivateKeyDer::from_pem_file(&files.key.1).map_err(|e| {
        format!(
            "{} {}: {}",
            files.key.0,
            files.key.1.display(),
            pem_error(e)
        )
    })?;
    let not_after = not_after(&chain[0])
        .map_err(|why| format!("{} {}: {why}", files.cert.0, files.cert.1.display()))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for ca in certs("--tls-client-ca", path)? {
                roots
                    .add(ca)
                    .map_err(|e| format!("--tls-client-ca {}: {e}", path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider());
            let verifier = match files.client_auth {
                ClientAuth::Optional => verifier.allow_unauthenticated(),
                ClientAuth::Required => verifier,
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| format!("--tls-client-ca {}: {e}", path.display()))?,
            )
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        format!(
            "{} {} with {} {}: {e}",
            files.cert.0,
            files.cert.1.display(),
            files.key.0,
            files.key.1.display()
        )
    })?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Loaded {
        config: Arc::new(config),
        not_after,
    })
}

/// Every certificate of a PEM file; none is an error.
fn certs(setting: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bad = |why: String| format!("{setting} {}: {why}", path.display());
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(pem_error(e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(pem_error(e)))?;
    if chain.is_empty() {
        return Err(bad(
            "no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into(),
        ));
    }
    Ok(chain)
}

fn pem_error(error: rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match error {
        Error::Io(io) => io.to_string(),
        Error::NoItemsFound => "no PEM item of the expected kind in it".into(),
        other => format!("not valid PEM: {other:?}"),
    }
}

/// A certificate's subject in RFC 4514 form: the RDNs from last to first, separated by `,`
/// (`+` inside a multi-valued RDN), attribute types by their short upper-case names, values
/// escaped as RFC 4514 says (`CN=alice,O=Example\, Inc.`).
pub fn subject(der: &[u8]) -> Result<String, String> {
    let cert = x509_cert::Certificate::from_der(der)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    Ok(cert.tbs_certificate.subject.to_string())
}

fn not_after(der: &[u8]) -> Result<u64, String> {
    let cert = x509_cert::Certificate::from_der(der)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    Ok(cert
        .tbs_certificate
        .validity
        .not_after
        .to_unix_duration()
        .as_secs())
}

/// A connection of a port that may serve TLS: plain, or after its handshake (boxed: rustls's
/// state is large, and a plain connection should not pay for it).
pub enum MaybeTls {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl MaybeTls {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            MaybeTls::Plain(stream) => stream,
            MaybeTls::Tls(stream) => stream.get_ref().0,
        }
    }
}

impl AsyncRead for MaybeTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MaybeTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(stream) => stream.is_write_vectored(),
            MaybeTls::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_flush(cx),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path, cert: &str, key: &str) -> Files {
        Files {
            cert: ("--tls-cert", dir.join(cert)),
            key: ("--tls-key", dir.join(key)),
            client_ca: None,
            client_auth: ClientAuth::Optional,
        }
    }

    fn self_signed(dn: &[(rcgen::DnType, &str)]) -> (String, String, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (kind, value) in dn {
            params.distinguished_name.push(kind.clone(), *value);
        }
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }

    #[test]
    fn pem_errors_name_the_setting_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, _) = self_signed(&[(rcgen::DnType::CommonName, "gw")]);
        std::fs::write(dir.path().join("cert.pem"), &cert).unwrap();
        std::fs::write(dir.path().join("key.pem"), &key).unwrap();
        std::fs::write(dir.path().join("junk.pem"), "not pem at all\n").unwrap();
        assert!(build(&files(dir.path(), "cert.pem", "key.pem"), b"h2").is_ok());

        let missing = build(&files(dir.path(), "none.pem", "key.pem"), b"h2")
            .err()
            .unwrap();
        assert!(
            missing.starts_with("--tls-cert ") && missing.contains("none.pem"),
            "{missing}"
        );
        let junk = build(&files(dir.path(), "junk.pem", "key.pem"), b"h2")
            .err()
            .unwrap();
        assert!(
            junk.contains("--tls-cert") && junk.contains("junk.pem"),
            "{junk}"
        );
        assert!(junk.contains("no PEM certificate"), "{junk}");
        let no_key = build(&files(dir.path(), "cert.pem", "junk.pem"), b"h2")
            .err()
            .unwrap();
        assert!(
            no_key.starts_with("--tls-key ") && no_key.contains("junk.pem"),
            "{no_key}"
        );
        // A key from another pair: rustls sees it does not match the certificate.
        let (_, other_key, _) = self_signed(&[(rcgen::DnType::CommonName, "other")]);
        std::fs::write(dir.path().join("other.pem"), &other_key).unwrap();
        let mismatch = build(&files(dir.path(), "cert.pem", "other.pem"), b"h2")
            .err()
            .unwrap();
        assert!(
            mismatch.contains("cert.pem") && mismatch.contains("other.pem"),
            "{mismatch}"
        );
        let mut with_ca = files(dir.path(), "cert.pem", "key.pem");
        with_ca.client_ca = Some(dir.path().join("junk.pem"));
        let ca = build(&with_ca, b"h2").err().unwrap();
        assert!(
            ca.starts_with("--tls-client-ca ") && ca.contains("junk.pem"),
            "{ca}"
        );
    }

    #[test]
    fn the_subject_is_written_in_rfc_4514_form_last_rdn_first() {
        use rcgen::DnType;
        let (_, _, der) = self_signed(&[
            (DnType::CountryName, "DE"),
            (DnType::OrganizationName, "Example, Inc."),
            (DnType::CommonName, "alice"),
        ]);
        assert_eq!(subject(&der).unwrap(), r"CN=alice,O=Example\, Inc.,C=DE");
        let (_, _, der) = self_signed(&[(DnType::CommonName, "#bob ")]);
        assert_eq!(subject(&der).unwrap(), r"CN=\#bob\ ");
        assert!(subject(b"junk").is_err());
    }
}
