//! Who a client is, as the rest of the gateway sees it: plain data taken once, when the
//! connection is accepted, from something the client cannot forge (the kernel's peer
//! credentials on the Unix socket, a verified JWT or a verified client certificate on WebSocket
//! and gRPC). Policy matches on it,
//! the audit log writes it (`serde` gives the JSON object), and every message the gateway sends
//! to NATS for the client carries it in `Ipc-Gateway-*` headers ([`Identity::headers`]) that no
//! client may set itself ([`is_reserved_header`]).
//!
//! Building an `Identity` (resolving user names, verifying tokens) is the core's job
//! (`core::auth`); this module only holds and renders it.

use std::fmt::Write as _;

use serde::Serialize;

use super::frontend::Frontend;

/// Header names with this prefix are the gateway's: set on every message it sends to NATS for
/// a client, refused (`BAD_REQUEST`) when a client sends one. Compared without regard to case.
pub const RESERVED_HEADER_PREFIX: &str = "Ipc-Gateway-";

/// The short stable form (`uid=1001 user=alice pid=4242`, `sub=bob`, `anonymous`).
pub const IDENTITY_HEADER: &str = "Ipc-Gateway-Identity";
/// The peer's uid (Unix socket), in decimal.
pub const UID_HEADER: &str = "Ipc-Gateway-Uid";
/// The peer uid's user name, when the user database has one.
pub const USER_HEADER: &str = "Ipc-Gateway-User";
/// The peer's pid (Unix socket), in decimal.
pub const PID_HEADER: &str = "Ipc-Gateway-Pid";
/// A verified JWT's `sub` claim (WebSocket, gRPC).
pub const SUB_HEADER: &str = "Ipc-Gateway-Sub";
/// A verified client certificate's subject, in the canonical form of [`Identity::cert`].
pub const CERT_HEADER: &str = "Ipc-Gateway-Cert";
/// The front-end the client came through: `uds`, `ws` or `grpc`.
pub const FRONTEND_HEADER: &str = "Ipc-Gateway-Frontend";
/// The id of the gateway the client is connected to (`gateway_id`).
pub const GATEWAY_ID_HEADER: &str = "Ipc-Gateway-Id";

/// Whether a header name is one only the gateway may set (`Ipc-Gateway-` in any case).
pub fn is_reserved_header(name: &str) -> bool {
    name.len() >= RESERVED_HEADER_PREFIX.len()
        && name.as_bytes()[..RESERVED_HEADER_PREFIX.len()]
            .eq_ignore_ascii_case(RESERVED_HEADER_PREFIX.as_bytes())
}

/// A connection's caller. Every field but `frontend` is optional: what is known depends on the
/// front-end (uid, gid and pid from the Unix socket; `sub` from a token; `addr` for network
/// peers). Serialized (for the audit log) as an object with only the known fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    /// The front-end the client came through (`"uds"`, `"ws"`, `"grpc"` in JSON).
    pub frontend: Frontend,
    /// The peer's effective uid (SO_PEERCRED).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The peer's effective gid (SO_PEERCRED).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// The peer's pid (SO_PEERCRED); a hint for people, not for policy: pids are reused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// `uid`'s user name, when the user database has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `gid`'s group name, when the group database has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The group ids the group database gives the user (its primary group included), when
    /// known.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<u32>,
    /// The names of those of `groups` that have one, in the same order (a gid without a name
    /// is left out, so the two lists need not line up).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub group_names: Vec<String>,
    /// A verified JWT's subject.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// The subject of a client certificate that chains to `tls_client_ca` (WebSocket, gRPC
    /// over TLS), in RFC 4514 form: the RDNs from last to first, attribute types by their
    /// short upper-case names (`CN`, `O`, `OU`, `C`, `L`, `ST`, `DC`...) or dotted OIDs, values
    /// escaped as RFC 4514 says: `CN=alice,O=Example`. Beside `sub` when the client also sent a
    /// token: both are recorded, and a grant may match either.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<String>,
    /// The peer address, for network front-ends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
}

