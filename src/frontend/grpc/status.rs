//! The gateway's errors as gRPC sees them: each `ErrorCode` maps to one status code (the table
//! in DESIGN.md), the message starts with the stable code, and the code alone travels in the
//! `ipc-gateway-error` metadata entry so that clients can branch on it without parsing text.

use tonic::codegen::http;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

use crate::protocol::{ErrorCode, GatewayError};

use super::pb;

/// The metadata entry that names the gateway's error code.
pub const ERROR_KEY: &str = "ipc-gateway-error";
/// The metadata entry with the gateway's retry hint in milliseconds, when it has one.
pub const RETRY_AFTER_KEY: &str = "ipc-gateway-retry-after-ms";

/// The gRPC status code for each gateway error code.
pub const fn code_of(code: ErrorCode) -> Code {
    match code {
        ErrorCode::BadRequest => Code::InvalidArgument,
        ErrorCode::TooLarge => Code::ResourceExhausted,
        ErrorCode::UnsupportedVersion => Code::FailedPrecondition,
        ErrorCode::Unauthenticated => Code::Unauthenticated,
        ErrorCode::Forbidden => Code::PermissionDenied,
        ErrorCode::NoResponders => Code::Unavailable,
        ErrorCode::Timeout => Code::DeadlineExceeded,
        ErrorCode::CircuitOpen => Code::Unavailable,
        ErrorCode::Overloaded => Code::ResourceExhausted,
        ErrorCode::Unavailable => Code::Unavailable,
        ErrorCode::Internal => Code::Internal,
        ErrorCode::NoStream => Code::FailedPrecondition,
    }
}

/// A gateway error as the status a call ends with.
pub fn to_status(error: &GatewayError) -> Status {
    let mut metadata = MetadataMap::new();
    metadata.insert(ERROR_KEY, MetadataValue::from_static(error.code.as_str()));
    if let Some(ms) = error.retry_after_ms {
        metadata.insert(RETRY_AFTER_KEY, MetadataValue::from(ms));
    }
    Status::with_metadata(code_of(error.code), error.to_string(), metadata)
}

/// tonic refuses a unary message over its decoding limit itself, before any handler, with an
/// OUT_OF_RANGE status; this gives that refusal the gateway's TOO_LARGE status and code.
pub fn too_large_refusal<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    if headers
        .get(GRPC_STATUS)
        .is_some_and(|value| value.as_bytes() == OUT_OF_RANGE)
        && let Some(status) = Status::from_header_map(headers)
    {
        let _ = input_failure(status).add_header(headers);
    }
    response
}

/// A status that ended a call's input, as the client sees it. tonic's codec refuses a message
/// over its size limit with OUT_OF_RANGE, a code the gateway maps none of its own errors to:
/// that is the gateway's TOO_LARGE, as on every front-end. Told by the code, not the wording.
pub fn input_failure(status: Status) -> Status {
    if status.code() == Code::OutOfRange {
        return to_status(&GatewayError::new(ErrorCode::TooLarge, status.message()));
    }
    status
}

const GRPC_STATUS: &str = "grpc-status";
const OUT_OF_RANGE: &[u8] = b"11";

/// A gateway error as an Exchange answer carries it.
pub fn to_message(error: GatewayError) -> pb::Error {
    pb::Error {
        code: error.code.as_str().to_owned(),
        message: error.message,
        retry_after_ms: error.retry_after_ms.unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tonics_own_too_large_refusal_becomes_too_large() {
        let refusal = Status::out_of_range(
            "Error, decoded message length too large: found 9 bytes, the limit is: 4 bytes",
        );
        let response = too_large_refusal(refusal.into_http::<()>());
        let status = Status::from_header_map(response.headers()).unwrap();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().starts_with("TOO_LARGE: "), "{status:?}");
        assert_eq!(response.headers()[ERROR_KEY], "TOO_LARGE");
        let other = Status::internal("something else").into_http::<()>();
        let status = Status::from_header_map(too_large_refusal(other).headers()).unwrap();
        assert_eq!(status.code(), Code::Internal);
    }

    #[test]
    fn every_code_maps_to_its_status_with_the_code_in_metadata_and_message() {
        for code in ErrorCode::ALL {
            let status = to_status(&GatewayError::new(code, "why"));
            assert_eq!(status.code(), code_of(code));
            assert_eq!(status.message(), format!("{}: why", code.as_str()));
            assert_eq!(
                status.metadata().get(ERROR_KEY).unwrap().to_str().unwrap(),
                code.as_str()
            );
        }
        let mut open = GatewayError::new(ErrorCode::CircuitOpen, "open");
        open.retry_after_ms = Some(1500);
        let status = to_status(&open);
        assert_eq!(status.metadata().get(RETRY_AFTER_KEY).unwrap(), "1500");
    }
}
