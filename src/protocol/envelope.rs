//! The one message model every front-end speaks to the core: an inbound `Envelope` (what a
//! client asks for) and an `Outbound` event (what the gateway sends back). Codecs turn wire
//! bytes into these; nothing here knows about sockets or NATS connections.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::error::GatewayError;
use super::headers::Headers;
use super::subject::Subject;

/// A client's correlation id, echoed unchanged on the answer. JSON clients may use numbers or
/// strings; binary frames carry a `u64` (0 means "no id").
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(untagged)]
pub enum Id {
    #[default]
    Null,
    Number(serde_json::Number),
    Text(Arc<str>),
}

impl Id {
    pub fn is_null(&self) -> bool {
        matches!(self, Id::Null)
    }

    /// The id as a binary frame carries it: numbers that fit a `u64`, else 0.
    pub fn as_u64(&self) -> u64 {
        match self {
            Id::Number(n) => n.as_u64().unwrap_or(0),
            _ => 0,
        }
    }
}

/// What `#[serde(untagged)]` said of an id that is none of the three (kept word for word).
const NOT_AN_ID: &str = "data did not match any variant of untagged enum Id";

/// By the JSON value's type, in one pass: `#[serde(untagged)]` buffered every id and built (and
/// threw away) an error for each variant it tried first, on every JSON request.
impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Id, D::Error> {
        struct IdVisitor;

        impl<'de> serde::de::Visitor<'de> for IdVisitor {
            type Value = Id;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("null, a number or a string")
            }

            fn visit_unit<E: serde::de::Error>(self) -> Result<Id, E> {
                Ok(Id::Null)
            }

            fn visit_none<E: serde::de::Error>(self) -> Result<Id, E> {
                Ok(Id::Null)
            }

            fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<Id, E> {
                Ok(Id::Number(value.into()))
            }

            fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<Id, E> {
                Ok(Id::Number(value.into()))
            }

            fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<Id, E> {
                serde_json::Number::from_f64(value)
                    .map(Id::Number)
                    .ok_or_else(|| E::custom(NOT_AN_ID))
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Id, E> {
                Ok(Id::Text(Arc::from(value)))
            }

            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Id, E> {
                Err(E::custom(NOT_AN_ID))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<Id, A::Error> {
                Err(serde::de::Error::custom(NOT_AN_ID))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<Id, A::Error> {
                Err(serde::de::Error::custom(NOT_AN_ID))
            }
        }

        deserializer.deserialize_any(IdVisitor)
    }
}

impl From<u64> for Id {
    fn from(value: u64) -> Self {
        Id::Number(value.into())
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Id::Null => f.write_str("null"),
            Id::Number(n) => write!(f, "{n}"),
            Id::Text(s) => write!(f, "{s:?}"),
        }
    }
}

/// What a client asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Request,
    Publish,
    Subscribe,
    Unsubscribe,
    Ping,
    /// Grants a credit-controlled subscription more messages (`id` names the subscription).
    Credit,
    /// Presents a bearer token (WebSocket connections that came in anonymous).
    Auth,
    /// Named clients (`subject` carries the name or pattern): take a name, give it up, ask
    /// where a name is, follow names' presence.
    Register,
    Unregister,
    Presence,
    PresenceWatch,
}

impl Op {
    /// Every op, in declaration order.
    pub const ALL: [Op; 11] = [
        Op::Request,
        Op::Publish,
        Op::Subscribe,
        Op::Unsubscribe,
        Op::Ping,
        Op::Credit,
        Op::Auth,
        Op::Register,
        Op::Unregister,
        Op::Presence,
        Op::PresenceWatch,
    ];

    pub fn parse(name: &str) -> Option<Op> {
        Some(match name {
            "request" => Op::Request,
            "publish" => Op::Publish,
            "subscribe" => Op::Subscribe,
            "unsubscribe" => Op::Unsubscribe,
            "ping" => Op::Ping,
            "credit" => Op::Credit,
            "auth" => Op::Auth,
            "register" => Op::Register,
            "unregister" => Op::Unregister,
            "presence" => Op::Presence,
            "presence_watch" => Op::PresenceWatch,
            _ => return None,
        })
    }

