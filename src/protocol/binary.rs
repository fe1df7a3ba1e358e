//! Binary frames, version 1: a fixed 20-byte header, then subject, aux, headers and payload.
//! The exact layout, with a worked example, is in docs/protocol.md. Decoding is two-phase: the
//! header is checked (magic, version, declared length against the limit) before a byte of the
//! body is buffered, so a frame that claims a gigabyte costs nothing; one over the limit is
//! answered at once and its body discarded as it streams in.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::envelope::{Decoded, Envelope, Flags, Id, Op, Outbound, Priority, Since};
use super::error::{ErrorCode, GatewayError};
use super::headers::Headers;
use super::subject::Subject;

/// First byte of every frame: 0xC1 never appears in UTF-8, so it can never start JSON.
pub const MAGIC: u8 = 0xC1;
pub const VERSION: u8 = 1;
pub const SUPPORTED_VERSIONS: &[u8] = &[VERSION];
pub const HEADER_LEN: usize = 20;

/// Frame types. Client to gateway below 0x80, gateway to client from 0x80.
pub mod frame_type {
    pub const REQUEST: u8 = 0x01;
    pub const PUBLISH: u8 = 0x02;
    pub const SUBSCRIBE: u8 = 0x03;
    pub const UNSUBSCRIBE: u8 = 0x04;
    pub const PING: u8 = 0x05;
    pub const CREDIT: u8 = 0x06;
    /// Named clients (docs/protocol.md, "Named clients"): the subject is the name (the pattern
    /// for PRESENCE_WATCH).
    pub const REGISTER: u8 = 0x10;
    pub const UNREGISTER: u8 = 0x11;
    pub const PRESENCE_QUERY: u8 = 0x12;
    pub const PRESENCE_WATCH: u8 = 0x13;
    pub const REPLY: u8 = 0x81;
    pub const ERROR: u8 = 0x82;
    pub const ACK: u8 = 0x83;
    pub const MSG: u8 = 0x84;
    pub const DROPPED: u8 = 0x85;
    pub const PONG: u8 = 0x86;
    /// The gateway ended the subscription named by the id; aux and payload as in ERROR.
    pub const UNSUBSCRIBED: u8 = 0x87;
    /// Another connection took the name in the subject; the id is the REGISTER's.
    pub const NAME_LOST: u8 = 0x90;
    /// A presence answer (id: the query's) or watch event (id: the watch's; flag bit 4
    /// WATCH): subject the name, param 1 online / 0 offline, payload the JSON object.
    pub const PRESENCE: u8 = 0x91;
}

/// Flag bits (header byte 3).
pub mod flag {
    /// Bits 0–1: priority class (0 normal, 1 high, 2 low; 3 is refused). A SUBSCRIBE's class is
    /// its messages' class, a REQUEST's its reply's; a MSG frame carries its subscription's.
    pub const PRIORITY_MASK: u8 = 0b0000_0011;
    /// The request is idempotent and may be retried by the gateway within its deadline.
    pub const RETRY: u8 = 0b0000_0100;
    /// DROPPED: an unknown number more were lost besides `param` (the NATS connection the
    /// subscription lives on was cut).
    pub const GAP: u8 = 0b0000_1000;
    /// JetStream. PUBLISH: a durable publish (stored in the stream that captures the subject;
    /// answered with an ACK that has this flag). SUBSCRIBE: replay from the subject's stream,
    /// the payload saying from where (8 bytes, big-endian: the last sequence seen; or with
    /// `SINCE_TIME`, an RFC 3339 time). ACK: aux is the stream's name; after a PUBLISH the
    /// payload is the 8-byte sequence, after a SUBSCRIBE the first sequence still held when
    /// `TRUNCATED` is set (else empty). MSG: a stream message; aux is its 8-byte sequence.
    pub const STREAM: u8 = 0b0100_0000;
    /// SUBSCRIBE with `STREAM`: the payload is an RFC 3339 time, not a sequence.
    pub const SINCE_TIME: u8 = 0b1000_0000;
    /// ACK with `STREAM` after a SUBSCRIBE: the stream no longer holds the asked-for point.
    pub const TRUNCATED: u8 = 0b1000_0000;
    /// PRESENCE: an event of a watch, not the answer to a query.
    pub const WATCH: u8 = 0b0001_0000;
}

