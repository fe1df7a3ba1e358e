//! JSON strings written the way serde_json writes them (the same escapes, byte for byte), but
//! sixteen bytes at a time: a run with nothing to escape is found with a few vector
//! instructions and copied whole, where serde_json looks up every byte in a table. For a 4 KiB
//! text payload, written into every JSON reply and message, that was most of what JSON lines
//! cost over binary frames. `next_stop` also finds the end of a string for `json_quick`.

use bytes::{BufMut, BytesMut};

/// Appends `text` as a JSON string, quotes included.
pub(super) fn put_str(out: &mut BytesMut, text: &str) {
    put_escaped(out, text.as_bytes(), true);
}

/// Appends `bytes` as a JSON string when they are UTF-8, and says whether they were (when not,
/// nothing is appended). Checking and escaping is one pass: a run of ASCII with nothing to
/// escape passes both tests at once.
pub(super) fn put_utf8(out: &mut BytesMut, bytes: &[u8]) -> bool {
    put_escaped(out, bytes, false)
}

/// `valid`: `bytes` is known to be UTF-8.
fn put_escaped(out: &mut BytesMut, bytes: &[u8], mut valid: bool) -> bool {
    let start = out.len();
    out.reserve(bytes.len() + 2);
    out.put_u8(b'"');
    // Until the first byte that is not ASCII, that is a stop too; from there on, the rest was
    // checked whole.
    let mut run = 0;
    let mut at = next_stop(bytes, 0, !valid);
    while at < bytes.len() {
        let byte = bytes[at];
        if let Some(escape) = escape(byte) {
            out.extend_from_slice(&bytes[run..at]);
            escape.put(out);
            run = at + 1;
        } else {
            // Not ASCII, and not yet known to be UTF-8 (what is before it is ASCII).
            if std::str::from_utf8(&bytes[at..]).is_err() {
                out.truncate(start);
                return false;
            }
            valid = true;
        }
        at = next_stop(bytes, at + 1, !valid);
    }
    out.extend_from_slice(&bytes[run..]);
    out.put_u8(b'"');
    true
}

/// Where the first byte at or after `from` (at most `bytes.len()`) is a control character,
/// `"` or `\`, or, with `non_ascii`, a byte that is not ASCII; `bytes.len()` when none is.
pub(super) fn next_stop(bytes: &[u8], from: usize, non_ascii: bool) -> usize {
    let mut at = from;
    let stops = |marks: Marks| marks.escape | if non_ascii { marks.non_ascii } else { 0 };
    while let Some(chunk) = bytes.get(at..at + 16) {
        let found = stops(marks(chunk.try_into().expect("sixteen bytes")));
        if found != 0 {
            return at + found.trailing_zeros() as usize;
        }
        at += 16;
    }
    let rest = &bytes[at..];
    if rest.is_empty() {
        return bytes.len();
    }
    let found = if let Some(last) = bytes.len().checked_sub(16) {
        // The last sixteen bytes, whose first `at - last` were looked at already.
        let chunk = bytes[last..].try_into().expect("sixteen bytes");
        stops(marks(chunk)) >> (at - last)
    } else {
        // A space is never a stop.
        let mut chunk = [b' '; 16];
        chunk[..rest.len()].copy_from_slice(rest);
        stops(marks(&chunk))
    };
    if found != 0 {
        at + found.trailing_zeros() as usize
    } else {
        bytes.len()
    }
}

/// Bit `i` of each field is about byte `i` of sixteen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Marks {
    /// A control character, `"` or `\`: what a JSON string holds only escaped.
    escape: u32,
    non_ascii: u32,
}

