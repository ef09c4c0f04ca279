//! Human-readable forms: timestamps, byte strings, sizes, records.

use std::fmt::Write as _;

use idemstore::{Record, RecordState};

/// The longest byte string shown in full; longer ones are cut, with their length given.
const SHOWN_BYTES_MAX: usize = 96;

/// `ms` since the Unix epoch as an RFC 3339 UTC time, to the millisecond.
pub fn time(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's `civil_from_days`).
    let z = i64::try_from(days).unwrap_or(i64::MAX / 2) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// A scope or key as the tool's arguments take it back: as is if it is printable UTF-8 text
/// (and does not itself start with a `hex:` or `b64:` prefix), `hex:` and its bytes in hex
/// otherwise.
pub fn ident(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text)
            if !text.chars().any(hides_or_reorders)
                && !text.starts_with("hex:")
                && !text.starts_with("b64:") =>
        {
            text.to_owned()
        }
        _ => {
            let mut out = String::from("hex:");
            for b in bytes {
                let _ = write!(out, "{b:02x}");
            }
            out
        }
    }
}

/// Whether `c` would not show as itself on a terminal: a control character, or an invisible
/// formatting one (zero-width characters, bidirectional overrides and isolates, line and
/// paragraph separators, variation selectors, tag characters, the byte-order mark, the soft
/// hyphen) that could hide or reorder what is printed around it.
fn hides_or_reorders(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{061C}'
                | '\u{200B}'..='\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2028}'..='\u{2029}'
                | '\u{2060}'..='\u{2069}'
                | '\u{FE00}'..='\u{FE0F}'
                | '\u{FEFF}'
                | '\u{E0000}'..='\u{E007F}'
                | '\u{E0100}'..='\u{E01EF}'
        )
}

/// The bytes a scope or key argument names: `hex:` followed by hex digits, `b64:` followed by
/// standard base64, or else the argument's own UTF-8 bytes.
pub fn parse_ident(arg: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    if let Some(hex) = arg.strip_prefix("hex:") {
        if hex.len() % 2 != 0 {
            return Err("hex: needs an even number of hex digits".into());
        }
        return (0..hex.len())
            .step_by(2)
            .map(|i| {
                hex.get(i..i + 2)
                    .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                    .ok_or_else(|| format!("hex: {hex:?} is not hex"))
            })
            .collect();
    }
    if let Some(b64) = arg.strip_prefix("b64:") {
        return base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| format!("b64: {e}"));
    }
    Ok(arg.as_bytes().to_vec())
}

/// A byte string as escaped text, cut after [`SHOWN_BYTES_MAX`] bytes.
pub fn text(bytes: &[u8]) -> String {
    let shown = bytes.get(..SHOWN_BYTES_MAX).unwrap_or(bytes);
    let mut out = shown.escape_ascii().to_string();
    if shown.len() < bytes.len() {
        let _ = write!(out, "… ({} bytes)", bytes.len());
    }
    out
}

/// A byte string as hex, cut after [`SHOWN_BYTES_MAX`] bytes.
pub fn hex(bytes: &[u8]) -> String {
    let shown = bytes.get(..SHOWN_BYTES_MAX).unwrap_or(bytes);
    let mut out = String::with_capacity(shown.len() * 2);
    for b in shown {
        let _ = write!(out, "{b:02x}");
    }
    if shown.len() < bytes.len() {
        let _ = write!(out, "… ({} bytes)", bytes.len());
    }
    out
}

/// A size in bytes, with a binary unit.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS.get(unit).copied().unwrap_or("TiB"))
}

/// The state's name, as `--state` and the JSON form spell it.
pub fn state_name(state: &RecordState) -> &'static str {
    match state {
        RecordState::InFlight { .. } => "in-flight",
        RecordState::Completed { .. } => "completed",
        RecordState::Failed { .. } => "failed",
        _ => "unknown",
    }
}

/// Every field of a record, one per line.
pub fn record(scope: &[u8], key: &[u8], r: &Record) -> String {
    let mut rows = vec![
        ("scope", ident(scope)),
        ("key", ident(key)),
        ("state", state_name(&r.state).to_owned()),
        ("attempt", r.attempt.to_string()),
        ("fingerprint", hex(&r.fingerprint)),
        ("created", time(r.created_at_ms)),
        ("updated", time(r.updated_at_ms)),
        ("expires", time(r.expires_at_ms)),
    ];
    let checkpoint = |c: &Option<Vec<u8>>| {
        c.as_ref().map_or_else(
            || "none".to_owned(),
            |c| format!("{} bytes: {}", c.len(), text(c)),
        )
    };
    match &r.state {
        RecordState::InFlight {
            token,
            epoch,
            lease_until_ms,
            checkpoint: c,
        } => {
            rows.push(("token", token.to_string()));
            rows.push(("epoch", epoch.to_string()));
            rows.push(("lease until", time(*lease_until_ms)));
            rows.push(("checkpoint", checkpoint(c)));
        }
        RecordState::Completed { outcome } => {
            rows.push((
                "outcome",
                format!("{} bytes: {}", outcome.len(), text(outcome)),
            ));
        }
        RecordState::Failed { checkpoint: c } => rows.push(("checkpoint", checkpoint(c))),
        _ => {}
    }
    let mut out = String::new();
    for (name, value) in rows {
        let _ = writeln!(out, "{name:<12} {value}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(time(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(time(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn long_byte_strings_are_cut_with_their_length() {
        assert_eq!(text(b"a\nb"), "a\\nb");
        assert!(text(&[b'x'; 200]).ends_with("… (200 bytes)"));
        assert_eq!(hex(&[0, 255]), "00ff");
        assert_eq!(size(1536), "1.5 KiB");
    }

    #[test]
    fn identities_print_as_arguments_take_them_back() {
        for bytes in [
            &b"tenant-1"[..],
            b"\xca>\x00",
            b"hex:ab",
            b"",
            "clé".as_bytes(),
        ] {
            assert_eq!(parse_ident(&ident(bytes)), Ok(bytes.to_vec()), "{bytes:?}");
        }
        assert_eq!(ident(&[0xca, 0x3e]), "hex:ca3e");
        assert_eq!(ident("a\u{202e}b".as_bytes()), "hex:61e280ae62");
        // Line separators, variation selectors and tag characters hide or reorder too.
        for hidden in ["a\u{2028}b", "a\u{fe0f}", "a\u{e0041}", "a\u{e0100}"] {
            assert!(ident(hidden.as_bytes()).starts_with("hex:"), "{hidden:?}");
        }
        assert_eq!(parse_ident("b64:yj4="), Ok(vec![0xca, 0x3e]));
        assert!(parse_ident("hex:zz").is_err());
    }
}