/// The parsed fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub version: u8,
    pub frame_type: u8,
    pub flags: u8,
    pub body_len: u32,
    pub id: u64,
    /// REQUEST: timeout in ms (0 = gateway default). ERROR: retry-after in ms (0 = none).
    /// DROPPED: count. Otherwise 0.
    pub param: u32,
}

impl FrameHeader {
    pub fn parse(bytes: &[u8]) -> FrameHeader {
        let mut b = &bytes[1..HEADER_LEN];
        FrameHeader {
            version: b.get_u8(),
            frame_type: b.get_u8(),
            flags: b.get_u8(),
            body_len: b.get_u32(),
            id: b.get_u64(),
            param: b.get_u32(),
        }
    }
}

/// The decoded body, before it is given a meaning by the frame type.
#[derive(Debug, Default)]
pub struct FrameBody {
    pub subject: Bytes,
    pub aux: Bytes,
    pub headers: Option<Headers>,
    pub payload: Bytes,
}

#[derive(Debug)]
pub struct BinaryDecoder {
    max_frame: usize,
    /// Body bytes still to discard from a frame that was over the limit.
    skipping: u64,
}

impl BinaryDecoder {
    pub fn new(max_frame: usize) -> Self {
        BinaryDecoder {
            max_frame,
            skipping: 0,
        }
    }

    /// Yields the next complete item in `buf`, or `None` until more bytes arrive.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Option<Decoded> {
        if self.skipping > 0 {
            let n = (self.skipping as usize).min(buf.len());
            buf.advance(n);
            self.skipping -= n as u64;
            if self.skipping > 0 {
                return None;
            }
        }
        if buf.is_empty() {
            return None;
        }
        if buf[0] != MAGIC {
            buf.clear();
            return Some(fatal(
                Id::Null,
                ErrorCode::BadRequest,
                "stream out of sync: a frame must start with 0xC1".into(),
            ));
        }
        if buf.len() < 2 {
            return None;
        }
        if buf[1] != VERSION {
            let version = buf[1];
            buf.clear();
            return Some(fatal(
                Id::Null,
                ErrorCode::UnsupportedVersion,
                format!(
                    "frame version {version} is not supported; supported versions: {SUPPORTED_VERSIONS:?}"
                ),
            ));
        }
        if buf.len() < HEADER_LEN {
            return None;
        }
        let header = FrameHeader::parse(buf);
        let body_len = header.body_len as usize;
        let id = frame_id(header.id);
        if HEADER_LEN + body_len > self.max_frame {
            buf.advance(HEADER_LEN);
            self.skipping = header.body_len as u64;
            let n = body_len.min(buf.len());
            buf.advance(n);
            self.skipping -= n as u64;
            return Some(Decoded::Invalid {
                id,
                error: GatewayError::new(
                    ErrorCode::TooLarge,
                    format!(
                        "frame of {} bytes is over the limit of {} bytes",
                        HEADER_LEN + body_len,
                        self.max_frame
                    ),
                ),
                fatal: false,
            });
        }
        if buf.len() < HEADER_LEN + body_len {
            buf.reserve(HEADER_LEN + body_len - buf.len());
            return None;
        }
        let mut frame = buf.split_to(HEADER_LEN + body_len).freeze();
        frame.advance(HEADER_LEN);
        Some(match decode_envelope(header, frame) {
            Ok(envelope) => Decoded::Envelope(envelope),
            Err(error) => Decoded::Invalid {
                id,
                error,
                fatal: false,
            },
        })
    }
}

/// Id 0 in a frame means "no id" (a publish that wants no ack, say).
fn frame_id(id: u64) -> Id {
    if id == 0 { Id::Null } else { Id::from(id) }
}

fn fatal(id: Id, code: ErrorCode, message: String) -> Decoded {
    Decoded::Invalid {
        id,
        error: GatewayError::new(code, message),
        fatal: true,
    }
}

