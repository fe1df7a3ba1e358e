//! W3C trace context (https://www.w3.org/TR/trace-context/) for the gateway's operations. A
//! client may send `traceparent` (and `tracestate`) as a header on any wire; the gateway
//! continues that trace with a span of its own (same trace id, a fresh span id) and sends
//! `traceparent: 00-<trace id>-<gateway span id>-<flags>` to NATS, so the service sees the
//! gateway's span as its parent. A request without a valid `traceparent` starts a new trace
//! (random trace and span ids): the W3C spec says a receiver that cannot parse `traceparent`
//! restarts the trace rather than failing the request, and drops `tracestate` with it.
//!
//! Cheap on the request path: a `TraceContext` is 40 bytes of plain data, ids come from a
//! thread-local generator, and the one string made per operation is the 55-byte header value.

use std::cell::RefCell;
use std::fmt;

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use crate::protocol::Headers;

/// The header names, as the W3C spec writes them (lower case; matched in any case).
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// The length of a version-00 `traceparent` value.
pub const TRACEPARENT_LEN: usize = 55;

/// The trace context of one operation through the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace: the client's, or a new one.
    pub trace_id: [u8; 16],
    /// The gateway's span for this operation: the parent the service sees.
    pub span_id: [u8; 8],
    /// The client's span (its `traceparent`'s parent id); `None` when the trace started here.
    pub parent_id: Option<[u8; 8]>,
    /// Trace flags (bit 0: sampled): the client's, or `01` for a new trace.
    pub flags: u8,
}

/// A valid `traceparent` value's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

/// Parses a `traceparent` value by the W3C rules: `version-traceid-parentid-flags`, lower-case
/// hex; version `ff` is invalid; version `00` is exactly 55 characters; a later version may be
/// longer, with a `-` after the first 55 (read as version 00); the trace id and the parent id
/// must not be all zeros. `None` when it is not valid.
pub fn parse_traceparent(value: &str) -> Option<TraceParent> {
    let bytes = value.as_bytes();
    if bytes.len() < TRACEPARENT_LEN {
        return None;
    }
    let version = hex_byte(&bytes[0..2])?;
    match version {
        0xff => return None,
        0x00 if bytes.len() != TRACEPARENT_LEN => return None,
        _ if bytes.len() > TRACEPARENT_LEN && bytes[TRACEPARENT_LEN] != b'-' => return None,
        _ => {}
    }
    if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
        return None;
    }
    let mut trace_id = [0u8; 16];
    for (i, byte) in trace_id.iter_mut().enumerate() {
        *byte = hex_byte(&bytes[3 + 2 * i..5 + 2 * i])?;
    }
    let mut parent_id = [0u8; 8];
    for (i, byte) in parent_id.iter_mut().enumerate() {
        *byte = hex_byte(&bytes[36 + 2 * i..38 + 2 * i])?;
    }
    let flags = hex_byte(&bytes[53..55])?;
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    Some(TraceParent {
        trace_id,
        parent_id,
        flags,
    })
}

fn hex_digit(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        _ => None, // upper case is not valid either (W3C)
    }
}

fn hex_byte(pair: &[u8]) -> Option<u8> {
    Some(hex_digit(pair[0])? << 4 | hex_digit(pair[1])?)
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn put_hex(out: &mut [u8], bytes: &[u8]) {
    for (i, byte) in bytes.iter().enumerate() {
        out[2 * i] = HEX[usize::from(byte >> 4)];
        out[2 * i + 1] = HEX[usize::from(byte & 0xf)];
    }
}

thread_local! {
    /// Span and trace ids: a generator seeded once per thread from the OS (ids need to be
    /// unique, not secret; this one is cheap and never blocks).
    static IDS: RefCell<StdRng> = RefCell::new(StdRng::from_os_rng());
}

/// Random, never all zeros (an all-zero id is invalid).
fn random_ids() -> ([u8; 16], [u8; 8]) {
    IDS.with(|rng| {
        let mut rng = rng.borrow_mut();
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        loop {
            rng.fill_bytes(&mut trace_id);
            rng.fill_bytes(&mut span_id);
            if trace_id != [0; 16] && span_id != [0; 8] {
                return (trace_id, span_id);
            }
        }
    })
}

fn random_span_id() -> [u8; 8] {
    IDS.with(|rng| {
        let mut rng = rng.borrow_mut();
        loop {
            let id = rng.next_u64();
            if id != 0 {
                return id.to_be_bytes();
            }
        }
    })
}

/// How an operation's headers stood towards the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming {
    /// No `traceparent`.
    Absent,
    /// A valid one: the trace continues (and `tracestate` goes with it).
    Continued,
    /// One that is not valid (or several): the trace restarts, `tracestate` is dropped.
    Invalid,
}

impl TraceContext {
    /// A new trace started at the gateway.
    pub fn start() -> TraceContext {
        let (trace_id, span_id) = random_ids();
        TraceContext {
            trace_id,
            span_id,
            parent_id: None,
            flags: 0x01,
        }
    }

    /// The gateway's span in the client's trace.
    pub fn child_of(parent: TraceParent) -> TraceContext {
        TraceContext {
            trace_id: parent.trace_id,
            span_id: random_span_id(),
            parent_id: Some(parent.parent_id),
            flags: parent.flags,
        }
    }

