//! JSON strings written the way serde_json writes them (the same escapes, byte for byte), but a
//! word at a time: eight bytes are checked per step, and a run with nothing to escape is copied
//! whole. serde_json looks up every byte in a table; for a 4 KiB text payload, written into
//! every JSON reply and message, that was most of what JSON lines cost over binary frames.

use bytes::{BufMut, BytesMut};

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Appends `text` as a JSON string, quotes included.
pub(super) fn put_str(out: &mut BytesMut, text: &str) {
    put_escaped(out, text.as_bytes(), true);
}

/// Appends `bytes` as a JSON string when they are UTF-8, and says whether they were (when not,
/// nothing is appended). Checking and escaping is one pass: a word of ASCII with nothing to
/// escape passes both tests at once.
pub(super) fn put_utf8(out: &mut BytesMut, bytes: &[u8]) -> bool {
    put_escaped(out, bytes, false)
}

/// `valid`: `bytes` is known to be UTF-8.
fn put_escaped(out: &mut BytesMut, bytes: &[u8], mut valid: bool) -> bool {
    let start = out.len();
    out.reserve(bytes.len() + 2);
    out.put_u8(b'"');
    // Until the first byte that is not ASCII, words must be ASCII too; from there on, the rest
    // was checked whole.
    let mut word_must_not_have = if valid { 0 } else { HIGHS };
    let mut run = 0;
    let mut at = 0;
    while at < bytes.len() {
        if let Some(word) = bytes
            .get(at..at + 8)
            .and_then(|w| <[u8; 8]>::try_from(w).ok())
        {
            let word = u64::from_le_bytes(word);
            if word & word_must_not_have == 0 && !any_to_escape(word) {
                at += 8;
                continue;
            }
        }
        let byte = bytes[at];
        if !valid && !byte.is_ascii() {
            if std::str::from_utf8(&bytes[at..]).is_err() {
                out.truncate(start);
                return false;
            }
            valid = true;
            word_must_not_have = 0;
        }
        if let Some(escape) = escape(byte) {
            out.extend_from_slice(&bytes[run..at]);
            escape.put(out);
            run = at + 1;
        }
        at += 1;
    }
    out.extend_from_slice(&bytes[run..]);
    out.put_u8(b'"');
    true
}

/// Whether any of the eight bytes is a control character, `"` or `\`.
fn any_to_escape(word: u64) -> bool {
    to_escape(word) != 0
}

/// The high bit of each of the eight bytes (little-endian) that is a control character, `"` or
/// `\`, and maybe of some bytes after the first of them: the classic "has a byte less than n"
/// and "has a zero byte" tricks (n ≤ 128) are exact as a yes/no and for the lowest byte they
/// mark, so `trailing_zeros() / 8` is where the first such byte is.
pub(super) fn to_escape(word: u64) -> u64 {
    let below_space = word.wrapping_sub(ONES * 0x20) & !word;
    let quote = word ^ (ONES * u64::from(b'"'));
    let backslash = word ^ (ONES * u64::from(b'\\'));
    let zero_in = |v: u64| v.wrapping_sub(ONES) & !v;
    (below_space | zero_in(quote) | zero_in(backslash)) & HIGHS
}

enum Escape {
    Short(u8),
    Unicode(u8),
}

impl Escape {
    fn put(self, out: &mut BytesMut) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        match self {
            Escape::Short(letter) => out.extend_from_slice(&[b'\\', letter]),
            Escape::Unicode(byte) => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 0xf)],
            ]),
        }
    }
}