fn decode_envelope(header: FrameHeader, body: Bytes) -> Result<Envelope, GatewayError> {
    let op = match header.frame_type {
        frame_type::REQUEST => Op::Request,
        frame_type::PUBLISH => Op::Publish,
        frame_type::SUBSCRIBE => Op::Subscribe,
        frame_type::UNSUBSCRIBE => Op::Unsubscribe,
        frame_type::PING => Op::Ping,
        frame_type::CREDIT => Op::Credit,
        frame_type::REGISTER => Op::Register,
        frame_type::UNREGISTER => Op::Unregister,
        frame_type::PRESENCE_QUERY => Op::Presence,
        frame_type::PRESENCE_WATCH => Op::PresenceWatch,
        other => {
            return Err(GatewayError::bad_request(format!(
                "unknown frame type 0x{other:02x}"
            )));
        }
    };
    let body = split_body(body, Writer::Client)?;
    let mut envelope = Envelope::new(op, frame_id(header.id));
    if !body.subject.is_empty() {
        envelope.subject = Some(Subject::from_utf8(body.subject)?);
    }
    if !body.aux.is_empty() {
        let queue = std::str::from_utf8(&body.aux)
            .map_err(|_| GatewayError::bad_request("queue group is not UTF-8"))?;
        envelope.queue = Some(queue.to_owned());
    }
    envelope.headers = body.headers;
    envelope.data = body.payload;
    match op {
        // The number of messages a subscription may receive before the client grants more.
        Op::Subscribe | Op::Credit => envelope.credit = (header.param != 0).then_some(header.param),
        _ => envelope.timeout_ms = (header.param != 0).then_some(header.param),
    }
    let stream = header.flags & flag::STREAM != 0;
    envelope.flags = Flags {
        retry: header.flags & flag::RETRY != 0,
        to_default_subject: false,
        durable: stream && op == Op::Publish,
    };
    envelope.priority = frame_priority(header.flags)?;
    match op {
        Op::Subscribe if stream => {
            envelope.since = Some(Box::new(frame_since(header.flags, &envelope.data)?));
            envelope.data = Bytes::new();
        }
        Op::Publish | Op::Subscribe => {}
        _ if stream => {
            return Err(GatewayError::bad_request(
                "flag 0x40 (stream) is for PUBLISH and SUBSCRIBE frames",
            ));
        }
        _ => {}
    }
    Ok(envelope)
}

/// Where a SUBSCRIBE with the stream flag replays from: its payload.
fn frame_since(flags: u8, payload: &[u8]) -> Result<Since, GatewayError> {
    if flags & flag::SINCE_TIME != 0 {
        let text = std::str::from_utf8(payload)
            .map_err(|_| GatewayError::bad_request("since time is not UTF-8"))?;
        return super::json::parse_time(text)
            .map(Since::Time)
            .map_err(GatewayError::bad_request);
    }
    let seq: [u8; 8] = payload.try_into().map_err(|_| {
        GatewayError::bad_request(format!(
            "a SUBSCRIBE with flag 0x40 (stream) carries the last sequence seen as 8 bytes (big-endian), not {} bytes",
            payload.len()
        ))
    })?;
    Ok(Since::Seq(u64::from_be_bytes(seq)))
}

/// The class in flag bits 0–1; the fourth value is not one.
fn frame_priority(flags: u8) -> Result<Priority, GatewayError> {
    let bits = flags & flag::PRIORITY_MASK;
    Priority::from_bits(bits).ok_or_else(|| {
        GatewayError::bad_request(format!(
            "priority bits (flags & 0x03) are {bits}; expected 0 (normal), 1 (high) or 2 (low)"
        ))
    })
}

/// Who wrote a frame, which decides whether `Ipc-Gateway-*` headers may be in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writer {
    /// A client: only the gateway sets those headers.
    Client,
    /// The gateway: a service's reply may carry them.
    Gateway,
}

/// Splits the body of a frame the gateway sent (a client reading its answers) into its parts;
/// every length is checked against what is left.
pub fn decode_body(body: Bytes) -> Result<FrameBody, GatewayError> {
    split_body(body, Writer::Gateway)
}

