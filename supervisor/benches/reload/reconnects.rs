//! The `reconnects` scenario: what a reload costs the keep-alive
//! connections open across it, for baton with handovers, baton with
//! `[worker] handover = false`, nginx and HAProxy, measured the same way for
//! each. [`CONNECTIONS`] keep-alive HTTP/1.1 connections, every one idle
//! 1–3 s between requests (one tokio client thread,
//! `baton_tests::keepalive`), a light load so that serving requests does not
//! hide what reloads cost. First [`RELOADS`] × [`INTERVAL`] without a
//! reload, then [`RELOADS`] reloads, one every [`INTERVAL`] (longer than
//! the longest pause, so that every connection sends a request between two
//! reloads, and the replaced workers are gone before the next one).
//!
//! Over each of the two windows: *reconnects* (TCP connects beyond the
//! first [`CONNECTIONS`]: the client opens a connection again only after
//! the server ended one), the CPU time of the clients' thread, and that of
//! the server: its master and every process below it, each one's own time
//! plus that of the children it waited for (so the replaced workers count),
//! from /proc/PID/stat, sampled at the start and the end of the window.
//! Divided by the reloads (without reloads: by the same number of
//! intervals).

use crate::procs::{self, tree_cpu_time};
use crate::servers::{self, Binaries, Kind, Server};
use baton_tests::keepalive::Clients;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// For `--only`.
pub const NAME: &str = "reconnects";
/// Keep-alive connections held across the reloads.
const CONNECTIONS: usize = 1000;
/// Reloads, and as many intervals without one before them.
const RELOADS: u64 = 10;
/// From one reload to the next.
const INTERVAL: Duration = Duration::from_secs(4);
/// How long after [`INTERVAL`] the replaced workers may still take to exit
/// before the run is given up.
const EXIT_GRACE: Duration = Duration::from_secs(10);

/// A system and its reload.
struct System {
    kind: Kind,
    /// Its name in the table; nginx's and HAProxy's versions are added.
    label: &'static str,
    /// The signal to the master that reloads it.
    signal: Signal,
    reload: &'static str,
}

/// In run order.
const SYSTEMS: [System; 4] = [
    System {
        kind: Kind::Baton,
        label: "baton + hello, handover (default)",
        signal: Signal::SIGHUP,
        reload: "HUP",
    },
    System {
        kind: Kind::BatonWithoutHandover,
        label: "baton + hello, `handover = false`",
        signal: Signal::SIGHUP,
        reload: "HUP",
    },
    System {
        kind: Kind::Nginx,
        label: "nginx",
        signal: Signal::SIGHUP,
        reload: "HUP",
    },
    System {
        kind: Kind::Haproxy,
        label: "HAProxy -W",
        signal: Signal::SIGUSR2,
        reload: "USR2",
    },
];

/// One system's run.
pub struct Row {
    pub system: String,
    pub reload: &'static str,
    pub outcome: Result<Figures, String>,
}

/// What one window saw.
#[derive(Clone, Copy, Debug, Default)]
pub struct Window {
    /// Connects beyond those open at its start.
    pub reconnects: u64,
    /// CPU time of the clients' thread.
    pub client_cpu: Duration,
    /// CPU time of the server's processes.
    pub server_cpu: Duration,
}

/// What one run saw.
pub struct Figures {
    /// Reloads done (fewer than [`RELOADS`] if interrupted).
    pub reloads: u64,
    /// Intervals without a reload (as many, unless interrupted).
    pub quiet_intervals: u64,
    /// Over the whole run, both windows.
    pub ok: u64,
    pub failed: u64,
    pub closed_by_server: u64,
    /// [`RELOADS`] intervals without a reload.
    pub quiet: Window,
    /// The reloads.
    pub reloading: Window,
}

/// Runs each system that is installed, unless interrupted.
pub fn run(bins: &Binaries, interrupted: &AtomicBool) -> Vec<Row> {
    let mut rows = Vec::new();
    for system in &SYSTEMS {
        if interrupted.load(Ordering::Relaxed) {
            break;
        }
        let label = servers::label(system.kind, bins, system.label);
        eprint!(
            "reload bench: reconnects, {label}, {CONNECTIONS} idle connections, {RELOADS} reloads ... "
        );
        let outcome = Server::start(system.kind, bins)
            .and_then(|mut server| measure(&mut server, system, interrupted));
        match &outcome {
            Ok(f) => eprintln!(
                "{} reconnects, {} failed, {} reloads",
                f.reloading.reconnects, f.failed, f.reloads
            ),
            Err(e) => eprintln!("{e}"),
        }
        rows.push(Row {
            system: label,
            reload: system.reload,
            outcome,
        });
    }
    rows
}