/// serde_json's escapes: the short forms where JSON has one, `\u00xx` for other controls.
fn escape(byte: u8) -> Option<Escape> {
    Some(match byte {
        b'"' => Escape::Short(b'"'),
        b'\\' => Escape::Short(b'\\'),
        0x08 => Escape::Short(b'b'),
        b'\t' => Escape::Short(b't'),
        b'\n' => Escape::Short(b'n'),
        0x0c => Escape::Short(b'f'),
        b'\r' => Escape::Short(b'r'),
        0x00..=0x1f => Escape::Unicode(byte),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn written(text: &str) -> String {
        let mut out = BytesMut::new();
        put_str(&mut out, text);
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn every_character_that_needs_escaping_is_escaped_as_serde_json_does() {
        for byte in 0u8..=0x7f {
            let one = char::from(byte).to_string();
            assert_eq!(
                written(&one),
                serde_json::to_string(&one).unwrap(),
                "{byte:#x}"
            );
            // At every position of a word, and across a word's edge.
            for at in [0, 3, 7, 8, 9, 15, 16, 17] {
                let text = format!("{}{one}{}", "a".repeat(at), "z".repeat(20 - at));
                assert_eq!(written(&text), serde_json::to_string(&text).unwrap());
            }
        }
    }

    #[test]
    fn clean_text_and_multibyte_characters_are_copied_whole() {
        for text in [
            "",
            "x",
            "abcdefgh",
            "abcdefghi",
            "Grüße, 世界 🦀 \u{7f}\u{80}\u{2028}",
            &"lorem ipsum ".repeat(400),
        ] {
            assert_eq!(written(text), serde_json::to_string(text).unwrap());
        }
    }

    #[test]
    fn a_word_test_says_yes_exactly_when_a_byte_needs_escaping() {
        for byte in 0u8..=0xff {
            for at in 0..8 {
                let mut word = [b'a'; 8];
                word[at] = byte;
                let expected = escape(byte).is_some();
                assert_eq!(
                    any_to_escape(u64::from_le_bytes(word)),
                    expected,
                    "{byte:#x} at {at}"
                );
            }
        }
        // Neighbours that could borrow into each other's test.
        for pair in [
            [0x00, 0x21],
            [0x21, 0x00],
            [0x80, 0x1f],
            [0xff, 0x22],
            [0x5d, 0x5c],
        ] {
            let mut word = [b'a'; 8];
            word[3..5].copy_from_slice(&pair);
            let expected = pair.iter().any(|&b| escape(b).is_some());
            assert_eq!(
                any_to_escape(u64::from_le_bytes(word)),
                expected,
                "{pair:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn the_lowest_byte_a_word_test_marks_is_the_first_to_escape(
            word in proptest::array::uniform8(prop_oneof![
                any::<u8>(),
                Just(b'"'),
                Just(b'\\'),
                Just(0x00u8),
                Just(0x1f),
                Just(0x20),
                Just(0x21),
            ])
        ) {
            let first = word.iter().position(|&b| escape(b).is_some()).unwrap_or(8);
            let marked = to_escape(u64::from_le_bytes(word));
            prop_assert_eq!((marked.trailing_zeros() / 8) as usize, first, "{:?}", word);
        }
    }

    #[test]
    fn bytes_are_written_as_text_only_when_they_are_utf8() {
        for text in [
            "",
            "plain",
            "a\"b\\c\nd",
            "Grüße 🦀",
            &"abc\u{1}é".repeat(50),
        ] {
            let mut out = BytesMut::from(&b"{"[..]);
            assert!(put_utf8(&mut out, text.as_bytes()));
            assert_eq!(out, format!("{{{}", serde_json::to_string(text).unwrap()));
        }
        for bytes in [
            &b"\xff"[..],
            b"abcdefgh\xc3",
            b"abcdefghijklmnop\x80",
            b"\xe2\x82",
            b"ok\n\xed\xa0\x80",
        ] {
            let mut out = BytesMut::from(&b"{"[..]);
            assert!(!put_utf8(&mut out, bytes), "{bytes:?}");
            assert_eq!(out, &b"{"[..], "nothing is left behind");
        }
    }

    proptest! {
        #[test]
        fn any_bytes_are_written_as_text_exactly_when_they_are_utf8(
            bytes in proptest::collection::vec(any::<u8>(), 0..40)
        ) {
            let mut out = BytesMut::new();
            let written_as_text = put_utf8(&mut out, &bytes);
            match std::str::from_utf8(&bytes) {
                Ok(text) => {
                    prop_assert!(written_as_text);
                    prop_assert_eq!(out, serde_json::to_string(text).unwrap());
                }
                Err(_) => {
                    prop_assert!(!written_as_text);
                    prop_assert!(out.is_empty());
                }
            }
        }

        #[test]
        fn any_text_is_written_as_serde_json_writes_it(text in any::<String>()) {
            prop_assert_eq!(written(&text), serde_json::to_string(&text).unwrap());
        }

        #[test]
        fn text_of_escapes_and_plain_bytes_is_written_as_serde_json_writes_it(
            text in "[\\x00-\\x25\\x5b-\\x5d a-z]{0,80}"
        ) {
            prop_assert_eq!(written(&text), serde_json::to_string(&text).unwrap());
        }
    }
}