fn split_body(mut body: Bytes, writer: Writer) -> Result<FrameBody, GatewayError> {
    let short = || GatewayError::bad_request("frame body is shorter than its lengths say");
    let take = |body: &mut Bytes, len: usize| -> Result<Bytes, GatewayError> {
        if body.len() < len {
            return Err(short());
        }
        Ok(body.split_to(len))
    };
    if body.len() < 2 {
        return Err(short());
    }
    let subject_len = body.get_u16() as usize;
    let subject = take(&mut body, subject_len)?;
    if body.len() < 2 {
        return Err(short());
    }
    let aux_len = body.get_u16() as usize;
    let aux = take(&mut body, aux_len)?;
    if body.len() < 4 {
        return Err(short());
    }
    let headers_len = body.get_u32() as usize;
    let headers_block = take(&mut body, headers_len)?;
    let headers = if headers_block.is_empty() {
        None
    } else {
        Some(decode_headers(headers_block, writer)?)
    };
    Ok(FrameBody {
        subject,
        aux,
        headers,
        payload: body,
    })
}

fn decode_headers(mut block: Bytes, writer: Writer) -> Result<Headers, GatewayError> {
    let mut map = Headers::new();
    let text = |block: &mut Bytes| -> Result<String, GatewayError> {
        if block.len() < 2 {
            return Err(GatewayError::bad_request("header block is truncated"));
        }
        let len = block.get_u16() as usize;
        if block.len() < len {
            return Err(GatewayError::bad_request("header block is truncated"));
        }
        String::from_utf8(block.split_to(len).to_vec())
            .map_err(|_| GatewayError::bad_request("a header is not UTF-8"))
    };
    while !block.is_empty() {
        let name = text(&mut block)?;
        let value = text(&mut block)?;
        match writer {
            Writer::Client => map.append(name, value)?,
            Writer::Gateway => map.append_from_gateway(name, value)?,
        }
    }
    Ok(map)
}

/// The parts of one frame to write; encoding both ways goes through this.
#[derive(Debug, Default, Clone, Copy)]
pub struct FrameParts<'a> {
    pub frame_type: u8,
    pub flags: u8,
    pub id: u64,
    pub param: u32,
    pub subject: &'a [u8],
    pub aux: &'a [u8],
    pub headers: Option<&'a Headers>,
    pub payload: &'a [u8],
}

/// Appends one frame to `out`.
pub fn put_frame(parts: FrameParts<'_>, out: &mut BytesMut) {
    // Every length must fit its field: a subject or aux over 65535 bytes is cut (NATS never
    // sends such subjects in practice), and a header entry that does not fit is left out
    // rather than corrupting the stream.
    let subject = &parts.subject[..parts.subject.len().min(u16::MAX as usize)];
    let aux = &parts.aux[..parts.aux.len().min(u16::MAX as usize)];
    let entries = || {
        parts
            .headers
            .into_iter()
            .flat_map(|headers| headers.pairs())
            .map(|(name, value)| (name.as_bytes(), value.as_bytes()))
            .filter(|(name, value)| {
                name.len() <= u16::MAX as usize && value.len() <= u16::MAX as usize
            })
    };
    let headers_len: usize = entries()
        .map(|(name, value)| 4 + name.len() + value.len())
        .sum();
    // Payloads and header blocks are bounded by NATS's max_payload (64 MiB at most), so the
    // body length fits its u32.
    let body_len = 2 + subject.len() + 2 + aux.len() + 4 + headers_len + parts.payload.len();
    out.reserve(HEADER_LEN + body_len);
    out.put_u8(MAGIC);
    out.put_u8(VERSION);
    out.put_u8(parts.frame_type);
    out.put_u8(parts.flags);
    out.put_u32(body_len as u32);
    out.put_u64(parts.id);
    out.put_u32(parts.param);
    out.put_u16(subject.len() as u16);
    out.put_slice(subject);
    out.put_u16(aux.len() as u16);
    out.put_slice(aux);
    out.put_u32(headers_len as u32);
    for (name, value) in entries() {
        out.put_u16(name.len() as u16);
        out.put_slice(name);
        out.put_u16(value.len() as u16);
        out.put_slice(value);
    }
    out.put_slice(parts.payload);
}

