//! The `handover` scenario: reloads that close no connection, at the scale
//! of issue 22. [`CONNECTIONS`] keep-alive HTTP/1.1 connections (half busy,
//! half idle 1–3 s between requests, one tokio client thread) held across
//! [`HUPS`] HUPs then [`UPGRADES`] USR2 binary upgrades of `hello`, with 2
//! and with 4 workers. The client counts every connect and every close it
//! did not start: failed requests, connections closed by the server and
//! reconnects should all be 0. From the masters' JSON log: connections
//! handed over and closed at drain, and for each drained generation the
//! time from its last handover (the taker's answer, `connections.handed_over`)
//! to its end (`generation.finished`), and from its drain to its end.

use crate::baton_log::{field, BatonLog};
use crate::procs::{Guard, TempDir};
use crate::servers::{baton_run, Binaries};
use baton_tests::harness::event_name;
use baton_tests::keepalive::Clients;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// For `--only`.
pub const NAME: &str = "handover";
/// Keep-alive connections held across the reloads.
const CONNECTIONS: usize = 1000;
/// HUPs, then binary upgrades.
const HUPS: u64 = 100;
const UPGRADES: u64 = 10;
/// Between two reloads.
const PAUSE: Duration = Duration::from_millis(300);
/// How long a reload or an upgrade may take.
const TIMEOUT: Duration = Duration::from_secs(30);

/// One run.
pub struct Row {
    pub workers: u32,
    pub outcome: Result<Figures, String>,
}

/// What one run saw.
pub struct Figures {
    pub hups: u64,
    pub upgrades: u64,
    pub ok: u64,
    pub failed: u64,
    pub closed_by_server: u64,
    pub reconnects: u64,
    pub handed_over: u64,
    pub closed_at_drain: u64,
    /// Per drained generation that handed connections over, in ms: from
    /// its last handover to its end; drained by a HUP, then by an upgrade.
    pub after_last_handover: Vec<f64>,
    pub after_last_handover_upgrade: Vec<f64>,
    /// Per drained generation, in ms: from its drain to its end.
    pub drain_to_end: Vec<f64>,
}

/// Runs with 2 and 4 workers, unless interrupted.
pub fn run(bins: &Binaries, interrupted: &AtomicBool) -> Vec<Row> {
    let mut rows = Vec::new();
    for workers in [2, 4] {
        if interrupted.load(Ordering::Relaxed) {
            break;
        }
        eprint!(
            "reload bench: handover, {CONNECTIONS} connections, {HUPS} HUPs and {UPGRADES} upgrades, {workers} workers ... "
        );
        let outcome = measure(bins, workers, interrupted);
        match &outcome {
            Ok(f) => eprintln!(
                "{} failed, {} closed by the server, {} reconnects",
                f.failed, f.closed_by_server, f.reconnects
            ),
            Err(e) => eprintln!("{e}"),
        }
        rows.push(Row { workers, outcome });
    }
    rows
}

/// Seconds since midnight (UTC) of an event's `timestamp`.
fn seconds(event: &Value) -> Option<f64> {
    let stamp = event["timestamp"].as_str()?;
    let time = stamp.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = time.split(':').map(|p| p.parse::<f64>().ok());
    Some(parts.next()?? * 3600.0 + parts.next()?? * 60.0 + parts.next()??)
}

/// The pid in `dir`'s pid file.
fn pid_file(dir: &TempDir) -> Option<Pid> {
    let text = std::fs::read_to_string(dir.path().join("baton.pid")).ok()?;
    text.trim().parse().ok().map(Pid::from_raw)
}

fn alive(pid: Pid) -> bool {
    kill(pid, None).is_ok()
}

fn measure(bins: &Binaries, workers: u32, interrupted: &AtomicBool) -> Result<Figures, String> {
    let dir = TempDir::new("handover").map_err(|e| format!("cannot create a temp dir: {e}"))?;
    let mut guard = Guard::default();
    let figures = run_in(bins, workers, &dir, &mut guard, interrupted);
    // Whatever still runs there goes with the guard, a new master that an
    // upgrade left unannounced included.
    for pid in crate::procs::running_in(dir.path()) {
        guard.adopt(pid);
    }
    figures
}