    /// The name `parse` reads (the JSON `op`, and the op label of metrics and audit).
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Request => "request",
            Op::Publish => "publish",
            Op::Subscribe => "subscribe",
            Op::Unsubscribe => "unsubscribe",
            Op::Ping => "ping",
            Op::Credit => "credit",
            Op::Auth => "auth",
            Op::Register => "register",
            Op::Unregister => "unregister",
            Op::Presence => "presence",
            Op::PresenceWatch => "presence_watch",
        }
    }
}

/// The class a client asks for on a subscription (its messages) or a request (its reply), on a
/// connection whose outbound queue is under pressure: high goes out first and is dropped last,
/// low is dropped first. Binary frames carry it in flag bits 0–1, JSON lines in `"priority"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    /// Every class, in the order the outbox writes them.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    /// The class of flag bits 0–1 (0 normal, 1 high, 2 low); 3 is none.
    pub fn from_bits(bits: u8) -> Option<Priority> {
        match bits {
            0 => Some(Priority::Normal),
            1 => Some(Priority::High),
            2 => Some(Priority::Low),
            _ => None,
        }
    }

    /// Flag bits 0–1 for this class.
    pub fn bits(self) -> u8 {
        match self {
            Priority::Normal => 0,
            Priority::High => 1,
            Priority::Low => 2,
        }
    }

    /// The JSON name (case-sensitive, as op names are).
    pub fn parse(name: &str) -> Option<Priority> {
        match name {
            "high" => Some(Priority::High),
            "normal" => Some(Priority::Normal),
            "low" => Some(Priority::Low),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

/// Delivery hints a client may set on a message (binary flag bits, JSON fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flags {
    /// The request is idempotent: the gateway may retry it within its deadline.
    pub retry: bool,
    /// A legacy JSON object (neither op nor subject): it goes to the configured default
    /// subject. Only such objects do; any other message without a subject is an error.
    pub to_default_subject: bool,
    /// Publish: store it in the JetStream stream that captures the subject and answer with
    /// the stream's name and sequence (see docs/protocol.md, durable publish).
    pub durable: bool,
}

/// Subscribe: replay what the subject's JetStream stream holds from this point, then go on live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    /// Messages whose stream sequence is above this one (the last one the client saw).
    Seq(u64),
    /// Messages stored at or after this time.
    Time(time::OffsetDateTime),
}

/// One inbound message, whatever wire it came from. Payload and subject are `Bytes` slices of
/// the connection's read buffer where the codec could manage it (no copy).
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub op: Op,
    pub id: Id,
    pub subject: Option<Subject>,
    pub headers: Option<Headers>,
    pub data: Bytes,
    pub timeout_ms: Option<u32>,
    pub queue: Option<String>,
    /// Subscribe: the messages the gateway may send before the client grants more (none =
    /// no flow control). Credit: how many more it grants.
    pub credit: Option<u32>,
    /// Auth: the bearer token.
    pub token: Option<String>,
    pub flags: Flags,
    /// Subscribe: the class of the subscription's messages. Request: the class of its reply.
    /// Other ops ignore it.
    pub priority: Priority,
    /// Subscribe: replay from a stream first (boxed: rare, and envelopes are moved a lot).
    pub since: Option<Box<Since>>,
}

impl Envelope {
    pub fn new(op: Op, id: Id) -> Self {
        Envelope {
            op,
            id,
            subject: None,
            headers: None,
            data: Bytes::new(),
            timeout_ms: None,
            queue: None,
            credit: None,
            token: None,
            flags: Flags::default(),
            priority: Priority::Normal,
            since: None,
        }
    }

    /// The subject, or the `BAD_REQUEST` that an op needing one gets without it.
    pub fn require_subject(&self) -> Result<&Subject, GatewayError> {
        self.subject
            .as_ref()
            .ok_or_else(|| GatewayError::bad_request("\"subject\" is required"))
    }
}

/// What a codec yields for each unit of input: a message, or input it could not accept.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    Envelope(Envelope),
    /// Bad input. `fatal` means the stream cannot be resynchronised: send the error, then close.
    Invalid {
        id: Id,
        error: GatewayError,
        fatal: bool,
    },
}

