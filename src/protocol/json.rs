//! JSON-lines wire: one envelope per line. Decoding borrows `subject` and `data` straight out
//! of the line's `Bytes` when the JSON string has no escapes, so the payload reaches NATS as a
//! slice of the read buffer. A line over the limit is discarded as it streams in (never
//! buffered whole) and answered with `TOO_LARGE`; any bad line costs only that line.

use std::borrow::Cow;
use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::envelope::{Decoded, Envelope, Flags, Id, Op, Outbound, Priority, Since};
use super::error::GatewayError;
use super::headers::Headers;
use super::json_quick;
use super::json_text::{put_str, put_utf8};
use super::subject::Subject;

/// Splits a byte stream into lines of at most `max_line` bytes and parses each one.
#[derive(Debug)]
pub struct JsonLinesDecoder {
    max_line: usize,
    /// How far the current buffer was already searched for a newline.
    scanned: usize,
    /// Inside a line that is over the limit: drop bytes until its newline.
    discarding: bool,
}

impl JsonLinesDecoder {
    pub fn new(max_line: usize) -> Self {
        JsonLinesDecoder {
            max_line,
            scanned: 0,
            discarding: false,
        }
    }

    /// Yields the next complete item in `buf`, or `None` until more bytes arrive.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Option<Decoded> {
        loop {
            let newline = memchr::memchr(b'\n', &buf[self.scanned..]);
            let Some(offset) = newline else {
                if buf.len() > self.max_line || self.discarding {
                    // Drop what we have of the oversized line; keep only nothing.
                    let was_discarding = self.discarding;
                    buf.clear();
                    self.scanned = 0;
                    self.discarding = true;
                    if !was_discarding {
                        return Some(self.too_large());
                    }
                } else {
                    self.scanned = buf.len();
                }
                return None;
            };
            let end = self.scanned + offset;
            let line = buf.split_to(end + 1).freeze();
            self.scanned = 0;
            if self.discarding {
                self.discarding = false;
                continue;
            }
            if end > self.max_line {
                return Some(self.too_large());
            }
            // CRLF clients: the carriage return is not part of the message.
            let end = if end > 0 && line[end - 1] == b'\r' {
                end - 1
            } else {
                end
            };
            let line = line.slice(..end);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Some(parse_line(line));
        }
    }

    /// At end of stream: a last line without its newline still counts.
    pub fn decode_eof(&mut self, buf: &mut BytesMut) -> Option<Decoded> {
        if let Some(item) = self.decode(buf) {
            return Some(item);
        }
        if self.discarding || buf.is_empty() {
            buf.clear();
            return None;
        }
        buf.put_u8(b'\n');
        self.decode(buf)
    }

    fn too_large(&self) -> Decoded {
        Decoded::Invalid {
            id: Id::Null,
            error: GatewayError::new(
                super::ErrorCode::TooLarge,
                format!("line is over the limit of {} bytes", self.max_line),
            ),
            fatal: false,
        }
    }
}

/// Header values may be a string or a list of strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum HeaderValues<'a> {
    One(#[serde(borrow)] Cow<'a, str>),
    Many(#[serde(borrow)] Vec<Cow<'a, str>>),
}

#[derive(Deserialize, Default)]
struct JsonEnvelope<'a> {
    #[serde(borrow, default)]
    op: Option<Cow<'a, str>>,
    #[serde(default)]
    id: Id,
    #[serde(borrow, default)]
    subject: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<RawJson<'a>>,
    #[serde(borrow, default)]
    data_b64: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    headers: Option<BTreeMap<Cow<'a, str>, HeaderValues<'a>>>,
    #[serde(default)]
    timeout_ms: Option<u32>,
    #[serde(default)]
    queue: Option<String>,
    #[serde(default)]
    retry: bool,
    /// subscribe: initial credit; credit: the grant (`n`).
    #[serde(default)]
    credit: Option<u32>,
    #[serde(default)]
    n: Option<u32>,
    /// credit: the subscription it is for.
    #[serde(default)]
    sid: Id,
    /// auth: the bearer token.
    #[serde(default)]
    token: Option<String>,
    /// register, unregister, presence: the name; presence_watch: the pattern. Both are read
    /// into the envelope's subject.
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pattern: Option<Cow<'a, str>>,
    /// subscribe, request: "high", "normal" or "low". Read raw, so that a wrong type gets the
    /// same clear answer as a wrong name.
    #[serde(borrow, default)]
    priority: Option<&'a RawValue>,
    /// publish: store in a JetStream stream and answer with its sequence.
    #[serde(default)]
    durable: bool,
    /// subscribe: replay the stream after this sequence (or from this RFC 3339 time).
    #[serde(default)]
    since_seq: Option<u64>,
    #[serde(borrow, default)]
    since_time: Option<Cow<'a, str>>,
}

/// A JSON value's text, as it is in the line.
struct RawJson<'a>(&'a str);

impl<'de: 'a, 'a> Deserialize<'de> for RawJson<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        <&RawValue>::deserialize(deserializer).map(|raw| RawJson(raw.get()))
    }
}

