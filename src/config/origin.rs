//! Which browser pages may open `/ws`: the `Origin` a browser sends is compared with the
//! gateway's own origins and `ws_allowed_origins`, never with anything else in the request. A
//! DNS-rebinding page (`http://evil.example:8080`, its name pointed at 127.0.0.1) sends its own
//! origin and a matching `Host` header; the Host header is the attacker's to choose, so it
//! never counts.
//!
//! The gateway's own origins are `public_origins` or, when that is empty, the `http://` and
//! `https://` forms of the `http` address with its port, plus `localhost` with the port when
//! that address is loopback. An unspecified address (`0.0.0.0`, `[::]`) stands for its
//! loopback forms: which names and addresses browsers use for a public listener is the
//! operator's to say, in `public_origins`.
//!
//! Origins compare as browsers mean them (RFC 6454): scheme, host and port, the scheme and
//! host without regard to case, the port made explicit (80 for `http` and `ws`, 443 for
//! `https` and `wss`), so `http://Example.com` and `http://example.com:80` are one origin.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::Config;

/// A tuple origin: scheme, host and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: String,
    /// Lower case; an IPv6 address keeps its brackets.
    host: String,
    /// Explicit, or the scheme's default; `None` for a scheme without one and no port given.
    port: Option<u16>,
}

impl Origin {
    /// Reads `scheme://host[:port]`, as the `Origin` header and the settings spell an origin.
    /// A path (even `/`), query, fragment or user name is refused, as is `null`, the opaque
    /// origin (list it verbatim in `ws_allowed_origins` to allow it).
    pub fn parse(text: &str) -> Result<Origin, String> {
        let bad = |why: &str| Err(format!("{text:?} is not an origin ({why})"));
        let Some((scheme, rest)) = text.split_once("://") else {
            return bad("an origin is scheme://host[:port], such as https://app.example");
        };
        let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !scheme_ok {
            return bad("the scheme is not valid");
        }
        if rest.contains(['/', '?', '#', '@']) || rest.contains(char::is_whitespace) {
            return bad("an origin has no path, query or user name: scheme://host[:port]");
        }
        let (host, port) = match rest.strip_prefix('[') {
            Some(v6) => {
                let Some((address, after)) = v6.split_once(']') else {
                    return bad("an IPv6 address needs its closing ]");
                };
                if address.parse::<Ipv6Addr>().is_err() {
                    return bad("not an IPv6 address in [ ]");
                }
                match after {
                    "" => (&rest[..address.len() + 2], None),
                    port => match port.strip_prefix(':') {
                        Some(port) => (&rest[..address.len() + 2], Some(port)),
                        None => return bad("only :port may follow the host"),
                    },
                }
            }
            None => {
                let (host, port) = match rest.split_once(':') {
                    Some((host, port)) => (host, Some(port)),
                    None => (rest, None),
                };
                if host.is_empty() || host.contains([':', '[', ']']) {
                    return bad("the host is not valid");
                }
                (host, port)
            }
        };
        let scheme = scheme.to_ascii_lowercase();
        let port = match port {
            Some(port) => match port.parse::<u16>() {
                Ok(port) => Some(port),
                Err(_) => return bad("the port is not a number from 0 to 65535"),
            },
            None => default_port(&scheme),
        };
        Ok(Origin {
            host: host.to_ascii_lowercase(),
            scheme,
            port,
        })
    }

    fn new(scheme: &str, host: String, port: u16) -> Origin {
        Origin {
            scheme: scheme.to_owned(),
            host,
            port: Some(port),
        }
    }
}

/// As a browser writes it: the port left out when it is the scheme's default.
impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.host)?;
        match self.port {
            Some(port) if Some(port) != default_port(&self.scheme) => write!(f, ":{port}"),
            _ => Ok(()),
        }
    }
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

