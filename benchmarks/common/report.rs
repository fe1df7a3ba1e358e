//! How a report leaves the benchmark: one data structure is serialised to `latest.json` and
//! rendered to `latest.md` (the Markdown is made from that same structure, never from numbers
//! computed a second time), and the Markdown is printed. Also the small formatting helpers
//! the renderers share.

use std::path::Path;

use serde::{Serialize, Serializer};

/// The report as pretty JSON, keys sorted, with a final newline.
pub fn json_text<R: Serialize>(report: &R) -> Result<String, String> {
    // Through a `Value`, whose maps are sorted, so that the keys come out in the same order
    // whatever the field order of the structs.
    let value = serde_json::to_value(report).map_err(|err| format!("report: {err}"))?;
    let text = serde_json::to_string_pretty(&value).map_err(|err| format!("report: {err}"))?;
    Ok(text + "\n")
}

/// Writes `latest.json` (the report) and `latest.md` (its Markdown) into `dir`.
pub fn write_latest<R: Serialize>(dir: &Path, report: &R, markdown: &str) -> Result<(), String> {
    write_named(dir, "latest", report, markdown)
}

/// Writes `<name>.json` (the report) and `<name>.md` (its Markdown) into `dir`.
pub fn write_named<R: Serialize>(
    dir: &Path,
    name: &str,
    report: &R,
    markdown: &str,
) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|err| format!("{}: {err}", dir.display()))?;
    let (json, md) = (format!("{name}.json"), format!("{name}.md"));
    std::fs::write(dir.join(&json), json_text(report)?).map_err(|err| format!("{json}: {err}"))?;
    std::fs::write(dir.join(&md), markdown).map_err(|err| format!("{md}: {err}"))?;
    eprintln!("wrote {} and {md}", dir.join(&json).display());
    Ok(())
}

/// A number with `digits` decimals, or "—" when there is none.
pub fn fmt_opt(value: Option<f64>, digits: usize) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        _ => "—".into(),
    }
}

/// `128 B`, `4 KiB`.
pub fn payload_label(bytes: usize) -> String {
    if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} B")
    }
}

/// Serialises an `f64` rounded to one decimal (the report keeps the full value).
pub fn round1<S: Serializer>(value: &f64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64((value * 10.0).round() / 10.0)
}

/// Serialises an `Option<f64>` rounded to one decimal.
pub fn round1_opt<S: Serializer>(value: &Option<f64>, serializer: S) -> Result<S::Ok, S::Error> {
    value
        .map(|v| (v * 10.0).round() / 10.0)
        .serialize(serializer)
}

/// Serialises an `Option<f64>` rounded to three decimals.
pub fn round3_opt<S: Serializer>(value: &Option<f64>, serializer: S) -> Result<S::Ok, S::Error> {
    value
        .map(|v| (v * 1000.0).round() / 1000.0)
        .serialize(serializer)
}