    /// The trace context of an operation with these headers: the client's trace continued,
    /// or (when it has no valid `traceparent`) a new one if `start_new`, else none.
    pub fn for_headers(headers: Option<&Headers>, start_new: bool) -> (Option<Self>, Incoming) {
        let incoming = headers.map_or(Ok(None), |headers| {
            let mut found = None;
            for (name, values) in headers.iter() {
                if name.eq_ignore_ascii_case(TRACEPARENT) {
                    // Several values (or names differing in case) are not one valid value.
                    if found.is_some() || values.len() != 1 {
                        return Err(());
                    }
                    found = Some(values[0].as_str());
                }
            }
            match found {
                None => Ok(None),
                Some(value) => parse_traceparent(value).map(Some).ok_or(()),
            }
        });
        match incoming {
            Ok(Some(parent)) => (Some(Self::child_of(parent)), Incoming::Continued),
            Ok(None) => (start_new.then(Self::start), Incoming::Absent),
            Err(()) => (start_new.then(Self::start), Incoming::Invalid),
        }
    }

    /// The `traceparent` value the gateway sends on: version 00, the trace id, the gateway's
    /// span id, the flags. Exactly 55 bytes, made with their exact capacity.
    pub fn traceparent(&self) -> String {
        let out = self.traceparent_bytes();
        let mut value = String::with_capacity(TRACEPARENT_LEN);
        // ASCII by construction.
        value.push_str(std::str::from_utf8(&out).unwrap_or_default());
        value
    }

    /// The same `traceparent` value on the stack (to compare without allocating).
    pub fn traceparent_bytes(&self) -> [u8; TRACEPARENT_LEN] {
        let mut out = [0u8; TRACEPARENT_LEN];
        out[0..3].copy_from_slice(b"00-");
        put_hex(&mut out[3..35], &self.trace_id);
        out[35] = b'-';
        put_hex(&mut out[36..52], &self.span_id);
        out[52] = b'-';
        put_hex(&mut out[53..55], &[self.flags]);
        out
    }

    /// The trace id as 32 hex digits (for logs and the audit record), without allocating.
    pub fn trace_id_hex(&self) -> TraceId {
        TraceId(self.trace_id)
    }
}

/// A trace id that prints as 32 lower-case hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceId(pub [u8; 16]);

impl TraceId {
    pub fn to_hex(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        put_hex(&mut out, &self.0);
        out
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = self.to_hex();
        f.write_str(std::str::from_utf8(&hex).unwrap_or_default())
    }
}

/// Whether a header name is the trace context's (any case).
pub fn is_trace_header(name: &str) -> bool {
    name.eq_ignore_ascii_case(TRACEPARENT) || name.eq_ignore_ascii_case(TRACESTATE)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        let mut headers = Headers::new();
        for (name, value) in pairs {
            headers.append(*name, *value).unwrap();
        }
        headers
    }

    #[test]
    fn a_valid_traceparent_is_parsed() {
        let parsed = parse_traceparent(VALID).unwrap();
        assert_eq!(TraceId(parsed.trace_id).to_string(), &VALID[3..35]);
        assert_eq!(parsed.parent_id, 0x00f0_67aa_0ba9_02b7u64.to_be_bytes());
        assert_eq!(parsed.flags, 1);
        // A later version may carry more after a dash; it is read as version 00.
        let future = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever";
        assert_eq!(parse_traceparent(future).unwrap().trace_id, parsed.trace_id);
    }

    #[test]
    fn invalid_traceparents_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_client_trace_continues_with_a_new_gateway_span() {
        let given = headers(&[("Traceparent", VALID), ("tracestate", "k=v")]);
        let (trace, incoming) = TraceContext::for_headers(Some(&given), true);
        let trace = trace.unwrap();
        assert_eq!(incoming, Incoming::Continued);
        assert_eq!(trace.trace_id_hex().to_string(), &VALID[3..35]);
        assert_eq!(
            trace.parent_id,
            Some(0x00f0_67aa_0ba9_02b7u64.to_be_bytes())
        );
        assert_ne!(trace.span_id, [0; 8]);
        assert_ne!(Some(trace.span_id), trace.parent_id);
        let sent = trace.traceparent();
        assert_eq!(sent.len(), TRACEPARENT_LEN);
        assert_eq!(sent.capacity(), TRACEPARENT_LEN);
        assert_eq!(&sent[..36], &VALID[..36]);
        assert_eq!(&sent[52..], "-01");
        assert_eq!(parse_traceparent(&sent).unwrap().parent_id, trace.span_id);
    }

    #[test]
    fn an_absent_or_invalid_traceparent_starts_a_new_trace() {
        let (absent, incoming) = TraceContext::for_headers(None, true);
        assert_eq!(incoming, Incoming::Absent);
        let absent = absent.unwrap();
        assert_eq!(absent.parent_id, None);
        assert_eq!(absent.flags, 1);
        let sent = absent.traceparent();
        assert_eq!(parse_traceparent(&sent).unwrap().trace_id, absent.trace_id);
        let (other, _) = TraceContext::for_headers(None, true);
        assert_ne!(other.unwrap().trace_id, absent.trace_id, "random ids");

        let bad = headers(&[("traceparent", "00-xyz")]);
        let (trace, incoming) = TraceContext::for_headers(Some(&bad), true);
        assert_eq!(incoming, Incoming::Invalid);
        assert_eq!(trace.unwrap().parent_id, None);
        let twice = headers(&[("traceparent", VALID), ("traceparent", VALID)]);
        assert_eq!(
            TraceContext::for_headers(Some(&twice), true).1,
            Incoming::Invalid
        );
        let other = headers(&[("X-Other", "1")]);
        assert_eq!(
            TraceContext::for_headers(Some(&other), false),
            (None, Incoming::Absent),
            "no new trace when not asked for"
        );
    }

    #[test]
    fn trace_headers_are_recognised_in_any_case() {
        assert!(is_trace_header("TraceParent"));
        assert!(is_trace_header("tracestate"));
        assert!(!is_trace_header("trace"));
    }
}
