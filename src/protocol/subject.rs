//! Subjects as the wire carries them, and their validation: a `Subject` is UTF-8 text held in
//! `Bytes` (a slice of the read buffer where the codec could manage it), and `validate_subject`
//! gives every front-end the same clear `BAD_REQUEST` before anything reaches NATS.

use std::fmt;
use std::ops::Deref;

use bytes::Bytes;

use super::error::GatewayError;

/// A subject (or reply subject): UTF-8 text, cheap to clone. Whether it is a valid subject for
/// a given use is `validate_subject`'s question, asked by the core.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subject(Bytes);

impl Subject {
    /// Takes bytes that must be UTF-8 (without copying them).
    pub fn from_utf8(bytes: Bytes) -> Result<Subject, GatewayError> {
        // Subjects are nearly always ASCII, checked in a few instructions; std's UTF-8 check
        // costs about a hundred for a short subject.
        if bytes.is_ascii() || std::str::from_utf8(&bytes).is_ok() {
            Ok(Subject(bytes))
        } else {
            Err(GatewayError::bad_request("subject is not UTF-8"))
        }
    }

    pub const fn from_static(text: &'static str) -> Subject {
        Subject(Bytes::from_static(text.as_bytes()))
    }

    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor checked or was given UTF-8.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    /// The text's bytes, shared (no copy).
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// The same subject in an allocation of its own, for one that is kept long (a
    /// subscription's): a slice would keep the whole buffer it was read into alive with it.
    pub fn detached(&self) -> Subject {
        Subject(Bytes::copy_from_slice(&self.0))
    }
}

