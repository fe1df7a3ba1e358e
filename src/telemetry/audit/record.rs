//! One audit record: what happened (`op`, `outcome`), to whom (`frontend`, `conn`, `identity`),
//! on what (`subject`, `id`) and at what cost (`latency_us`, `bytes_in`, `bytes_out`). A
//! `Record` is plain data, cheap to build on the request path (no formatting, no allocation
//! beyond what the caller hands in: the subject and identity are shared, not copied); the writer
//! thread turns it into one JSON line, the timestamp included.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};

use crate::protocol::{ErrorCode, Frontend, Id, Op, Subject};
use crate::telemetry::trace::TraceId;

/// What a record is about: its `op` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditOp {
    /// A connection was accepted (outcome `ok`) or refused (outcome: the code, e.g.
    /// `OVERLOADED` at the connection limit, `UNAUTHENTICATED` for a bad token).
    Connect,
    /// A connection closed; `reason` says why.
    Disconnect,
    /// In-band authentication (`{"op":"auth"}`).
    Auth,
    Request,
    Publish,
    Subscribe,
    Unsubscribe,
    Ping,
    Credit,
    /// Named clients: taking and giving up a name, presence queries and watches.
    Register,
    Unregister,
    Presence,
    /// Input that decoded into no operation (`BAD_REQUEST`, `TOO_LARGE`,
    /// `UNSUPPORTED_VERSION`).
    Invalid,
    /// The policy file was reloaded (outcome `ok`) or kept (outcome: the code, `message`: why).
    PolicyReload,
    /// Written by the audit writer only: `count` records were lost because the queue was full.
    AuditLost,
}

impl AuditOp {
    pub const fn as_str(self) -> &'static str {
        match self {
            AuditOp::Connect => "connect",
            AuditOp::Disconnect => "disconnect",
            AuditOp::Auth => "auth",
            AuditOp::Request => "request",
            AuditOp::Publish => "publish",
            AuditOp::Subscribe => "subscribe",
            AuditOp::Unsubscribe => "unsubscribe",
            AuditOp::Ping => "ping",
            AuditOp::Credit => "credit",
            AuditOp::Register => "register",
            AuditOp::Unregister => "unregister",
            AuditOp::Presence => "presence",
            AuditOp::Invalid => "invalid",
            AuditOp::PolicyReload => "policy_reload",
            AuditOp::AuditLost => "audit_lost",
        }
    }
}

impl From<Op> for AuditOp {
    fn from(op: Op) -> Self {
        match op {
            Op::Request => AuditOp::Request,
            Op::Publish => AuditOp::Publish,
            Op::Subscribe => AuditOp::Subscribe,
            Op::Unsubscribe => AuditOp::Unsubscribe,
            Op::Ping => AuditOp::Ping,
            Op::Credit => AuditOp::Credit,
            Op::Auth => AuditOp::Auth,
            Op::Register => AuditOp::Register,
            Op::Unregister => AuditOp::Unregister,
            Op::Presence | Op::PresenceWatch => AuditOp::Presence,
        }
    }
}

/// Who is calling, as far as the gateway knows it: the `identity` object of a record. Built
/// once per connection and shared by its records (`Arc`); fields that are not known are left
/// out of the JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AuditIdentity {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// A verified token's `sub` claim.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// A verified client certificate's subject (RFC 4514: `CN=alice,O=Example`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<String>,
    /// The peer's network address (WebSocket, gRPC).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
}

/// One audit record. Build it with a constructor and the chained setters:
///
/// ```
/// # use std::time::Duration;
/// # use ipc_gateway::protocol::{ErrorCode, Frontend, Op, Subject};
/// # use ipc_gateway::telemetry::audit::{AuditConn, AuditIdentity};
/// let conn = AuditConn::new(Frontend::Uds, 7, AuditIdentity { uid: Some(1001), ..Default::default() });
/// let record = conn
///     .record(Op::Request)
///     .subject(Subject::from_static("svc.orders.create"))
///     .id(42u64.into())
///     .outcome(Err(ErrorCode::Timeout))
///     .latency(Duration::from_millis(5000))
///     .bytes_in(128);
/// ```
///
/// `ts` is taken when the record is made (for a request: when its answer is known), not when
/// it is written.
#[derive(Debug, Clone)]
pub struct Record {
    ts: SystemTime,
    op: AuditOp,
    frontend: Option<Frontend>,
    conn: Option<u64>,
    id: Id,
    subject: Option<Subject>,
    outcome: Option<Result<(), ErrorCode>>,
    latency_us: Option<u64>,
    bytes_in: Option<u64>,
    bytes_out: Option<u64>,
    count: Option<u64>,
    reason: Option<Cow<'static, str>>,
    message: Option<Cow<'static, str>>,
    identity: Option<Arc<AuditIdentity>>,
    /// The operation's W3C trace id (see `telemetry::trace`).
    trace_id: Option<TraceId>,
}

