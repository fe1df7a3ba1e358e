//! The WebSocket opening handshake (RFC 6455 §4.2), server side: `Handshake` is the extractor
//! that checks an upgrade request and takes hyper's upgrade from it; `accept` makes the `101`
//! answer. What follows the answer is `socket.rs`'s.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use hyper::upgrade::OnUpgrade;

/// RFC 6455's key suffix.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A request that asked, correctly, to become a WebSocket.
pub struct Handshake {
    /// `Sec-WebSocket-Accept` for the answer.
    accept: HeaderValue,
    pub on_upgrade: OnUpgrade,
}

/// Why a request is not a WebSocket upgrade: a `400` (or `426` when the request did not ask
/// for an upgrade at all), with the reason in the body.
pub struct NotAnUpgrade(StatusCode, &'static str);

impl IntoResponse for NotAnUpgrade {
    fn into_response(self) -> Response {
        let mut response = (self.0, self.1).into_response();
        if self.0 == StatusCode::UPGRADE_REQUIRED {
            response
                .headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        }
        response
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Handshake {
    type Rejection = NotAnUpgrade;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let headers = &parts.headers;
        if parts.method != Method::GET {
            return Err(NotAnUpgrade(
                StatusCode::METHOD_NOT_ALLOWED,
                "a WebSocket opens with GET",
            ));
        }
        if !has_token(headers, header::CONNECTION, "upgrade")
            || !has_token(headers, header::UPGRADE, "websocket")
        {
            return Err(NotAnUpgrade(
                StatusCode::UPGRADE_REQUIRED,
                "/ws is a WebSocket: send Connection: upgrade and Upgrade: websocket",
            ));
        }
        if headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .map(HeaderValue::as_bytes)
            != Some(b"13")
        {
            return Err(NotAnUpgrade(
                StatusCode::BAD_REQUEST,
                "Sec-WebSocket-Version must be 13",
            ));
        }
        let key = headers
            .get(header::SEC_WEBSOCKET_KEY)
            .filter(|key| is_key(key.as_bytes()))
            .ok_or(NotAnUpgrade(
                StatusCode::BAD_REQUEST,
                "Sec-WebSocket-Key must be 16 bytes in base64",
            ))?;
        let accept = accept_key(key.as_bytes());
        let on_upgrade = parts.extensions.remove::<OnUpgrade>().ok_or(NotAnUpgrade(
            StatusCode::UPGRADE_REQUIRED,
            "this connection cannot be upgraded",
        ))?;
        Ok(Handshake { accept, on_upgrade })
    }
}

impl Handshake {
    /// The `101 Switching Protocols` answer, naming `protocol` if one was chosen.
    pub fn accept(&self, protocol: Option<&'static str>) -> Response {
        let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, self.accept.clone());
        if let Some(protocol) = protocol {
            headers.insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(protocol),
            );
        }
        response
    }
}

/// Whether a comma-separated header holds `token` (case-insensitive), in any of its values.
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .as_bytes()
            .split(|&b| b == b',')
            .any(|item| item.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// A key is 16 random bytes in base64: 24 characters.
fn is_key(key: &[u8]) -> bool {
    base64::engine::general_purpose::STANDARD
        .decode(key)
        .is_ok_and(|raw| raw.len() == 16)
}

/// `Sec-WebSocket-Accept`: base64 of SHA-1 over the key and RFC 6455's GUID.
fn accept_key(key: &[u8]) -> HeaderValue {
    let mut context = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    context.update(key);
    context.update(ACCEPT_GUID);
    let encoded = base64::engine::general_purpose::STANDARD.encode(context.finish());
    HeaderValue::from_str(&encoded).expect("base64 is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accept_key_is_rfc_6455s_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn tokens_are_found_in_lists_in_any_case() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(has_token(&headers, header::CONNECTION, "upgrade"));
        assert!(!has_token(&headers, header::UPGRADE, "websocket"));
        assert!(is_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!is_key(b"c2hvcnQ="));
    }
}