/// Appends one outbound event as a binary frame.
pub fn encode(event: &Outbound, out: &mut BytesMut) {
    // The one sequence number a frame may carry, big-endian.
    let seq_bytes = match event {
        Outbound::Msg { message, .. } => message.seq,
        Outbound::Stored { seq, .. } => Some(*seq),
        Outbound::Replaying { truncated, .. } => *truncated,
        _ => None,
    }
    .unwrap_or(0)
    .to_be_bytes();
    let parts = match event {
        Outbound::Reply { id, data, headers } => FrameParts {
            frame_type: frame_type::REPLY,
            id: id.as_u64(),
            headers: headers.as_ref(),
            payload: data,
            ..FrameParts::default()
        },
        Outbound::Ack { id } => FrameParts {
            frame_type: frame_type::ACK,
            id: id.as_u64(),
            ..FrameParts::default()
        },
        Outbound::Pong { id } => FrameParts {
            frame_type: frame_type::PONG,
            id: id.as_u64(),
            ..FrameParts::default()
        },
        Outbound::Error { id, error } => FrameParts {
            frame_type: frame_type::ERROR,
            id: id.as_u64(),
            param: error.retry_after_ms.unwrap_or(0),
            aux: error.code.as_str().as_bytes(),
            payload: error.message.as_bytes(),
            ..FrameParts::default()
        },
        Outbound::Msg {
            sid,
            message,
            priority,
        } => FrameParts {
            frame_type: frame_type::MSG,
            flags: priority.bits() | message.seq.map_or(0, |_| flag::STREAM),
            id: sid.as_u64(),
            subject: message.subject.as_bytes(),
            aux: match message.seq {
                Some(_) => &seq_bytes,
                None => message.reply_to.as_ref().map_or(&[][..], |r| r.as_bytes()),
            },
            headers: message.headers.as_ref(),
            payload: &message.payload,
            ..FrameParts::default()
        },
        Outbound::Dropped { sid, count, gap } => FrameParts {
            frame_type: frame_type::DROPPED,
            flags: if *gap { flag::GAP } else { 0 },
            id: sid.as_u64(),
            param: (*count).min(u32::MAX as u64) as u32,
            ..FrameParts::default()
        },
        // Binary frames carry no `auth` (their connections are identified otherwise).
        Outbound::Authenticated { id } => FrameParts {
            frame_type: frame_type::ACK,
            id: id.as_u64(),
            ..FrameParts::default()
        },
        Outbound::Unsubscribed { sid, error } => FrameParts {
            frame_type: frame_type::UNSUBSCRIBED,
            id: sid.as_u64(),
            aux: error.code.as_str().as_bytes(),
            payload: error.message.as_bytes(),
            ..FrameParts::default()
        },
        Outbound::Stored { id, stream, .. } => FrameParts {
            frame_type: frame_type::ACK,
            flags: flag::STREAM,
            id: id.as_u64(),
            aux: stream.as_bytes(),
            payload: &seq_bytes,
            ..FrameParts::default()
        },
        Outbound::Replaying {
            id,
            stream,
            truncated,
        } => FrameParts {
            frame_type: frame_type::ACK,
            flags: flag::STREAM | truncated.map_or(0, |_| flag::TRUNCATED),
            id: id.as_u64(),
            aux: stream.as_bytes(),
            payload: if truncated.is_some() { &seq_bytes } else { &[] },
            ..FrameParts::default()
        },
        Outbound::NameLost { sid, name } => FrameParts {
            frame_type: frame_type::NAME_LOST,
            id: sid.as_u64(),
            subject: name.as_bytes(),
            ..FrameParts::default()
        },
        Outbound::Presence { id, watch, info } => {
            let payload = serde_json::to_vec(&**info).unwrap_or_default();
            let parts = FrameParts {
                frame_type: frame_type::PRESENCE,
                flags: if *watch { flag::WATCH } else { 0 },
                id: id.as_u64(),
                param: u32::from(info.online),
                subject: info.name.as_bytes(),
                payload: &payload,
                ..FrameParts::default()
            };
            return put_frame(parts, out);
        }
    };
    put_frame(parts, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_frame(id: u64, subject: &str, payload: &[u8], timeout_ms: u32) -> BytesMut {
        let mut out = BytesMut::new();
        put_frame(
            FrameParts {
                frame_type: frame_type::REQUEST,
                id,
                param: timeout_ms,
                subject: subject.as_bytes(),
                payload,
                ..FrameParts::default()
            },
            &mut out,
        );
        out
    }

    #[test]
    fn a_request_frame_round_trips_and_the_payload_is_not_copied() {
        let mut buf = request_frame(42, "demo.echo", b"hello", 250);
        let start = buf.as_ptr() as usize;
        let item = BinaryDecoder::new(1024).decode(&mut buf).unwrap();
        let Decoded::Envelope(envelope) = item else {
            panic!("{item:?}")
        };
        assert_eq!(envelope.op, Op::Request);
        assert_eq!(envelope.id, Id::from(42));
        assert_eq!(envelope.subject.as_deref(), Some("demo.echo"));
        assert_eq!(envelope.timeout_ms, Some(250));
        assert_eq!(&envelope.data[..], b"hello");
        assert_eq!(envelope.data.as_ptr() as usize, start + HEADER_LEN + 8 + 9);
        assert!(buf.is_empty());
    }

    #[test]
    fn a_partial_frame_waits_for_the_rest() {
        let full = request_frame(1, "a", b"xyz", 0);
        let mut decoder = BinaryDecoder::new(1024);
        let mut buf = BytesMut::from(&full[..HEADER_LEN + 3]);
        assert!(decoder.decode(&mut buf).is_none());
        buf.extend_from_slice(&full[HEADER_LEN + 3..]);
        assert!(matches!(
            decoder.decode(&mut buf),
            Some(Decoded::Envelope(_))
        ));
    }

    #[test]
    fn a_frame_claiming_a_gigabyte_is_refused_from_its_header_and_skipped() {
        let mut decoder = BinaryDecoder::new(1024);
        let mut buf = BytesMut::new();
        buf.put_u8(MAGIC);
        buf.put_u8(VERSION);
        buf.put_u8(frame_type::REQUEST);
        buf.put_u8(0);
        buf.put_u32(1 << 30);
        buf.put_u64(9);
        buf.put_u32(0);
        buf.extend_from_slice(&[0u8; 100]);
        match decoder.decode(&mut buf) {
            Some(Decoded::Invalid { id, error, fatal }) => {
                assert_eq!(id, Id::from(9));
                assert_eq!(error.code, ErrorCode::TooLarge);
                assert!(!fatal);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            buf.capacity() < 1 << 20,
            "must not reserve the claimed size"
        );
        assert_eq!(decoder.skipping, (1 << 30) - 100);
    }

    #[test]
    fn an_oversized_frame_is_skipped_and_the_next_one_decodes() {
        let mut decoder = BinaryDecoder::new(64);
        let mut buf = request_frame(1, "a", &[7u8; 100], 0);
        buf.extend_from_slice(&request_frame(2, "b", b"ok", 0));
        assert!(matches!(
            decoder.decode(&mut buf),
            Some(Decoded::Invalid { fatal: false, .. })
        ));
        match decoder.decode(&mut buf) {
            Some(Decoded::Envelope(envelope)) => assert_eq!(envelope.id, Id::from(2)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_version_is_fatal_and_names_the_supported_ones() {
        let mut buf = request_frame(1, "a", b"", 0);
        buf[1] = 9;
        match BinaryDecoder::new(1024).decode(&mut buf) {
            Some(Decoded::Invalid { error, fatal, .. }) => {
                assert_eq!(error.code, ErrorCode::UnsupportedVersion);
                assert!(error.message.contains("[1]"));
                assert!(fatal);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_type_and_truncated_body_are_recoverable_errors() {
        let mut decoder = BinaryDecoder::new(1024);
        let mut buf = request_frame(5, "a", b"", 0);
        buf[2] = 0x7f;
        let mut bad_len = request_frame(6, "abc", b"", 0);
        bad_len[HEADER_LEN + 1] = 200; // subject length past the body
        buf.extend_from_slice(&bad_len);
        buf.extend_from_slice(&request_frame(7, "a", b"", 0));
        for expected in [5u64, 6] {
            match decoder.decode(&mut buf) {
                Some(Decoded::Invalid { id, error, fatal }) => {
                    assert_eq!(id, Id::from(expected));
                    assert_eq!(error.code, ErrorCode::BadRequest);
                    assert!(!fatal);
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            decoder.decode(&mut buf),
            Some(Decoded::Envelope(_))
        ));
    }

    #[test]
    fn a_header_too_long_for_its_field_is_left_out_and_the_frame_stays_valid() {
        let mut headers = Headers::new();
        headers.append("X-Big", "v".repeat(70_000)).unwrap();
        headers.append("X-Ok", "1").unwrap();
        let mut out = BytesMut::new();
        put_frame(
            FrameParts {
                frame_type: frame_type::PUBLISH,
                subject: b"s",
                headers: Some(&headers),
                payload: b"p",
                ..FrameParts::default()
            },
            &mut out,
        );
        let Some(Decoded::Envelope(envelope)) = BinaryDecoder::new(1 << 20).decode(&mut out) else {
            panic!()
        };
        let decoded = envelope.headers.unwrap();
        assert!(decoded.get("X-Big").is_none());
        assert_eq!(decoded.get("X-Ok"), Some("1"));
        assert_eq!(&envelope.data[..], b"p");
    }

    #[test]
    fn a_client_frame_with_a_gateway_header_is_refused_but_a_gateway_frame_may_carry_one() {
        let mut headers = Headers::new();
        headers.append_trusted("Ipc-Gateway-Uid", "0".into());
        let frame = |frame_type| {
            let mut out = BytesMut::new();
            put_frame(
                FrameParts {
                    frame_type,
                    id: 9,
                    subject: b"s",
                    headers: Some(&headers),
                    payload: b"p",
                    ..FrameParts::default()
                },
                &mut out,
            );
            out
        };
        match BinaryDecoder::new(1024).decode(&mut frame(frame_type::REQUEST)) {
            Some(Decoded::Invalid { id, error, fatal }) => {
                assert_eq!(id, Id::from(9));
                assert_eq!(error.code, ErrorCode::BadRequest);
                assert!(error.message.contains("set by the gateway only"), "{error}");
                assert!(!fatal);
            }
            other => panic!("{other:?}"),
        }
        let reply = frame(frame_type::REPLY).freeze().slice(HEADER_LEN..);
        let body = decode_body(reply).unwrap();
        assert_eq!(body.headers.unwrap().get("Ipc-Gateway-Uid"), Some("0"));
    }

    #[test]
    fn headers_round_trip() {
        let mut headers = Headers::new();
        headers.append("X-Trace", "abc").unwrap();
        headers.append("X-Multi", "1").unwrap();
        headers.append("X-Multi", "2").unwrap();
        let mut out = BytesMut::new();
        put_frame(
            FrameParts {
                frame_type: frame_type::PUBLISH,
                subject: b"s",
                headers: Some(&headers),
                payload: b"p",
                ..FrameParts::default()
            },
            &mut out,
        );
        let Some(Decoded::Envelope(envelope)) = BinaryDecoder::new(1024).decode(&mut out) else {
            panic!()
        };
        let decoded = envelope.headers.unwrap();
        assert_eq!(decoded, headers);
        assert_eq!(&envelope.data[..], b"p");
    }

    #[test]
    fn priority_bits_set_the_class_and_the_fourth_value_is_refused_with_the_frames_id() {
        let mut decoder = BinaryDecoder::new(1024);
        for (bits, expected) in [
            (0u8, Priority::Normal),
            (1, Priority::High),
            (2, Priority::Low),
        ] {
            let mut buf = request_frame(3, "a", b"", 0);
            buf[3] = bits | flag::RETRY;
            let Some(Decoded::Envelope(envelope)) = decoder.decode(&mut buf) else {
                panic!("bits {bits}")
            };
            assert_eq!(envelope.priority, expected);
            assert!(envelope.flags.retry, "the other bits still count");
        }
        let mut buf = request_frame(4, "a", b"", 0);
        buf[3] = 3;
        buf.extend_from_slice(&request_frame(5, "a", b"", 0));
        match decoder.decode(&mut buf) {
            Some(Decoded::Invalid { id, error, fatal }) => {
                assert_eq!(id, Id::from(4));
                assert_eq!(error.code, ErrorCode::BadRequest);
                assert!(error.message.contains("priority bits"), "{error}");
                assert!(!fatal, "the connection goes on");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decoder.decode(&mut buf),
            Some(Decoded::Envelope(envelope)) if envelope.id == Id::from(5)
        ));
    }

    #[test]
    fn a_msg_frame_carries_its_subscriptions_priority_bits() {
        for priority in Priority::ALL {
            let mut out = BytesMut::new();
            encode(
                &Outbound::Msg {
                    sid: Id::from(7),
                    message: std::sync::Arc::new(crate::protocol::Delivery {
                        subject: "s".into(),
                        reply_to: None,
                        headers: None,
                        payload: Bytes::from_static(b"p"),
                        seq: None,
                        json_tail: Default::default(),
                    }),
                    priority,
                },
                &mut out,
            );
            let header = FrameHeader::parse(&out);
            assert_eq!(header.frame_type, frame_type::MSG);
            assert_eq!(header.flags, priority.bits());
            assert_eq!(
                Priority::from_bits(header.flags & flag::PRIORITY_MASK),
                Some(priority)
            );
        }
    }
}

#[cfg(test)]
mod stream_tests {
    use super::*;

    fn decode(parts: FrameParts<'_>) -> Result<Envelope, GatewayError> {
        let mut buf = BytesMut::new();
        put_frame(parts, &mut buf);
        match BinaryDecoder::new(1 << 20).decode(&mut buf) {
            Some(Decoded::Envelope(envelope)) => Ok(envelope),
            Some(Decoded::Invalid { error, .. }) => Err(error),
            None => panic!("a whole frame"),
        }
    }

    fn parts(frame_type: u8, flags: u8, payload: &[u8]) -> FrameParts<'_> {
        FrameParts {
            frame_type,
            flags,
            id: 1,
            subject: b"a.b",
            payload,
            ..FrameParts::default()
        }
    }

    #[test]
    fn the_stream_flag_means_durable_on_publish_and_replay_on_subscribe() {
        let publish = decode(parts(frame_type::PUBLISH, flag::STREAM, b"x")).unwrap();
        assert!(publish.flags.durable);
        assert_eq!(&publish.data[..], b"x");
        let seq = 41u64.to_be_bytes();
        let subscribe = decode(parts(frame_type::SUBSCRIBE, flag::STREAM, &seq)).unwrap();
        assert_eq!(subscribe.since.as_deref(), Some(&Since::Seq(41)));
        assert!(subscribe.data.is_empty());
        let time = b"2026-12-06T05:00:00Z";
        let flags = flag::STREAM | flag::SINCE_TIME;
        let subscribe = decode(parts(frame_type::SUBSCRIBE, flags, time)).unwrap();
        assert!(matches!(subscribe.since.as_deref(), Some(Since::Time(_))));
        for (frame_type, flags, payload) in [
            (frame_type::SUBSCRIBE, flag::STREAM, &b"short"[..]),
            (frame_type::SUBSCRIBE, flags, &b"not a time"[..]),
            (frame_type::REQUEST, flag::STREAM, &b""[..]),
        ] {
            let error = decode(parts(frame_type, flags, payload)).unwrap_err();
            assert_eq!(error.code, ErrorCode::BadRequest);
        }
    }

    #[test]
    fn stream_answers_and_messages_carry_the_sequence_in_eight_bytes() {
        let mut out = BytesMut::new();
        encode(
            &Outbound::Stored {
                id: Id::from(3),
                stream: "ORDERS".into(),
                seq: 42,
            },
            &mut out,
        );
        let header = FrameHeader::parse(&out);
        assert_eq!(
            (header.frame_type, header.flags),
            (frame_type::ACK, flag::STREAM)
        );
        let body = decode_body(out.split_off(HEADER_LEN).freeze()).unwrap();
        assert_eq!(&body.aux[..], b"ORDERS");
        assert_eq!(body.payload[..], 42u64.to_be_bytes());

        let mut out = BytesMut::new();
        let delivery = crate::protocol::Delivery {
            subject: Subject::from("a.b"),
            reply_to: None,
            headers: None,
            payload: Bytes::from_static(b"x"),
            seq: Some(7),
            json_tail: Default::default(),
        };
        encode(
            &Outbound::Msg {
                sid: Id::from(1),
                message: std::sync::Arc::new(delivery),
                priority: Priority::High,
            },
            &mut out,
        );
        let header = FrameHeader::parse(&out);
        assert_eq!(header.flags, flag::STREAM | Priority::High.bits());
        let body = decode_body(out.split_off(HEADER_LEN).freeze()).unwrap();
        assert_eq!(body.aux[..], 7u64.to_be_bytes());
        assert_eq!(&body.payload[..], b"x");
    }
}
