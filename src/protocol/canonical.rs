//! An inbound `Envelope` written back as the bytes a client sends: one binary frame or one JSON
//! line, in one canonical form per envelope. The codecs only read this direction, so this is
//! what lets the round-trip tests and the fuzz targets (fuzz/) check them: whatever decodes
//! must write out to a form that decodes to the same envelope again, and that form is a fixed
//! point. An envelope that a wire cannot carry (a text id in a binary frame, an `auth` op, a
//! field its op does not take) is refused with the reason, never written lossily.

use bytes::{BufMut, Bytes, BytesMut};

use super::binary::{self, FrameParts, flag, frame_type};
use super::envelope::{Envelope, Id, Op, Priority, Since};
use super::headers::Headers;
use super::json::{self, put, put_data, put_headers};

/// Why an envelope has no form on a wire: what it holds that the wire cannot say.
pub type Unencodable = &'static str;

/// Appends `envelope` as one binary frame (version 1).
pub fn put_binary(envelope: &Envelope, out: &mut BytesMut) -> Result<(), Unencodable> {
    let frame_type = match envelope.op {
        Op::Request => frame_type::REQUEST,
        Op::Publish => frame_type::PUBLISH,
        Op::Subscribe => frame_type::SUBSCRIBE,
        Op::Unsubscribe => frame_type::UNSUBSCRIBE,
        Op::Ping => frame_type::PING,
        Op::Credit => frame_type::CREDIT,
        Op::Register => frame_type::REGISTER,
        Op::Unregister => frame_type::UNREGISTER,
        Op::Presence => frame_type::PRESENCE_QUERY,
        Op::PresenceWatch => frame_type::PRESENCE_WATCH,
        Op::Auth => return Err("binary frames have no auth op"),
    };
    let id = match &envelope.id {
        Id::Null => 0,
        // 0 is how a frame says "no id", so a number 0 would come back as no id.
        id if id.as_u64() != 0 => id.as_u64(),
        _ => return Err("a frame id is a u64 other than 0"),
    };
    if envelope.token.is_some() || envelope.flags.to_default_subject {
        return Err("binary frames carry no token and no default-subject object");
    }
    // One u32 field: the credit of a subscribe or credit frame, the timeout of the others.
    let (param, unused) = match envelope.op {
        Op::Subscribe | Op::Credit => (envelope.credit, envelope.timeout_ms),
        _ => (envelope.timeout_ms, envelope.credit),
    };
    if param == Some(0) || unused.is_some() {
        return Err("the frame's param is 0 for none, and holds the credit or the timeout");
    }
    let subject = envelope.subject.as_ref().map_or(&b""[..], |s| s.as_bytes());
    let queue = envelope.queue.as_deref().unwrap_or_default().as_bytes();
    if envelope.subject.as_ref().is_some_and(|s| s.is_empty())
        || envelope.queue.as_ref().is_some_and(String::is_empty)
        || subject.len() > u16::MAX as usize
        || queue.len() > u16::MAX as usize
        || !headers_fit_frame(envelope.headers.as_ref())
    {
        return Err("an empty or over-long subject, queue or header");
    }
    let mut flags = envelope.priority.bits();
    if envelope.flags.retry {
        flags |= flag::RETRY;
    }
    match envelope.op {
        Op::Publish if envelope.flags.durable => flags |= flag::STREAM,
        _ if envelope.flags.durable => return Err("only a publish is durable"),
        _ => {}
    }
    let since = match (envelope.op, envelope.since.as_deref()) {
        (_, None) => None,
        (Op::Subscribe, Some(_)) if !envelope.data.is_empty() => {
            return Err("a replaying subscribe's payload is where it replays from");
        }
        (Op::Subscribe, Some(Since::Seq(seq))) => {
            flags |= flag::STREAM;
            Some(Bytes::copy_from_slice(&seq.to_be_bytes()))
        }
        (Op::Subscribe, Some(Since::Time(time))) => {
            flags |= flag::STREAM | flag::SINCE_TIME;
            Some(Bytes::from(rfc3339(time)?))
        }
        (_, Some(_)) => return Err("only a subscribe replays"),
    };
    binary::put_frame(
        FrameParts {
            frame_type,
            flags,
            id,
            param: param.unwrap_or(0),
            subject,
            aux: queue,
            headers: envelope.headers.as_ref(),
            payload: since.as_deref().unwrap_or(&envelope.data),
        },
        out,
    );
    Ok(())
}

/// Whether `put_frame` writes every header: none is left out for being too long, and an empty
/// map (which a frame cannot tell from none) is not given.
fn headers_fit_frame(headers: Option<&Headers>) -> bool {
    headers.is_none_or(|headers| {
        !headers.is_empty()
            && headers.pairs().all(|(name, value)| {
                name.len() <= u16::MAX as usize && value.len() <= u16::MAX as usize
            })
    })
}

