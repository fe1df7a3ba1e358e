//! Property tests of both codecs: any envelope a wire can carry, written with `canonical` and
//! read back with the decoder, is the same envelope (every op, ids, subjects, headers, flags and
//! priority, durable and replay fields, payloads of arbitrary bytes, which JSON carries as
//! `data` when they are UTF-8 and `data_b64` otherwise), also when the bytes arrive in two
//! reads; and each outbound event (replies, deliveries, errors, drops) reads back with the
//! fields it was written with. The fuzz targets (fuzz/) check the other direction: bytes first.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use serde_json::Value;
use tokio_util::codec::Decoder;

use super::binary::{self, FrameHeader, HEADER_LEN, flag, frame_type};
use super::canonical::{put_binary, put_json};
use super::json;
use super::{
    Decoded, Delivery, Envelope, ErrorCode, Flags, GatewayError, Headers, Id, Op, Outbound,
    Priority, Since, Subject, WireDecoder,
};

/// Decodes `bytes` fed in two reads split at `split` to one stream decoder (which tells the
/// wire from the first byte), expecting exactly one envelope.
fn decode_in_two(bytes: &[u8], split: usize) -> Envelope {
    let (a, b) = bytes.split_at(split % (bytes.len() + 1));
    let mut decoder = WireDecoder::new(1 << 20);
    let mut buf = BytesMut::from(a);
    if let Some(item) = decoder.decode(&mut buf).expect("no I/O") {
        assert!(
            a.len() == bytes.len(),
            "an item from a partial read: {item:?}"
        );
        return envelope(item);
    }
    buf.extend_from_slice(b);
    let item = decoder.decode(&mut buf).expect("no I/O");
    assert!(buf.is_empty(), "{} bytes left over", buf.len());
    envelope(item.expect("the whole input is one item"))
}

fn envelope(item: Decoded) -> Envelope {
    match item {
        Decoded::Envelope(envelope) => envelope,
        Decoded::Invalid { error, .. } => panic!("refused: {error}"),
    }
}

fn op(binary: bool) -> impl Strategy<Value = Op> {
    // Binary frames have no auth op.
    let ops = Op::ALL.into_iter().filter(|op| !binary || *op != Op::Auth);
    proptest::sample::select(ops.collect::<Vec<_>>())
}

fn id(binary: bool) -> BoxedStrategy<Id> {
    let numbers = prop_oneof![Just(Id::Null), (1..=u64::MAX).prop_map(Id::from)];
    if binary {
        return numbers.boxed();
    }
    prop_oneof![
        numbers,
        any::<i64>().prop_map(|n| Id::Number(n.into())),
        ".{0,12}".prop_map(|s| Id::Text(Arc::from(s))),
    ]
    .boxed()
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z0-9_$*>.-]{1,24}", ".{1,12}"]
}

/// Valid headers: names sorted (as JSON reads them back) or in any order (binary frames).
fn headers(sorted: bool) -> impl Strategy<Value = Option<Headers>> {
    let entries = proptest::collection::vec(
        (
            "[A-Za-z][A-Za-z0-9-]{0,10}",
            proptest::collection::vec("[^\r\n]{0,10}", 1..3),
        ),
        1..4,
    );
    proptest::option::of(entries.prop_map(move |entries| {
        let entries: Vec<(String, Vec<String>)> = match sorted {
            true => entries
                .into_iter()
                .collect::<BTreeMap<_, _>>()
                .into_iter()
                .collect(),
            false => entries,
        };
        let mut headers = Headers::new();
        for (name, values) in entries {
            for value in values {
                // A generated name may be the gateway's own prefix: then it is left out.
                let _ = headers.append(name.clone(), value);
            }
        }
        Some(headers).filter(|h| !h.is_empty())
    }))
    .prop_map(Option::flatten)
}

fn since() -> impl Strategy<Value = Since> {
    let time = (
        0i64..4_000_000_000,
        0u32..1_000_000_000,
        -23 * 60..=23 * 60i32,
    )
        .prop_map(|(secs, nanos, minutes)| {
            let at = time::OffsetDateTime::from_unix_timestamp(secs)
                .and_then(|t| t.replace_nanosecond(nanos))
                .expect("in range");
            let offset = time::UtcOffset::from_whole_seconds(minutes * 60).expect("in range");
            Since::Time(at.to_offset(offset))
        });
    prop_oneof![any::<u64>().prop_map(Since::Seq), time]
}

