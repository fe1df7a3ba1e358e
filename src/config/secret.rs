//! A setting whose value is a secret (the NATS token and password): the gateway uses it and
//! never shows it. Its `Debug`, `Display` and serialized form are `***`, so a log line, an
//! error, `check-config` or anything that prints a `Config` shows that a value is set, never
//! the value; only `expose` gives the text, to the one place that sends it to NATS.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a secret is shown as, wherever it is shown.
pub const REDACTED: &str = "***";

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: impl Into<String>) -> Secret {
        Secret(text.into())
    }

    /// The secret's text, to send to NATS and nowhere else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

/// Text, or what an environment variable's text is parsed into (a token of digits arrives as a
/// number, `true` as a boolean): taken as the text it was. Nothing else is accepted, and the
/// refusal does not repeat the value.
impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Secret, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = Secret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("text")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Secret, E> {
                Ok(Secret::new(text))
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Secret, E> {
                Ok(Secret::new(n.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Secret, E> {
                Ok(Secret::new(n.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Secret, E> {
                Err(E::custom("a secret must be text: put it in quotes"))
            }
            fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<Secret, E> {
                Ok(Secret::new(b.to_string()))
            }
        }
        deserializer.deserialize_any(Text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_shown_as_stars_everywhere_but_expose() {
        let secret = Secret::new("s3cr3t-value");
        assert_eq!(format!("{secret:?}"), "***");
        assert_eq!(format!("{secret}"), "***");
        assert_eq!(format!("{:?}", Some(&secret)), "Some(***)");
        assert_eq!(serde_json::to_string(&secret).unwrap(), "\"***\"");
        assert_eq!(secret.expose(), "s3cr3t-value");
        let read: Secret = serde_json::from_str("\"s3cr3t-value\"").unwrap();
        assert_eq!(read, secret);
        let digits: Secret = serde_json::from_str("12345").unwrap();
        assert_eq!(digits.expose(), "12345");
        let err = serde_json::from_str::<Secret>("1.5")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("1.5"), "{err}");
    }
}
