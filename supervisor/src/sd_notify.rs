//! Telling systemd about the master (`Type=notify` and `Type=notify-reload`
//! units): ready after every reload whatever its outcome, reloading with the
//! monotonic time `notify-reload` needs, a status line naming the serving
//! generation and the last outcome, stopping, the new main pid after a
//! binary upgrade, and the watchdog.

use crate::reload::Outcome;
use std::time::Duration;

/// Sends `state` (e.g. `READY=1`) to `$NOTIFY_SOCKET`, if set. Best effort:
/// outside systemd there is nobody to tell.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
    } else {
        socket.send_to(state.as_bytes(), std::path::Path::new(&path))
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, state, "sd_notify failed");
    }
}

/// A reload of `generation` starts: `RELOADING=1` with `MONOTONIC_USEC=`,
/// which `Type=notify-reload` compares with the time it sent the signal.
pub fn reloading(generation: u64) {
    notify(&format!(
        "RELOADING=1\nSTATUS=reloading to generation {generation}\nMONOTONIC_USEC={}",
        monotonic_usec()
    ));
}

/// A reload ended: `READY=1` whatever the outcome (a unit must not stay
/// "reloading"), and a `STATUS=` that says which generation serves and how
/// the reload ended.
pub fn reload_finished(serving: Option<u64>, outcome: &Outcome) {
    notify(&format!(
        "READY=1\nSTATUS={}",
        status_line(serving, outcome)
    ));
}

/// A reload signal that was refused (an upgrade is under way): the
/// reload `Type=notify-reload` waits for begins and ends at once.
pub fn reload_refused(serving: Option<u64>, reason: &str) {
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    notify(&format!(
        "READY=1\nSTATUS={}; reload refused: {reason}",
        serving_line(serving)
    ));
}

/// What `systemctl status` shows after a reload.
fn status_line(serving: Option<u64>, outcome: &Outcome) -> String {
    let serving = serving_line(serving);
    match &outcome.failure {
        None => format!("{serving}; last reload ({}) committed", outcome.trigger),
        Some((phase, reason)) => {
            // One line, and short: systemd shows it in a single row.
            let full = reason.replace('\n', " ");
            let mut reason: String = full.chars().take(200).collect();
            if reason.len() < full.len() {
                reason.push('…');
            }
            format!(
                "{serving}; reload to generation {} ({}) failed in phase {phase}: {reason}",
                outcome.generation, outcome.trigger
            )
        }
    }
}

fn serving_line(serving: Option<u64>) -> String {
    serving.map_or("no generation serving".into(), |g| {
        format!("generation {g} serving")
    })
}

/// `CLOCK_MONOTONIC` in microseconds, as systemd reads it.
fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| Duration::from(t).as_micros() as u64)
        .unwrap_or(0)
}

/// systemd's watchdog (`WatchdogSec=`): `WATCHDOG=1` every half
/// `WATCHDOG_USEC`, sent from the master's event loop, so a loop that hangs
/// stops petting and systemd restarts the service.
pub struct Watchdog {
    interval: Option<tokio::time::Interval>,
}

impl Watchdog {
    /// From `WATCHDOG_USEC` (and `WATCHDOG_PID`, which must be this process,
    /// or, in a new master started by a binary upgrade, the old master that
    /// systemd knew). Off when unset or malformed.
    pub fn from_env(upgraded: bool) -> Watchdog {
        let usec = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|usec| *usec > 0);
        let pid = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|v| v.parse::<u32>().ok());
        let ours = match pid {
            None => true,
            Some(pid) => {
                pid == std::process::id()
                    || (upgraded && pid == std::os::unix::process::parent_id())
            }
        };
        let interval = usec.filter(|_| ours).map(|usec| {
            let period = Duration::from_micros(usec / 2);
            tracing::info!(period_ms = period.as_millis() as u64, "systemd watchdog on");
            let mut interval = tokio::time::interval(period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval
        });
        Watchdog { interval }
    }

    /// Completes when the next ping is due; never without a watchdog.
    pub async fn due(&mut self) {
        match &mut self.interval {
            Some(interval) => {
                interval.tick().await;
            }
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reload::{Phase, Trigger};

    fn outcome(failure: Option<(Phase, String)>) -> Outcome {
        Outcome {
            generation: 4,
            trigger: Trigger::Signal,
            failure,
            phases: Vec::new(),
            finished: std::time::SystemTime::now(),
            version: None,
            deploy_version: None,
            requested_by: None,
        }
    }

    #[test]
    fn the_status_line_names_the_serving_generation_and_the_outcome() {
        assert_eq!(
            status_line(Some(4), &outcome(None)),
            "generation 4 serving; last reload (signal) committed"
        );
        let failed = outcome(Some((Phase::Validate, "baton.toml:3:1: bad\nthing".into())));
        assert_eq!(
            status_line(Some(3), &failed),
            "generation 3 serving; reload to generation 4 (signal) failed in phase validate: baton.toml:3:1: bad thing"
        );
        let long = outcome(Some((Phase::Ready, "x".repeat(500))));
        assert!(status_line(Some(3), &long).ends_with("x…"));
    }

    #[test]
    fn monotonic_time_is_in_microseconds() {
        let a = monotonic_usec();
        std::thread::sleep(Duration::from_millis(2));
        let b = monotonic_usec();
        assert!(b >= a + 2000 && b < a + 2_000_000, "{a} {b}");
    }
}