/// An envelope each wire can carry; `binary` keeps to what a frame can say.
fn envelopes(binary: bool) -> impl Strategy<Value = Envelope> {
    let parts = (
        op(binary),
        id(binary),
        proptest::option::of(text()),
        headers(!binary),
        proptest::collection::vec(any::<u8>(), 0..48),
        proptest::option::of(1..=u32::MAX),
        proptest::option::of(text()),
        any::<(bool, bool)>(),
        proptest::sample::select(Priority::ALL.to_vec()),
        proptest::option::of(since()),
        proptest::option::of(".{0,16}"),
    );
    parts.prop_map(
        move |(
            op,
            id,
            subject,
            headers,
            data,
            number,
            queue,
            (retry, durable),
            priority,
            since,
            token,
        )| {
            let mut envelope = Envelope::new(op, id);
            envelope.subject = subject.map(Subject::from);
            envelope.headers = headers;
            envelope.data = Bytes::from(data);
            match op {
                Op::Subscribe | Op::Credit => envelope.credit = number,
                _ => envelope.timeout_ms = number,
            }
            envelope.queue = queue;
            envelope.flags = Flags {
                retry,
                to_default_subject: false,
                durable: durable && op == Op::Publish,
            };
            envelope.priority = priority;
            if op == Op::Subscribe {
                envelope.since = since.map(Box::new);
                if binary && envelope.since.is_some() {
                    // A frame's payload says where the replay starts.
                    envelope.data = Bytes::new();
                }
            }
            if !binary {
                envelope.token = token;
            }
            envelope
        },
    )
}

proptest! {
    #[test]
    fn every_envelope_a_frame_can_carry_round_trips(envelope in envelopes(true), split in any::<usize>()) {
        let mut frame = BytesMut::new();
        put_binary(&envelope, &mut frame).expect("a frame can carry it");
        prop_assert_eq!(decode_in_two(&frame, split), envelope);
    }

    #[test]
    fn every_envelope_a_line_can_carry_round_trips(envelope in envelopes(false), split in any::<usize>()) {
        let mut line = BytesMut::new();
        put_json(&envelope, &mut line).expect("a line can carry it");
        prop_assert_eq!(decode_in_two(&line, split), envelope);
    }

    #[test]
    fn both_wires_read_an_envelope_both_can_carry_the_same(envelope in envelopes(true)) {
        let (mut frame, mut line) = (BytesMut::new(), BytesMut::new());
        put_binary(&envelope, &mut frame).expect("a frame can carry it");
        if put_json(&envelope, &mut line).is_ok() {
            prop_assert_eq!(decode_in_two(&line, 0), decode_in_two(&frame, 0));
        }
    }

    #[test]
    fn outbound_events_read_back_with_their_fields(
        event in outbound(),
    ) {
        check_outbound_frame(&event);
        check_outbound_line(&event);
    }
}

