//! RFC 6455 framing, server side, without I/O: what a client's frames mean (`Incoming`, which
//! assembles messages from the bytes read) and how the gateway's frames are written
//! (`put_message`, `put_control`). The socket (`socket.rs`) moves the bytes.
//!
//! Why our own: tungstenite kept a read buffer, a write buffer, two waker proxies and a
//! 368-byte state per connection for its whole life, more than half of an idle connection
//! (artifacts/ws-idle/profile-*.md). Here an idle connection keeps nothing: bytes read wait in
//! an `Incoming` only while a frame is incomplete, and a batch of events is framed into one
//! buffer that goes out in one write and is freed.

use bytes::{Buf, BufMut, Bytes, BytesMut};

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// The most a control frame may carry (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;
/// The longest header a client frame can have: 2 bytes, 8 of extended length, 4 of mask.
const MAX_HEADER: usize = 14;

/// A whole message from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Checked to be UTF-8.
    Text(Bytes),
    /// Mutable, so that the binary frame decoder splits it without a copy (`BytesMut::from`
    /// a `Bytes` that shares the read buffer copies it).
    Binary(BytesMut),
    Ping(Bytes),
    Pong(Bytes),
    /// The close code and reason (the reason checked to be UTF-8), if the frame had them.
    Close(Option<(u16, Bytes)>),
}

/// Why the client's input cannot be read on: each ends the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadError {
    /// A frame or message over the limit (it cannot be skipped without reading it all).
    TooLong,
    /// A text message that is not UTF-8 (RFC 6455 asks for close code 1007).
    NotUtf8,
    /// Anything else RFC 6455 forbids (close code 1002); says what.
    Protocol(&'static str),
}

/// The kinds of message the gateway sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Binary,
}

/// What has been read and not yet handed over as messages: the bytes of incomplete frames,
/// and the pieces of a fragmented message. The socket keeps one only while it is not empty.
#[derive(Default)]
pub struct Incoming {
    buf: BytesMut,
    /// A fragmented data message so far: whether it is text, and its payload.
    fragments: Option<(bool, BytesMut)>,
}

/// A frame's header, parsed.
struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    len: usize,
    /// Bytes the header took.
    size: usize,
}

impl Incoming {
    pub fn new(read: BytesMut) -> Self {
        Incoming {
            buf: read,
            fragments: None,
        }
    }

    /// Nothing kept: the socket may drop it.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty() && self.fragments.is_none()
    }

    /// Where the next read goes (at the end of what is kept).
    pub fn buf_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// How many more bytes the frame in hand needs at least: its header when that is not
    /// whole yet, then its payload.
    pub fn wanted(&self) -> usize {
        match parse_header(&self.buf, usize::MAX) {
            Ok(Some(header)) => (header.size + header.len).saturating_sub(self.buf.len()),
            _ => MAX_HEADER.saturating_sub(self.buf.len()).max(1),
        }
    }

    /// The next whole message in what was read; `Ok(None)` until more is read. Frames and
    /// messages are limited to `limit` bytes of payload.
    pub fn next(&mut self, limit: usize) -> Result<Option<Message>, ReadError> {
        loop {
            let Some(header) = parse_header(&self.buf, limit)? else {
                return Ok(None);
            };
            if self.buf.len() < header.size + header.len {
                return Ok(None);
            }
            self.buf.advance(header.size);
            let mut payload = self.buf.split_to(header.len);
            unmask(&mut payload, header.mask);
            if let Some(message) = self.assemble(header.fin, header.opcode, payload, limit)? {
                return Ok(Some(message));
            }
        }
    }

    /// One frame's part in a message: a whole message, or a piece kept for later.
    fn assemble(
        &mut self,
        fin: bool,
        opcode: u8,
        payload: BytesMut,
        limit: usize,
    ) -> Result<Option<Message>, ReadError> {
        let (text, payload) = match opcode {
            OP_PING => return Ok(Some(Message::Ping(payload.freeze()))),
            OP_PONG => return Ok(Some(Message::Pong(payload.freeze()))),
            OP_CLOSE => return close_message(payload.freeze()).map(Some),
            OP_TEXT | OP_BINARY if self.fragments.is_some() => {
                return Err(ReadError::Protocol(
                    "a new message began before the fragmented one ended",
                ));
            }
            OP_TEXT | OP_BINARY if !fin => {
                self.fragments = Some((opcode == OP_TEXT, payload));
                return Ok(None);
            }
            OP_TEXT | OP_BINARY => (opcode == OP_TEXT, payload),
            OP_CONTINUATION => {
                let Some((text, so_far)) = self.fragments.as_mut() else {
                    return Err(ReadError::Protocol(
                        "a continuation frame without a message to continue",
                    ));
                };
                if so_far.len() + payload.len() > limit {
                    return Err(ReadError::TooLong);
                }
                so_far.extend_from_slice(&payload);
                if !fin {
                    return Ok(None);
                }
                let text = *text;
                let (_, whole) = self.fragments.take().expect("checked above");
                (text, whole)
            }
            _ => unreachable!("parse_header refuses other opcodes"),
        };
        if !text {
            return Ok(Some(Message::Binary(payload)));
        }
        let payload = payload.freeze();
        match simdutf8::basic::from_utf8(&payload) {
            Ok(_) => Ok(Some(Message::Text(payload))),
            Err(_) => Err(ReadError::NotUtf8),
        }
    }
}

