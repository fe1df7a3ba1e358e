//! The wire: the envelope every front-end produces, its error codes, subject rules, and the
//! two codecs (binary frames and JSON lines) behind one sniffing decoder.

pub mod binary;
pub mod envelope;
pub mod error;
mod frontend;
pub mod json;
pub mod subject;
mod wire;

pub use envelope::{Decoded, Envelope, Flags, Id, Op, Outbound};
pub use error::{ErrorCode, GatewayError};
pub use frontend::Frontend;
pub use wire::{WireDecoder, WireFormat};