impl<'a> From<json_quick::Fields<'a>> for JsonEnvelope<'a> {
    fn from(fields: json_quick::Fields<'a>) -> Self {
        JsonEnvelope {
            op: fields.op.map(Cow::Borrowed),
            id: fields.id,
            subject: fields.subject.map(Cow::Borrowed),
            data: fields.data.map(RawJson),
            timeout_ms: fields.timeout_ms,
            ..JsonEnvelope::default()
        }
    }
}

/// Only the id, to answer a line whose other fields are wrong with the right id.
#[derive(Deserialize)]
struct IdOnly {
    #[serde(default)]
    id: Id,
}

/// Parses one line (without its newline) into an envelope.
pub fn parse_line(line: Bytes) -> Decoded {
    parse_line_using(line, true)
}

/// `quick`: lines of the common shape are read by `json_quick` (false: by serde_json alone, for
/// the tests that hold the two to the same result).
fn parse_line_using(line: Bytes, quick: bool) -> Decoded {
    // serde would also read a JSON array by position: only objects are envelopes.
    if line.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        let id = Id::Null;
        return match serde_json::from_slice::<serde::de::IgnoredAny>(&line) {
            Ok(_) => invalid(id, "invalid envelope: a line must be a JSON object".into()),
            Err(err) => invalid(id, format!("malformed JSON: {err}")),
        };
    }
    // The line checked as UTF-8 once: serde_json reading a `str` trusts it, where reading
    // bytes it checks every string again (7 or more per request: about 5 % of a JSON request's
    // instructions). Bytes that are not UTF-8 are read as bytes, for serde_json's own error.
    let parsed: serde_json::Result<JsonEnvelope<'_>> = match simdutf8::basic::from_utf8(&line) {
        Ok(text) => match quick.then(|| json_quick::read(text)).flatten() {
            Some(fields) => Ok(fields.into()),
            None => serde_json::from_str(text),
        },
        Err(_) => serde_json::from_slice(&line),
    };
    let parsed = match parsed {
        Ok(parsed) => parsed,
        Err(err) => {
            // A legacy object's own fields may clash with ours ("retry":"yes"): it is still
            // a legacy object, sent whole.
            if let Ok(probe) = serde_json::from_slice::<LegacyProbe<'_>>(&line)
                && probe.op.is_none()
                && probe.subject.is_none()
            {
                let id = serde_json::from_str::<Id>(probe.id.map_or("null", RawValue::get))
                    .unwrap_or_default();
                let timeout_ms = probe
                    .timeout_ms
                    .and_then(|raw| serde_json::from_str::<u32>(raw.get()).ok());
                return Decoded::Envelope(legacy_envelope(&line, id, timeout_ms));
            }
            let id = serde_json::from_slice::<IdOnly>(&line)
                .map(|only| only.id)
                .unwrap_or_default();
            let what = if err.is_syntax() || err.is_eof() {
                "malformed JSON"
            } else {
                "invalid envelope"
            };
            return invalid(id, format!("{what}: {err}"));
        }
    };
    match build_envelope(&line, parsed) {
        Ok(envelope) => Decoded::Envelope(envelope),
        Err((id, error)) => Decoded::Invalid {
            id,
            error,
            fatal: false,
        },
    }
}

/// Any JSON object, looked at only for the fields that decide whether it is a legacy one.
#[derive(Deserialize)]
struct LegacyProbe<'a> {
    #[serde(borrow, default)]
    op: Option<&'a RawValue>,
    #[serde(borrow, default)]
    subject: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    timeout_ms: Option<&'a RawValue>,
}

/// A legacy object with neither op nor subject: a request whose payload is the whole line,
/// to the configured default subject.
fn legacy_envelope(line: &Bytes, id: Id, timeout_ms: Option<u32>) -> Envelope {
    let mut envelope = Envelope::new(Op::Request, id);
    envelope.data = line.clone();
    envelope.timeout_ms = timeout_ms;
    envelope.flags.to_default_subject = true;
    envelope
}

fn invalid(id: Id, message: String) -> Decoded {
    Decoded::Invalid {
        id,
        error: GatewayError::bad_request(message),
        fatal: false,
    }
}

