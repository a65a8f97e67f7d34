//! `baton status`: the master's state as the control protocol reports it,
//! and the aligned table the CLI prints.

use crate::control::protocol::{Status, WorkerStatus};
use crate::worker::State;
use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// Adds each draining worker's open client connections to `status` and
/// hands it to `send`: on a blocking thread, since listing them reads the
/// kernel's TCP table and, when it has connections on the listeners'
/// ports, every such worker's `/proc/PID/fd` (thousands of entries with
/// many listeners), which the event loop must not wait for.
pub fn complete(mut status: Status, send: impl FnOnce(Status) + Send + 'static) {
    let draining = |w: &WorkerStatus| w.state == "draining" || w.state == "killed";
    let any = status
        .generations
        .iter()
        .flat_map(|g| &g.workers)
        .any(draining);
    if !any {
        return send(status);
    }
    tokio::task::spawn_blocking(move || {
        let addresses = status.listeners.iter().map(|l| l.address.as_str());
        let connections = crate::connections::Connections::on(addresses);
        for worker in status.generations.iter_mut().flat_map(|g| &mut g.workers) {
            if draining(worker) {
                worker.open_connections = Some(connections.of_worker(worker.pid));
            }
        }
        send(status);
    });
}

/// A draining worker's kill time, in seconds since the epoch.
pub fn deadline(state: &State, (instant, wall): (Instant, SystemTime)) -> Option<f64> {
    let State::Draining { kill_at } = state else {
        return None;
    };
    let at = wall + kill_at.saturating_duration_since(instant);
    Some(at.duration_since(UNIX_EPOCH).ok()?.as_secs_f64())
}

/// Seconds as `3s`, `5m12s`, `2h03m`, `4d02h`.
pub fn age(seconds: f64) -> String {
    let s = seconds as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// `seconds` since the Unix epoch as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc(seconds: f64) -> String {
    let s = seconds.max(0.0) as i64;
    let (days, rest) = (s.div_euclid(86_400), s.rem_euclid(86_400));
    // Days to a civil date (Howard Hinnant's `civil_from_days`).
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
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Lays out rows so that every column is aligned.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| format!("{cell:<width$}", width = widths[c]))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

