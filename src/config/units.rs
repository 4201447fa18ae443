//! Durations ("90s", "5m", "100ms") and sizes ("1MiB", "512KiB") as operators write them.
//!
//! Pure parsing: no I/O, no knowledge of which key a value belongs to (the caller adds that).

use std::time::Duration;

/// Parse a duration such as `"90s"`, `"5m"`, `"100ms"`, `"1h30m"` or `"0s"`.
///
/// Units: `ms`, `s`, `m`, `h`, `d`. A bare number is refused: a TTL of `300` could mean
/// seconds or milliseconds, and guessing wrong caches for the wrong time.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    let total_ms = parse_duration_ms(s).ok_or_else(|| not_a_duration(text))?;
    // Ten years is far beyond any sane TTL or timeout; past it the value is a typo.
    if total_ms > 10 * 365 * 86_400_000 {
        return Err(format!("{text:?} is out of range (at most \"3650d\")"));
    }
    Ok(Duration::from_millis(total_ms as u64))
}

fn parse_duration_ms(s: &str) -> Option<u128> {
    let bytes = s.as_bytes();
    if bytes.is_empty() {
        return None;
    }
    let mut total: u128 = 0;
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let value: u128 = s.get(start..i)?.parse().ok()?;
        let unit_start = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let factor: u128 = match &s[unit_start..i] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return None,
        };
        total = total.checked_add(value.checked_mul(factor)?)?;
    }
    Some(total)
}

/// The error for a value that is not a duration, with the spelling the operator probably meant.
fn not_a_duration(text: &str) -> String {
    let t = text.trim();
    let digits: String = t.chars().take_while(|c| c.is_ascii_digit()).collect();
    let word = t[digits.len()..].trim().to_ascii_lowercase();
    let unit = match word.as_str() {
        "" => None,
        w if w.starts_with("mil") => Some("ms"),
        w if w.starts_with("sec") => Some("s"),
        w if w.starts_with("min") => Some("m"),
        w if w.starts_with("hour") || w == "hr" || w == "hrs" => Some("h"),
        w if w.starts_with("day") => Some("d"),
        _ => None,
    };
    match (digits.is_empty(), unit, word.is_empty()) {
        (false, Some(u), _) => format!("{text:?} is not a duration (try \"{digits}{u}\")"),
        (false, None, true) => {
            format!(
                "{text:?} is not a duration: it has no unit (try \"{digits}s\" or \"{digits}ms\")"
            )
        }
        _ => format!("{text:?} is not a duration (use ms, s, m, h or d, e.g. \"30s\" or \"5m\")"),
    }
}

/// Parse a size such as `"1MiB"`, `"256MiB"`, `"512KiB"`, `"1GiB"`, `"1000B"` or a bare byte count.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if digits_end == 0 {
        return Err(format!(
            "{text:?} is not a size (try \"1MiB\" or \"512KiB\")"
        ));
    }
    let value: u64 = s[..digits_end]
        .parse()
        .map_err(|_| format!("{text:?} is out of range"))?;
    let factor: u64 = match s[digits_end..].trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "{text:?} is not a size: unknown unit {other:?} (use B, KiB, MiB, GiB, KB, MB or GB)"
            ));
        }
    };
    value
        .checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is out of range"))
}

/// Render a duration the way an operator would write it, for `check` output.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0s".into()
    } else if ms.is_multiple_of(86_400_000) {
        format!("{}d", ms / 86_400_000)
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1_000) {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(
            parse_duration("5 minutes").unwrap_err(),
            "\"5 minutes\" is not a duration (try \"5m\")"
        );
        assert!(parse_duration("300").unwrap_err().contains("no unit"));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("99999999999999999999999d").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert!(parse_size("1 megabyte").is_err());
        assert!(parse_size("MiB").is_err());
    }

    #[test]
    fn format_round_trips() {
        for s in ["0s", "90s", "5m", "2h", "1d", "150ms"] {
            assert_eq!(format_duration(parse_duration(s).unwrap()), s);
        }
    }
}