fn build_envelope(
    line: &Bytes,
    mut parsed: JsonEnvelope<'_>,
) -> Result<Envelope, (Id, GatewayError)> {
    // The named-client ops carry their target as "name" or "pattern"; other ops ignore both.
    let named = parsed.op.as_deref().and_then(Op::parse).is_some_and(|op| {
        matches!(
            op,
            Op::Register | Op::Unregister | Op::Presence | Op::PresenceWatch
        )
    });
    if named && parsed.subject.is_none() {
        parsed.subject = parsed.name.take().or(parsed.pattern.take());
    }
    let id = parsed.id;
    let fail = |id: &Id, message: String| (id.clone(), GatewayError::bad_request(message));

    if parsed.op.is_none() && parsed.subject.is_none() {
        return Ok(legacy_envelope(line, id, parsed.timeout_ms));
    }
    let op = match parsed.op.as_deref() {
        None => Op::Request,
        Some(name) => Op::parse(name).ok_or_else(|| {
            fail(
                &id,
                format!(
                    "unknown op {name:?}; expected request, publish, subscribe, unsubscribe, credit, ping, auth, register, unregister, presence or presence_watch"
                ),
            )
        })?,
    };
    // A credit grant names its subscription by "sid", as messages do ("id" also works, as on
    // unsubscribe).
    let id = match op {
        Op::Credit if !parsed.sid.is_null() => parsed.sid,
        _ => id,
    };
    let mut envelope = Envelope::new(op, id);
    envelope.credit = match op {
        Op::Credit => parsed.n,
        _ => parsed.credit,
    };
    envelope.subject = parsed
        .subject
        .map(|subject| Subject::from_utf8(borrow_or_copy(line, subject)))
        .transpose()
        .map_err(|error| (envelope.id.clone(), error))?;
    envelope.data = match (parsed.data, parsed.data_b64) {
        (Some(_), Some(_)) => {
            return Err(fail(
                &envelope.id,
                "give \"data\" or \"data_b64\", not both".into(),
            ));
        }
        (Some(raw), None) => {
            payload_from_raw(line, raw).map_err(|message| fail(&envelope.id, message))?
        }
        (None, Some(encoded)) => Bytes::from(
            BASE64
                .decode(encoded.as_bytes())
                .map_err(|err| fail(&envelope.id, format!("\"data_b64\" is not base64: {err}")))?,
        ),
        (None, None) => Bytes::new(),
    };
    if let Some(headers) = parsed.headers {
        let headers = header_map(headers).map_err(|error| (envelope.id.clone(), error))?;
        // `{}` (or names with `[]`) is no headers, as an empty block is in a binary frame.
        envelope.headers = Some(headers).filter(|headers| !headers.is_empty());
    }
    if let Some(raw) = parsed.priority {
        envelope.priority = priority(raw).map_err(|message| fail(&envelope.id, message))?;
    }
    envelope.timeout_ms = parsed.timeout_ms;
    envelope.token = parsed.token;
    envelope.queue = parsed.queue;
    envelope.flags = Flags {
        retry: parsed.retry,
        to_default_subject: false,
        durable: parsed.durable,
    };
    if parsed.durable && op != Op::Publish {
        return Err(fail(&envelope.id, "\"durable\" is for publish".into()));
    }
    envelope.since = since(op, parsed.since_seq, parsed.since_time.as_deref())
        .map_err(|message| fail(&envelope.id, message))?;
    Ok(envelope)
}

/// `"since_seq"` / `"since_time"`: one of them, on a subscribe.
fn since(op: Op, seq: Option<u64>, time: Option<&str>) -> Result<Option<Box<Since>>, String> {
    let since = match (seq, time) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => return Err("give \"since_seq\" or \"since_time\", not both".into()),
        (Some(seq), None) => Since::Seq(seq),
        (None, Some(text)) => Since::Time(parse_time(text)?),
    };
    if op != Op::Subscribe {
        return Err("\"since_seq\" and \"since_time\" are for subscribe".into());
    }
    Ok(Some(Box::new(since)))
}

/// An RFC 3339 time (`2026-12-06T05:00:00Z`, or with an offset), as `since_time` takes it.
pub fn parse_time(text: &str) -> Result<time::OffsetDateTime, String> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).map_err(
        |err| {
            format!("\"since_time\" must be an RFC 3339 time such as 2026-12-06T05:00:00Z: {err}")
        },
    )
}

/// `"priority"`: one of the three names (`null` is the default, normal).
fn priority(raw: &RawValue) -> Result<Priority, String> {
    if raw.get() == "null" {
        return Ok(Priority::Normal);
    }
    serde_json::from_str::<Cow<'_, str>>(raw.get())
        .ok()
        .and_then(|name| Priority::parse(&name))
        .ok_or_else(|| {
            format!(
                "\"priority\" must be \"high\", \"normal\" or \"low\", not {}",
                raw.get()
            )
        })
}

/// A JSON string becomes its text; any other JSON value is sent as its JSON text.
fn payload_from_raw(line: &Bytes, raw: RawJson<'_>) -> Result<Bytes, String> {
    let text = raw.0;
    if text.starts_with('"') {
        // serde_json already checked the string when it read the RawValue: without a
        // backslash, its contents are the text between the quotes, taken without a copy.
        if memchr::memchr(b'\\', text.as_bytes()).is_none() && text.len() >= 2 {
            return Ok(line.slice_ref(&text.as_bytes()[1..text.len() - 1]));
        }
        let value: String = serde_json::from_str(text).map_err(|err| format!("\"data\": {err}"))?;
        Ok(Bytes::from(value))
    } else if text == "null" {
        Ok(Bytes::new())
    } else {
        Ok(line.slice_ref(text.as_bytes()))
    }
}

/// A string borrowed from the line becomes a slice of it; an unescaped copy is moved in.
fn borrow_or_copy(line: &Bytes, value: Cow<'_, str>) -> Bytes {
    match value {
        Cow::Borrowed(text) => line.slice_ref(text.as_bytes()),
        Cow::Owned(text) => Bytes::from(text),
    }
}

fn header_map(headers: BTreeMap<Cow<'_, str>, HeaderValues<'_>>) -> Result<Headers, GatewayError> {
    let mut map = Headers::new();
    for (name, values) in headers {
        let values = match values {
            HeaderValues::One(value) => vec![value],
            HeaderValues::Many(values) => values,
        };
        for value in values {
            map.append(name.as_ref(), value)?;
        }
    }
    Ok(map)
}