/// Where a window starts: connects so far, and both CPU times.
struct Sample {
    connects: u64,
    client_cpu: Duration,
    server_cpu: Duration,
}

impl Sample {
    fn take(clients: &Clients, master: Pid) -> Result<Sample, String> {
        Ok(Sample {
            connects: clients.tally().connects.load(Ordering::Relaxed),
            client_cpu: clients
                .cpu_time()
                .ok_or("cannot read the clients' CPU time")?,
            server_cpu: tree_cpu_time(master),
        })
    }

    /// From this sample to `end`.
    fn until(&self, end: &Sample) -> Window {
        Window {
            reconnects: end.connects.saturating_sub(self.connects),
            client_cpu: end.client_cpu.saturating_sub(self.client_cpu),
            server_cpu: end.server_cpu.saturating_sub(self.server_cpu),
        }
    }
}

fn measure(
    server: &mut Server,
    system: &System,
    interrupted: &AtomicBool,
) -> Result<Figures, String> {
    let master = server.master;
    let clients = Clients::idle(
        server.addr,
        CONNECTIONS,
        Duration::from_secs(1)..Duration::from_secs(3),
    );
    // Without reloads, as long as the reloads below take.
    let start = Sample::take(&clients, master)?;
    let mut quiet_intervals = 0;
    for _ in 0..RELOADS {
        if interrupted.load(Ordering::Relaxed) {
            break;
        }
        std::thread::sleep(INTERVAL);
        quiet_intervals += 1;
    }
    let middle = Sample::take(&clients, master)?;
    let mut reloads = 0;
    for _ in 0..RELOADS {
        if interrupted.load(Ordering::Relaxed) {
            break;
        }
        let before = procs::workers_of(master);
        kill(master, system.signal).map_err(|e| format!("{}: {e}", system.reload))?;
        std::thread::sleep(INTERVAL);
        // The replaced workers gone, so that what they cost is in the
        // master's count of its reaped children before the next sample.
        let deadline = Instant::now() + EXIT_GRACE;
        while procs::workers_of(master)
            .iter()
            .any(|pid| before.contains(pid))
        {
            if Instant::now() >= deadline {
                return Err(format!(
                    "reload {}: workers {before:?} still ran {:?} after the {}",
                    reloads + 1,
                    INTERVAL + EXIT_GRACE,
                    system.reload
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        reloads += 1;
    }
    let end = Sample::take(&clients, master)?;
    let tally = clients.stop();
    let (failed, closed_by_server, _) = tally.counts();
    Ok(Figures {
        reloads,
        quiet_intervals,
        ok: tally.ok.load(Ordering::Relaxed),
        failed,
        closed_by_server,
        quiet: start.until(&middle),
        reloading: middle.until(&end),
    })
}

/// `total` divided by `count`, in ms.
fn per(total: Duration, count: u64) -> f64 {
    total.as_secs_f64() * 1000.0 / count.max(1) as f64
}

/// The table.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = format!(
        "\n### Reconnects and CPU per reload: {CONNECTIONS} idle keep-alive connections, a reload every {} s\n\n\
         | system | reload | reloads | requests ok | failed | closed by the server | reconnects per reload | client CPU per reload (more than without reloads) | server CPU per reload (more than without reloads) | without reloads, per {} s: reconnects / client CPU / server CPU |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        INTERVAL.as_secs(),
        INTERVAL.as_secs(),
    );
    for row in rows {
        match &row.outcome {
            Ok(f) => {
                let (n, quiet) = (f.reloads, f.quiet_intervals);
                let client = per(f.reloading.client_cpu, n);
                let server = per(f.reloading.server_cpu, n);
                let (quiet_client, quiet_server) = (
                    per(f.quiet.client_cpu, quiet),
                    per(f.quiet.server_cpu, quiet),
                );
                out.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} | **{:.1}** | {:.0} ms ({:+.0}) | {:.0} ms ({:+.0}) | {:.1} / {:.0} ms / {:.0} ms |\n",
                    row.system,
                    row.reload,
                    n,
                    f.ok,
                    f.failed,
                    f.closed_by_server,
                    f.reloading.reconnects as f64 / n.max(1) as f64,
                    client,
                    client - quiet_client,
                    server,
                    server - quiet_server,
                    f.quiet.reconnects as f64 / quiet.max(1) as f64,
                    quiet_client,
                    quiet_server,
                ));
            }
            Err(e) => out.push_str(&format!(
                "| {} | {} | failed: {} | | | | | | | |\n",
                row.system,
                row.reload,
                e.replace('|', "/")
            )),
        }
    }
    out
}