impl Deref for Subject {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Subject {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl From<String> for Subject {
    fn from(text: String) -> Self {
        Subject(Bytes::from(text))
    }
}

impl From<&str> for Subject {
    fn from(text: &str) -> Self {
        Subject(Bytes::copy_from_slice(text.as_bytes()))
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// The longest subject the gateway accepts; NATS itself has no hard limit, but a subject is
/// sent with every message and a megabyte-long one is always a mistake.
pub const MAX_SUBJECT_BYTES: usize = 1024;

/// Whether wildcards (`*`, `>`) may appear: only subscriptions may use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectUse {
    Publish,
    Subscribe,
}

/// Checks a subject: non-empty dot-separated tokens, no white space or control characters, and
/// wildcards only as whole tokens of a subscription (`>` last).
pub fn validate_subject(subject: &str, usage: SubjectUse) -> Result<(), GatewayError> {
    if subject.len() <= MAX_SUBJECT_BYTES && is_plain(subject.as_bytes()) {
        return Ok(());
    }
    if subject.is_empty() {
        return Err(GatewayError::bad_request("subject is empty"));
    }
    if subject.len() > MAX_SUBJECT_BYTES {
        return Err(GatewayError::bad_request(format!(
            "subject is {} bytes, the limit is {MAX_SUBJECT_BYTES}",
            subject.len()
        )));
    }
    if let Some(bad) = subject
        .chars()
        .find(|c| c.is_whitespace() || c.is_control())
    {
        return Err(GatewayError::bad_request(format!(
            "subject {subject:?} contains {bad:?}; subjects have no white space"
        )));
    }
    let token_count = subject.split('.').count();
    for (index, token) in subject.split('.').enumerate() {
        if token.is_empty() {
            return Err(GatewayError::bad_request(format!(
                "subject {subject:?} has an empty token"
            )));
        }
        let is_wildcard = token == "*" || token == ">";
        let has_wildcard_char = token.contains(['*', '>']);
        match usage {
            SubjectUse::Publish if has_wildcard_char => {
                return Err(GatewayError::bad_request(format!(
                    "subject {subject:?} has a wildcard; only subscriptions may use wildcards"
                )));
            }
            SubjectUse::Subscribe if has_wildcard_char && !is_wildcard => {
                return Err(GatewayError::bad_request(format!(
                    "subject {subject:?}: a wildcard must be a whole token"
                )));
            }
            SubjectUse::Subscribe if token == ">" && index + 1 != token_count => {
                return Err(GatewayError::bad_request(format!(
                    "subject {subject:?}: '>' may only be the last token"
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Checks a queue group name: one token, no white space, no wildcards.
/// The common case, checked in one pass over the bytes: printable ASCII tokens without
/// wildcard characters, separated by single dots. Valid for every use; anything else takes the
/// full check, which says what is wrong.
fn is_plain(bytes: &[u8]) -> bool {
    // A leading dot would be an empty first token.
    let mut after_dot = true;
    for &byte in bytes {
        match byte {
            b'.' if after_dot => return false,
            b'.' => after_dot = true,
            b'*' | b'>' => return false,
            b'!'..=b'~' => after_dot = false,
            _ => return false,
        }
    }
    !after_dot
}

pub fn validate_queue_group(queue: &str) -> Result<(), GatewayError> {
    let valid = !queue.is_empty()
        && queue.len() <= MAX_SUBJECT_BYTES
        && !queue
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '*' || c == '>');
    if valid {
        Ok(())
    } else {
        Err(GatewayError::bad_request(format!(
            "queue group {queue:?} is not valid: one word, no white space or wildcards"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_detached_subject_keeps_nothing_of_the_buffer_it_was_read_into() {
        let read = Bytes::from(br#"{"op":"subscribe","subject":"own.7"}"#.to_vec());
        let subject = Subject::from_utf8(read.slice(29..34)).unwrap();
        assert_eq!(subject.as_bytes().as_ptr(), read[29..].as_ptr(), "a slice");
        let detached = subject.detached();
        assert_eq!(detached, subject);
        let range = read.as_ptr_range();
        assert!(!range.contains(&detached.as_bytes().as_ptr()), "a copy");
    }

    #[test]
    fn bytes_become_a_subject_exactly_when_they_are_utf8() {
        for text in ["demo.echo", "", "grüße.世界", "a.🦀"] {
            let subject = Subject::from_utf8(Bytes::from(text)).unwrap();
            assert_eq!(subject.as_str(), text);
        }
        for bytes in [&b"a.\xff"[..], b"\xc3", b"ok.\xed\xa0\x80", b"\x80abc"] {
            let err = Subject::from_utf8(Bytes::from(bytes)).unwrap_err();
            assert_eq!(
                err.code,
                crate::protocol::ErrorCode::BadRequest,
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn accepts_plain_subjects_everywhere() {
        for subject in ["demo.echo", "a", "svc.orders.create", "_INBOX.x1"] {
            assert!(
                validate_subject(subject, SubjectUse::Publish).is_ok(),
                "{subject}"
            );
            assert!(
                validate_subject(subject, SubjectUse::Subscribe).is_ok(),
                "{subject}"
            );
        }
    }

    #[test]
    fn rejects_malformed_subjects() {
        for subject in ["", "a b", "a..b", ".a", "a.", "a\tb", "a\nb"] {
            assert!(
                validate_subject(subject, SubjectUse::Subscribe).is_err(),
                "{subject:?}"
            );
        }
        assert!(validate_subject(&"a".repeat(MAX_SUBJECT_BYTES + 1), SubjectUse::Publish).is_err());
    }

    #[test]
    fn wildcards_only_in_subscriptions_and_only_whole() {
        assert!(validate_subject("a.*", SubjectUse::Publish).is_err());
        assert!(validate_subject("a.>", SubjectUse::Publish).is_err());
        assert!(validate_subject("a.*.c", SubjectUse::Subscribe).is_ok());
        assert!(validate_subject("a.>", SubjectUse::Subscribe).is_ok());
        assert!(validate_subject(">", SubjectUse::Subscribe).is_ok());
        assert!(validate_subject("a.>.c", SubjectUse::Subscribe).is_err());
        assert!(validate_subject("a.b*", SubjectUse::Subscribe).is_err());
    }

    #[test]
    fn queue_groups_are_single_words() {
        assert!(validate_queue_group("workers").is_ok());
        assert!(validate_queue_group("").is_err());
        assert!(validate_queue_group("a b").is_err());
        assert!(validate_queue_group("a*").is_err());
    }
}
