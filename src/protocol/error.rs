//! The gateway's error kinds: one small `Copy` enum with stable wire names, mapped once to
//! JSON, binary frames and (later) gRPC status codes, plus the error value that carries a
//! human-readable message beside the kind.

use std::fmt;

/// A stable error code. The string names are part of the wire contract: never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ErrorCode {
    BadRequest = 1,
    TooLarge = 2,
    UnsupportedVersion = 3,
    Unauthenticated = 4,
    Forbidden = 5,
    NoResponders = 6,
    Timeout = 7,
    CircuitOpen = 8,
    Overloaded = 9,
    Unavailable = 10,
    Internal = 11,
    /// A durable publish or a replay on a subject no JetStream stream captures.
    NoStream = 12,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::BadRequest,
        ErrorCode::TooLarge,
        ErrorCode::UnsupportedVersion,
        ErrorCode::Unauthenticated,
        ErrorCode::Forbidden,
        ErrorCode::NoResponders,
        ErrorCode::Timeout,
        ErrorCode::CircuitOpen,
        ErrorCode::Overloaded,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::NoStream,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::TooLarge => "TOO_LARGE",
            ErrorCode::UnsupportedVersion => "UNSUPPORTED_VERSION",
            ErrorCode::Unauthenticated => "UNAUTHENTICATED",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::NoResponders => "NO_RESPONDERS",
            ErrorCode::Timeout => "TIMEOUT",
            ErrorCode::CircuitOpen => "CIRCUIT_OPEN",
            ErrorCode::Overloaded => "OVERLOADED",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::NoStream => "NO_STREAM",
        }
    }

    pub fn parse(name: &str) -> Option<ErrorCode> {
        ErrorCode::ALL
            .into_iter()
            .find(|code| code.as_str() == name)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as a client sees it: the stable code for programs, the message for people, and for
/// errors that can be retried later, a hint in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayError {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after_ms: Option<u32>,
}

impl GatewayError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        GatewayError {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        GatewayError::new(ErrorCode::BadRequest, message)
    }
}

impl fmt::Display for GatewayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for GatewayError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_its_name() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
        }
        assert_eq!(ErrorCode::parse("NOPE"), None);
    }
}
