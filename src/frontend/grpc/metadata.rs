//! Between gRPC metadata and NATS headers, and the deadline a call carries. A call's custom
//! metadata goes to NATS as headers beside the message's own `headers` (binary `-bin` values
//! base64-encoded, since NATS headers are text); a reply's NATS headers come back as response
//! metadata, a `-bin` name being base64-decoded again. Metadata that gRPC or HTTP/2 use
//! themselves (`grpc-*`, `te`, `content-type`, `user-agent`) and the caller's `authorization`
//! are never forwarded; `ipc-gateway-*` metadata from a client is refused (`BAD_REQUEST`: only
//! the gateway says who the caller is) and never copied from a reply's headers either.

use std::time::Duration;

use base64::Engine;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD_NO_PAD};
use tonic::metadata::{BinaryMetadataValue, KeyAndValueRef, MetadataKey, MetadataMap};

use crate::protocol::{GatewayError, Headers};

use super::pb;

/// Reads base64 with or without padding (gRPC omits it, other tools add it).
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Metadata the gRPC transport owns, and the caller's credentials: not the application's,
/// so never forwarded (a token must not reach every service and subscriber).
fn is_transport(name: &str) -> bool {
    name.starts_with("grpc-")
        || matches!(
            name,
            "te" | "content-type" | "user-agent" | "content-length" | "authorization"
        )
        || name.starts_with("ipc-gateway-")
}

