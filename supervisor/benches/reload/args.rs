//! The bench's command line.

use std::time::Duration;

pub const USAGE: &str = "\
usage: cargo bench -p baton --bench reload -- [OPTIONS]

Reloads baton, nginx and HAProxy under a strict load, side by side.

options:
  --duration D      time per scenario and client mode (default 10s)
  --interval D      time between reloads (default 200ms)
  --connections N   concurrent closed-loop clients (default 8)
  --only NAME       run only the scenarios whose name starts with NAME
                    (repeatable; comma-separated lists work too)
  --quick           3s per scenario, for a smoke run (--duration wins)
  --soak-reloads N  reloads of the soak scenario (default 100000); the soak
                    runs only when named (--only soak)
  -h, --help        this text

durations: 500ms, 3s, 1.5s, 2m

scenarios: ";

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    pub duration: Duration,
    pub interval: Duration,
    pub connections: usize,
    /// Name prefixes; empty means every scenario.
    pub only: Vec<String>,
    pub quick: bool,
    /// Reloads of the soak scenario.
    pub soak_reloads: usize,
}

/// What the command line asks for.
pub enum Parsed {
    Run(Options),
    Help,
    /// Started without `--bench`, as `cargo test --benches` does: not a
    /// benchmark run.
    NotBenchmarking,
}

/// Parses the arguments after the program name. Cargo adds `--bench` to
/// every `cargo bench` run.
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Parsed, String> {
    let mut options = Options {
        duration: Duration::from_secs(10),
        interval: Duration::from_millis(200),
        connections: 8,
        only: Vec::new(),
        quick: false,
        soak_reloads: 100_000,
    };
    let mut duration = None;
    let mut benchmarking = false;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag.to_string(), Some(value)),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .map(str::to_string)
                .or_else(|| args.next())
                .ok_or_else(|| format!("`{flag}` needs a value"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "--bench" => benchmarking = true,
            "--quick" => options.quick = true,
            "--duration" => duration = Some(parse_duration(&value()?)?),
            "--interval" => options.interval = parse_duration(&value()?)?,
            "--connections" => {
                let text = value()?;
                options.connections = text
                    .parse()
                    .ok()
                    .filter(|n| (1..=256).contains(n))
                    .ok_or_else(|| format!("--connections: `{text}` is not 1..=256"))?;
            }
            "--soak-reloads" => {
                let text = value()?;
                options.soak_reloads = text
                    .parse()
                    .ok()
                    .filter(|n| (1_000..=10_000_000).contains(n))
                    .ok_or_else(|| format!("--soak-reloads: `{text}` is not 1000..=10000000"))?;
            }
            "--only" => options.only.extend(
                value()?
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            ),
            _ => return Err(format!("unknown argument `{arg}`")),
        }
    }
    options.duration = duration.unwrap_or(if options.quick {
        Duration::from_secs(3)
    } else {
        options.duration
    });
    if options.duration < Duration::from_secs(1) {
        return Err("--duration must be at least 1s".into());
    }
    if options.interval < Duration::from_millis(10) {
        return Err("--interval must be at least 10ms".into());
    }
    Ok(if benchmarking {
        Parsed::Run(options)
    } else {
        Parsed::NotBenchmarking
    })
}

/// `500ms`, `3s`, `1.5s`, `2m`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("`{text}` is not a duration like 500ms, 3s or 2m");
    let (number, unit) = text
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| text.split_at(i))
        .ok_or_else(bad)?;
    let number: f64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        _ => return Err(bad()),
    };
    if !seconds.is_finite() || !(0.0..=3600.0).contains(&seconds) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(seconds))
}
