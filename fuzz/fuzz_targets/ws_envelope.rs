//! The WebSocket message parser (`frontend::ws::decode`): a text message is one JSON envelope, a
//! binary message exactly one frame. Checked against the stream decoders (a message that holds
//! one frame or one line decodes as the stream would decode it), never fatal (message
//! boundaries keep the wire in step), and every envelope re-encodes to its canonical form.
#![no_main]

use bytes::{Bytes, BytesMut};
use ipc_gateway::frontend::ws::{self, Message};
use ipc_gateway::protocol::binary::{BinaryDecoder, MAGIC};
use ipc_gateway::protocol::json::JsonLinesDecoder;
use ipc_gateway::protocol::{Decoded, ErrorCode, WireFormat};
use ipc_gateway_fuzz::{check_binary, check_json, check_refusal, control};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((control, rest)) = control(data) else {
        return;
    };
    // The split point's parity picks the kind of message (one message is never split).
    if control.split % 2 == 0 {
        text(&String::from_utf8_lossy(rest), control.max);
    } else {
        binary(rest, control.max);
    }
});

fn text(text: &str, max: usize) {
    let Some((WireFormat::JsonLines, item)) =
        ws::decode(Message::Text(Bytes::from(text.to_owned())), max)
    else {
        panic!("a text message is a JSON envelope");
    };
    // One line of a stream reads the same, unless the stream would skip it (blank) or read it
    // as more than one line.
    let one_line = !text.contains('\n')
        && !text.ends_with('\r')
        && !text.bytes().all(|b| b.is_ascii_whitespace());
    if one_line {
        let mut buf = BytesMut::from(text.as_bytes());
        buf.extend_from_slice(b"\n");
        let stream = JsonLinesDecoder::new(usize::MAX / 2).decode(&mut buf);
        assert_eq!(
            stream.as_ref(),
            Some(&item),
            "a stream line reads otherwise"
        );
    }
    match &item {
        Decoded::Invalid { error, fatal, .. } => {
            assert!(!fatal, "a bad WebSocket message is never fatal");
            check_refusal(error.code, &error.message, false);
        }
        // Over WebSocket a default-subject object may span lines (a line break is JSON white
        // space), which no JSON line can carry: the message itself is its canonical form.
        Decoded::Envelope(envelope)
            if envelope.flags.to_default_subject && envelope.data.contains(&b'\n') =>
        {
            let same = String::from_utf8(envelope.data.to_vec()).expect("the message's text");
            let again = ws::decode(Message::Text(Bytes::from(same)), max).map(|(_, item)| item);
            assert_eq!(again.as_ref(), Some(&item), "the object decodes otherwise");
        }
        Decoded::Envelope(envelope) => check_json(envelope),
    }
}

fn binary(rest: &[u8], max: usize) {
    let mut frame = rest.to_vec();
    if let Some(first) = frame.first_mut() {
        *first = MAGIC;
    }
    let message = Message::Binary(Bytes::copy_from_slice(&frame));
    let Some((WireFormat::Binary, item)) = ws::decode(message, max) else {
        panic!("a binary message is a frame");
    };
    let mut buf = BytesMut::from(&frame[..]);
    let stream = BinaryDecoder::new(max).decode(&mut buf);
    match (&item, stream) {
        (Decoded::Invalid { fatal: true, .. }, _) => panic!("a bad WebSocket message is fatal"),
        (Decoded::Envelope(envelope), Some(Decoded::Envelope(same))) => {
            assert!(
                buf.is_empty(),
                "an envelope from a message with bytes left over"
            );
            assert_eq!(envelope, &same);
            check_binary(envelope, Some(&frame));
        }
        (Decoded::Invalid { id, error, .. }, Some(Decoded::Envelope(envelope))) => {
            assert!(!buf.is_empty(), "one whole frame refused");
            assert_eq!((id, error.code), (&envelope.id, ErrorCode::BadRequest));
        }
        (
            Decoded::Invalid { id, error, .. },
            Some(Decoded::Invalid {
                id: i, error: e, ..
            }),
        ) => {
            assert_eq!((id, error), (&i, &e), "the stream refuses it otherwise");
            check_refusal(error.code, &error.message, false);
        }
        (Decoded::Invalid { id, error, .. }, None) => {
            assert!(id.is_null());
            assert_eq!(error.code, ErrorCode::BadRequest, "a partial frame");
        }
        (item, stream) => panic!("message {item:?}, stream {stream:?}"),
    }
}
