//! Message headers as the wire carries them, and the one place they are validated. Every
//! front-end builds `Headers` through `append`, so a header that NATS could not carry (a name
//! with a colon, space or control character; a value with a line break) is the same
//! `BAD_REQUEST` whichever wire it came on. So is a name only the gateway may set
//! (`Ipc-Gateway-*`, any case: the caller's identity, stamped by the core with
//! `append_trusted`). Names keep their case and their order of first appearance; a name may
//! have several values.

use super::error::GatewayError;
use super::identity::{RESERVED_HEADER_PREFIX, is_reserved_header};

/// Why a header was refused; the caller words the message for its wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// Empty, or not printable ASCII, or contains ':'.
    Name,
    /// Contains a line break.
    Value,
    /// Starts with `Ipc-Gateway-` (any case): only the gateway sets those.
    Reserved,
}

impl HeaderError {
    /// The `BAD_REQUEST` every wire gives for this header.
    pub fn to_error(self, name: &str) -> GatewayError {
        GatewayError::bad_request(match self {
            HeaderError::Name => format!("header name {name:?} is not valid"),
            HeaderError::Value => format!("header {name:?} has a value with a line break"),
            HeaderError::Reserved => {
                format!(
                    "header names starting with {RESERVED_HEADER_PREFIX} are set by the gateway only"
                )
            }
        })
    }
}

/// Checks a header name: printable ASCII without ':' (what a NATS header line allows).
pub fn check_name(name: &str) -> Result<(), HeaderError> {
    let valid = !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
    if valid {
        Ok(())
    } else {
        Err(HeaderError::Name)
    }
}

/// Checks a header value: anything but a line break.
pub fn check_value(value: &str) -> Result<(), HeaderError> {
    if value.contains(['\r', '\n']) {
        Err(HeaderError::Value)
    } else {
        Ok(())
    }
}

/// One header name and its values, in the order they were added.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    name: String,
    values: Vec<String>,
}

/// Validated headers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Headers {
    entries: Vec<Entry>,
}

impl Headers {
    pub fn new() -> Self {
        Headers::default()
    }

    /// Adds one value a client sent under `name` after checking both; a name only the gateway
    /// may set (`Ipc-Gateway-*`) is refused too.
    pub fn append(
        &mut self,
        name: impl AsRef<str> + Into<String>,
        value: impl Into<String>,
    ) -> Result<(), GatewayError> {
        if is_reserved_header(name.as_ref()) {
            return Err(HeaderError::Reserved.to_error(name.as_ref()));
        }
        self.append_from_gateway(name, value)
    }

    /// Adds one value the gateway sent (a client reading its frames): checked like `append`,
    /// but `Ipc-Gateway-*` names are let through, since a service's reply may carry them.
    pub fn append_from_gateway(
        &mut self,
        name: impl AsRef<str> + Into<String>,
        value: impl Into<String>,
    ) -> Result<(), GatewayError> {
        let value = value.into();
        check_name(name.as_ref())
            .and_then(|()| check_value(&value))
            .map_err(|error| error.to_error(name.as_ref()))?;
        self.push(name, value);
        Ok(())
    }

    /// Adds a header without checking it: one that came from NATS (which already parsed it),
    /// or one the gateway sets itself (the caller's `Ipc-Gateway-*` identity headers).
    pub fn append_trusted(&mut self, name: impl AsRef<str> + Into<String>, value: String) {
        self.push(name, value);
    }

    /// Sets `name` (exact case) to this one value, unchecked like `append_trusted`: the
    /// gateway's own `traceparent` on a reply.
    pub fn replace_trusted(&mut self, name: &str, value: String) {
        match self.entries.iter_mut().find(|e| e.name == name) {
            Some(entry) => entry.values = vec![value],
            None => self.entries.push(Entry {
                name: name.to_owned(),
                values: vec![value],
            }),
        }
    }

    fn push(&mut self, name: impl AsRef<str> + Into<String>, value: String) {
        match self.entries.iter_mut().find(|e| e.name == name.as_ref()) {
            Some(entry) => entry.values.push(value),
            None => self.entries.push(Entry {
                name: name.into(),
                values: vec![value],
            }),
        }
    }

    /// Each name with its values.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[String])> {
        self.entries
            .iter()
            .map(|e| (e.name.as_str(), e.values.as_slice()))
    }

    /// Every (name, value) pair, a name repeated for each of its values.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries
            .iter()
            .flat_map(|e| e.values.iter().map(move |v| (e.name.as_str(), v.as_str())))
    }

    /// The first value of `name` (exact case).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .and_then(|e| e.values.first())
            .map(String::as_str)
    }

    /// How many (name, value) pairs there are.
    pub fn len(&self) -> usize {
        self.entries.iter().map(|e| e.values.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_values_are_checked_once_for_every_wire() {
        let mut headers = Headers::new();
        assert!(headers.append("X-Trace", "abc").is_ok());
        assert!(headers.append("X-Trace", "def").is_ok());
        for bad in ["", "a b", "a:b", "é", "a\tb"] {
            let error = headers.append(bad, "v").unwrap_err();
            assert!(error.message.contains("header name"), "{bad:?}: {error}");
        }
        let error = headers.append("ok", "line\nbreak").unwrap_err();
        assert!(error.message.contains("line break"), "{error}");
        assert_eq!(headers.len(), 2, "refused headers are not kept");
        let pairs: Vec<_> = headers.pairs().collect();
        assert_eq!(pairs, [("X-Trace", "abc"), ("X-Trace", "def")]);
        assert_eq!(headers.get("X-Trace"), Some("abc"));
        assert_eq!(headers.get("x-trace"), None, "names keep their case");
    }

    #[test]
    fn a_client_can_never_set_a_gateway_header() {
        let mut headers = Headers::new();
        for name in ["ipc-gateway-uid", "Ipc-Gateway-Identity", "IPC-GATEWAY-SUB"] {
            let error = headers.append(name, "0").unwrap_err();
            assert_eq!(error.code, crate::protocol::ErrorCode::BadRequest);
            assert_eq!(
                error.message,
                "header names starting with Ipc-Gateway- are set by the gateway only"
            );
        }
        assert!(headers.is_empty(), "refused headers are not kept");
        headers.append("X-Ipc-Gateway-Uid", "0").unwrap();
        headers.append_trusted("Ipc-Gateway-Uid", "1001".into());
        headers
            .append_from_gateway("Ipc-Gateway-User", "alice")
            .unwrap();
        let error = headers
            .append_from_gateway("Ipc-Gateway-Pid", "1\n2")
            .unwrap_err();
        assert!(error.message.contains("line break"), "{error}");
        assert_eq!(headers.get("Ipc-Gateway-Uid"), Some("1001"));
        assert_eq!(headers.get("Ipc-Gateway-User"), Some("alice"));
        assert_eq!(headers.len(), 3);
    }

    #[test]
    fn names_keep_their_first_order() {
        let mut headers = Headers::new();
        for (name, value) in [("b", "1"), ("a", "2"), ("b", "3")] {
            headers.append(name, value).unwrap();
        }
        let names: Vec<_> = headers
            .iter()
            .map(|(name, values)| (name, values.len()))
            .collect();
        assert_eq!(names, [("b", 2), ("a", 1)]);
    }
}