impl Record {
    /// A record of `op`, stamped now, with every other field empty.
    pub fn new(op: impl Into<AuditOp>) -> Record {
        Record {
            ts: SystemTime::now(),
            op: op.into(),
            frontend: None,
            conn: None,
            id: Id::Null,
            subject: None,
            outcome: None,
            latency_us: None,
            bytes_in: None,
            bytes_out: None,
            count: None,
            reason: None,
            message: None,
            identity: None,
            trace_id: None,
        }
    }

    /// The operation's trace id (`trace_id`, 32 hex digits).
    pub fn trace_id(mut self, trace_id: TraceId) -> Self {
        self.trace_id = Some(trace_id);
        self
    }

    /// A policy reload: `Ok(())` when the new policy took effect, else the code (the old policy
    /// stays) with the reason in `message`.
    pub fn policy_reload(outcome: Result<(), ErrorCode>) -> Record {
        Record::new(AuditOp::PolicyReload).outcome(outcome)
    }

    /// The notice the writer writes when room returns after records were lost.
    pub(super) fn audit_lost(count: u64) -> Record {
        Record::new(AuditOp::AuditLost)
            .count(count)
            .message("audit records lost: the audit queue was full")
    }

    pub fn op(&self) -> AuditOp {
        self.op
    }

    /// Sets the time stamp (records are stamped when made; this is for tests and replays).
    pub fn at(mut self, ts: SystemTime) -> Self {
        self.ts = ts;
        self
    }

    pub fn frontend(mut self, frontend: Frontend) -> Self {
        self.frontend = Some(frontend);
        self
    }

    pub fn conn(mut self, conn: u64) -> Self {
        self.conn = Some(conn);
        self
    }

    pub fn identity(mut self, identity: Arc<AuditIdentity>) -> Self {
        self.identity = Some(identity);
        self
    }

    /// The client's request (or subscription) id; `Id::Null` leaves the field out.
    pub fn id(mut self, id: Id) -> Self {
        self.id = id;
        self
    }

    pub fn subject(mut self, subject: Subject) -> Self {
        self.subject = Some(subject);
        self
    }

    /// `ok`, or the error code the client got.
    pub fn outcome(mut self, outcome: Result<(), ErrorCode>) -> Self {
        self.outcome = Some(outcome);
        self
    }

    pub fn ok(self) -> Self {
        self.outcome(Ok(()))
    }

    pub fn error(self, code: ErrorCode) -> Self {
        self.outcome(Err(code))
    }

    /// The request's time inside the gateway, written in microseconds.
    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency_us = Some(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
        self
    }

    /// Payload bytes from the client (a request's or publish's data; on `disconnect`, the
    /// connection's total where the caller tracks it).
    pub fn bytes_in(mut self, bytes: u64) -> Self {
        self.bytes_in = Some(bytes);
        self
    }

    /// Payload bytes to the client (a reply's data; on `disconnect`, the connection's total).
    pub fn bytes_out(mut self, bytes: u64) -> Self {
        self.bytes_out = Some(bytes);
        self
    }

    pub fn count(mut self, count: u64) -> Self {
        self.count = Some(count);
        self
    }

    /// A short machine-friendly word: why a connection closed (`client`, `idle`, `slow_client`,
    /// `shutdown`, …), what triggered a reload (`sighup`).
    pub fn reason(mut self, reason: impl Into<Cow<'static, str>>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// Words for people: an error's message, a reload's summary.
    pub fn message(mut self, message: impl Into<Cow<'static, str>>) -> Self {
        self.message = Some(message.into());
        self
    }

    /// The record as its JSON line (without the newline). The writer does this; callers need
    /// it only in tests and diagnostics.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A record as its audit line shows it: with the gateway that wrote it, when known.
pub(super) struct Line<'a> {
    record: &'a Record,
    gateway: Option<&'a str>,
}

impl Record {
    pub(super) fn line<'a>(&'a self, gateway: Option<&'a str>) -> Line<'a> {
        Line {
            record: self,
            gateway,
        }
    }
}

impl Serialize for Record {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.line(None).serialize(serializer)
    }
}