fn run_in(
    bins: &Binaries,
    workers: u32,
    dir: &TempDir,
    guard: &mut Guard,
    interrupted: &AtomicBool,
) -> Result<Figures, String> {
    let config = format!(
        "[supervisor]\nlog_format = \"json\"\ncontrol_socket = \"baton.sock\"\npid_file = \"baton.pid\"\n\n\
         [[listener]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\n\n\
         [worker]\ncommand = [{:?}]\nprocesses = {workers}\nready_timeout = \"30s\"\n\
         drain_timeout = \"10s\"\n",
        bins.hello.display().to_string(),
    );
    let mut command = baton_run(&bins.baton, dir.path(), &config)?;
    command.stderr(Stdio::piped());
    let first = guard
        .spawn(&mut command)
        .map_err(|e| format!("cannot start baton: {e}"))?;
    let stderr = guard
        .child_mut(first)
        .and_then(|c| c.stderr.take())
        .ok_or("baton has no stderr")?;
    // Every master after an upgrade inherits the same stderr.
    let log = BatonLog::start(stderr);
    let committed = |from: usize| {
        log.wait_for(from, TIMEOUT, |e| {
            matches!(event_name(e), "reload.committed" | "reload.failed")
        })
    };
    let first_commit = committed(0).ok_or_else(|| format!("generation 1: {}", log.tail(5)))?;
    if event_name(&first_commit) != "reload.committed" {
        return Err(format!("generation 1 failed: {first_commit}"));
    }
    let bound = log
        .wait_for(0, TIMEOUT, |e| event_name(e) == "listener.bound")
        .ok_or("no listener.bound event")?;
    let addr = field(&bound, "address")
        .parse()
        .map_err(|e| format!("bad listener address: {e}"))?;
    let clients = Clients::start(
        addr,
        CONNECTIONS,
        Duration::from_secs(1)..Duration::from_secs(3),
    );
    let mut master = first;
    let mut hups = 0;
    for _ in 0..HUPS {
        if interrupted.load(Ordering::Relaxed) {
            break;
        }
        let from = log.len();
        kill(master, Signal::SIGHUP).map_err(|e| format!("HUP: {e}"))?;
        let outcome =
            committed(from).ok_or_else(|| format!("HUP {}: {}", hups + 1, log.tail(5)))?;
        if event_name(&outcome) != "reload.committed" {
            return Err(format!("HUP {}: {outcome}", hups + 1));
        }
        hups += 1;
        std::thread::sleep(PAUSE);
    }
    let mut upgrades = 0;
    for _ in 0..UPGRADES {
        if interrupted.load(Ordering::Relaxed) {
            break;
        }
        kill(master, Signal::SIGUSR2).map_err(|e| format!("USR2: {e}"))?;
        let deadline = Instant::now() + TIMEOUT;
        let new = loop {
            if let Some(pid) = pid_file(dir).filter(|p| *p != master) {
                guard.adopt(pid);
                break pid;
            }
            if Instant::now() >= deadline {
                return Err(format!("upgrade {}: no new master", upgrades + 1));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        // The old master goes once its generation has drained.
        loop {
            let gone = match guard.child_mut(master) {
                Some(child) => child.try_wait().ok().flatten().is_some(),
                None => !alive(master),
            };
            if gone {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!("upgrade {}: the old master stayed", upgrades + 1));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        master = new;
        upgrades += 1;
        std::thread::sleep(PAUSE);
    }
    // Every idle client asks again after its pause: each reaches the last
    // generation over the connection it always had.
    std::thread::sleep(Duration::from_millis(3500));
    let tally = clients.stop();
    let (failed, closed_by_server, connects) = tally.counts();
    // The last generation's end is not awaited: it still serves.
    let events = log.since(0);
    let mut last_handover: BTreeMap<String, f64> = BTreeMap::new();
    let mut drained: BTreeMap<String, f64> = BTreeMap::new();
    let (mut handed_over, mut closed_at_drain) = (0, 0);
    let mut after_last_handover = Vec::new();
    let mut after_last_handover_upgrade = Vec::new();
    let mut drain_to_end = Vec::new();
    for event in &events {
        let generation = field(event, "generation");
        let Some(at) = seconds(event) else { continue };
        match event_name(event) {
            "generation.draining" => {
                drained.insert(generation, at);
            }
            "connections.handed_over" => {
                let last = last_handover.entry(generation).or_insert(at);
                *last = last.max(at);
            }
            "generation.finished" => {
                handed_over += field(event, "handed_over").parse::<u64>().unwrap_or(0);
                closed_at_drain += field(event, "closed_at_drain").parse::<u64>().unwrap_or(0);
                // Generations 1 to `hups` were drained by a HUP, the later
                // ones by an upgrade.
                let by_hup = generation.parse::<u64>().is_ok_and(|g| g <= hups);
                if let Some(last) = last_handover.remove(&generation) {
                    let ms = (at - last) * 1000.0;
                    match by_hup {
                        true => after_last_handover.push(ms),
                        false => after_last_handover_upgrade.push(ms),
                    }
                }
                if let Some(start) = drained.remove(&generation) {
                    drain_to_end.push((at - start) * 1000.0);
                }
            }
            _ => {}
        }
    }
    Ok(Figures {
        hups,
        upgrades,
        ok: tally.ok.load(Ordering::Relaxed),
        failed,
        closed_by_server,
        reconnects: connects.saturating_sub(CONNECTIONS as u64),
        handed_over,
        closed_at_drain,
        after_last_handover,
        after_last_handover_upgrade,
        drain_to_end,
    })
}

/// Median and maximum, in ms.
fn spread(values: &[f64]) -> String {
    if values.is_empty() {
        return "—".into();
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    format!(
        "{:.0} ms / {:.0} ms",
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1]
    )
}

/// The table.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = format!(
        "\n### Handover: {CONNECTIONS} keep-alive connections across {HUPS} HUPs and {UPGRADES} upgrades\n\n\
         | workers | reloads | requests ok | failed | closed by the server | reconnects | handed over | closed at drain | last handover → old generation gone, HUP (p50 / max) | same, USR2 (p50 / max) | within 50 ms | drain → old generation gone (p50 / max) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n"
    );
    for row in rows {
        match &row.outcome {
            Ok(f) => {
                let all: Vec<f64> = f
                    .after_last_handover
                    .iter()
                    .chain(&f.after_last_handover_upgrade)
                    .copied()
                    .collect();
                let within = all.iter().filter(|t| **t <= 50.0).count();
                out.push_str(&format!(
                    "| {} | {} HUP + {} USR2 | {} | **{}** | **{}** | **{}** | {} | {} | {} | {} | {} of {} | {} |\n",
                    row.workers,
                    f.hups,
                    f.upgrades,
                    f.ok,
                    f.failed,
                    f.closed_by_server,
                    f.reconnects,
                    f.handed_over,
                    f.closed_at_drain,
                    spread(&f.after_last_handover),
                    spread(&f.after_last_handover_upgrade),
                    within,
                    all.len(),
                    spread(&f.drain_to_end),
                ));
            }
            Err(e) => out.push_str(&format!(
                "| {} | failed: {} | | | | | | | | | | |\n",
                row.workers,
                e.replace('|', "/")
            )),
        }
    }
    out
}
