//! `[worker]` settings of safe rollouts: readiness probes, probation,
//! canary shares and the crash-loop breaker.

use super::{parse_duration, Dur};
use serde::{de, Deserialize, Deserializer};
use std::time::Duration;

/// A share of new connections, written `"10%"`: strictly between 0 and 100.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Share(f64);

impl Share {
    /// The smallest share: one new connection in 10,000. Below it a canary
    /// would get next to nothing (and `0.0000001%` is a typo, not a plan).
    pub const MIN_PERCENT: f64 = 0.01;

    /// Parses `"10%"` or `"12.5%"`: above 0.01% and below 100%.
    pub fn parse(s: &str) -> Result<Share, String> {
        let bad = || {
            format!(
                "invalid share {s:?}: expected a percentage above 0 and below 100, like \"10%\""
            )
        };
        let number: f64 = s
            .trim()
            .strip_suffix('%')
            .ok_or_else(bad)?
            .trim()
            .parse()
            .map_err(|_| bad())?;
        if !(number > 0.0 && number < 100.0) {
            return Err(bad());
        }
        if number < Self::MIN_PERCENT {
            return Err(format!(
                "invalid share {s:?}: below the smallest canary, {}% (one new connection in 10,000)",
                Self::MIN_PERCENT
            ));
        }
        Ok(Share(number))
    }

    /// The percentage.
    pub fn percent(self) -> f64 {
        self.0
    }

    /// The threshold a uniform random `u32` is compared with: below it, the
    /// connection goes to the new generation.
    pub fn threshold(self) -> u32 {
        ((self.0 / 100.0) * f64::from(u32::MAX)).round() as u32
    }
}

impl std::fmt::Display for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}%", self.0)
    }
}

impl<'de> Deserialize<'de> for Share {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Share::parse(&String::deserialize(d)?).map_err(de::Error::custom)
    }
}

pub(super) fn default_probe_interval() -> Dur {
    Dur(Duration::from_secs(1))
}

pub(super) fn default_probation_failures() -> u32 {
    3
}

pub(super) fn de_probation_failures<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = i64::deserialize(d)?;
    if !(1..=1000).contains(&n) {
        return Err(de::Error::custom(format!(
            "probation_failures must be between 1 and 1000, got {n}"
        )));
    }
    Ok(n as u32)
}

pub(super) fn default_crash_loop_limit() -> u32 {
    10
}

pub(super) fn de_crash_loop_limit<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = i64::deserialize(d)?;
    if !(1..=10_000).contains(&n) {
        return Err(de::Error::custom(format!(
            "crash_loop_limit must be between 1 and 10000, got {n}"
        )));
    }
    Ok(n as u32)
}

pub(super) fn default_crash_loop_window() -> Dur {
    Dur(Duration::from_secs(60))
}

pub(super) fn de_probe_interval<'de, D: Deserializer<'de>>(d: D) -> Result<Dur, D::Error> {
    let s = String::deserialize(d)?;
    let interval = parse_duration(&s).map_err(de::Error::custom)?;
    if interval < Duration::from_millis(10) {
        return Err(de::Error::custom(format!(
            "probe_interval must be at least 10ms, got {s:?}"
        )));
    }
    Ok(Dur(interval))
}

/// A probe command: `exec:CMD ARG ...`, split on white space.
pub(super) fn parse_exec(command: &str) -> Result<Vec<String>, String> {
    let argv: Vec<String> = command.split_whitespace().map(String::from).collect();
    if argv.is_empty() {
        return Err("invalid ready \"exec:\": expected a command, like \"exec:/usr/local/bin/check --fast\"".into());
    }
    Ok(argv)
}

/// An HTTP probe's path: `http:/PATH`.
pub(super) fn parse_http(path: &str) -> Result<String, String> {
    if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "invalid ready \"http:{path}\": expected a path starting with /, like \"http:/healthz\""
        ));
    }
    Ok(path.to_string())
}

/// A probe that connects needs a TCP listener to connect to: the first one
/// in the file is probed.
pub(super) fn check(
    worker: &super::WorkerConfig,
    has_tcp_listener: bool,
    text: &str,
) -> Result<(), (Option<std::ops::Range<usize>>, String)> {
    if !matches!(
        worker.ready,
        super::ReadyMode::Tcp | super::ReadyMode::Http(_)
    ) || has_tcp_listener
    {
        return Ok(());
    }
    #[derive(Deserialize)]
    struct Spans {
        worker: Option<WorkerSpans>,
    }
    #[derive(Deserialize)]
    struct WorkerSpans {
        ready: Option<toml::Spanned<toml::Value>>,
    }
    let span = toml::from_str::<Spans>(text)
        .ok()
        .and_then(|s| s.worker?.ready)
        .map(|r| r.span());
    Err((
        span,
        "a tcp or http readiness probe needs a TCP [[listener]] to connect to (the first one is probed)".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_percentages_strictly_between_0_and_100() {
        assert_eq!(Share::parse("10%").unwrap().percent(), 10.0);
        assert_eq!(Share::parse("12.5 %").unwrap().percent(), 12.5);
        for bad in ["0%", "100%", "150%", "10", "-5%", "abc%", "nan%", "inf%"] {
            assert!(Share::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Share::parse("0.01%").unwrap().percent(), 0.01);
        let tiny = Share::parse("0.0000001%").unwrap_err();
        assert!(tiny.contains("below the smallest canary, 0.01%"), "{tiny}");
        assert_eq!(Share::parse("50%").unwrap().threshold(), u32::MAX / 2 + 1);
    }
}
