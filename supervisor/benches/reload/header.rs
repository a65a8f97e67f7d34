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

/// `YYYY-MM-DD HH:MM UTC`.
fn utc_date(since_epoch: Duration) -> String {
    // `YYYY-MM-DD HH:MM:SS UTC`, without the seconds.
    let full = baton::status::utc(since_epoch.as_secs() as f64);
    format!("{} UTC", &full[..16])
}
