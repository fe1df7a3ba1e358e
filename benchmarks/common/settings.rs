//! Settings from the environment: numbers checked against a range, lists of numbers, extra
//! gateway flags, and the switch that turns artifact writing off.

/// A number from the environment, checked against a range; unset or empty gives `default`.
pub fn env_f64(name: &str, default: f64, min: f64, max: f64) -> Result<f64, String> {
    match std::env::var(name) {
        Ok(text) if !text.trim().is_empty() => {
            let value: f64 = text
                .trim()
                .parse()
                .map_err(|_| format!("{name}={text:?} is not a number"))?;
            if !(min..=max).contains(&value) {
                return Err(format!("{name}={value} is outside {min}..={max}"));
            }
            Ok(value)
        }
        _ => Ok(default),
    }
}

/// Extra `ipc-gateway serve` flags from a variable, split on whitespace.
pub fn env_args(name: &str) -> Vec<String> {
    std::env::var(name)
        .map(|args| args.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Artifacts are written unless `name` (e.g. BENCH_NO_ARTIFACTS) is set to something.
pub fn env_artifacts(name: &str) -> bool {
    std::env::var(name).map_or(true, |v| v.is_empty())
}

/// A comma-separated list of whole numbers (e.g. BENCH_CONCURRENCY=1,16,256), each checked
/// against a range; unset gives `default`.
pub fn env_list(
    name: &str,
    default: &[usize],
    min: usize,
    max: usize,
) -> Result<Vec<usize>, String> {
    let Ok(text) = std::env::var(name) else {
        return Ok(default.to_vec());
    };
    let mut values = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let value: usize = part
            .parse()
            .map_err(|_| format!("{name}: {part:?} is not a whole number"))?;
        if !(min..=max).contains(&value) {
            return Err(format!("{name}: {value} is outside {min}..={max}"));
        }
        values.push(value);
    }
    if values.is_empty() {
        return Err(format!("{name} is empty"));
    }
    Ok(values)
}

/// A comma-separated list of words, each one of `allowed` (e.g. FANOUT_PATHS=gateway,native);
/// unset gives `default`.
pub fn env_words(name: &str, default: &[&str], allowed: &[&str]) -> Result<Vec<String>, String> {
    let Ok(text) = std::env::var(name) else {
        return Ok(default.iter().map(|w| w.to_string()).collect());
    };
    let mut words = Vec::new();
    for word in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        if !allowed.contains(&word) {
            return Err(format!("{name}: {word:?} is not one of {allowed:?}"));
        }
        words.push(word.to_owned());
    }
    if words.is_empty() {
        return Err(format!("{name} is empty"));
    }
    Ok(words)
}
