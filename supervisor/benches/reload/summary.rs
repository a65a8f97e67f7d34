//! What a run comes to: the markdown tables on stdout and the JSON file.

use crate::drive::{comparable, Cycle, Measured, Snapshot};
use crate::RunResult;
use baton_tests::load::{Class, Mode, Report};
use serde_json::{json, Value};
use std::fmt::Write;
use std::time::Duration;

/// The chart's and the JSON timeline's bucket.
pub const BUCKET: Duration = Duration::from_millis(100);

pub fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::KeepAlive => "keep-alive",
        Mode::NewConnection => "new connection",
    }
}

/// `0.21 ms`, `12.3 ms`, `1520 ms`.
pub fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 100.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

fn opt_ms(d: Option<Duration>) -> String {
    d.map_or("—".into(), ms)
}

/// Nearest-rank quantile.
fn quantile(values: &[Duration], q: f64) -> Option<Duration> {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.saturating_sub(1).min(sorted.len().checked_sub(1)?))
        .copied()
}

/// `p50 / max` of one reload-cycle time, with how many were never seen.
fn cycle_times(cycles: &[Cycle], pick: impl Fn(&Cycle) -> Option<Duration>) -> String {
    if cycles.is_empty() {
        return "—".into();
    }
    let seen: Vec<Duration> = cycles.iter().filter_map(&pick).collect();
    let mut text = match (quantile(&seen, 0.5), quantile(&seen, 1.0)) {
        (Some(p50), Some(max)) => format!("{} / {}", ms(p50), ms(max)),
        _ => "not seen".into(),
    };
    let missing = cycles.len() - seen.len();
    if missing > 0 && !seen.is_empty() {
        let _ = write!(text, " ({missing} of {} not seen)", cycles.len());
    }
    text
}

/// Failed requests that were sent on a reused keep-alive connection.
fn failed_on_reused(report: &Report) -> usize {
    report
        .samples
        .iter()
        .filter(|s| s.class.is_failure() && s.reused)
        .count()
}

pub fn failures_by_class(report: &Report) -> String {
    let parts: Vec<String> = Class::ALL
        .iter()
        .filter(|c| c.is_failure() && report.count(**c) > 0)
        .map(|c| format!("{} {}", c.name(), report.count(*c)))
        .collect();
    if parts.is_empty() {
        return "—".into();
    }
    match failed_on_reused(report) {
        0 => parts.join(", "),
        reused => format!("{} ({reused} on reused connections)", parts.join(", ")),
    }
}

/// Reload signals sent, and how many of those reloads are known to have
/// failed.
fn reloads(m: &Measured) -> String {
    match m.cycles.iter().filter(|c| c.failed.is_some()).count() {
        0 => m.cycles.len().to_string(),
        failed => format!("{} ({failed} failed)", m.cycles.len()),
    }
}

