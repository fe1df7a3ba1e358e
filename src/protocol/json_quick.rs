//! The common JSON line read without serde: an object whose keys are among `op`, `id`,
//! `subject`, `timeout_ms` and `data`, each at most once, whose strings have nothing escaped and
//! whose numbers are plain unsigned integers. That is what the client library and most scripts
//! send for a request or a publish, and serde's derived reader spent about a fifth of a JSON
//! request's instructions on it (matching each key against twenty fields, skipping `data` once
//! as a raw value, then reading it again). Anything else gives `None`, and the line goes to
//! serde_json: what a line means, and every error's text, stay serde_json's. A property test in
//! `json.rs` holds the two readers to the same envelopes.

use std::sync::Arc;

use super::envelope::Id;
use super::json_text::next_stop;

/// The fields of a line this reader took.
#[derive(Debug, Default)]
pub(super) struct Fields<'a> {
    pub op: Option<&'a str>,
    pub id: Id,
    pub subject: Option<&'a str>,
    pub timeout_ms: Option<u32>,
    /// The JSON text of a string value, quotes included.
    pub data: Option<&'a str>,
}

/// Reads `line` if it is of the common shape (see the top of the file).
pub(super) fn read(line: &str) -> Option<Fields<'_>> {
    let mut reader = Reader {
        bytes: line.as_bytes(),
        at: 0,
    };
    let mut fields = Fields::default();
    reader.skip_space();
    reader.expect(b'{')?;
    reader.skip_space();
    if reader.peek() == Some(b'}') {
        reader.at += 1;
        return reader.only_space_left().then_some(fields);
    }
    loop {
        let key = reader.key()?;
        reader.skip_space();
        reader.expect(b':')?;
        reader.skip_space();
        // A key given twice goes to serde_json, which refuses it.
        let again = match key {
            Key::Op => fields.op.replace(reader.text(line)?).is_some(),
            Key::Subject => fields.subject.replace(reader.text(line)?).is_some(),
            Key::Data => {
                let (start, end) = reader.string()?;
                fields.data.replace(&line[start..end]).is_some()
            }
            Key::TimeoutMs => {
                let timeout = u32::try_from(reader.unsigned(10)?).ok()?;
                fields.timeout_ms.replace(timeout).is_some()
            }
            Key::Id => {
                // Never `null` here: a second id finds the first in place.
                let id = match reader.peek()? {
                    b'"' => Id::Text(Arc::from(reader.text(line)?)),
                    _ => Id::from(reader.unsigned(19)?),
                };
                !std::mem::replace(&mut fields.id, id).is_null()
            }
        };
        if again {
            return None;
        }
        reader.skip_space();
        match reader.next()? {
            b',' => reader.skip_space(),
            b'}' => return reader.only_space_left().then_some(fields),
            _ => return None,
        }
    }
}

/// The keys this reader takes.
#[derive(Clone, Copy)]
enum Key {
    Op,
    Id,
    Subject,
    Data,
    TimeoutMs,
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.at += 1;
        Some(byte)
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        (self.next()? == byte).then_some(())
    }

    /// JSON's whitespace, as serde_json reads it.
    fn skip_space(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\n' | b'\t' | b'\r')) {
            self.at += 1;
        }
    }

    fn only_space_left(&mut self) -> bool {
        self.skip_space();
        self.at == self.bytes.len()
    }

    /// One of the five keys, quotes included, compared whole: a key is taken only as one of
    /// these exact strings (with an escape in it, or any other key, the line is not taken).
    fn key(&mut self) -> Option<Key> {
        let (text, key): (&[u8], Key) = match self.bytes.get(self.at + 1)? {
            b'o' => (b"\"op\"", Key::Op),
            b'i' => (b"\"id\"", Key::Id),
            b's' => (b"\"subject\"", Key::Subject),
            b'd' => (b"\"data\"", Key::Data),
            b't' => (b"\"timeout_ms\"", Key::TimeoutMs),
            _ => return None,
        };
        if !self.bytes[self.at..].starts_with(text) {
            return None;
        }
        self.at += text.len();
        Some(key)
    }

    /// The contents of a string (see `string`) in `line`, the text this reader reads.
    fn text<'a>(&mut self, line: &'a str) -> Option<&'a str> {
        let (start, end) = self.string()?;
        Some(&line[start + 1..end - 1])
    }

    /// A string with nothing escaped and no control character: where its opening quote is,
    /// and one past its closing quote.
    fn string(&mut self) -> Option<(usize, usize)> {
        let start = self.at;
        self.expect(b'"')?;
        self.at = next_stop(self.bytes, self.at, false);
        match self.next()? {
            b'"' => Some((start, self.at)),
            _ => None,
        }
    }

    /// Digits without a leading zero (JSON's integers), at most `most` of them, not followed
    /// by a fraction or an exponent.
    fn unsigned(&mut self, most: usize) -> Option<u64> {
        let start = self.at;
        let mut value: u64 = 0;
        while let Some(digit @ b'0'..=b'9') = self.peek() {
            // Wrapping: a number with too many digits is refused below.
            value = value.wrapping_mul(10).wrapping_add(u64::from(digit - b'0'));
            self.at += 1;
        }
        let digits = self.at - start;
        let leading_zero = digits > 1 && self.bytes[start] == b'0';
        if digits == 0 || digits > most || leading_zero {
            return None;
        }
        match self.peek() {
            Some(b'.' | b'e' | b'E') => None,
            _ => Some(value),
        }
    }
}
