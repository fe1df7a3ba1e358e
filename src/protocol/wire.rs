//! The stream decoder a connection uses: it sniffs the first byte (0xC1 means binary frames,
//! anything else JSON lines, where a non-JSON line gets a clear error) and then delegates.

use bytes::BytesMut;
use tokio_util::codec::Decoder;

use super::binary::{self, BinaryDecoder};
use super::envelope::{Decoded, Outbound};
use super::json::{self, JsonLinesDecoder};

/// The two wire formats a stream connection may speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFormat {
    Binary,
    JsonLines,
}

impl WireFormat {
    pub fn sniff(first_byte: u8) -> WireFormat {
        if first_byte == binary::MAGIC {
            WireFormat::Binary
        } else {
            WireFormat::JsonLines
        }
    }

    pub fn encode(self, event: &Outbound, out: &mut BytesMut) {
        match self {
            WireFormat::Binary => binary::encode(event, out),
            WireFormat::JsonLines => json::encode(event, out),
        }
    }
}

#[derive(Debug)]
enum State {
    Sniffing,
    Binary(BinaryDecoder),
    Json(JsonLinesDecoder),
}

/// A `tokio_util` decoder that picks its format from the first byte of the stream.
#[derive(Debug)]
pub struct WireDecoder {
    max_frame: usize,
    state: State,
}

impl WireDecoder {
    pub fn new(max_frame: usize) -> Self {
        WireDecoder {
            max_frame,
            state: State::Sniffing,
        }
    }

    /// The format, once the first byte has arrived.
    pub fn format(&self) -> Option<WireFormat> {
        match self.state {
            State::Sniffing => None,
            State::Binary(_) => Some(WireFormat::Binary),
            State::Json(_) => Some(WireFormat::JsonLines),
        }
    }

    fn sniff(&mut self, buf: &BytesMut) {
        if let (State::Sniffing, Some(first)) = (&self.state, buf.first()) {
            self.state = match WireFormat::sniff(*first) {
                WireFormat::Binary => State::Binary(BinaryDecoder::new(self.max_frame)),
                WireFormat::JsonLines => State::Json(JsonLinesDecoder::new(self.max_frame)),
            };
        }
    }
}

impl Decoder for WireDecoder {
    type Item = Decoded;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, Self::Error> {
        self.sniff(buf);
        Ok(match &mut self.state {
            State::Sniffing => None,
            State::Binary(decoder) => decoder.decode(buf),
            State::Json(decoder) => decoder.decode(buf),
        })
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, Self::Error> {
        self.sniff(buf);
        Ok(match &mut self.state {
            State::Sniffing => None,
            State::Binary(decoder) => {
                let item = decoder.decode(buf);
                // A partial frame at end of stream is simply discarded: the peer is gone.
                if item.is_none() {
                    buf.clear();
                }
                item
            }
            State::Json(decoder) => decoder.decode_eof(buf),
        })
    }
}
