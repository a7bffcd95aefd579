//! Parsers for label values, following the Go rules that Traefik's label decoder (paerser)
//! applies: `strconv.ParseBool`, base-10 integers with an optional sign, Traefik durations and
//! comma-separated lists.

use std::time::Duration;

/// Parses a boolean as Go's `strconv.ParseBool` does.
///
/// # Errors
///
/// Returns a message for any other spelling, such as `yes` or `on`.
pub(crate) fn parse_bool(text: &str) -> Result<bool, String> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err("invalid boolean; use true or false".to_owned()),
    }
}

/// Parses a base-10 integer with an optional `+` or `-` sign.
///
/// # Errors
///
/// Returns a message when the text is not an integer or is out of range.
pub(crate) fn parse_int(text: &str) -> Result<i64, String> {
    // NOTE: Rust's integer parser accepts a leading '+', as Go's strconv.ParseInt does.
    text.parse::<i64>()
        .map_err(|_| "invalid integer; write a base-10 number".to_owned())
}

/// Parses a non-negative base-10 integer with an optional `+` sign.
///
/// # Errors
///
/// Returns a message when the text is not a non-negative integer.
pub(crate) fn parse_unsigned(text: &str) -> Result<u64, String> {
    text.parse::<u64>()
        .map_err(|_| "invalid number; write a non-negative base-10 integer".to_owned())
}

/// Parses a TCP port from 1 to 65535.
///
/// # Errors
///
/// Returns a message for anything else.
pub(crate) fn parse_port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err("invalid port; use 1 to 65535".to_owned()),
    }
}

/// Parses a Traefik duration: a bare integer is seconds, anything else is a Go duration such
/// as `1m30s` or `500ms`. Returns the signed length in nanoseconds.
///
/// # Errors
///
/// Returns a message when the text is neither form or overflows 64-bit nanoseconds.
pub(crate) fn parse_duration_nanos(text: &str) -> Result<i128, String> {
    let invalid =
        || "invalid duration; write seconds as a number or a Go duration such as 10s or 1m30s";
    if let Ok(seconds) = text.parse::<i64>() {
        return Ok(i128::from(seconds) * 1_000_000_000);
    }
    parse_go_duration(text).ok_or_else(|| invalid().to_owned())
}

/// Parses a Traefik duration that must be longer than zero.
///
/// # Errors
///
/// Returns a message for an invalid, zero or negative duration.
pub(crate) fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let nanos = parse_duration_nanos(text)?;
    match u64::try_from(nanos) {
        Ok(nanos) if nanos > 0 => Ok(Duration::from_nanos(nanos)),
        _ => Err("duration must be longer than zero".to_owned()),
    }
}

/// Parses a Go duration string (`time.ParseDuration`): an optional sign, then one or more
/// decimal numbers, each with an optional fraction and a unit (`ns`, `us`, `µs`, `ms`, `s`, `m`,
/// `h`). `0` needs no unit.
fn parse_go_duration(text: &str) -> Option<i128> {
    let (negative, mut rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }

    let mut total: i128 = 0;
    while !rest.is_empty() {
        let whole_length = rest.bytes().take_while(u8::is_ascii_digit).count();
        let whole = &rest[..whole_length];
        rest = &rest[whole_length..];
        let mut fraction = "";
        if let Some(after_dot) = rest.strip_prefix('.') {
            let fraction_length = after_dot.bytes().take_while(u8::is_ascii_digit).count();
            fraction = &after_dot[..fraction_length];
            rest = &after_dot[fraction_length..];
        }
        if whole.is_empty() && fraction.is_empty() {
            return None;
        }

        let unit_length = rest
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit_nanos: i128 = match &rest[..unit_length] {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        rest = &rest[unit_length..];

        let whole_value: i128 = if whole.is_empty() {
            0
        } else {
            whole.parse().ok()?
        };
        let mut nanos = whole_value.checked_mul(unit_nanos)?;
        if !fraction.is_empty() {
            // Digits beyond the 18th cannot change the result by a whole nanosecond.
            let significant_digits = &fraction[..fraction.len().min(18)];
            let scale = 10_i128.checked_pow(u32::try_from(significant_digits.len()).ok()?)?;
            let fraction_value: i128 = significant_digits.parse().ok()?;
            nanos = nanos.checked_add(fraction_value * unit_nanos / scale)?;
        }
        total = total.checked_add(nanos)?;
    }

    if total > i128::from(i64::MAX) {
        return None;
    }
    Some(if negative { -total } else { total })
}

/// Splits a list value on `,` and trims each element. Empty elements, such as the one after a
/// trailing comma, are dropped.
pub(crate) fn parse_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The effect of a section key's value (`tls`, `healthcheck`) on its section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SectionSwitch {
    /// An empty value or `true` in any case.
    Enabled,
    /// `false` in any case.
    Disabled,
    /// Any other value, which Traefik also reads as disabled.
    DisabledByOtherValue,
}