/// The NATS headers of a request: the message's listed `headers`, then the call's metadata.
/// `None` when there are none (most requests), so nothing is allocated for them.
pub fn request_headers(
    metadata: &MetadataMap,
    listed: Vec<pb::Header>,
) -> Result<Option<Headers>, GatewayError> {
    let mut headers: Option<Headers> = None;
    for header in listed {
        headers
            .get_or_insert_with(Headers::new)
            .append(header.name, header.value)?;
    }
    for entry in metadata.iter() {
        let key = match &entry {
            KeyAndValueRef::Ascii(key, _) => key.as_str(),
            KeyAndValueRef::Binary(key, _) => key.as_str(),
        };
        // Only the gateway says who the caller is.
        if crate::protocol::identity::is_reserved_header(key) {
            return Err(GatewayError::bad_request(format!(
                "metadata {key:?}: names starting with ipc-gateway- are set by the gateway only"
            )));
        }
        let (name, value) = match entry {
            KeyAndValueRef::Ascii(key, value) => {
                if is_transport(key.as_str()) {
                    continue;
                }
                (
                    key.as_str(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            }
            KeyAndValueRef::Binary(key, value) => {
                let bytes = value.to_bytes().map_err(|_| {
                    GatewayError::bad_request(format!(
                        "metadata {:?} is not valid base64",
                        key.as_str()
                    ))
                })?;
                (key.as_str(), STANDARD_NO_PAD.encode(bytes))
            }
        };
        headers
            .get_or_insert_with(Headers::new)
            .append(name, value)
            .map_err(|_| {
                GatewayError::bad_request(format!("metadata {name:?} cannot be a NATS header"))
            })?;
    }
    Ok(headers)
}

/// NATS headers as the messages of the proto list them.
pub fn listed(headers: Option<&Headers>) -> Vec<pb::Header> {
    let Some(headers) = headers else {
        return Vec::new();
    };
    headers
        .pairs()
        .map(|(name, value)| pb::Header {
            name: name.to_owned(),
            value: value.to_owned(),
        })
        .collect()
}

/// Adds a reply's NATS headers to the response metadata. Names that cannot be gRPC metadata
/// (or that the transport owns) and `-bin` values that are not base64 are left out: they are
/// still in the reply message's `headers`.
pub fn reply_metadata(headers: Option<&Headers>, metadata: &mut MetadataMap) {
    let Some(headers) = headers else { return };
    for (name, values) in headers.iter() {
        let lower = name.to_ascii_lowercase();
        if is_transport(&lower) {
            continue;
        }
        for value in values {
            if lower.ends_with("-bin") {
                let Ok(key) = MetadataKey::from_bytes(lower.as_bytes()) else {
                    continue;
                };
                let Ok(bytes) = LENIENT_BASE64.decode(value) else {
                    continue;
                };
                metadata.append_bin(key, BinaryMetadataValue::from_bytes(&bytes));
            } else {
                let Ok(key) = MetadataKey::from_bytes(lower.as_bytes()) else {
                    continue;
                };
                let Ok(value) = value.as_str().parse() else {
                    continue;
                };
                metadata.append(key, value);
            }
        }
    }
}

/// The call's gRPC deadline (`grpc-timeout`), less a small margin: the gateway answers
/// `TIMEOUT` a little before the client gives up, so the client gets the gateway's error
/// rather than its own (and before tonic's own timer cancels the call).
/// A request's deadline in ms: the call's (see `deadline_ms`) or the message's `timeout_ms`,
/// whichever is tighter; `None` leaves it to the gateway's default.
pub fn request_deadline_ms(metadata: &MetadataMap, timeout_ms: Option<u32>) -> Option<u32> {
    let message = timeout_ms.filter(|ms| *ms > 0);
    match (deadline_ms(metadata), message) {
        (Some(call), Some(message)) => Some(call.min(message)),
        (call, message) => call.or(message),
    }
}

pub fn deadline_ms(metadata: &MetadataMap) -> Option<u32> {
    let text = metadata.get("grpc-timeout")?.to_str().ok()?;
    let timeout = parse_grpc_timeout(text)?;
    let margin = (timeout / 10).min(Duration::from_millis(100));
    let ms = (timeout - margin).as_millis().clamp(1, u32::MAX as u128);
    Some(ms as u32)
}

/// `grpc-timeout` is up to 8 digits and a unit: H, M, S, m (ms), u (µs), n (ns).
fn parse_grpc_timeout(text: &str) -> Option<Duration> {
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value * 3600),
        "M" => Duration::from_secs(value * 60),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit_and_leave_a_margin() {
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("150m"), Some(Duration::from_millis(150)));
        assert_eq!(
            parse_grpc_timeout("999999u"),
            Some(Duration::from_micros(999_999))
        );
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("123456789m"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("5x"), None);
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", "2000m".parse().unwrap());
        assert_eq!(deadline_ms(&metadata), Some(1900));
        metadata.insert("grpc-timeout", "300m".parse().unwrap());
        assert_eq!(deadline_ms(&metadata), Some(270));
    }

    #[test]
    fn the_tighter_of_the_call_deadline_and_timeout_ms_wins() {
        let mut metadata = MetadataMap::new();
        assert_eq!(request_deadline_ms(&metadata, Some(300)), Some(300));
        assert_eq!(request_deadline_ms(&metadata, Some(0)), None);
        assert_eq!(request_deadline_ms(&metadata, None), None);
        metadata.insert("grpc-timeout", "10S".parse().unwrap());
        assert_eq!(request_deadline_ms(&metadata, Some(300)), Some(300));
        assert_eq!(request_deadline_ms(&metadata, None), Some(9900));
        metadata.insert("grpc-timeout", "300m".parse().unwrap());
        assert_eq!(request_deadline_ms(&metadata, Some(5000)), Some(270));
    }

    #[test]
    fn metadata_becomes_headers_and_reply_headers_come_back_as_metadata() {
        let mut metadata = MetadataMap::new();
        metadata.insert("x-trace", "abc".parse().unwrap());
        metadata.insert("grpc-timeout", "1S".parse().unwrap());
        metadata.insert("content-type", "application/grpc".parse().unwrap());
        metadata.insert_bin("x-raw-bin", BinaryMetadataValue::from_bytes(&[0, 255, 1]));
        let listed = vec![pb::Header {
            name: "X-Listed".into(),
            value: "1".into(),
        }];
        let headers = request_headers(&metadata, listed).unwrap().unwrap();
        assert_eq!(headers.get("x-trace").unwrap(), "abc");
        assert_eq!(headers.get("X-Listed").unwrap(), "1");
        assert_eq!(headers.get("x-raw-bin").unwrap(), "AP8B");
        assert!(headers.get("grpc-timeout").is_none());
        assert!(headers.get("content-type").is_none());

        let mut back = MetadataMap::new();
        reply_metadata(Some(&headers), &mut back);
        assert_eq!(back.get("x-trace").unwrap(), "abc");
        assert_eq!(back.get("x-listed").unwrap(), "1");
        assert_eq!(
            back.get_bin("x-raw-bin")
                .unwrap()
                .to_bytes()
                .unwrap()
                .as_ref(),
            &[0, 255, 1]
        );
    }

    #[test]
    fn bad_listed_headers_are_bad_requests() {
        let bad = vec![pb::Header {
            name: "bad name:".into(),
            value: "1".into(),
        }];
        let error = request_headers(&MetadataMap::new(), bad).unwrap_err();
        assert_eq!(error.code, crate::protocol::ErrorCode::BadRequest);
        assert_eq!(request_headers(&MetadataMap::new(), vec![]).unwrap(), None);
    }
}
