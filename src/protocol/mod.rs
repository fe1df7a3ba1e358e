//! The wire: the envelope every front-end produces, its error codes, its own small types (a
//! subject, headers, a delivered message, the caller's identity), and the two codecs (binary
//! frames and JSON lines) behind one sniffing decoder. Nothing here knows about NATS, the core
//! or a front-end.

pub mod binary;
pub mod canonical;
pub mod envelope;
pub mod error;
mod frontend;
pub mod headers;
pub mod identity;
pub mod json;
mod json_quick;
mod json_text;
pub mod presence;
#[cfg(test)]
mod roundtrip_tests;
pub mod subject;
mod wire;

pub use envelope::{Decoded, Delivery, Envelope, Flags, Id, Op, Outbound, Priority, Since};
pub use error::{ErrorCode, GatewayError};
pub use frontend::Frontend;
pub use headers::Headers;
pub use identity::Identity;
pub use presence::PresenceInfo;
pub use subject::Subject;
pub use wire::{WireDecoder, WireFormat};
