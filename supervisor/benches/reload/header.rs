//! When, where and from what the bench ran, for the results' header.

use crate::args::Options;
use crate::servers;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// When (the start), where and how the bench runs.
pub fn header(options: &Options) -> serde_json::Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    serde_json::json!({
        "date": utc_date(now),
        "unix_time": now.as_secs(),
        "cpus": servers::cpus(),
        "kernel": kernel.trim(),
        "duration_s": options.duration.as_secs_f64(),
        "interval_ms": options.interval.as_millis() as u64,
        "connections": options.connections,
        "quick": options.quick,
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "revision": revision(),
    })
}

/// The checkout the bench was built from, e.g. `ee7be67` or
/// `ee7be67+changes`; `None` outside a git checkout.
fn revision() -> Option<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let git = |args: &[&str]| {
        let output = std::process::Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
    };
    let head = git(&["rev-parse", "--short", "HEAD"])?;
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(if dirty {
        format!("{head}+changes")
    } else {
        head
    })
}

/// `YYYY-MM-DD HH:MM UTC`, from Howard Hinnant's days-to-civil algorithm.
fn utc_date(since_epoch: Duration) -> String {
    let secs = since_epoch.as_secs();
    let days = (secs / 86_400) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        secs % 86_400 / 3600,
        secs % 3600 / 60
    )
}