/// How a host is written in an origin: an IPv6 address in brackets.
fn host_of(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// The origins a page served from `address` has: `http` and `https` for each name a browser
/// can reach it by without the operator saying so.
fn own_origins_of(address: SocketAddr) -> Vec<Origin> {
    let ip = address.ip();
    let mut hosts = match ip {
        // `[::]` takes IPv4 connections too (unless the host sets IPV6_V6ONLY).
        IpAddr::V4(v4) if v4.is_unspecified() => vec![host_of(Ipv4Addr::LOCALHOST.into())],
        IpAddr::V6(v6) if v6.is_unspecified() => vec![
            host_of(Ipv6Addr::LOCALHOST.into()),
            host_of(Ipv4Addr::LOCALHOST.into()),
        ],
        ip => vec![host_of(ip)],
    };
    if ip.is_loopback() || ip.is_unspecified() {
        hosts.push("localhost".to_owned());
    }
    hosts
        .into_iter()
        .flat_map(|host| {
            [
                Origin::new("http", host.clone(), address.port()),
                Origin::new("https", host, address.port()),
            ]
        })
        .collect()
}

impl Config {
    /// The gateway's own origins: `public_origins`, or the ones its `http` address implies.
    pub fn own_origins(&self) -> Vec<Origin> {
        if self.public_origins.is_empty() {
            own_origins_of(self.http)
        } else {
            // Each was checked by `validate`.
            self.public_origins
                .iter()
                .filter_map(|origin| Origin::parse(origin).ok())
                .collect()
        }
    }

    /// Whether a browser page whose `Origin` header is `origin` may open `/ws`. (A request
    /// without `Origin` comes from a program, not from a page, and is let in by the caller.)
    pub fn allows_origin(&self, origin: &str) -> bool {
        let allowed = &self.ws_allowed_origins;
        if allowed
            .iter()
            .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
        {
            return true;
        }
        let Ok(origin) = Origin::parse(origin) else {
            return false;
        };
        let listed = allowed.iter().filter_map(|a| Origin::parse(a).ok());
        self.own_origins()
            .into_iter()
            .chain(listed)
            .any(|o| o == origin)
    }

    /// Checks `public_origins` and `ws_allowed_origins` (which may also hold `*` and `null`).
    pub(super) fn validate_origins(&self) -> Result<(), String> {
        for origin in &self.public_origins {
            Origin::parse(origin).map_err(|why| format!("public_origins: {why}"))?;
        }
        for origin in &self.ws_allowed_origins {
            if origin != "*" && origin != "null" {
                Origin::parse(origin).map_err(|why| format!("ws_allowed_origins: {why}"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(http: &str, public: &[&str], allowed: &[&str]) -> Config {
        Config {
            http: http.parse().unwrap(),
            public_origins: public.iter().map(|s| s.to_string()).collect(),
            ws_allowed_origins: allowed.iter().map(|s| s.to_string()).collect(),
            ..Config::default()
        }
    }

    fn shown(origins: Vec<Origin>) -> Vec<String> {
        origins.iter().map(Origin::to_string).collect()
    }

    #[test]
    fn origins_compare_by_scheme_host_and_port_without_regard_to_case_or_default_ports() {
        let origin = Origin::parse("HTTP://Example.COM").unwrap();
        assert_eq!(origin, Origin::parse("http://example.com:80").unwrap());
        assert_ne!(origin, Origin::parse("https://example.com").unwrap());
        assert_ne!(origin, Origin::parse("http://example.com:8080").unwrap());
        assert_eq!(
            Origin::parse("https://[::1]:443").unwrap().to_string(),
            "https://[::1]"
        );
        assert_eq!(
            Origin::parse("ftp://127.0.0.1:8080").unwrap().to_string(),
            "ftp://127.0.0.1:8080"
        );
    }

    #[test]
    fn what_is_not_an_origin_is_refused() {
        for text in [
            "null",
            "example.com",
            "http://",
            "http://example.com/",
            "http://example.com/page",
            "http://user@example.com",
            "http://example.com:99999",
            "http://example.com:",
            "http://[::1",
            "http://[nonsense]:80",
            "http://a:b:c",
            "1http://example.com",
            "http://exa mple.com",
        ] {
            assert!(Origin::parse(text).is_err(), "{text}");
        }
    }

    #[test]
    fn the_own_origins_come_from_the_listen_address_never_from_a_request() {
        assert_eq!(
            shown(config("127.0.0.1:8080", &[], &[]).own_origins()),
            [
                "http://127.0.0.1:8080",
                "https://127.0.0.1:8080",
                "http://localhost:8080",
                "https://localhost:8080"
            ]
        );
        assert_eq!(
            shown(config("[::1]:80", &[], &[]).own_origins()),
            [
                "http://[::1]",
                "https://[::1]:80",
                "http://localhost",
                "https://localhost:80"
            ]
        );
        assert_eq!(
            shown(config("0.0.0.0:8080", &[], &[]).own_origins()),
            [
                "http://127.0.0.1:8080",
                "https://127.0.0.1:8080",
                "http://localhost:8080",
                "https://localhost:8080"
            ],
            "an unspecified address stands for its loopback forms"
        );
        assert_eq!(
            shown(config("[::]:8080", &[], &[]).own_origins()).len(),
            6,
            "[::1], 127.0.0.1 and localhost"
        );
        assert_eq!(
            shown(config("10.0.0.5:8080", &[], &[]).own_origins()),
            ["http://10.0.0.5:8080", "https://10.0.0.5:8080"],
            "localhost:8080 would be another socket"
        );
        assert_eq!(
            shown(config("0.0.0.0:8080", &["https://gw.example"], &[]).own_origins()),
            ["https://gw.example"],
            "public_origins replaces the defaults"
        );
    }

    #[test]
    fn a_dns_rebinding_page_or_another_scheme_is_not_the_gateway_s_own() {
        let config = config("127.0.0.1:8080", &[], &[]);
        assert!(config.allows_origin("http://127.0.0.1:8080"));
        assert!(config.allows_origin("http://LOCALHOST:8080"));
        assert!(config.allows_origin("https://localhost:8080"));
        assert!(!config.allows_origin("http://evil.example:8080"));
        assert!(!config.allows_origin("ftp://127.0.0.1:8080"));
        assert!(!config.allows_origin("ws://127.0.0.1:8080"));
        assert!(!config.allows_origin("http://127.0.0.1:8081"));
        assert!(!config.allows_origin("http://127.0.0.1"));
        assert!(!config.allows_origin("null"));
        assert!(!config.allows_origin("http://127.0.0.1:8080/"));
    }

    #[test]
    fn allowed_origins_add_to_the_own_ones_and_star_allows_any() {
        let config = config(
            "127.0.0.1:8080",
            &["https://gw.example"],
            &["https://app.example:443", "null"],
        );
        assert!(config.allows_origin("https://gw.example"));
        assert!(config.allows_origin("https://app.example"));
        assert!(config.allows_origin("null"));
        assert!(!config.allows_origin("http://app.example"));
        assert!(
            !config.allows_origin("http://127.0.0.1:8080"),
            "public_origins replaced the defaults"
        );
        let any = self::config("127.0.0.1:8080", &[], &["*"]);
        assert!(any.allows_origin("http://evil.example:8080"));
    }

    #[test]
    fn listed_origins_are_checked_at_start() {
        assert!(
            config("127.0.0.1:8080", &[], &["*", "null"])
                .validate()
                .is_ok()
        );
        let err = config("127.0.0.1:8080", &["gw.example"], &[])
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("public_origins"), "{err}");
        let err = config("127.0.0.1:8080", &["*"], &[])
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("public_origins"), "{err}");
        let err = config("127.0.0.1:8080", &[], &["https://app.example/"])
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("ws_allowed_origins"), "{err}");
    }
}