fn outbound() -> impl Strategy<Value = Outbound> {
    let id = || prop_oneof![Just(Id::Null), (1..=u64::MAX).prop_map(Id::from)];
    let payload = || proptest::collection::vec(any::<u8>(), 0..48).prop_map(Bytes::from);
    let error = (
        proptest::sample::select(ErrorCode::ALL.to_vec()),
        ".{0,24}",
        proptest::option::of(any::<u32>()),
    )
        .prop_map(|(code, message, retry_after_ms)| GatewayError {
            code,
            message,
            retry_after_ms,
        });
    let delivery = (
        "[a-z0-9_$.-]{1,24}",
        proptest::option::of("_INBOX\\.[a-z0-9]{1,12}"),
        headers(false),
        payload(),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(|(subject, reply_to, headers, payload, seq)| Delivery {
            subject: Subject::from(subject),
            reply_to: reply_to.map(Subject::from),
            headers,
            payload,
            seq,
            json_tail: Default::default(),
        });
    prop_oneof![
        (id(), payload(), headers(false)).prop_map(|(id, data, headers)| Outbound::Reply {
            id,
            data,
            headers
        }),
        (id(), error).prop_map(|(id, error)| Outbound::Error { id, error }),
        (
            id(),
            delivery,
            proptest::sample::select(Priority::ALL.to_vec())
        )
            .prop_map(|(sid, message, priority)| Outbound::Msg {
                sid,
                message: Arc::new(message),
                priority,
            }),
        (id(), any::<u32>(), any::<bool>()).prop_map(|(sid, count, gap)| Outbound::Dropped {
            sid,
            count: u64::from(count),
            gap,
        }),
    ]
}

/// The frame as a client reads it: header fields, then the body's parts.
fn check_outbound_frame(event: &Outbound) {
    let mut out = BytesMut::new();
    binary::encode(event, &mut out);
    let header = FrameHeader::parse(&out);
    assert_eq!(header.body_len as usize, out.len() - HEADER_LEN);
    let body = binary::decode_body(out.freeze().slice(HEADER_LEN..)).expect("a valid body");
    match event {
        Outbound::Reply { id, data, headers } => {
            assert_eq!(
                (header.frame_type, header.id),
                (frame_type::REPLY, id.as_u64())
            );
            assert_eq!((&body.payload, &body.headers), (data, headers));
        }
        Outbound::Error { id, error } => {
            assert_eq!(
                (header.frame_type, header.id),
                (frame_type::ERROR, id.as_u64())
            );
            assert_eq!(&body.aux[..], error.code.as_str().as_bytes());
            assert_eq!(&body.payload[..], error.message.as_bytes());
            assert_eq!(header.param, error.retry_after_ms.unwrap_or(0));
        }
        Outbound::Msg {
            sid,
            message,
            priority,
        } => {
            assert_eq!(
                (header.frame_type, header.id),
                (frame_type::MSG, sid.as_u64())
            );
            assert_eq!(
                Priority::from_bits(header.flags & flag::PRIORITY_MASK),
                Some(*priority)
            );
            assert_eq!(&body.subject[..], message.subject.as_bytes());
            let aux = match message.seq {
                Some(seq) => seq.to_be_bytes().to_vec(),
                None => message
                    .reply_to
                    .as_ref()
                    .map_or(vec![], |r| r.as_bytes().to_vec()),
            };
            assert_eq!(body.aux[..], aux[..]);
            assert_eq!(header.flags & flag::STREAM != 0, message.seq.is_some());
            assert_eq!(
                (&body.payload, &body.headers),
                (&message.payload, &message.headers)
            );
        }
        Outbound::Dropped { sid, count, gap } => {
            assert_eq!(
                (header.frame_type, header.id),
                (frame_type::DROPPED, sid.as_u64())
            );
            assert_eq!(u64::from(header.param), *count);
            assert_eq!(header.flags & flag::GAP != 0, *gap);
        }
        other => unreachable!("not generated: {other:?}"),
    }
}

/// The line as a client reads it: a JSON object whose fields give the event back.
fn check_outbound_line(event: &Outbound) {
    let mut out = BytesMut::new();
    json::encode(event, &mut out);
    assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1, "one line");
    let line: Value = serde_json::from_slice(&out).expect("JSON");
    let id = |id: &Id| serde_json::to_value(id).expect("an id");
    let data = |line: &Value| -> Vec<u8> {
        match (&line["data"], &line["data_b64"]) {
            (Value::String(text), Value::Null) => text.clone().into_bytes(),
            (Value::Null, Value::String(b64)) => BASE64.decode(b64).expect("base64"),
            other => panic!("data: {other:?}"),
        }
    };
    let headers = |line: &Value| -> Option<Headers> {
        let mut headers = Headers::new();
        for (name, values) in line["headers"].as_object()? {
            let values = match values {
                Value::Array(values) => values.clone(),
                one => vec![one.clone()],
            };
            for value in values {
                headers.append_trusted(name.as_str(), value.as_str().expect("text").to_owned());
            }
        }
        Some(headers)
    };
    let sorted = |headers: &Option<Headers>| {
        headers.as_ref().filter(|h| !h.is_empty()).map(|h| {
            let mut pairs: Vec<(String, String)> = h
                .pairs()
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect();
            pairs.sort();
            pairs
        })
    };
    match event {
        Outbound::Reply {
            id: i,
            data: d,
            headers: h,
        } => {
            assert_eq!((&line["id"], &line["ok"]), (&id(i), &Value::Bool(true)));
            assert_eq!(data(&line), d[..]);
            assert_eq!(sorted(&headers(&line)), sorted(h));
        }
        Outbound::Error { id: i, error } => {
            assert_eq!((&line["id"], &line["ok"]), (&id(i), &Value::Bool(false)));
            assert_eq!(line["error"]["code"], error.code.as_str());
            assert_eq!(line["error"]["message"], error.message.as_str());
            assert_eq!(
                line["error"]["retry_after_ms"].as_u64(),
                error.retry_after_ms.map(u64::from)
            );
        }
        Outbound::Msg { sid, message, .. } => {
            assert_eq!((&line["op"], &line["sid"]), (&Value::from("msg"), &id(sid)));
            assert_eq!(line["subject"], message.subject.as_str());
            assert_eq!(line["reply_to"].as_str(), message.reply_to.as_deref());
            assert_eq!(line["seq"].as_u64(), message.seq);
            assert_eq!(data(&line), message.payload[..]);
            assert_eq!(sorted(&headers(&line)), sorted(&message.headers));
        }
        Outbound::Dropped { sid, count, gap } => {
            assert_eq!(
                (&line["op"], &line["sid"]),
                (&Value::from("dropped"), &id(sid))
            );
            assert_eq!(line["count"].as_u64(), Some(*count));
            assert_eq!(line["gap"].as_bool().unwrap_or(false), *gap);
        }
        other => unreachable!("not generated: {other:?}"),
    }
}