impl Serialize for Line<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let Line {
            record: this,
            gateway,
        } = self;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("ts", &Timestamp(this.ts))?;
        map.serialize_entry("op", this.op.as_str())?;
        if let Some(gateway) = gateway {
            map.serialize_entry("gateway", gateway)?;
        }
        if let Some(frontend) = this.frontend {
            map.serialize_entry("frontend", frontend.as_str())?;
        }
        if let Some(conn) = this.conn {
            map.serialize_entry("conn", &conn)?;
        }
        if !this.id.is_null() {
            map.serialize_entry("id", &this.id)?;
        }
        if let Some(subject) = &this.subject {
            map.serialize_entry("subject", subject.as_str())?;
        }
        if let Some(trace_id) = this.trace_id {
            let hex = trace_id.to_hex();
            map.serialize_entry("trace_id", std::str::from_utf8(&hex).unwrap_or_default())?;
        }
        if let Some(outcome) = this.outcome {
            let outcome = match outcome {
                Ok(()) => "ok",
                Err(code) => code.as_str(),
            };
            map.serialize_entry("outcome", outcome)?;
        }
        if let Some(latency_us) = this.latency_us {
            map.serialize_entry("latency_us", &latency_us)?;
        }
        if let Some(bytes) = this.bytes_in {
            map.serialize_entry("bytes_in", &bytes)?;
        }
        if let Some(bytes) = this.bytes_out {
            map.serialize_entry("bytes_out", &bytes)?;
        }
        if let Some(count) = this.count {
            map.serialize_entry("count", &count)?;
        }
        if let Some(reason) = &this.reason {
            map.serialize_entry("reason", reason)?;
        }
        if let Some(message) = &this.message {
            map.serialize_entry("message", message)?;
        }
        if let Some(identity) = &this.identity {
            map.serialize_entry("identity", identity.as_ref())?;
        }
        map.end()
    }
}

/// One connection's part of every record it makes: front-end, connection id and identity,
/// filled in once. Clone it into whatever needs to make records for the connection.
#[derive(Debug, Clone)]
pub struct AuditConn {
    frontend: Frontend,
    conn: u64,
    identity: Arc<AuditIdentity>,
}

impl AuditConn {
    pub fn new(frontend: Frontend, conn: u64, identity: impl Into<Arc<AuditIdentity>>) -> Self {
        AuditConn {
            frontend,
            conn,
            identity: identity.into(),
        }
    }

    /// After in-band authentication: the records that follow carry the new identity.
    pub fn set_identity(&mut self, identity: impl Into<Arc<AuditIdentity>>) {
        self.identity = identity.into();
    }

    pub fn conn(&self) -> u64 {
        self.conn
    }

    /// A record of `op` on this connection, stamped now.
    pub fn record(&self, op: impl Into<AuditOp>) -> Record {
        let mut record = Record::new(op);
        record.frontend = Some(self.frontend);
        record.conn = Some(self.conn);
        record.identity = Some(self.identity.clone());
        record
    }

    /// The connection was accepted.
    pub fn connected(&self) -> Record {
        self.record(AuditOp::Connect).ok()
    }

    /// The connection was refused at accept or upgrade (`OVERLOADED`, `UNAUTHENTICATED`, …).
    pub fn refused(&self, code: ErrorCode) -> Record {
        self.record(AuditOp::Connect).error(code)
    }

    /// The connection closed, for `reason`.
    pub fn disconnected(&self, reason: impl Into<Cow<'static, str>>) -> Record {
        self.record(AuditOp::Disconnect).reason(reason)
    }
}

/// A time stamp as RFC 3339 in UTC with microseconds: `2026-12-06T00:23:16.123456Z`.
struct Timestamp(SystemTime);

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let text = format_rfc3339_micros(self.0);
        // Only ASCII digits and separators are written.
        serializer
            .serialize_str(std::str::from_utf8(&text).unwrap_or("1970-01-01T00:00:00.000000Z"))
    }
}