/// The human form of `baton status`.
pub fn render(status: &Status) -> String {
    let m = &status.master;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "master   pid {}  up {}  {}  config {} ({})",
        m.pid,
        age(m.uptime_s),
        m.state,
        m.config,
        m.config_hash
    );
    if let Some(admin) = &m.admin {
        let _ = writeln!(out, "admin    {admin}");
    }
    if let Some(a) = &m.adopted {
        let previous = if a.died.starts_with("exited for") {
            format!("previous master pid {} {}", a.previous_pid, a.died)
        } else {
            format!("previous master pid {} died ({})", a.previous_pid, a.died)
        };
        let _ = writeln!(
            out,
            "adopted  at {}, {previous}; {} adoption(s) so far",
            utc(a.at),
            a.adoptions
        );
    }
    if let Some(r) = &status.rollout {
        let share = r
            .canary_percent
            .map(|p| format!(", canary {p}% of new connections"))
            .unwrap_or_default();
        let left = r
            .left_s
            .map(|s| format!("{} left", age(s)))
            .unwrap_or_else(|| "until baton promote or rollback".into());
        let _ = writeln!(
            out,
            "reload   generation {} on probation{share}: {left}; generation {} on standby",
            r.generation, r.standby
        );
    } else if let Some(n) = status.reload_in_progress {
        let _ = writeln!(out, "reload   in progress: generation {n}");
    }
    for g in status
        .generations
        .iter()
        .filter(|g| !g.crash_loop.is_empty())
    {
        let _ = writeln!(
            out,
            "alert    generation {}: worker(s) {:?} crash-looped and are not respawned (capacity lost; `baton reload` to fix)",
            g.number, g.crash_loop
        );
    }
    for g in status
        .generations
        .iter()
        .filter(|g| g.handed_over + g.closed_at_drain > 0)
    {
        let _ = writeln!(
            out,
            "moved    generation {}: {} connection(s) handed to a newer generation, {} closed at the drain",
            g.number, g.handed_over, g.closed_at_drain
        );
    }
    if let Some(d) = &status.last_drained {
        let _ = writeln!(
            out,
            "drained  generation {}: {} connection(s) handed to a newer generation, {} closed at the drain",
            d.generation, d.handed_over, d.closed_at_drain
        );
    }
    if let Some(r) = &status.last_reload {
        let detail = match (&r.failed_phase, &r.reason) {
            (Some(phase), Some(reason)) => format!("failed in {phase}: {reason}"),
            _ => "committed".into(),
        };
        let by = r
            .requested_by
            .as_ref()
            .map_or(String::new(), |by| format!(", {by}"));
        let _ = writeln!(
            out,
            "last     reload to generation {} ({}{by}): {detail}",
            r.generation, r.trigger
        );
    }
    out.push('\n');
    let mut rows = vec![vec![
        "LISTENER".into(),
        "KIND".into(),
        "ADDRESS".into(),
        "FD".into(),
    ]];
    rows.extend(status.listeners.iter().map(|l| {
        vec![
            l.name.clone(),
            l.kind.clone(),
            l.address.clone(),
            l.fd.to_string(),
        ]
    }));
    out.push_str(&table(&rows));
    out.push('\n');
    let mut rows = vec![[
        "GEN", "STATE", "AGE", "WORKER", "PID", "WSTATE", "UPTIME", "RESTARTS", "CONNS",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect::<Vec<_>>()];
    // Only servers using `ready = "notify"` send a status text.
    let with_status = status
        .generations
        .iter()
        .flat_map(|g| &g.workers)
        .any(|w| w.status.is_some());
    if with_status {
        rows[0].push("STATUS".into());
    }
    // Only workers with a reload handle run a config version of their own.
    let with_version = status
        .generations
        .iter()
        .flat_map(|g| &g.workers)
        .any(|w| w.config_version.is_some());
    if with_version {
        rows[0].push("VERSION".into());
    }
    for g in &status.generations {
        let head = vec![g.number.to_string(), g.state.clone(), age(g.age_s)];
        if g.workers.is_empty() {
            rows.push(head.clone());
        }
        for (i, w) in g.workers.iter().enumerate() {
            let mut row = if i == 0 {
                head.clone()
            } else {
                vec![String::new(); 3]
            };
            row.extend([
                w.index.to_string(),
                w.pid.to_string(),
                w.state.clone(),
                age(w.uptime_s),
                w.restarts.to_string(),
                w.connections.map_or("-".into(), |c| c.to_string()),
            ]);
            if with_status {
                row.push(w.status.clone().unwrap_or_else(|| "-".into()));
            }
            if with_version {
                row.push(w.config_version.clone().unwrap_or_else(|| "-".into()));
            }
            rows.push(row);
        }
    }
    out.push_str(&table(&rows));
    out.push_str(&drain_section(status));
    out
}

/// Below the table: each draining worker's deadline and the connections
/// it still holds (what keeps its generation alive).
fn drain_section(status: &Status) -> String {
    let mut out = String::new();
    for g in &status.generations {
        for w in &g.workers {
            let Some(open) = &w.open_connections else {
                continue;
            };
            let when = w
                .kill_in_s
                .map_or("killed".into(), |s| format!("killed in {}", age(s)));
            let _ = writeln!(
                out,
                "\ndraining worker {} (generation {}, pid {}): {when}, {} open connection(s)",
                w.index,
                g.number,
                w.pid,
                open.len()
            );
            let mut rows = Vec::new();
            for c in open {
                rows.push(vec![
                    String::new(),
                    c.peer.clone(),
                    c.state.clone(),
                    format!("idle {}", c.idle_s.map_or("-".into(), age)),
                    format!("queued in {} out {}", c.recv_queue, c.send_queue),
                ]);
            }
            out.push_str(&table(&rows));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times_read_as_dates() {
        assert_eq!(utc(0.0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400.0), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_796_601_599.5), "2026-12-06 23:59:59 UTC");
    }

    #[test]
    fn ages_read_naturally() {
        assert_eq!(age(0.4), "0s");
        assert_eq!(age(312.0), "5m12s");
        assert_eq!(age(7380.0), "2h03m");
        assert_eq!(age(352_800.0), "4d02h");
    }

    #[test]
    fn tables_align_columns() {
        let out = table(&[
            vec!["A".into(), "LONG HEADER".into(), "C".into()],
            vec!["wide cell".into(), "x".into(), "y".into()],
        ]);
        assert_eq!(
            out,
            "A          LONG HEADER  C\nwide cell  x            y\n"
        );
    }
}
