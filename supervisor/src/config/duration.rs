//! Durations as written in `baton.toml`: `"500ms"`, `"30s"`, `"2m"`, `"1h"`.

use serde::{de, Deserialize, Deserializer};
use std::fmt;
use std::time::Duration;

/// A duration written as `"500ms"`, `"30s"`, `"2m"`, `"1h"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DurVisitor)
    }
}

/// Reads a duration string; a bare number gets the spelling it needs.
struct DurVisitor;

impl DurVisitor {
    fn unitless<E: de::Error>(n: impl fmt::Display) -> E {
        E::custom(format!(
            "a duration is a string with a unit: write \"{n}s\" (or \"{n}ms\", \"{n}m\")"
        ))
    }
}

impl de::Visitor<'_> for DurVisitor {
    type Value = Dur;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration such as \"500ms\" or \"30s\"")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Dur, E> {
        parse_duration(s).map(Dur).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Dur, E> {
        Err(Self::unitless(n))
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Dur, E> {
        Err(Self::unitless(n))
    }

    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Dur, E> {
        Err(Self::unitless(n))
    }
}

/// Parses `"500ms"`, `"30s"`, `"2m"`, `"1h"` (also fractional: `"1.5s"`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!("invalid duration {s:?}: expected a number with ms, s, m or h, like \"500ms\" or \"30s\"")
    };
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(bad)?;
    let (number, unit) = s.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad())?;
    let scale = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(bad()),
    };
    let secs = number * scale;
    if !secs.is_finite() || secs > 7.0 * 24.0 * 3600.0 {
        return Err(format!("invalid duration {s:?}: at most one week"));
    }
    Ok(Duration::from_secs_f64(secs))
}