/// Formats `time` as `YYYY-MM-DDTHH:MM:SS.ffffffZ`. Times before 1970 are written as the epoch
/// and times after year 9999 as its last microsecond: neither comes from a working clock.
pub fn format_rfc3339_micros(time: SystemTime) -> [u8; 27] {
    const MAX_SECS: u64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    let since = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let (secs, micros) = if since.as_secs() > MAX_SECS {
        (MAX_SECS, 999_999)
    } else {
        (since.as_secs(), since.subsec_micros())
    };
    let (year, month, day) = civil_from_days(secs / 86_400);
    let second_of_day = secs % 86_400;
    let mut out = *b"0000-00-00T00:00:00.000000Z";
    put_digits(&mut out[0..4], year);
    put_digits(&mut out[5..7], month);
    put_digits(&mut out[8..10], day);
    put_digits(&mut out[11..13], second_of_day / 3600);
    put_digits(&mut out[14..16], second_of_day / 60 % 60);
    put_digits(&mut out[17..19], second_of_day % 60);
    put_digits(&mut out[20..26], u64::from(micros));
    out
}

fn put_digits(out: &mut [u8], mut value: u64) {
    for byte in out.iter_mut().rev() {
        *byte = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar (Howard
/// Hinnant's `civil_from_days`, for non-negative day numbers).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z / 146_097;
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153; // March = 0
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64, micros: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(secs, micros * 1000)
    }

    fn text(time: SystemTime) -> String {
        String::from_utf8(format_rfc3339_micros(time).to_vec()).unwrap()
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        assert_eq!(text(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        // Checked with `date -u -d @1796516596`.
        assert_eq!(
            text(at(1_796_516_596, 123_456)),
            "2026-12-06T00:23:16.123456Z"
        );
        assert_eq!(text(at(951_782_400, 1)), "2000-02-29T00:00:00.000001Z");
        assert_eq!(
            text(at(4_107_542_399, 999_999)),
            "2100-02-28T23:59:59.999999Z"
        );
        assert_eq!(text(at(4_107_542_400, 0)), "2100-03-01T00:00:00.000000Z");
        assert_eq!(
            text(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00.000000Z"
        );
        assert_eq!(text(at(u64::MAX / 4, 0)), "9999-12-31T23:59:59.999999Z");
    }

    #[test]
    fn civil_dates_agree_with_a_day_by_day_calendar() {
        let (mut year, mut month, mut day) = (1970, 1, 1);
        for days in 0..(400 * 366) {
            assert_eq!(civil_from_days(days), (year, month, day), "day {days}");
            let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
            let length = match month {
                2 if leap => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            day += 1;
            if day > length {
                day = 1;
                month += 1;
                if month > 12 {
                    month = 1;
                    year += 1;
                }
            }
        }
    }

    #[test]
    fn a_request_record_has_every_field_it_was_given() {
        let identity = AuditIdentity {
            uid: Some(1001),
            gid: Some(100),
            pid: Some(4242),
            user: Some("alice".into()),
            ..Default::default()
        };
        let conn = AuditConn::new(Frontend::Uds, 7, identity);
        let record = conn
            .record(Op::Request)
            .at(at(1_796_516_596, 123_456))
            .subject(Subject::from_static("svc.orders.create"))
            .id(42u64.into())
            .error(ErrorCode::Forbidden)
            .latency(Duration::from_micros(1234))
            .bytes_in(128)
            .bytes_out(0)
            .message("request to svc.orders.create is not allowed");
        assert_eq!(
            record.to_json(),
            r#"{"ts":"2026-12-06T00:23:16.123456Z","op":"request","frontend":"uds","conn":7,"id":42,"subject":"svc.orders.create","outcome":"FORBIDDEN","latency_us":1234,"bytes_in":128,"bytes_out":0,"message":"request to svc.orders.create is not allowed","identity":{"uid":1001,"gid":100,"pid":4242,"user":"alice"}}"#
        );
    }

    #[test]
    fn empty_fields_are_left_out_and_text_ids_stay_text() {
        let record = Record::policy_reload(Ok(()))
            .at(UNIX_EPOCH)
            .reason("sighup")
            .id(Id::Text("s1".into()));
        assert_eq!(
            record.to_json(),
            r#"{"ts":"1970-01-01T00:00:00.000000Z","op":"policy_reload","id":"s1","outcome":"ok","reason":"sighup"}"#
        );
        let closed = AuditConn::new(Frontend::Ws, 3, AuditIdentity::default())
            .disconnected("idle")
            .at(UNIX_EPOCH);
        assert_eq!(
            closed.to_json(),
            r#"{"ts":"1970-01-01T00:00:00.000000Z","op":"disconnect","frontend":"ws","conn":3,"reason":"idle","identity":{}}"#
        );
    }

    #[test]
    fn a_record_is_small_enough_to_queue_by_the_ten_thousand() {
        // 65,536 queued records should stay well under 20 MB.
        let size = std::mem::size_of::<Record>();
        assert!(size <= 256, "{size}");
    }
}