#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
fn marks(chunk: &[u8; 16]) -> Marks {
    use std::arch::x86_64::{
        _mm_cmpeq_epi8, _mm_loadu_si128, _mm_min_epu8, _mm_movemask_epi8, _mm_or_si128,
        _mm_set1_epi8,
    };
    // SAFETY: this build enables SSE2 (the cfg above; every x86_64 CPU has it), and the load
    // reads the sixteen bytes of `chunk`, which need no alignment.
    unsafe {
        let bytes = _mm_loadu_si128(chunk.as_ptr().cast());
        let quote = _mm_cmpeq_epi8(bytes, _mm_set1_epi8(b'"' as i8));
        let backslash = _mm_cmpeq_epi8(bytes, _mm_set1_epi8(b'\\' as i8));
        // Unsigned: min(b, 0x1f) == b exactly when b <= 0x1f.
        let control = _mm_cmpeq_epi8(_mm_min_epu8(bytes, _mm_set1_epi8(0x1f)), bytes);
        let escape = _mm_or_si128(_mm_or_si128(quote, backslash), control);
        Marks {
            escape: _mm_movemask_epi8(escape) as u32,
            non_ascii: _mm_movemask_epi8(bytes) as u32,
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
use marks_portable as marks;

/// The same marks a byte at a time, where there is no SSE2 (and for the tests).
#[cfg_attr(all(target_arch = "x86_64", target_feature = "sse2"), allow(dead_code))]
fn marks_portable(chunk: &[u8; 16]) -> Marks {
    let mut marks = Marks {
        escape: 0,
        non_ascii: 0,
    };
    for (i, &byte) in chunk.iter().enumerate() {
        marks.escape |= u32::from(escape(byte).is_some()) << i;
        marks.non_ascii |= u32::from(!byte.is_ascii()) << i;
    }
    marks
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
            // At every position of a chunk, and across a chunk's edge.
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

    /// Where `next_stop` should stop, a byte at a time.
    fn first_stop(bytes: &[u8], from: usize, non_ascii: bool) -> usize {
        bytes[from..]
            .iter()
            .position(|&b| escape(b).is_some() || (non_ascii && !b.is_ascii()))
            .map_or(bytes.len(), |at| from + at)
    }

    #[test]
    fn every_byte_is_marked_as_the_portable_marks_say_at_every_position() {
        for byte in 0u8..=0xff {
            for at in 0..16 {
                let mut chunk = [b'a'; 16];
                chunk[at] = byte;
                let marks = marks(&chunk);
                assert_eq!(marks, marks_portable(&chunk), "{byte:#x} at {at}");
                assert_eq!(marks.escape != 0, escape(byte).is_some(), "{byte:#x}");
                assert_eq!(marks.non_ascii != 0, !byte.is_ascii(), "{byte:#x}");
            }
        }
    }

    #[test]
    fn a_stop_is_found_at_every_position_in_short_and_long_text() {
        for len in [0, 1, 7, 15, 16, 17, 31, 32, 33, 40] {
            for stop_at in 0..len {
                for (byte, non_ascii) in [(b'"', false), (0x1f, false), (0xc3, true)] {
                    let mut bytes = vec![b'x'; len];
                    bytes[stop_at] = byte;
                    for from in [0, stop_at / 2, stop_at, stop_at + 1, len] {
                        let from = from.min(len);
                        assert_eq!(
                            next_stop(&bytes, from, non_ascii),
                            first_stop(&bytes, from, non_ascii),
                            "len {len}, {byte:#x} at {stop_at}, from {from}"
                        );
                    }
                    // A byte that is not ASCII is no stop unless asked for.
                    if non_ascii {
                        assert_eq!(next_stop(&bytes, 0, false), len);
                    }
                }
            }
        }
    }

    proptest! {
        #[test]
        fn the_marks_are_the_portable_marks(
            chunk in proptest::array::uniform16(any::<u8>())
        ) {
            prop_assert_eq!(marks(&chunk), marks_portable(&chunk));
        }

        #[test]
        fn next_stop_finds_the_first_stop(
            bytes in proptest::collection::vec(prop_oneof![
                4 => Just(b'a'),
                1 => any::<u8>(),
                1 => Just(b'"'),
                1 => Just(b'\\'),
                1 => Just(0x1fu8),
                1 => Just(0x20u8),
                1 => Just(0x80u8),
            ], 0..70),
            from in 0usize..70,
            non_ascii in any::<bool>(),
        ) {
            let from = from.min(bytes.len());
            prop_assert_eq!(
                next_stop(&bytes, from, non_ascii),
                first_stop(&bytes, from, non_ascii)
            );
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