/// Appends one outbound event as a JSON line.
pub fn encode(event: &Outbound, out: &mut BytesMut) {
    let mut w = out.writer();
    let w = &mut w;
    match event {
        Outbound::Reply { id, data, headers } => {
            put(w, b"{\"id\":");
            put_id(w, id);
            put(w, b",\"ok\":true");
            put_data(w, data);
            put_headers(w, headers.as_ref());
            put(w, b"}\n");
        }
        Outbound::Ack { id } => {
            put(w, b"{\"id\":");
            put_id(w, id);
            put(w, b",\"ok\":true}\n");
        }
        Outbound::Error { id, error } => {
            put(w, b"{\"id\":");
            put_id(w, id);
            put(w, b",\"ok\":false");
            put_error(w, error);
            put(w, b"}\n");
        }
        Outbound::Pong { id } => {
            put(w, b"{\"op\":\"pong\"");
            if !id.is_null() {
                put(w, b",\"id\":");
                put_id(w, id);
            }
            put(w, b"}\n");
        }
        // A JSON client knows its subscriptions' classes; the line does not repeat it.
        Outbound::Msg { sid, message, .. } => {
            put(w, b"{\"op\":\"msg\",\"sid\":");
            json(w, sid);
            let tail = message.json_tail.get_or_init(|| {
                let mut tail = BytesMut::new();
                let w = &mut (&mut tail).writer();
                put(w, b",\"subject\":");
                put_str(w.get_mut(), message.subject.as_str());
                if let Some(reply) = &message.reply_to {
                    put(w, b",\"reply_to\":");
                    put_str(w.get_mut(), reply.as_str());
                }
                put_data(w, &message.payload);
                put_headers(w, message.headers.as_ref());
                if let Some(seq) = message.seq {
                    put(w, b",\"seq\":");
                    json(w, &seq);
                }
                put(w, b"}\n");
                tail.freeze()
            });
            put(w, tail);
        }
        Outbound::Dropped { sid, count, gap } => {
            put(w, b"{\"op\":\"dropped\",\"sid\":");
            json(w, sid);
            put(w, b",\"count\":");
            json(w, count);
            if *gap {
                put(w, b",\"gap\":true");
            }
            put(w, b"}\n");
        }
        Outbound::Authenticated { id } => {
            put(w, b"{\"op\":\"auth\"");
            if !id.is_null() {
                put(w, b",\"id\":");
                put_id(w, id);
            }
            put(w, b",\"ok\":true}\n");
        }
        Outbound::Unsubscribed { sid, error } => {
            put(w, b"{\"op\":\"unsubscribed\",\"sid\":");
            json(w, sid);
            put_error(w, error);
            put(w, b"}\n");
        }
        Outbound::Stored { id, stream, seq } => {
            put(w, b"{\"id\":");
            put_id(w, id);
            put(w, b",\"ok\":true,\"stream\":");
            json(w, &**stream);
            put(w, b",\"seq\":");
            json(w, seq);
            put(w, b"}\n");
        }
        Outbound::Replaying {
            id,
            stream,
            truncated,
        } => {
            put(w, b"{\"id\":");
            put_id(w, id);
            put(w, b",\"ok\":true,\"stream\":");
            json(w, &**stream);
            if let Some(first) = truncated {
                put(w, b",\"truncated\":true,\"first_seq\":");
                json(w, first);
            }
            put(w, b"}\n");
        }
        Outbound::NameLost { sid, name } => {
            put(w, b"{\"op\":\"name_lost\",\"sid\":");
            json(w, sid);
            put(w, b",\"name\":");
            json(w, &**name);
            put(w, b"}\n");
        }
        Outbound::Presence { id, watch, info } => {
            if *watch {
                put(w, b"{\"op\":\"presence\",\"sid\":");
            } else {
                put(w, b"{\"id\":");
            }
            put_id(w, id);
            if !*watch {
                put(w, b",\"ok\":true");
            }
            put(w, b",");
            put(w, info.json_members().as_bytes());
            put(w, b"}\n");
        }
    }
}

pub(super) type Writer<'a> = bytes::buf::Writer<&'a mut BytesMut>;

pub(super) fn put(w: &mut Writer<'_>, bytes: &[u8]) {
    w.get_mut().extend_from_slice(bytes);
}

/// An id as serde_json writes it; a whole number (nearly every id) without serde.
fn put_id(w: &mut Writer<'_>, id: &Id) {
    match id {
        Id::Number(number) if let Some(whole) = number.as_u64() => {
            put(w, itoa::Buffer::new().format(whole).as_bytes());
        }
        _ => json(w, id),
    }
}

pub(super) fn json<T: serde::Serialize + ?Sized>(w: &mut Writer<'_>, value: &T) {
    // Serializing ids, strings and numbers into memory cannot fail.
    let _ = serde_json::to_writer(w, value);
}

/// `,"error":{"code":..,"message":..}`, with `retry_after_ms` when the error has a hint.
fn put_error(w: &mut Writer<'_>, error: &GatewayError) {
    put(w, b",\"error\":{\"code\":\"");
    put(w, error.code.as_str().as_bytes());
    put(w, b"\",\"message\":");
    json(w, &error.message);
    if let Some(retry_after_ms) = error.retry_after_ms {
        put(w, b",\"retry_after_ms\":");
        json(w, &retry_after_ms);
    }
    put(w, b"}");
}