/// Failed requests per reload.
fn per_reload(m: &Measured) -> Option<f64> {
    (!m.cycles.is_empty()).then(|| m.report.failed() as f64 / m.cycles.len() as f64)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn rss(m: &Measured, run: &RunResult) -> String {
    if !run.scenario.has_master() {
        return "— (no master)".into();
    }
    match m.end.memory {
        Some(mem) => format!("{} ({} peak)", mib(mem.rss_kib), mib(mem.peak_kib)),
        None => "gone".into(),
    }
}

/// Whether the baton master came back to its starting fds and children.
fn resources_ok(m: &Measured) -> bool {
    m.baseline.fds == m.end.fds && m.baseline.children == m.end.children
}

/// The markdown report: requests, latency and reload cycles, and baton's
/// resources, then the notes.
pub fn markdown(runs: &[RunResult]) -> String {
    let mut out = String::new();
    out.push_str("| system | reload | mode | reloads | ok | failed | failed per reload | failures by class | ok req/s | other load |\n");
    out.push_str("| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |\n");
    for run in runs {
        let head = format!(
            "| {} | {} | {} |",
            run.system,
            run.scenario.reload,
            mode_name(run.mode)
        );
        match &run.outcome {
            Err(why) => {
                let _ = writeln!(out, "{head} {} | | | | | | |", short(why));
            }
            Ok(m) => {
                let _ = writeln!(
                    out,
                    "{head} {} | {} | {} | {} | {} | {:.0} | {:.2} |",
                    reloads(m),
                    m.report.ok(),
                    m.report.failed(),
                    per_reload(m).map_or("—".into(), |f| format!("{f:.2}")),
                    failures_by_class(&m.report),
                    m.report.ok_per_second(),
                    m.other_cpu,
                );
            }
        }
    }

    out.push_str("\n| system | reload | mode | p50 | p99 | max | p99 in reloads | max in reloads | signal → new generation serving (p50 / max) | signal → old generation gone (p50 / max) | master RSS |\n");
    out.push_str("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |\n");
    for run in runs {
        let Ok(m) = &run.outcome else { continue };
        let inside = m.in_windows();
        let q = |r: &Report, q: f64| opt_ms(r.latency_quantile(q));
        let (p99_in, max_in) = if m.cycles.is_empty() {
            ("—".into(), "—".into())
        } else {
            (q(&inside, 0.99), q(&inside, 1.0))
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {p99_in} | {max_in} | {} | {} | {} |",
            run.system,
            run.scenario.reload,
            mode_name(run.mode),
            q(&m.report, 0.5),
            q(&m.report, 0.99),
            q(&m.report, 1.0),
            cycle_times(&m.cycles, |c| c.new_serving),
            cycle_times(&m.cycles, |c| c.old_gone),
            rss(m, run),
        );
    }

    let batons: Vec<(&RunResult, &Measured)> = runs
        .iter()
        .filter(|r| r.scenario.is_baton())
        .filter_map(|r| Some((r, r.outcome.as_ref().ok()?)))
        .collect();
    if !batons.is_empty() {
        out.push_str("\n| baton master after the run | mode | pid | fds start → end | children start → end | back to start |\n");
        out.push_str("| --- | --- | --- | --- | --- | --- |\n");
        for (run, m) in batons {
            let pid = if m.baseline.pid == m.end.pid {
                m.end.pid.to_string()
            } else {
                format!("{} → {}", m.baseline.pid, m.end.pid)
            };
            let fds = |s: &Snapshot| s.fds.map_or("?".into(), |n| n.to_string());
            let _ = writeln!(
                out,
                "| {} | {} | {pid} | {} → {} | {} → {} | {} |",
                run.scenario.reload,
                mode_name(run.mode),
                fds(&m.baseline),
                fds(&m.end),
                m.baseline.children,
                m.end.children,
                if !comparable(&m.start, &m.baseline, m.end.pid) {
                    "n/a (another master)"
                } else if resources_ok(m) {
                    "yes"
                } else {
                    "**no**"
                },
            );
        }
    }

    out.push_str(
        "\n*Other load*: CPUs' worth of time that processes outside the bench's \
         session (other builds and tests on the machine) used during the run.\n",
    );

    let notes: Vec<String> = runs
        .iter()
        .flat_map(|run| {
            let label = format!(
                "{}, {}, {}",
                run.system,
                run.scenario.reload,
                mode_name(run.mode)
            );
            let notes: Vec<String> = match &run.outcome {
                Err(why) if why.len() > short(why).len() => vec![why.clone()],
                Err(_) => Vec::new(),
                Ok(m) => m.notes.clone(),
            };
            notes.into_iter().map(move |n| format!("- {label}: {n}"))
        })
        .collect();
    if !notes.is_empty() {
        out.push('\n');
        out.push_str(&notes.join("\n"));
        out.push('\n');
    }
    out
}

/// A reason short enough for a table cell.
fn short(why: &str) -> &str {
    if why == "not installed" {
        why
    } else {
        "failed (see notes)"
    }
}

fn dur_ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn opt_dur_ms(d: Option<Duration>) -> Value {
    d.map_or(Value::Null, |d| json!(dur_ms(d)))
}

fn snapshot_json(s: &Snapshot) -> Value {
    json!({
        "pid": s.pid.as_raw(),
        "rss_kib": s.memory.map(|m| m.rss_kib),
        "peak_rss_kib": s.memory.map(|m| m.peak_kib),
        "fds": s.fds,
        "children": s.children,
    })
}

fn latency_json(r: &Report) -> Value {
    json!({
        "p50": opt_dur_ms(r.latency_quantile(0.5)),
        "p99": opt_dur_ms(r.latency_quantile(0.99)),
        "max": opt_dur_ms(r.latency_quantile(1.0)),
    })
}

fn run_json(run: &RunResult) -> Value {
    let mut value = json!({
        "scenario": run.scenario.name,
        "system": run.system,
        "reload": run.scenario.reload,
        "mode": mode_name(run.mode),
    });
    let m = match &run.outcome {
        Err(why) => {
            value["status"] = json!(why);
            return value;
        }
        Ok(m) => m,
    };
    let by_class: serde_json::Map<String, Value> = Class::ALL
        .iter()
        .filter(|c| c.is_failure())
        .map(|c| (c.name().to_string(), json!(m.report.count(*c))))
        .collect();
    let inside = m.in_windows();
    let (ok, failed): (Vec<u64>, Vec<u64>) = m.report.timeline(BUCKET).into_iter().unzip();
    let extra = json!({
        "status": "ran",
        "elapsed_s": m.report.elapsed.as_secs_f64(),
        "requests": m.report.samples.len(),
        "ok": m.report.ok(),
        "failed": m.report.failed(),
        "failed_by_class": by_class,
        "failed_on_reused_connections": failed_on_reused(&m.report),
        "reloads": m.cycles.len(),
        "failed_per_reload": per_reload(m),
        "ok_per_second": m.report.ok_per_second(),
        "other_sessions_cpus": m.other_cpu,
        "latency_ms": latency_json(&m.report),
        "reload_windows": {
            "total_s": inside.elapsed.as_secs_f64(),
            "requests": inside.samples.len(),
            "failed": inside.failed(),
            "latency_ms": latency_json(&inside),
        },
        "cycles": m.cycles.iter().map(|c| json!({
            "signal_s": c.at.as_secs_f64(),
            "new_generation_serving_ms": opt_dur_ms(c.new_serving),
            "old_generation_gone_ms": opt_dur_ms(c.old_gone),
            "new_master_in_pid_file_ms": opt_dur_ms(c.new_master),
            "failed": c.failed,
        })).collect::<Vec<_>>(),
        "master": {
            "start": snapshot_json(&m.start),
            "baseline": snapshot_json(&m.baseline),
            "end": snapshot_json(&m.end),
        },
        "notes": m.notes,
        "timeline": { "bucket_ms": BUCKET.as_millis() as u64, "ok": ok, "failed": failed },
    });
    if let (Value::Object(value), Value::Object(extra)) = (&mut value, extra) {
        value.extend(extra);
    }
    value
}

/// The whole run as JSON.
pub fn json(runs: &[RunResult], header: &Value) -> Value {
    json!({
        "run": header,
        "results": runs.iter().map(run_json).collect::<Vec<_>>(),
    })
}