/// One thing the gateway sends to a client.
#[derive(Debug, Clone)]
pub enum Outbound {
    Reply {
        id: Id,
        data: Bytes,
        headers: Option<Headers>,
    },
    Ack {
        id: Id,
    },
    Error {
        id: Id,
        error: GatewayError,
    },
    Pong {
        id: Id,
    },
    /// A message on a subscription; `sid` is the id the client subscribed with, `priority`
    /// the subscription's class (binary frames show it in their flag bits).
    Msg {
        sid: Id,
        /// Shared by every client subscribed to the same subject on this gateway.
        message: Arc<Delivery>,
        priority: Priority,
    },
    /// `count` subscription messages were dropped since the last notice for `sid`; with
    /// `gap`, an unknown number more were lost (the NATS connection the subscription lives on
    /// was cut, and messages published until it came back never reached the gateway).
    Dropped {
        sid: Id,
        count: u64,
        gap: bool,
    },
    /// The token of an `auth` message was accepted: the connection now acts as its subject.
    Authenticated {
        id: Id,
    },
    /// The gateway ended subscription `sid` (a reloaded policy no longer allows it).
    Unsubscribed {
        sid: Id,
        error: GatewayError,
    },
    /// A durable publish was stored: in `stream`, at sequence `seq`.
    Stored {
        id: Id,
        stream: Arc<str>,
        seq: u64,
    },
    /// A subscription with `since_seq`/`since_time` replays from `stream`; `truncated` gives
    /// the first sequence the stream still holds when the asked-for point is older.
    Replaying {
        id: Id,
        stream: Arc<str>,
        truncated: Option<u64>,
    },
    /// Another connection took name `name`, registered under `sid`: its messages stop.
    NameLost {
        sid: Id,
        name: Arc<str>,
    },
    /// A `presence` answer (`watch: false`, `id` the query's) or a `presence_watch` event
    /// (`watch: true`, `id` the watch's).
    Presence {
        id: Id,
        watch: bool,
        info: Arc<super::presence::PresenceInfo>,
    },
}

/// A message delivered on a subscription, as every wire shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The subject it was published on (the concrete one, not the subscription's wildcard).
    pub subject: Subject,
    /// Where an answer goes, when the publisher asked for one.
    pub reply_to: Option<Subject>,
    pub headers: Option<Headers>,
    pub payload: Bytes,
    /// Its stream sequence, for a message replayed (or delivered live) from a JetStream stream.
    pub seq: Option<u64>,
    /// Its JSON `msg` line after the `sid`, made by the first JSON client it is written to
    /// and copied for the others (escaping it once per fan-out, not once per subscriber).
    pub json_tail: EncodedOnce,
}

/// An encoding made once and shared. Not part of the value: it compares equal always.
#[derive(Debug, Clone, Default)]
pub struct EncodedOnce(std::sync::OnceLock<Bytes>);

impl EncodedOnce {
    pub fn get_or_init(&self, encode: impl FnOnce() -> Bytes) -> &Bytes {
        self.0.get_or_init(encode)
    }
}

impl PartialEq for EncodedOnce {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for EncodedOnce {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_read_as_the_untagged_enum_read_them() {
        let read = |text: &str| serde_json::from_str::<Id>(text).map_err(|e| e.to_string());
        assert_eq!(read("null"), Ok(Id::Null));
        assert_eq!(read("7"), Ok(Id::from(7)));
        assert_eq!(read("-7"), Ok(Id::Number((-7i64).into())));
        assert_eq!(read("1.5").map(|id| id.to_string()), Ok("1.5".into()));
        assert_eq!(read(r#""a b""#), Ok(Id::Text("a b".into())));
        for bad in ["true", "[1]", r#"{"a":1}"#] {
            let error = read(bad).unwrap_err();
            assert!(error.starts_with(NOT_AN_ID), "{bad}: {error}");
        }
        assert_eq!(
            serde_json::to_string(&[Id::Null, Id::from(3), Id::Text("x".into())]).unwrap(),
            r#"[null,3,"x"]"#
        );
    }
}