pub(super) fn put_data(w: &mut Writer<'_>, data: &Bytes) {
    let out = w.get_mut();
    let start = out.len();
    out.extend_from_slice(b",\"data\":");
    if !put_utf8(out, data) {
        out.truncate(start);
        put(w, b",\"data_b64\":\"");
        put(w, BASE64.encode(data).as_bytes());
        put(w, b"\"");
    }
}

pub(super) fn put_headers(w: &mut Writer<'_>, headers: Option<&Headers>) {
    let Some(headers) = headers.filter(|h| !h.is_empty()) else {
        return;
    };
    put(w, b",\"headers\":{");
    for (index, (name, values)) in headers.iter().enumerate() {
        if index > 0 {
            put(w, b",");
        }
        put_str(w.get_mut(), name);
        put(w, b":");
        if let [one] = values {
            put_str(w.get_mut(), one);
        } else {
            json(w, values);
        }
    }
    put(w, b"}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorCode;

    fn decode_all(decoder: &mut JsonLinesDecoder, input: &[u8]) -> Vec<Decoded> {
        let mut buf = BytesMut::from(input);
        let mut items = Vec::new();
        while let Some(item) = decoder.decode(&mut buf) {
            items.push(item);
        }
        items
    }

    fn envelope(item: &Decoded) -> &Envelope {
        match item {
            Decoded::Envelope(envelope) => envelope,
            other => panic!("expected an envelope, got {other:?}"),
        }
    }

    fn error_code(item: &Decoded) -> ErrorCode {
        match item {
            Decoded::Invalid { error, .. } => error.code,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn request_defaults_and_borrows_payload_from_the_line() {
        let mut decoder = JsonLinesDecoder::new(1024);
        let mut buf = BytesMut::from(&b"{\"subject\":\"demo.echo\",\"data\":\"hi\"}\n"[..]);
        let start = buf.as_ptr() as usize;
        let item = decoder.decode(&mut buf).unwrap();
        let envelope = envelope(&item);
        assert_eq!(envelope.op, Op::Request);
        assert_eq!(envelope.id, Id::Null);
        assert_eq!(envelope.subject.as_deref(), Some("demo.echo"));
        assert_eq!(&envelope.data[..], b"hi");
        let data_at = envelope.data.as_ptr() as usize;
        assert!(
            data_at > start && data_at < start + 64,
            "payload was copied"
        );
    }

    #[test]
    fn escaped_strings_base64_and_json_values_become_payloads() {
        let mut decoder = JsonLinesDecoder::new(1024);
        let items = decode_all(
            &mut decoder,
            b"{\"subject\":\"a\",\"data\":\"x\\ny\"}\n{\"subject\":\"a\",\"data_b64\":\"AAE=\"}\n{\"subject\":\"a\",\"data\":{\"k\":[1,2]}}\n",
        );
        assert_eq!(&envelope(&items[0]).data[..], b"x\ny");
        assert_eq!(&envelope(&items[1]).data[..], &[0u8, 1]);
        assert_eq!(&envelope(&items[2]).data[..], b"{\"k\":[1,2]}");
    }

    #[test]
    fn a_number_id_too_long_for_an_integer_is_read_exactly_and_echoed_as_read() {
        // Found by fuzz/json_lines: serde_json's default float parsing was one ulp off for this
        // id, so the id written back (ryu, exact) read as another number than the one first read.
        let digits = "48888888888888888888888888888888888888888888888888888888888588888888888888888888888888";
        let line = format!(r#"{{"subject":"dem+o.echo","id":{digits}}}"#);
        let Decoded::Envelope(envelope) = parse_line(Bytes::from(line)) else {
            panic!("a valid line")
        };
        let Id::Number(id) = &envelope.id else {
            panic!("{:?}", envelope.id)
        };
        assert_eq!(id.as_f64(), Some(digits.parse::<f64>().unwrap()));
        let mut echoed = BytesMut::new();
        encode(
            &Outbound::Ack {
                id: envelope.id.clone(),
            },
            &mut echoed,
        );
        let again = parse_line(Bytes::from(format!(
            r#"{{"subject":"a","id":{}}}"#,
            serde_json::from_slice::<serde_json::Value>(&echoed).unwrap()["id"]
        )));
        assert!(matches!(again, Decoded::Envelope(e) if e.id == envelope.id));
    }

    #[test]
    fn object_without_op_or_subject_is_a_default_subject_request() {
        let mut decoder = JsonLinesDecoder::new(1024);
        let line = b"{\"task_id\":\"t1\",\"payload\":\"hello\"}";
        let mut input = line.to_vec();
        input.push(b'\n');
        let items = decode_all(&mut decoder, &input);
        let envelope = envelope(&items[0]);
        assert!(envelope.subject.is_none());
        assert_eq!(&envelope.data[..], line);
    }

    #[test]
    fn a_legacy_object_whose_fields_clash_with_ours_is_still_sent_whole() {
        let mut decoder = JsonLinesDecoder::new(1024);
        let line = br#"{"task":"t2","retry":"yes","id":4}"#;
        let mut input = line.to_vec();
        input.push(b'\n');
        let items = decode_all(&mut decoder, &input);
        let envelope = envelope(&items[0]);
        assert!(envelope.flags.to_default_subject);
        assert_eq!(envelope.id, Id::from(4));
        assert_eq!(&envelope.data[..], line);
    }

    #[test]
    fn arrays_and_other_values_are_not_envelopes() {
        let mut decoder = JsonLinesDecoder::new(1024);
        let items = decode_all(
            &mut decoder,
            b"[\"request\",1,\"demo.echo\",\"x\"]\n[]\n42\n\"s\"\n",
        );
        assert_eq!(items.len(), 4);
        for item in &items {
            match item {
                Decoded::Invalid { error, .. } => {
                    assert_eq!(error.code, ErrorCode::BadRequest);
                    assert!(error.message.contains("JSON object"), "{}", error.message);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_legacy_object_with_clashing_fields_keeps_a_valid_timeout() {
        let mut decoder = JsonLinesDecoder::new(1024);
        let items = decode_all(&mut decoder, b"{\"retry\":\"yes\",\"timeout_ms\":100}\n");
        assert_eq!(envelope(&items[0]).timeout_ms, Some(100));
    }

    #[test]
    fn only_legacy_objects_go_to_the_default_subject() {
        let mut decoder = JsonLinesDecoder::new(1024);
        let items = decode_all(&mut decoder, b"{\"op\":\"request\",\"data\":\"x\"}\n");
        assert!(!envelope(&items[0]).flags.to_default_subject);
    }

    #[test]
    fn crlf_lines_lose_their_carriage_return() {
        let mut decoder = JsonLinesDecoder::new(1024);
        let items = decode_all(&mut decoder, b"{\"task\":\"t\"}\r\n");
        assert_eq!(&envelope(&items[0]).data[..], b"{\"task\":\"t\"}");
    }

    #[test]
    fn bad_lines_are_errors_that_keep_the_id_and_the_stream() {
        let mut decoder = JsonLinesDecoder::new(1024);
        let items = decode_all(
            &mut decoder,
            b"{nope\n{\"op\":\"dance\",\"id\":7,\"subject\":\"a\"}\n{\"id\":\"x\",\"subject\":\"a\",\"timeout_ms\":-1}\n\n  \n{\"op\":\"ping\"}\n",
        );
        assert_eq!(items.len(), 4);
        assert_eq!(error_code(&items[0]), ErrorCode::BadRequest);
        match &items[1] {
            Decoded::Invalid { id, error, fatal } => {
                assert_eq!(*id, Id::from(7));
                assert!(error.message.contains("dance"));
                assert!(!fatal);
            }
            other => panic!("{other:?}"),
        }
        match &items[2] {
            Decoded::Invalid { id, .. } => assert_eq!(*id, Id::Text("x".into())),
            other => panic!("{other:?}"),
        }
        assert_eq!(envelope(&items[3]).op, Op::Ping);
    }

    #[test]
    fn a_line_that_is_not_utf8_gets_serde_jsons_own_error_and_the_stream_goes_on() {
        let mut decoder = JsonLinesDecoder::new(1024);
        let in_a_string = b"{\"op\":\"request\",\"id\":7,\"subject\":\"a\",\"data\":\"\xff\"}";
        let outside = b"{\"op\":\"request\",\"id\":8,\"subject\":\"a\"\xff}";
        let mut input = Vec::new();
        for line in [&in_a_string[..], &outside[..], b"{\"op\":\"ping\"}"] {
            input.extend_from_slice(line);
            input.push(b'\n');
        }
        let items = decode_all(&mut decoder, &input);
        assert_eq!(items.len(), 3);
        for (item, line) in items.iter().zip([&in_a_string[..], &outside[..]]) {
            // What reading the line as bytes said before it was checked as UTF-8 first.
            let Err(expected) = serde_json::from_slice::<JsonEnvelope<'_>>(line) else {
                panic!("{line:?} was read");
            };
            match item {
                Decoded::Invalid { error, fatal, .. } => {
                    assert_eq!(error.code, ErrorCode::BadRequest);
                    assert_eq!(error.message, format!("malformed JSON: {expected}"));
                    assert!(!fatal);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(envelope(&items[2]).op, Op::Ping);
    }

    #[test]
    fn an_oversized_line_is_skipped_without_buffering_it_whole() {
        let mut decoder = JsonLinesDecoder::new(16);
        let mut buf = BytesMut::from(&b"{\"subject\":\"aaaaaaaaaaaaaaaaaaaaaaaaa"[..]);
        assert_eq!(
            error_code(&decoder.decode(&mut buf).unwrap()),
            ErrorCode::TooLarge
        );
        assert!(buf.is_empty(), "the oversized prefix must be dropped");
        buf.extend_from_slice(b"aaaaaaaaaaaaaaaaaaaaaaaa");
        assert!(decoder.decode(&mut buf).is_none());
        assert!(buf.is_empty());
        buf.extend_from_slice(b"aaa\"}\n{\"op\":\"ping\"}\n");
        assert_eq!(envelope(&decoder.decode(&mut buf).unwrap()).op, Op::Ping);
    }

    #[test]
    fn a_last_line_without_newline_is_decoded_at_eof() {
        let mut decoder = JsonLinesDecoder::new(1024);
        let mut buf = BytesMut::from(&b"{\"op\":\"ping\"}"[..]);
        assert!(decoder.decode(&mut buf).is_none());
        assert_eq!(
            envelope(&decoder.decode_eof(&mut buf).unwrap()).op,
            Op::Ping
        );
    }

    #[test]
    fn headers_accept_strings_and_lists_and_reject_bad_names() {
        let mut decoder = JsonLinesDecoder::new(1024);
        let items = decode_all(
            &mut decoder,
            b"{\"subject\":\"a\",\"headers\":{\"X-A\":\"1\",\"X-B\":[\"2\",\"3\"]}}\n{\"subject\":\"a\",\"headers\":{\"bad:name\":\"1\"}}\n",
        );
        let headers = envelope(&items[0]).headers.clone().unwrap();
        assert_eq!(headers.get("X-A"), Some("1"));
        assert_eq!(
            headers
                .iter()
                .find(|(n, _)| *n == "X-B")
                .map(|(_, v)| v.len()),
            Some(2)
        );
        assert_eq!(error_code(&items[1]), ErrorCode::BadRequest);
    }

    #[test]
    fn a_gateway_header_from_a_client_is_refused_and_the_line_keeps_its_id() {
        let mut decoder = JsonLinesDecoder::new(1024);
        let items = decode_all(
            &mut decoder,
            b"{\"id\":7,\"subject\":\"a\",\"headers\":{\"ipc-gateway-uid\":\"0\"}}\n",
        );
        match &items[0] {
            Decoded::Invalid { id, error, fatal } => {
                assert_eq!(*id, Id::from(7));
                assert_eq!(error.code, ErrorCode::BadRequest);
                assert_eq!(
                    error.message,
                    "header names starting with Ipc-Gateway- are set by the gateway only"
                );
                assert!(!fatal, "the connection stays open");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn named_client_ops_read_name_or_pattern_and_others_ignore_them() {
        let subject = |line: &str| match parse_line(Bytes::copy_from_slice(line.as_bytes())) {
            Decoded::Envelope(envelope) => envelope.subject.map(|s| s.as_str().to_owned()),
            Decoded::Invalid { error, .. } => panic!("{line}: {error:?}"),
        };
        assert_eq!(
            subject(r#"{"op":"register","id":1,"name":"bob"}"#).as_deref(),
            Some("bob")
        );
        assert_eq!(
            subject(r#"{"op":"presence_watch","id":"w","pattern":"team.>"}"#).as_deref(),
            Some("team.>")
        );
        assert_eq!(subject(r#"{"op":"publish","name":"bob"}"#), None);
    }

    #[test]
    fn encodes_presence_and_name_lost() {
        let mut out = BytesMut::new();
        encode(
            &Outbound::NameLost {
                sid: Id::from(1),
                name: "bob".into(),
            },
            &mut out,
        );
        let info = std::sync::Arc::new(super::super::PresenceInfo::offline("bob"));
        encode(
            &Outbound::Presence {
                id: Id::from(2),
                watch: false,
                info: info.clone(),
            },
            &mut out,
        );
        encode(
            &Outbound::Presence {
                id: Id::Text("w".into()),
                watch: true,
                info,
            },
            &mut out,
        );
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            concat!(
                "{\"op\":\"name_lost\",\"sid\":1,\"name\":\"bob\"}\n",
                "{\"id\":2,\"ok\":true,\"name\":\"bob\",\"online\":false}\n",
                "{\"op\":\"presence\",\"sid\":\"w\",\"name\":\"bob\",\"online\":false}\n",
            )
        );
    }

    #[test]
    fn encodes_replies_errors_and_binary_data() {
        let mut out = BytesMut::new();
        encode(
            &Outbound::Reply {
                id: Id::Null,
                data: Bytes::from_static(b"hello"),
                headers: None,
            },
            &mut out,
        );
        encode(
            &Outbound::Error {
                id: Id::from(3),
                error: GatewayError::new(ErrorCode::NoResponders, "no service listens on a"),
            },
            &mut out,
        );
        encode(
            &Outbound::Reply {
                id: Id::Text("b".into()),
                data: Bytes::from_static(&[0xff, 0]),
                headers: None,
            },
            &mut out,
        );
        let text = String::from_utf8(out.to_vec()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            lines[0],
            serde_json::json!({"id":null,"ok":true,"data":"hello"})
        );
        assert_eq!(
            lines[1],
            serde_json::json!({"id":3,"ok":false,"error":{"code":"NO_RESPONDERS","message":"no service listens on a"}})
        );
        assert_eq!(
            lines[2],
            serde_json::json!({"id":"b","ok":true,"data_b64":"/wA="})
        );
    }

    #[test]
    fn priority_names_set_the_class_and_anything_else_is_a_bad_request_that_keeps_the_id() {
        let mut decoder = JsonLinesDecoder::new(1024);
        let items = decode_all(
            &mut decoder,
            concat!(
                "{\"op\":\"subscribe\",\"id\":\"h\",\"subject\":\"a\",\"priority\":\"high\"}\n",
                "{\"id\":1,\"subject\":\"a\",\"priority\":\"low\"}\n",
                "{\"id\":2,\"subject\":\"a\",\"priority\":\"normal\"}\n",
                "{\"id\":3,\"subject\":\"a\",\"priority\":null}\n",
                "{\"id\":4,\"subject\":\"a\"}\n",
                "{\"op\":\"subscribe\",\"id\":\"u\",\"subject\":\"a\",\"priority\":\"urgent\"}\n",
                "{\"id\":5,\"subject\":\"a\",\"priority\":1}\n",
                "{\"id\":6,\"subject\":\"a\",\"priority\":\"High\"}\n",
                "{\"task\":\"t\",\"priority\":7}\n",
            )
            .as_bytes(),
        );
        assert_eq!(items.len(), 9);
        let classes: Vec<Priority> = items[..5].iter().map(|i| envelope(i).priority).collect();
        assert_eq!(
            classes,
            [
                Priority::High,
                Priority::Low,
                Priority::Normal,
                Priority::Normal,
                Priority::Normal
            ]
        );
        for (item, expected_id, shown) in [
            (&items[5], Id::Text("u".into()), "\"urgent\""),
            (&items[6], Id::from(5), "1"),
            (&items[7], Id::from(6), "\"High\""),
        ] {
            match item {
                Decoded::Invalid { id, error, fatal } => {
                    assert_eq!(*id, expected_id);
                    assert_eq!(error.code, ErrorCode::BadRequest);
                    assert_eq!(
                        error.message,
                        format!(
                            "\"priority\" must be \"high\", \"normal\" or \"low\", not {shown}"
                        )
                    );
                    assert!(!fatal);
                }
                other => panic!("{other:?}"),
            }
        }
        // A legacy object's own "priority" is its business: it is sent whole.
        assert!(envelope(&items[8]).flags.to_default_subject);
    }
}

#[cfg(test)]
#[path = "json_quick_tests.rs"]
mod quick_tests;

#[cfg(test)]
mod stream_tests {
    use super::*;

    fn envelope(line: &str) -> Result<Envelope, GatewayError> {
        match parse_line(Bytes::copy_from_slice(line.as_bytes())) {
            Decoded::Envelope(envelope) => Ok(envelope),
            Decoded::Invalid { error, .. } => Err(error),
        }
    }

    fn line(event: &Outbound) -> String {
        let mut out = BytesMut::new();
        encode(event, &mut out);
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn durable_and_since_are_read_where_they_belong_and_refused_elsewhere() {
        let publish = envelope(r#"{"op":"publish","subject":"a.b","durable":true}"#).unwrap();
        assert!(publish.flags.durable);
        let subscribe = envelope(r#"{"op":"subscribe","id":"s","subject":"a.>","since_seq":41}"#);
        assert_eq!(subscribe.unwrap().since.as_deref(), Some(&Since::Seq(41)));
        let at = envelope(
            r#"{"op":"subscribe","id":"s","subject":"a.>","since_time":"2026-12-06T05:00:00+01:00"}"#,
        )
        .unwrap();
        let Some(Since::Time(time)) = at.since.as_deref() else {
            panic!("{at:?}");
        };
        assert_eq!(time.unix_timestamp(), 1_796_533_200 - 3600);
        for bad in [
            r#"{"op":"request","subject":"a.b","durable":true}"#,
            r#"{"op":"publish","subject":"a.b","since_seq":1}"#,
            r#"{"op":"subscribe","id":"s","subject":"a.b","since_seq":1,"since_time":"2026-12-06T05:00:00Z"}"#,
            r#"{"op":"subscribe","id":"s","subject":"a.b","since_time":"yesterday"}"#,
            r#"{"op":"subscribe","id":"s","subject":"a.b","since_seq":-1}"#,
        ] {
            let error = envelope(bad).unwrap_err();
            assert_eq!(error.code, super::super::ErrorCode::BadRequest, "{bad}");
        }
    }

    #[test]
    fn stream_answers_and_messages_carry_their_sequence() {
        let stored = Outbound::Stored {
            id: Id::from(1),
            stream: "ORDERS".into(),
            seq: 42,
        };
        assert_eq!(
            line(&stored),
            "{\"id\":1,\"ok\":true,\"stream\":\"ORDERS\",\"seq\":42}\n"
        );
        let replaying = |truncated| Outbound::Replaying {
            id: Id::Text("s1".into()),
            stream: "ORDERS".into(),
            truncated,
        };
        assert_eq!(
            line(&replaying(None)),
            "{\"id\":\"s1\",\"ok\":true,\"stream\":\"ORDERS\"}\n"
        );
        assert_eq!(
            line(&replaying(Some(7))),
            "{\"id\":\"s1\",\"ok\":true,\"stream\":\"ORDERS\",\"truncated\":true,\"first_seq\":7}\n"
        );
        let msg = Outbound::Msg {
            sid: Id::Text("s1".into()),
            message: std::sync::Arc::new(super::super::Delivery {
                subject: Subject::from("orders.a"),
                reply_to: None,
                headers: None,
                payload: Bytes::from_static(b"x"),
                seq: Some(9),
                json_tail: Default::default(),
            }),
            priority: Priority::Normal,
        };
        assert_eq!(
            line(&msg),
            "{\"op\":\"msg\",\"sid\":\"s1\",\"subject\":\"orders.a\",\"data\":\"x\",\"seq\":9}\n"
        );
    }
}
