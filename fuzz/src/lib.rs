//! What the stream fuzz targets share: how an input's first bytes choose the split point and
//! the size limit, feeding a decoder whole or in two reads (as nats-server fuzzes its parser),
//! and the invariants every decoded item must keep. A failed invariant panics, which libFuzzer
//! reports as a crash with the input that caused it.

use bytes::{Bytes, BytesMut};
use ipc_gateway::protocol::binary::{BinaryDecoder, HEADER_LEN};
use ipc_gateway::protocol::canonical::{put_binary, put_json};
use ipc_gateway::protocol::json::JsonLinesDecoder;
use ipc_gateway::protocol::{Decoded, Envelope, ErrorCode, Since, WireDecoder};
use tokio_util::codec::Decoder;

/// The limits a target picks from (by one control byte): small ones reach the over-limit paths
/// with short inputs, the last is the gateway's default order of size.
pub const MAX_FRAMES: [usize; 4] = [64, 300, 4096, 1 << 20];

/// An input's control bytes: where to split it, and the size limit.
#[derive(Debug, Clone, Copy)]
pub struct Control {
    pub split: usize,
    pub max: usize,
}

/// Takes three control bytes off the front (two for the split point, one for the limit) and
/// returns them with the rest; `None` for an input too short to have them.
pub fn control(data: &[u8]) -> Option<(Control, &[u8])> {
    let [a, b, c, rest @ ..] = data else {
        return None;
    };
    let split = usize::from(u16::from_be_bytes([*a, *b])) % (rest.len() + 1);
    let max = MAX_FRAMES[usize::from(*c) % MAX_FRAMES.len()];
    Some((Control { split, max }, rest))
}

/// What a stream decoder made of an input: each item, and the bytes of the stream it consumed.
#[derive(Debug)]
pub struct Fed {
    pub items: Vec<Decoded>,
    /// For each item, the stream's bytes it took (a whole frame or line, or what an error
    /// discarded while producing it).
    pub spans: Vec<std::ops::Range<usize>>,
}

/// Feeds `chunks` to a `WireDecoder` as successive reads, as a connection does: after each read,
/// every complete item; at the end, what end of stream gives. Stops at a fatal item, after
/// which the connection is closed. Checks on the way that the decoder never keeps more than
/// the limit (plus a frame header) while it waits for more.
pub fn feed(chunks: &[&[u8]], max: usize) -> Fed {
    let mut decoder = WireDecoder::new(max);
    let mut buf = BytesMut::new();
    let mut fed = Fed {
        items: Vec::new(),
        spans: Vec::new(),
    };
    let mut appended = 0;
    let take = |fed: &mut Fed, item: Decoded, before: usize, after: usize| -> bool {
        let fatal = matches!(item, Decoded::Invalid { fatal: true, .. });
        fed.items.push(item);
        fed.spans.push(before..after);
        fatal
    };
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        appended += chunk.len();
        loop {
            let before = appended - buf.len();
            match decoder
                .decode(&mut buf)
                .expect("the decoder has no I/O errors")
            {
                Some(item) => {
                    if take(&mut fed, item, before, appended - buf.len()) {
                        return fed;
                    }
                }
                None => {
                    assert!(
                        buf.len() <= max + HEADER_LEN,
                        "waiting with {} bytes buffered, over the limit {max} + {HEADER_LEN}",
                        buf.len()
                    );
                    break;
                }
            }
        }
    }
    loop {
        let before = appended - buf.len();
        match decoder.decode_eof(&mut buf).expect("no I/O errors") {
            Some(item) => {
                if take(&mut fed, item, before, appended - buf.len()) {
                    return fed;
                }
            }
            None => break,
        }
    }
    assert!(buf.is_empty(), "end of stream leaves {} bytes", buf.len());
    fed
}

/// Feeds `input` whole and split at `split`, checks that both give the same items, and checks
/// every item; `frames` says whether the input is binary frames (for the byte-level checks).
pub fn check_stream(input: &[u8], control: Control, frames: bool) {
    let whole = feed(&[input], control.max);
    let (a, b) = input.split_at(control.split);
    let split = feed(&[a, b], control.max);
    assert_eq!(
        whole.items, split.items,
        "fed whole and split at {} the decoder disagrees",
        control.split
    );
    for (item, span) in whole.items.iter().zip(&whole.spans) {
        match item {
            Decoded::Invalid { error, fatal, .. } => {
                check_refusal(error.code, &error.message, *fatal)
            }
            Decoded::Envelope(envelope) if frames => {
                check_binary(envelope, Some(&input[span.clone()]))
            }
            Decoded::Envelope(envelope) => check_json(envelope),
        }
    }
}