/// Reads the value of a section key as Traefik's decoder does: an empty value or `true` (any
/// case) enables the section, and every other value disables it.
pub(crate) fn parse_section_switch(text: &str) -> SectionSwitch {
    if text.is_empty() || text.eq_ignore_ascii_case("true") {
        SectionSwitch::Enabled
    } else if text.eq_ignore_ascii_case("false") {
        SectionSwitch::Disabled
    } else {
        SectionSwitch::DisabledByOtherValue
    }
}

/// Normalizes a name as Traefik's `provider.Normalize` does: every run of characters that are
/// neither letters nor digits becomes one `-`, and leading and trailing runs are removed.
pub(crate) fn normalize_name(name: &str) -> String {
    name.split(|c: char| !c.is_alphanumeric())
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}

/// Returns whether `text` is an HTTP token (RFC 9110 `token`), as header names and methods
/// must be.
pub(crate) fn is_http_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bool_accepts_go_spellings() {
        for text in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(parse_bool(text), Ok(true), "{text}");
        }
        for text in ["0", "f", "F", "FALSE", "false", "False"] {
            assert_eq!(parse_bool(text), Ok(false), "{text}");
        }
    }

    #[test]
    fn bool_rejects_other_spellings() {
        for text in ["yes", "on", "tRUE", "", " true"] {
            assert!(parse_bool(text).is_err(), "{text}");
        }
    }

    #[test]
    fn int_accepts_plus_sign() {
        assert_eq!(parse_int("+10"), Ok(10));
        assert_eq!(parse_int("-3"), Ok(-3));
        assert!(parse_int("1_000").is_err());
        assert!(parse_int("10 ").is_err());
    }

    #[test]
    fn port_rejects_zero_and_overflow() {
        assert_eq!(parse_port("8080"), Ok(8080));
        assert!(parse_port("0").is_err());
        assert!(parse_port("65536").is_err());
        assert!(parse_port("http").is_err());
    }

    #[test]
    fn duration_bare_integer_is_seconds() {
        assert_eq!(parse_duration_nanos("10"), Ok(10_000_000_000));
        assert_eq!(parse_duration_nanos("+2"), Ok(2_000_000_000));
    }

    #[test]
    fn duration_accepts_go_syntax() {
        assert_eq!(parse_duration_nanos("1m30s"), Ok(90_000_000_000));
        assert_eq!(parse_duration_nanos("500ms"), Ok(500_000_000));
        assert_eq!(parse_duration_nanos("1.5h"), Ok(5_400_000_000_000));
        assert_eq!(parse_duration_nanos("2µs"), Ok(2_000));
        assert_eq!(parse_duration_nanos(".5s"), Ok(500_000_000));
        assert_eq!(parse_duration_nanos("-1s"), Ok(-1_000_000_000));
        assert_eq!(parse_duration_nanos("0"), Ok(0));
    }

    #[test]
    fn duration_rejects_invalid_text() {
        for text in ["", "s", "10x", "1.s.", "soon", "1m 30s", "3000000h"] {
            assert!(parse_duration_nanos(text).is_err(), "{text}");
        }
    }

    #[test]
    fn positive_duration_rejects_zero() {
        assert_eq!(parse_positive_duration("5"), Ok(Duration::from_secs(5)));
        assert!(parse_positive_duration("0s").is_err());
        assert!(parse_positive_duration("-5s").is_err());
    }

    #[test]
    fn list_splits_and_trims() {
        assert_eq!(parse_list("web, websecure,"), vec!["web", "websecure"]);
        assert!(parse_list("").is_empty());
    }

    #[test]
    fn section_switch_follows_traefik() {
        assert_eq!(parse_section_switch(""), SectionSwitch::Enabled);
        assert_eq!(parse_section_switch("TRUE"), SectionSwitch::Enabled);
        assert_eq!(parse_section_switch("False"), SectionSwitch::Disabled);
        assert_eq!(
            parse_section_switch("1"),
            SectionSwitch::DisabledByOtherValue
        );
    }

    #[test]
    fn normalize_joins_runs_with_dash() {
        assert_eq!(normalize_name("web_my_app"), "web-my-app");
        assert_eq!(normalize_name("_a__b-"), "a-b");
        assert_eq!(normalize_name("Shop.Web"), "Shop-Web");
    }
}