/// Appends `envelope` as one JSON line, newline included. Fields in a fixed order, each only
/// when it is not its default; `op` always.
pub fn put_json(envelope: &Envelope, out: &mut BytesMut) -> Result<(), Unencodable> {
    if envelope.flags.to_default_subject {
        return put_legacy(envelope, out);
    }
    if envelope.flags.durable && envelope.op != Op::Publish {
        return Err("only a publish is durable");
    }
    if envelope.since.is_some() && envelope.op != Op::Subscribe {
        return Err("only a subscribe replays");
    }
    if let Some(headers) = &envelope.headers
        && (headers.is_empty() || !names_ascending(headers))
    {
        // A JSON object's names come back sorted (and an empty one as none).
        return Err("JSON headers are read back by name, in order");
    }
    let mut w = out.writer();
    let w = &mut w;
    put(w, b"{\"op\":");
    json::json(w, envelope.op.as_str());
    if !envelope.id.is_null() {
        put(w, b",\"id\":");
        json::json(w, &envelope.id);
    }
    if let Some(subject) = &envelope.subject {
        put(w, b",\"subject\":");
        json::json(w, subject.as_str());
    }
    if !envelope.data.is_empty() {
        put_data(w, &envelope.data);
    }
    put_headers(w, envelope.headers.as_ref());
    let mut number = |name: &[u8], value: Option<u64>| {
        if let Some(value) = value {
            put(w, name);
            json::json(w, &value);
        }
    };
    number(b",\"timeout_ms\":", envelope.timeout_ms.map(u64::from));
    let credit_name: &[u8] = match envelope.op {
        Op::Credit => b",\"n\":",
        _ => b",\"credit\":",
    };
    number(credit_name, envelope.credit.map(u64::from));
    if let Some(Since::Seq(seq)) = envelope.since.as_deref() {
        number(b",\"since_seq\":", Some(*seq));
    }
    if let Some(Since::Time(time)) = envelope.since.as_deref() {
        put(w, b",\"since_time\":");
        json::json(w, &rfc3339(time)?);
    }
    let mut text = |name: &[u8], value: Option<&str>| {
        if let Some(value) = value {
            put(w, name);
            json::json(w, value);
        }
    };
    text(b",\"queue\":", envelope.queue.as_deref());
    text(b",\"token\":", envelope.token.as_deref());
    if envelope.priority != Priority::Normal {
        text(b",\"priority\":", Some(envelope.priority.as_str()));
    }
    if envelope.flags.retry {
        put(w, b",\"retry\":true");
    }
    if envelope.flags.durable {
        put(w, b",\"durable\":true");
    }
    put(w, b"}\n");
    Ok(())
}

/// A default-subject object is its own line: the payload is the object the client sent.
fn put_legacy(envelope: &Envelope, out: &mut BytesMut) -> Result<(), Unencodable> {
    if envelope.op != Op::Request
        || envelope.subject.is_some()
        || memchr::memchr(b'\n', &envelope.data).is_some()
    {
        return Err("a default-subject object is a request without a subject, on one line");
    }
    out.extend_from_slice(&envelope.data);
    // The reader drops one carriage return before the newline: keep a payload's own.
    if envelope.data.last() == Some(&b'\r') {
        out.put_u8(b'\r');
    }
    out.put_u8(b'\n');
    Ok(())
}

fn names_ascending(headers: &Headers) -> bool {
    let names: Vec<&str> = headers.iter().map(|(name, _)| name).collect();
    names.windows(2).all(|pair| pair[0] < pair[1])
}

fn rfc3339(time: &time::OffsetDateTime) -> Result<String, Unencodable> {
    time.format(&time::format_description::well_known::Rfc3339)
        .map_err(|_| "a time RFC 3339 cannot write (year or offset out of its range)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::json::JsonLinesDecoder;
    use crate::protocol::{Decoded, Subject};

    #[test]
    fn what_a_frame_cannot_say_is_refused_not_dropped() {
        let mut out = BytesMut::new();
        let text_id = Envelope::new(Op::Request, Id::Text("a".into()));
        let zero_id = Envelope::new(Op::Request, Id::from(0));
        let auth = Envelope::new(Op::Auth, Id::Null);
        let mut timed_subscribe = Envelope::new(Op::Subscribe, Id::from(1));
        timed_subscribe.timeout_ms = Some(5);
        let mut durable_request = Envelope::new(Op::Request, Id::from(1));
        durable_request.flags.durable = true;
        for envelope in [text_id, zero_id, auth, timed_subscribe, durable_request] {
            assert!(put_binary(&envelope, &mut out).is_err(), "{envelope:?}");
        }
        assert!(out.is_empty(), "nothing written for a refused envelope");
    }

    #[test]
    fn a_default_subject_object_is_written_as_itself_and_reads_back() {
        for line in [&b"{\"task\":\"t\"}\n"[..], b"{\"task\":\"t\"}\r\r\n"] {
            let mut buf = BytesMut::from(line);
            let Some(Decoded::Envelope(envelope)) = JsonLinesDecoder::new(1024).decode(&mut buf)
            else {
                panic!("{line:?}")
            };
            assert!(envelope.flags.to_default_subject);
            let mut out = BytesMut::new();
            put_json(&envelope, &mut out).unwrap();
            assert_eq!(
                &out[..],
                line,
                "its own bytes, a carriage return of its own kept"
            );
        }
        let mut with_subject = Envelope::new(Op::Request, Id::Null);
        with_subject.flags.to_default_subject = true;
        with_subject.subject = Some(Subject::from("a"));
        assert!(put_json(&with_subject, &mut BytesMut::new()).is_err());
    }
}
