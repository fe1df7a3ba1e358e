//! The form of a request's reply subject, `<prefix><token>_<nonce>`: the connection's random
//! inbox prefix, the request's token in decimal, and its 64-bit nonce as sixteen lowercase hex
//! digits. Written for every request and read for every reply, so the nonce is turned into hex
//! and back eight digits at a time, in a few word operations (parsing it with
//! `u64::from_str_radix` was a loop of sixteen steps: 3 % of a request's instructions).

use async_nats::Subject;
use bytes::Bytes;

/// `<prefix><token>_<nonce>`: one subject token after the prefix, matched by `<prefix>*`.
pub(super) fn write(prefix: &str, token: u64, nonce: u64) -> Subject {
    let mut digits = itoa::Buffer::new();
    let token = digits.format(token);
    let mut tail = [b'_'; 17];
    tail[1..9].copy_from_slice(&hex8((nonce >> 32) as u32));
    tail[9..].copy_from_slice(&hex8(nonce as u32));
    // The exact length: `Bytes` then takes the vector over without another allocation.
    let mut reply = Vec::with_capacity(prefix.len() + token.len() + tail.len());
    reply.extend_from_slice(prefix.as_bytes());
    reply.extend_from_slice(token.as_bytes());
    reply.extend_from_slice(&tail);
    // SAFETY: the prefix is text; the token's digits and the tail are ASCII.
    unsafe { Subject::from_bytes_unchecked(Bytes::from(reply)) }
}

/// The token and nonce of a subject `write` made with `prefix`; `None` for anything else.
pub(super) fn read(prefix: &str, subject: &str) -> Option<(u64, u64)> {
    // The nonce is the last 17 bytes, so nothing is searched for (a token with a `_` in it
    // does not parse).
    let rest = subject.strip_prefix(prefix)?;
    let (token, tail) = rest.split_at_checked(rest.len().checked_sub(17)?)?;
    let (&b'_', nonce) = tail.as_bytes().split_first()? else {
        return None;
    };
    let token = token.parse().ok()?;
    let high = parse_hex8(nonce[..8].try_into().ok()?)?;
    let low = parse_hex8(nonce[8..].try_into().ok()?)?;
    Some((token, u64::from(high) << 32 | u64::from(low)))
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// `value` as eight lowercase hex digits.
fn hex8(value: u32) -> [u8; 8] {
    // One nibble per byte, the most significant in the first byte (big-endian order).
    let mut x = u64::from(value);
    x = (x | x << 16) & 0x0000_FFFF_0000_FFFF;
    x = (x | x << 8) & 0x00FF_00FF_00FF_00FF;
    x = (x | x << 4) & 0x0F0F_0F0F_0F0F_0F0F;
    // '0' + n, and 'a' - '0' - 10 more where n >= 10 (n + 6 carries into bit 4).
    let letters = ((x + ONES * 6) >> 4) & ONES;
    (x + ONES * u64::from(b'0') + letters * u64::from(b'a' - b'0' - 10)).to_be_bytes()
}

/// Eight lowercase hex digits, as `hex8` writes them; `None` if any byte is not one.
fn parse_hex8(digits: [u8; 8]) -> Option<u32> {
    let x = u64::from_be_bytes(digits);
    if x & HIGHS != 0 {
        return None;
    }
    // With every byte below 0x80, adding 0x80 - n sets a byte's high bit exactly when the
    // byte is at least n, and no byte carries into the next.
    let at_least = |n: u8| (x + ONES * u64::from(0x80 - n)) & HIGHS;
    let digit = at_least(b'0') & !at_least(b'9' + 1);
    let letter = at_least(b'a') & !at_least(b'f' + 1);
    if digit | letter != HIGHS {
        return None;
    }
    // The low nibble, plus 9 for a letter ('a' is 0x61).
    let mut n = (x & (ONES * 0x0F)) + (letter >> 7) * 9;
    n = (n | n >> 4) & 0x00FF_00FF_00FF_00FF;
    n = (n | n >> 8) & 0x0000_FFFF_0000_FFFF;
    n = (n | n >> 16) & 0x0000_0000_FFFF_FFFF;
    Some(n as u32)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn is_lower_hex(digits: &[u8]) -> bool {
        digits
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    }

    #[test]
    fn a_subject_is_read_back_as_written_and_looks_as_documented() {
        for (token, nonce) in [(0, 0), (7, u64::MAX), (u64::MAX, 0x0123_4567_89ab_cdef)] {
            let subject = write("_GW.abc.", token, nonce);
            assert_eq!(subject.as_str(), format!("_GW.abc.{token}_{nonce:016x}"));
            assert_eq!(read("_GW.abc.", &subject), Some((token, nonce)));
        }
    }

    #[test]
    fn subjects_not_of_the_form_are_not_read() {
        let good = write("_GW.abc.", 42, 0xdead_beef_0000_0001);
        assert!(read("_GW.abc.", &good).is_some());
        for subject in [
            "_GW.abd.42_deadbeef00000001",
            "_GW.abc.42_deadbeef0000001",
            "_GW.abc.42-deadbeef00000001",
            "_GW.abc._deadbeef00000001",
            "_GW.abc.4x_deadbeef00000001",
            "_GW.abc.42_DEADBEEF00000001",
            "_GW.abc.42_deadbeeg00000001",
            "_GW.abc.42_+eadbeef00000001",
            "_GW.abc.42_deadbeef0000000é",
            "_GW.abc.",
            "",
        ] {
            assert_eq!(read("_GW.abc.", subject), None, "{subject}");
        }
    }

    #[test]
    fn every_byte_at_every_place_of_a_nonce_is_refused_unless_a_lowercase_hex_digit() {
        for byte in 0u8..=0xff {
            for at in 0..8 {
                let mut digits = *b"0123abcd";
                digits[at] = byte;
                let expected = is_lower_hex(&[byte])
                    .then(|| u32::from_str_radix(std::str::from_utf8(&digits).unwrap(), 16))
                    .map(Result::unwrap);
                assert_eq!(parse_hex8(digits), expected, "{byte:#x} at {at}");
            }
        }
    }

    proptest! {
        #[test]
        fn hex_is_written_as_format_writes_it_and_read_back(value in any::<u32>()) {
            let digits = hex8(value);
            let formatted = format!("{value:08x}");
            prop_assert_eq!(&digits[..], formatted.as_bytes());
            prop_assert_eq!(parse_hex8(digits), Some(value));
        }

        #[test]
        fn any_eight_bytes_are_read_as_from_str_radix_reads_lowercase_hex(
            digits in proptest::array::uniform8(prop_oneof![
                any::<u8>(),
                proptest::sample::select(b"0123456789abcdefABCDEF/:`g".to_vec()),
            ])
        ) {
            let expected = is_lower_hex(&digits)
                .then(|| u32::from_str_radix(std::str::from_utf8(&digits).unwrap(), 16).unwrap());
            prop_assert_eq!(parse_hex8(digits), expected);
        }
    }
}
