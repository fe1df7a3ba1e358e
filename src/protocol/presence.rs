//! What the wire says about a named client's presence: whether a name is held, and where
//! (`presence` answers and `presence_watch` events; docs/protocol.md, "Named clients").

use serde::{Deserialize, Serialize};

/// One name's presence. `online: false` carries only the name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceInfo {
    pub name: String,
    pub online: bool,
    /// The gateway the holder is connected to (its `gateway_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// `uds`, `ws` or `grpc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frontend: Option<String>,
    /// When the holder registered the name (RFC 3339, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected_at: Option<String>,
    /// The holder's identity in short form (`uid=1000(alice)`, `sub=bob`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

impl PresenceInfo {
    pub fn offline(name: &str) -> PresenceInfo {
        PresenceInfo {
            name: name.to_owned(),
            ..PresenceInfo::default()
        }
    }

    /// The fields as a JSON object's members without the braces (`"name":"bob","online":true`),
    /// to be spliced after an answer's `id` and `ok` or an event's `op` and `sid`.
    pub fn json_members(&self) -> String {
        let object = serde_json::to_string(self).unwrap_or_else(|_| "{}".into());
        object[1..object.len() - 1].to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_shows_only_the_name() {
        assert_eq!(
            PresenceInfo::offline("bob").json_members(),
            r#""name":"bob","online":false"#
        );
    }
}