impl Identity {
    /// A caller the gateway knows nothing about (no peer credentials, no token).
    pub fn anonymous(frontend: Frontend, addr: Option<String>) -> Identity {
        Identity {
            frontend,
            uid: None,
            gid: None,
            pid: None,
            user: None,
            group: None,
            groups: Vec::new(),
            group_names: Vec::new(),
            sub: None,
            cert: None,
            addr,
        }
    }

    /// No uid, no verified token subject, no verified certificate: nothing vouches for this
    /// caller.
    pub fn is_anonymous(&self) -> bool {
        self.uid.is_none() && self.sub.is_none() && self.cert.is_none()
    }

    /// A short stable text for logs and the `Ipc-Gateway-Identity` header: the known ones of
    /// `uid`, `user`, `pid`, `sub` and `cert` as `key=value` in that order, or `anonymous`. A
    /// value that is not a plain word (a space, `=`, `,`, a quote, a control or non-ASCII
    /// character) is written as a JSON string, so a crafted name can never read as another
    /// field: `uid=1001 user=alice pid=4242`, `sub=bob`, `sub="x uid=0"`,
    /// `cert="CN=alice,O=Example"`.
    pub fn short_form(&self) -> String {
        let mut out = String::new();
        let mut field = |key: &str, value: &dyn std::fmt::Display| {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(key);
            out.push('=');
            let _ = write!(out, "{value}");
        };
        if let Some(uid) = self.uid {
            field("uid", &uid);
        }
        if let Some(user) = &self.user {
            field("user", &Word(user));
        }
        if let Some(pid) = self.pid {
            field("pid", &pid);
        }
        if let Some(sub) = &self.sub {
            field("sub", &Word(sub));
        }
        if let Some(cert) = &self.cert {
            field("cert", &Word(cert));
        }
        if out.is_empty() {
            out.push_str("anonymous");
        }
        out
    }

    /// The headers every message the gateway sends to NATS for this caller carries:
    /// `Ipc-Gateway-Identity` (the short form), then `Ipc-Gateway-Uid`, `-User`, `-Pid`, `-Sub`,
    /// `-Cert` where known, and `Ipc-Gateway-Frontend`. Values never hold a control character (one
    /// would be replaced by U+FFFD), so each is a valid NATS header value. An identity does not
    /// change while its connection lives: compute these once per connection and reuse them.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = Vec::with_capacity(7);
        headers.push((IDENTITY_HEADER, self.short_form()));
        if let Some(uid) = self.uid {
            headers.push((UID_HEADER, uid.to_string()));
        }
        if let Some(user) = &self.user {
            headers.push((USER_HEADER, header_value(user)));
        }
        if let Some(pid) = self.pid {
            headers.push((PID_HEADER, pid.to_string()));
        }
        self.push_verified(&mut headers);
        headers.push((FRONTEND_HEADER, self.frontend.as_str().to_owned()));
        headers
    }

    /// The headers of `identity_headers = "minimal"`: only the values a service authorises on,
    /// `Ipc-Gateway-Uid`, `-Sub` and `-Cert`, where known; none for an anonymous caller. Every
    /// header costs each receiving NATS client a parse per message, and these are the ones
    /// that cannot be had any other way.
    pub fn minimal_headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = Vec::with_capacity(2);
        if let Some(uid) = self.uid {
            headers.push((UID_HEADER, uid.to_string()));
        }
        self.push_verified(&mut headers);
        headers
    }

    /// `Ipc-Gateway-Sub` and `-Cert`, where known.
    fn push_verified(&self, headers: &mut Vec<(&'static str, String)>) {
        if let Some(sub) = &self.sub {
            headers.push((SUB_HEADER, header_value(sub)));
        }
        if let Some(cert) = &self.cert {
            headers.push((CERT_HEADER, header_value(cert)));
        }
    }
}

/// A value as a header carries it: control characters (line breaks above all) replaced.
fn header_value(value: &str) -> String {
    value.replace(char::is_control, "\u{FFFD}")
}

/// A short-form value: bare when it is a plain word, else a JSON string.
struct Word<'a>(&'a str);