/// A frame's header if `buf` holds all of it. Refuses what a client may not send: reserved
/// bits (no extension is negotiated), unknown opcodes, unmasked frames, fragmented or long
/// control frames, and payloads over `limit`.
fn parse_header(buf: &[u8], limit: usize) -> Result<Option<Header>, ReadError> {
    let [first, second, ..] = *buf else {
        return Ok(None);
    };
    if first & 0x70 != 0 {
        return Err(ReadError::Protocol(
            "reserved bits set (no extension was agreed)",
        ));
    }
    let fin = first & 0x80 != 0;
    let opcode = first & 0x0F;
    let control = opcode & 0x08 != 0;
    match opcode {
        OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG => {}
        _ => return Err(ReadError::Protocol("unknown opcode")),
    }
    if second & 0x80 == 0 {
        return Err(ReadError::Protocol("a client frame must be masked"));
    }
    let (len, at) = match second & 0x7F {
        126 => match buf.get(2..4) {
            Some(bytes) => (u64::from(u16::from_be_bytes([bytes[0], bytes[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(bytes) => {
                let len = u64::from_be_bytes(bytes.try_into().expect("8 bytes"));
                if len >> 63 != 0 {
                    return Err(ReadError::Protocol("a frame length with its top bit set"));
                }
                (len, 10)
            }
            None => return Ok(None),
        },
        short => (u64::from(short), 2),
    };
    if control && (!fin || len > MAX_CONTROL_PAYLOAD as u64) {
        return Err(ReadError::Protocol(
            "a control frame must be whole and at most 125 bytes",
        ));
    }
    if len > limit as u64 {
        return Err(ReadError::TooLong);
    }
    let Some(mask) = buf.get(at..at + 4) else {
        return Ok(None);
    };
    Ok(Some(Header {
        fin,
        opcode,
        mask: mask.try_into().expect("4 bytes"),
        len: len as usize,
        size: at + 4,
    }))
}

/// A close frame's code and reason, checked as RFC 6455 §7.4 asks.
fn close_message(payload: Bytes) -> Result<Message, ReadError> {
    match payload.len() {
        0 => return Ok(Message::Close(None)),
        1 => return Err(ReadError::Protocol("a close frame of one byte")),
        _ => {}
    }
    let code = u16::from_be_bytes([payload[0], payload[1]]);
    let sendable = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
    if !sendable {
        return Err(ReadError::Protocol("a close code no endpoint may send"));
    }
    let reason = payload.slice(2..);
    if std::str::from_utf8(&reason).is_err() {
        return Err(ReadError::Protocol("a close reason that is not UTF-8"));
    }
    Ok(Message::Close(Some((code, reason))))
}

/// XORs the payload with the client's mask, eight bytes at a time.
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes((&*chunk).try_into().expect("8 bytes")) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
}

/// Appends one data message to `out`, its payload written by `write` (which is given the
/// buffer and where the payload starts). The header is written first for a payload of
/// 126–65,535 bytes (a typical event) and moved when the payload came out another size.
pub fn put_message(out: &mut BytesMut, kind: Kind, write: impl FnOnce(&mut BytesMut, usize)) {
    let opcode = match kind {
        Kind::Text => OP_TEXT,
        Kind::Binary => OP_BINARY,
    };
    let at = out.len();
    out.put_slice(&[0x80 | opcode, 126, 0, 0]);
    write(out, at + 4);
    let len = out.len() - at - 4;
    match len {
        0..=125 => {
            out[at + 1] = len as u8;
            out.copy_within(at + 4.., at + 2);
            out.truncate(out.len() - 2);
        }
        126..=0xFFFF => out[at + 2..at + 4].copy_from_slice(&(len as u16).to_be_bytes()),
        _ => {
            // Six more bytes of length: the payload moves up.
            out.put_slice(&[0; 6]);
            out.copy_within(at + 4..at + 4 + len, at + 10);
            out[at + 1] = 127;
            out[at + 2..at + 10].copy_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

/// The control frames the gateway sends.
pub enum Control<'a> {
    Ping,
    Pong(&'a [u8]),
    Close(u16, &'a str),
}

/// One control frame in a buffer of its own, exactly as big as the largest one can be.
pub fn control_frame(control: Control<'_>) -> BytesMut {
    let mut frame = BytesMut::with_capacity(2 + MAX_CONTROL_PAYLOAD);
    put_control(&mut frame, control);
    frame
}

/// Appends one control frame to `out`; a payload over 125 bytes is cut there (a close
/// reason at a character boundary).
pub fn put_control(out: &mut BytesMut, control: Control<'_>) {
    let (opcode, code, payload) = match control {
        Control::Ping => (OP_PING, None, &[][..]),
        Control::Pong(payload) => (OP_PONG, None, payload),
        Control::Close(code, reason) => {
            let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            (OP_CLOSE, Some(code), &reason.as_bytes()[..end])
        }
    };
    let payload = &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)];
    let len = payload.len() + if code.is_some() { 2 } else { 0 };
    out.put_slice(&[0x80 | opcode, len as u8]);
    if let Some(code) = code {
        out.put_u16(code);
    }
    out.put_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame: masked with `mask`, as a browser would send it.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut frame = vec![(u8::from(fin) << 7) | opcode];
        match payload.len() {
            len @ 0..=125 => frame.push(0x80 | len as u8),
            len @ 126..=0xFFFF => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        frame
    }

    const MASK: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];

    fn read_all(bytes: &[u8], limit: usize) -> Result<Vec<Message>, ReadError> {
        let mut incoming = Incoming::new(BytesMut::from(bytes));
        let mut messages = Vec::new();
        while let Some(message) = incoming.next(limit)? {
            messages.push(message);
        }
        assert!(incoming.buf.is_empty(), "bytes left: {:?}", incoming.buf);
        Ok(messages)
    }

    #[test]
    fn masked_frames_of_every_length_form_read_back() {
        for len in [0, 1, 7, 8, 9, 125, 126, 127, 65_535, 65_536, 100_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let frame = client_frame(true, OP_BINARY, &payload, MASK);
            let read = read_all(&frame, 1 << 20).unwrap();
            assert_eq!(
                read,
                vec![Message::Binary(BytesMut::from(&payload[..]))],
                "length {len}"
            );
        }
    }

    #[test]
    fn a_frame_read_a_byte_at_a_time_comes_out_once_whole() {
        let frame = client_frame(true, OP_TEXT, "héllo".as_bytes(), MASK);
        let mut incoming = Incoming::default();
        for (i, byte) in frame.iter().enumerate() {
            assert!(incoming.wanted() >= 1);
            incoming.buf_mut().put_u8(*byte);
            let next = incoming.next(1024).unwrap();
            if i + 1 < frame.len() {
                assert_eq!(next, None, "after {} bytes", i + 1);
            } else {
                assert_eq!(next, Some(Message::Text(Bytes::from("héllo"))));
            }
        }
        assert!(incoming.is_empty());
    }

    #[test]
    fn wanted_is_the_rest_of_the_frame_once_its_header_is_in() {
        let frame = client_frame(true, OP_BINARY, &[1; 300], MASK);
        let mut incoming = Incoming::new(BytesMut::from(&frame[..10]));
        assert_eq!(incoming.wanted(), frame.len() - 10);
        assert_eq!(incoming.next(1024).unwrap(), None);
        let incoming = Incoming::new(BytesMut::from(&frame[..1]));
        assert_eq!(incoming.wanted(), MAX_HEADER - 1);
    }

    #[test]
    fn fragments_join_and_control_frames_may_come_between_them() {
        let mut bytes = client_frame(false, OP_TEXT, b"one ", MASK);
        bytes.extend(client_frame(true, OP_PING, b"p", MASK));
        bytes.extend(client_frame(false, OP_CONTINUATION, b"two ", MASK));
        bytes.extend(client_frame(true, OP_CONTINUATION, b"three", MASK));
        let read = read_all(&bytes, 1024).unwrap();
        assert_eq!(
            read,
            vec![
                Message::Ping(Bytes::from("p")),
                Message::Text(Bytes::from("one two three"))
            ]
        );
    }

    #[test]
    fn what_rfc_6455_forbids_is_a_protocol_error() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("unmasked", vec![0x81, 0x01, b'a']),
            ("reserved bit", {
                let mut frame = client_frame(true, OP_TEXT, b"a", MASK);
                frame[0] |= 0x40;
                frame
            }),
            ("unknown opcode", client_frame(true, 0x3, b"a", MASK)),
            ("fragmented ping", client_frame(false, OP_PING, b"a", MASK)),
            ("long ping", client_frame(true, OP_PING, &[0; 126], MASK)),
            (
                "stray continuation",
                client_frame(true, OP_CONTINUATION, b"a", MASK),
            ),
            ("message inside a message", {
                let mut bytes = client_frame(false, OP_BINARY, b"a", MASK);
                bytes.extend(client_frame(true, OP_TEXT, b"b", MASK));
                bytes
            }),
            ("one-byte close", client_frame(true, OP_CLOSE, &[3], MASK)),
            (
                "close code 1005",
                client_frame(true, OP_CLOSE, &1005u16.to_be_bytes(), MASK),
            ),
            (
                "close code 999",
                client_frame(true, OP_CLOSE, &999u16.to_be_bytes(), MASK),
            ),
            ("close reason not UTF-8", {
                client_frame(true, OP_CLOSE, &[0x03, 0xE8, 0xFF], MASK)
            }),
        ];
        for (what, bytes) in cases {
            assert!(
                matches!(read_all(&bytes, 1024), Err(ReadError::Protocol(_))),
                "{what}: {:?}",
                read_all(&bytes, 1024)
            );
        }
    }

    #[test]
    fn over_the_limit_and_bad_utf8_have_their_own_errors() {
        let long = client_frame(true, OP_BINARY, &[0; 101], MASK);
        assert_eq!(read_all(&long, 100), Err(ReadError::TooLong));
        // The header alone is enough to refuse it.
        assert_eq!(
            Incoming::new(BytesMut::from(&long[..4])).next(100),
            Err(ReadError::TooLong)
        );
        let mut pieces = client_frame(false, OP_BINARY, &[0; 60], MASK);
        pieces.extend(client_frame(true, OP_CONTINUATION, &[0; 60], MASK));
        assert_eq!(read_all(&pieces, 100), Err(ReadError::TooLong));
        let bad = client_frame(true, OP_TEXT, &[b'a', 0xC3], MASK);
        assert_eq!(read_all(&bad, 100), Err(ReadError::NotUtf8));
    }

    #[test]
    fn close_frames_carry_their_code_and_reason() {
        let mut payload = 4000u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        let bytes = client_frame(true, OP_CLOSE, &payload, MASK);
        assert_eq!(
            read_all(&bytes, 1024).unwrap(),
            vec![Message::Close(Some((4000, Bytes::from("bye"))))]
        );
        let empty = client_frame(true, OP_CLOSE, &[], MASK);
        assert_eq!(read_all(&empty, 1024).unwrap(), vec![Message::Close(None)]);
    }

    /// Reads a server frame back: (fin, opcode, payload, bytes it took).
    fn server_frame(bytes: &[u8]) -> (bool, u8, Vec<u8>, usize) {
        assert_eq!(bytes[1] & 0x80, 0, "a server frame is never masked");
        let (len, at) = match bytes[1] {
            126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize,
                10,
            ),
            short => (short as usize, 2),
        };
        (
            bytes[0] & 0x80 != 0,
            bytes[0] & 0x0F,
            bytes[at..at + len].to_vec(),
            at + len,
        )
    }

    #[test]
    fn put_message_writes_the_shortest_header_for_each_length() {
        for (len, header) in [
            (0, 2),
            (125, 2),
            (126, 4),
            (65_535, 4),
            (65_536, 10),
            (70_000, 10),
        ] {
            let mut out = BytesMut::from(&b"before"[..]);
            let payload: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
            put_message(&mut out, Kind::Binary, |buf, start| {
                assert_eq!(start, buf.len());
                buf.put_slice(&payload);
            });
            assert_eq!(&out[..6], b"before");
            let (fin, opcode, read, size) = server_frame(&out[6..]);
            assert!(fin);
            assert_eq!(opcode, OP_BINARY);
            assert_eq!(read, payload, "length {len}");
            assert_eq!(size, header + len);
            assert_eq!(out.len(), 6 + size);
        }
    }

    #[test]
    fn control_frames_are_short_and_whole() {
        let mut out = BytesMut::new();
        put_control(&mut out, Control::Ping);
        put_control(&mut out, Control::Pong(b"echo"));
        put_control(&mut out, Control::Close(1000, &"é".repeat(100)));
        let (_, op, payload, used) = server_frame(&out);
        assert_eq!((op, payload.len()), (OP_PING, 0));
        let rest = &out[used..];
        let (_, op, payload, used) = server_frame(rest);
        assert_eq!((op, payload.as_slice()), (OP_PONG, &b"echo"[..]));
        let (fin, op, payload, _) = server_frame(&rest[used..]);
        assert!(fin);
        assert_eq!(op, OP_CLOSE);
        assert!(payload.len() <= 125);
        assert_eq!(&payload[..2], &1000u16.to_be_bytes());
        assert!(
            std::str::from_utf8(&payload[2..]).is_ok(),
            "cut at a boundary"
        );
    }
}
