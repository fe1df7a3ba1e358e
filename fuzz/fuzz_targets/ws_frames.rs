//! The WebSocket frame reader (`frontend::ws::frame::Incoming`), which reads what any client on
//! the network sends: it never panics, gives the same messages and the same error whether the
//! bytes come in one read or two, leaves no whole frame unread when it asks for more, and
//! every message it gives keeps RFC 6455's rules (text is UTF-8, control payloads at most 125
//! bytes, nothing over the limit).
#![no_main]

use ipc_gateway::frontend::ws::frame::{Incoming, Message, ReadError};
use ipc_gateway_fuzz::control;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((control, rest)) = control(data) else {
        return;
    };
    let whole = read(&[rest], control.max);
    let (first, second) = rest.split_at(control.split);
    let split = read(&[first, second], control.max);
    assert_eq!(whole, split, "two reads read otherwise than one");
    for message in &whole.0 {
        match message {
            Message::Text(text) => {
                assert!(std::str::from_utf8(text).is_ok(), "text that is not UTF-8");
                assert!(text.len() <= control.max, "a message over the limit");
            }
            Message::Binary(data) => assert!(data.len() <= control.max, "a message over the limit"),
            Message::Ping(payload) | Message::Pong(payload) => {
                assert!(payload.len() <= 125, "a control payload over 125 bytes");
            }
            Message::Close(Some((code, reason))) => {
                assert!(*code >= 1000 && *code < 5000, "close code {code}");
                assert!(
                    std::str::from_utf8(reason).is_ok(),
                    "a close reason that is not UTF-8"
                );
            }
            Message::Close(None) => {}
        }
    }
});

/// Every message the pieces make, read as they arrive, and the error that stopped the reading.
fn read(pieces: &[&[u8]], limit: usize) -> (Vec<Message>, Option<ReadError>) {
    let mut incoming = Incoming::default();
    let mut messages = Vec::new();
    for piece in pieces {
        incoming.buf_mut().extend_from_slice(piece);
        loop {
            match incoming.next(limit) {
                Ok(Some(message)) => messages.push(message),
                Ok(None) => {
                    assert!(
                        incoming.wanted() >= 1,
                        "asks for nothing with no whole frame"
                    );
                    break;
                }
                Err(err) => return (messages, Some(err)),
            }
        }
    }
    (messages, None)
}