impl std::fmt::Display for Word<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plain = !self.0.is_empty()
            && self
                .0
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-@+:/".contains(&b));
        if plain {
            return f.write_str(self.0);
        }
        f.write_char('"')?;
        for c in self.0.chars() {
            match c {
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                c if c.is_ascii_graphic() || c == ' ' => f.write_char(c)?,
                c => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        write!(f, "\\u{unit:04x}")?;
                    }
                }
            }
        }
        f.write_char('"')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> Identity {
        Identity {
            uid: Some(1001),
            gid: Some(100),
            pid: Some(4242),
            user: Some("alice".into()),
            group: Some("users".into()),
            groups: vec![100, 27],
            group_names: vec!["users".into(), "sudo".into()],
            ..Identity::anonymous(Frontend::Uds, None)
        }
    }

    fn bob() -> Identity {
        Identity {
            sub: Some("bob".into()),
            ..Identity::anonymous(Frontend::Ws, Some("127.0.0.1:50000".into()))
        }
    }

    #[test]
    fn the_short_form_names_what_is_known_or_says_anonymous() {
        assert_eq!(alice().short_form(), "uid=1001 user=alice pid=4242");
        assert_eq!(bob().short_form(), "sub=bob");
        assert_eq!(
            Identity::anonymous(Frontend::Grpc, Some("[::1]:9".into())).short_form(),
            "anonymous"
        );
        let unnamed = Identity {
            user: None,
            pid: None,
            ..alice()
        };
        assert_eq!(unnamed.short_form(), "uid=1001");
        assert_eq!(
            Identity {
                sub: Some("svc@example.com".into()),
                ..bob()
            }
            .short_form(),
            "sub=svc@example.com"
        );
    }

    #[test]
    fn a_crafted_name_cannot_pass_for_another_field_in_the_short_form() {
        let crafted = Identity {
            sub: Some("x uid=0 user=root".into()),
            ..bob()
        };
        assert_eq!(crafted.short_form(), r#"sub="x uid=0 user=root""#);
        let quoted = Identity {
            sub: Some("a\"b\\c\nd é".into()),
            ..bob()
        };
        assert_eq!(quoted.short_form(), r#"sub="a\"b\\c\u000ad \u00e9""#);
        let empty = Identity {
            sub: Some(String::new()),
            ..bob()
        };
        assert_eq!(empty.short_form(), r#"sub="""#);
    }

    fn carol() -> Identity {
        Identity {
            cert: Some("CN=carol,O=Example\\, Inc.".into()),
            ..Identity::anonymous(Frontend::Grpc, Some("127.0.0.1:50001".into()))
        }
    }

    #[test]
    fn a_certificate_subject_is_an_identity_quoted_in_the_short_form_and_its_own_header() {
        let carol = carol();
        assert!(!carol.is_anonymous(), "a verified certificate vouches");
        assert_eq!(carol.short_form(), r#"cert="CN=carol,O=Example\\, Inc.""#);
        assert_eq!(
            carol.headers(),
            [
                (
                    IDENTITY_HEADER,
                    r#"cert="CN=carol,O=Example\\, Inc.""#.to_owned()
                ),
                (CERT_HEADER, "CN=carol,O=Example\\, Inc.".to_owned()),
                (FRONTEND_HEADER, "grpc".to_owned()),
            ]
        );
        let both = Identity {
            sub: Some("bob".into()),
            ..carol.clone()
        };
        assert_eq!(
            both.short_form(),
            r#"sub=bob cert="CN=carol,O=Example\\, Inc.""#
        );
        assert_eq!(
            serde_json::to_value(&both).unwrap(),
            serde_json::json!({
                "frontend": "grpc", "sub": "bob", "cert": "CN=carol,O=Example\\, Inc.",
                "addr": "127.0.0.1:50001",
            })
        );
    }

    #[test]
    fn anonymous_means_no_uid_and_no_subject() {
        let anonymous = Identity::anonymous(Frontend::Ws, None);
        assert!(anonymous.is_anonymous());
        assert!(!alice().is_anonymous());
        assert!(!bob().is_anonymous());
        let only_addr = Identity::anonymous(Frontend::Grpc, Some("10.0.0.1:1".into()));
        assert!(only_addr.is_anonymous(), "an address vouches for nobody");
    }

    #[test]
    fn headers_carry_the_known_fields_and_always_the_short_form_and_front_end() {
        assert_eq!(
            alice().headers(),
            [
                (IDENTITY_HEADER, "uid=1001 user=alice pid=4242".to_owned()),
                (UID_HEADER, "1001".to_owned()),
                (USER_HEADER, "alice".to_owned()),
                (PID_HEADER, "4242".to_owned()),
                (FRONTEND_HEADER, "uds".to_owned()),
            ]
        );
        assert_eq!(
            bob().headers(),
            [
                (IDENTITY_HEADER, "sub=bob".to_owned()),
                (SUB_HEADER, "bob".to_owned()),
                (FRONTEND_HEADER, "ws".to_owned()),
            ]
        );
        assert_eq!(
            Identity::anonymous(Frontend::Grpc, None).headers(),
            [
                (IDENTITY_HEADER, "anonymous".to_owned()),
                (FRONTEND_HEADER, "grpc".to_owned()),
            ]
        );
        for (name, _) in alice().headers().into_iter().chain(bob().headers()) {
            assert!(is_reserved_header(name), "{name}");
        }
    }

    #[test]
    fn minimal_headers_carry_only_the_values_a_service_authorises_on() {
        assert_eq!(alice().minimal_headers(), [(UID_HEADER, "1001".to_owned())]);
        assert_eq!(bob().minimal_headers(), [(SUB_HEADER, "bob".to_owned())]);
        let both = Identity {
            cert: Some("CN=bob,O=Example".into()),
            ..bob()
        };
        assert_eq!(
            both.minimal_headers(),
            [
                (SUB_HEADER, "bob".to_owned()),
                (CERT_HEADER, "CN=bob,O=Example".to_owned()),
            ]
        );
        assert!(
            Identity::anonymous(Frontend::Ws, None)
                .minimal_headers()
                .is_empty()
        );
        let crafted = Identity {
            sub: Some("bob\nIpc-Gateway-Uid: 0".into()),
            ..bob()
        };
        assert_eq!(
            crafted.minimal_headers(),
            [(SUB_HEADER, "bob\u{FFFD}Ipc-Gateway-Uid: 0".to_owned())]
        );
    }

    #[test]
    fn header_values_never_carry_a_line_break() {
        let crafted = Identity {
            sub: Some("bob\r\nIpc-Gateway-Uid: 0".into()),
            ..bob()
        };
        for (name, value) in crafted.headers() {
            assert!(!value.contains(['\r', '\n']), "{name}: {value:?}");
        }
        assert_eq!(
            crafted.headers()[1],
            (
                SUB_HEADER,
                "bob\u{FFFD}\u{FFFD}Ipc-Gateway-Uid: 0".to_owned()
            )
        );
    }

    #[test]
    fn reserved_header_names_are_matched_in_any_case() {
        for name in [
            "Ipc-Gateway-Uid",
            "ipc-gateway-uid",
            "IPC-GATEWAY-IDENTITY",
            "Ipc-Gateway-",
            "iPc-gAtEwAy-anything",
        ] {
            assert!(is_reserved_header(name), "{name}");
        }
        for name in [
            "Ipc-Gateway",
            "X-Ipc-Gateway-Uid",
            "Ipc_Gateway_Uid",
            "",
            "Ipc-",
        ] {
            assert!(!is_reserved_header(name), "{name}");
        }
        assert!(!is_reserved_header("Ipc-Gatewaé"), "non-ASCII is no panic");
    }

    #[test]
    fn json_has_the_known_fields_only() {
        let json = serde_json::to_value(alice()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "frontend": "uds", "uid": 1001, "gid": 100, "pid": 4242,
                "user": "alice", "group": "users",
                "groups": [100, 27], "group_names": ["users", "sudo"],
            })
        );
        let json = serde_json::to_value(bob()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"frontend": "ws", "sub": "bob", "addr": "127.0.0.1:50000"})
        );
        let json = serde_json::to_value(Identity::anonymous(Frontend::Grpc, None)).unwrap();
        assert_eq!(json, serde_json::json!({"frontend": "grpc"}));
    }
}