/// A refusal from a decoder: one of the codes the wire reserves for bad input, with a message;
/// fatal (closing the connection) only when the stream cannot be resynchronised.
pub fn check_refusal(code: ErrorCode, message: &str, fatal: bool) {
    assert!(
        matches!(
            code,
            ErrorCode::BadRequest | ErrorCode::TooLarge | ErrorCode::UnsupportedVersion
        ),
        "a decoder refused with {code}"
    );
    assert!(!message.is_empty(), "{code} without a message");
    if fatal {
        assert!(
            matches!(code, ErrorCode::BadRequest | ErrorCode::UnsupportedVersion),
            "fatal {code}"
        );
    }
}

/// A decoded binary frame: it re-encodes (canonical form) to a frame that decodes to the same
/// envelope and re-encodes to itself. Given the original `frame`, the canonical one differs from
/// it at most in the flag byte (bits the frame type does not use are dropped), in the order of
/// header entries (a name's values are grouped), and in a replay time (written as RFC 3339
/// again); everything else is the same bytes.
pub fn check_binary(envelope: &Envelope, frame: Option<&[u8]>) {
    let canonical = canonical(envelope, put_binary, decode_frame, "frame");
    cross_check_json(envelope);
    let Some(frame) = frame else { return };
    if matches!(envelope.since.as_deref(), Some(Since::Time(_))) {
        return;
    }
    assert_eq!(
        canonical.len(),
        frame.len(),
        "canonical frame of another length"
    );
    assert_eq!(canonical[..3], frame[..3], "magic, version or type changed");
    assert_eq!(
        canonical[4..HEADER_LEN],
        frame[4..HEADER_LEN],
        "length, id or param changed"
    );
    assert_eq!(
        canonical[3] & !frame[3],
        0,
        "the canonical flags {:#04x} set a bit the frame's {:#04x} did not",
        canonical[3],
        frame[3]
    );
    let names = envelope.headers.as_ref().map_or(0, |h| h.iter().count());
    if names <= 1 {
        assert_eq!(
            canonical[HEADER_LEN..],
            frame[HEADER_LEN..],
            "the body changed"
        );
    }
}

/// A decoded JSON line: its canonical line is one line, decodes to the same envelope, and is a
/// fixed point.
pub fn check_json(envelope: &Envelope) {
    let canonical = canonical(envelope, put_json, decode_line, "line");
    assert_eq!(canonical.last(), Some(&b'\n'));
    assert!(
        !canonical[..canonical.len() - 1].contains(&b'\n'),
        "the canonical line has a line break inside"
    );
    cross_check_binary(envelope);
}

/// The canonical form of a decoded envelope on one wire: it must exist, decode to the same
/// envelope, and be written again byte for byte (a fixed point).
fn canonical(envelope: &Envelope, put: Put, read: fn(&[u8]) -> Envelope, wire: &str) -> Bytes {
    let canonical =
        encode(envelope, put).unwrap_or_else(|| panic!("a decoded {wire} can be written back"));
    let again = read(&canonical);
    assert_eq!(&again, envelope, "the canonical {wire} decodes differently");
    assert_eq!(
        encode(&again, put).as_deref(),
        Some(&canonical[..]),
        "the canonical {wire} is not a fixed point"
    );
    canonical
}

/// `canonical::put_binary` or `canonical::put_json`.
type Put = fn(&Envelope, &mut BytesMut) -> Result<(), &'static str>;

/// When the other wire can carry the envelope, it carries it unchanged.
fn cross_check_json(envelope: &Envelope) {
    if let Some(line) = encode(envelope, put_json) {
        assert_eq!(&decode_line(&line), envelope, "binary → JSON changed it");
    }
}

fn cross_check_binary(envelope: &Envelope) {
    if let Some(frame) = encode(envelope, put_binary) {
        assert_eq!(&decode_frame(&frame), envelope, "JSON → binary changed it");
    }
}

fn encode(envelope: &Envelope, put: Put) -> Option<Bytes> {
    let mut out = BytesMut::new();
    put(envelope, &mut out).ok()?;
    Some(out.freeze())
}

/// One whole frame, with a limit no canonical frame reaches.
pub fn decode_frame(frame: &[u8]) -> Envelope {
    let mut buf = BytesMut::from(frame);
    match BinaryDecoder::new(usize::MAX / 2).decode(&mut buf) {
        Some(Decoded::Envelope(envelope)) if buf.is_empty() => envelope,
        other => panic!(
            "a canonical frame gave {other:?} (left {} bytes)",
            buf.len()
        ),
    }
}

/// One whole line, newline included, with a limit no canonical line reaches.
pub fn decode_line(line: &[u8]) -> Envelope {
    let mut buf = BytesMut::from(line);
    match JsonLinesDecoder::new(usize::MAX / 2).decode(&mut buf) {
        Some(Decoded::Envelope(envelope)) if buf.is_empty() => envelope,
        other => panic!("a canonical line gave {other:?} (left {} bytes)", buf.len()),
    }
}
