//! `json_quick` against serde_json: every line, of the common shape or near it, decodes to the
//! same envelope or the same error with the quick reader as with serde_json alone; and the
//! lines the client library and the README send are the ones the quick reader takes.

use bytes::Bytes;
use proptest::prelude::*;

use super::{json_quick, parse_line_using};

fn both(line: &str) -> (super::Decoded, super::Decoded) {
    let bytes = Bytes::copy_from_slice(line.as_bytes());
    (
        parse_line_using(bytes.clone(), true),
        parse_line_using(bytes, false),
    )
}

#[test]
fn the_common_lines_are_read_quickly_and_the_same() {
    for line in [
        r#"{"subject":"demo.echo","data":"hi"}"#,
        r#"{"op":"request","id":7,"subject":"demo.echo","timeout_ms":2000,"data":"say hi"}"#,
        r#"{"op":"publish","id":"a-1","subject":"events.x","data":"é ü 😀"}"#,
        r#" { "op" : "request" , "id" : 0 , "subject" : "a.b" } "#,
        r#"{"op":"ping"}"#,
        "{\t\"op\":\"request\",\r\"subject\":\"s\",\"data\":\"\"}",
        r#"{}"#,
    ] {
        assert!(json_quick::read(line).is_some(), "not taken: {line}");
        let (quick, slow) = both(line);
        assert_eq!(quick, slow, "{line}");
    }
}

#[test]
fn anything_else_goes_to_serde_json() {
    for line in [
        r#"{"subject":"demo.echo","data":"say \"hi\""}"#,
        r#"{"subject":"demo.echo","data":{"a":1}}"#,
        r#"{"subject":"demo.echo","data":"a	tab"}"#,
        r#"{"op":"request","op":"publish","subject":"a"}"#,
        r#"{"subject":"a","queue":"q"}"#,
        r#"{"subject":"a","id":-1}"#,
        r#"{"subject":"a","id":1.5}"#,
        r#"{"subject":"a","id":1e3}"#,
        r#"{"subject":"a","id":007}"#,
        r#"{"subject":"a","id":12345678901234567890}"#,
        r#"{"subject":"a","timeout_ms":4294967296}"#,
        r#"{"subject":"a","timeout_ms":null}"#,
        r#"{"subject":"a",}"#,
        r#"{"subject":"a"} x"#,
        r#"{"subject":"a""data":"b"}"#,
        r#"{"subj\u0065ct":"a"}"#,
        r#"{"subject":null}"#,
        r#"{"subject":"a""#,
    ] {
        assert!(json_quick::read(line).is_none(), "taken: {line}");
        let (quick, slow) = both(line);
        assert_eq!(quick, slow, "{line}");
    }
}

/// Values of every kind the five keys may meet, the good and the near misses.
fn odd_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,6}".prop_map(|text| format!("\"{text}\"")),
        prop::sample::select(vec![
            "\"\"",
            "\"a\\\"b\"",
            "\"a\\nb\"",
            "\"\\u00e9\"",
            "\"a\tb\"",
            "\"a\u{1}b\"",
            "0",
            "007",
            "-1",
            "1.5",
            "2e3",
            "4294967295",
            "4294967296",
            "9999999999999999999",
            "18446744073709551615",
            "18446744073709551616",
            "null",
            "true",
            "{}",
            "[1]",
            "{\"a\":1}",
        ])
        .prop_map(str::to_owned),
    ]
}

/// A key and a value of the kind it takes, mostly; sometimes a key serde_json reads and this
/// reader does not, or a value of another kind.
fn field() -> impl Strategy<Value = (String, String)> {
    let text = "[a-z.*>_ -]{0,12}".prop_map(|text| format!("\"{text}\""));
    let op = prop::sample::select(vec!["\"request\"", "\"publish\"", "\"ping\"", "\"nope\""])
        .prop_map(str::to_owned);
    let number = any::<u32>().prop_map(|n| n.to_string());
    let key = prop::sample::select(vec![
        "op",
        "id",
        "subject",
        "timeout_ms",
        "data",
        "queue",
        "retry",
        "subj\\u0065ct",
        "",
    ]);
    prop_oneof![
        3 => op.prop_map(|value| ("op".to_owned(), value)),
        3 => prop_oneof![number.clone(), text.clone()].prop_map(|value| ("id".to_owned(), value)),
        3 => text.clone().prop_map(|value| ("subject".to_owned(), value)),
        2 => number.prop_map(|value| ("timeout_ms".to_owned(), value)),
        3 => text.prop_map(|value| ("data".to_owned(), value)),
        2 => (key, odd_value()).prop_map(|(key, value)| (key.to_owned(), value)),
        2 => (prop::sample::select(vec!["op", "id", "subject", "timeout_ms", "data"]), odd_value())
            .prop_map(|(key, value)| (key.to_owned(), value)),
    ]
}

fn space() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["", "", "", " ", "\t", "\r", "  "])
}

fn separator() -> impl Strategy<Value = &'static str> {
    prop_oneof![12 => Just(","), 1 => prop::sample::select(vec![",,", "", ";"])]
}

fn ending() -> impl Strategy<Value = &'static str> {
    prop_oneof![12 => Just("}"), 1 => prop::sample::select(vec!["} ", ",}", "}}", "} x", ""])]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn the_quick_reader_and_serde_json_agree(
        fields in prop::collection::vec((space(), field(), space(), space(), space(), separator()), 0..6),
        end in ending(),
        lead in space(),
    ) {
        let mut line = format!("{lead}{{");
        let count = fields.len();
        for (i, (a, (key, value), b, c, d, separator)) in fields.into_iter().enumerate() {
            line.push_str(&format!("{a}\"{key}\"{b}:{c}{value}{d}"));
            if i + 1 < count {
                line.push_str(separator);
            }
        }
        line.push_str(end);
        let (quick, slow) = both(&line);
        prop_assert_eq!(quick, slow, "{}", line);
    }
}
