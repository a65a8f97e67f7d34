//! One run: a server under the strict load client for a fixed time, with a
//! reload every interval, and what the bench observed of each reload.

use crate::baton_log::message;
use crate::procs::{self, Memory};
use crate::servers::Server;
use baton_tests::load::{Class, LoadConfig, LoadHandle, Mode, Report};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How often the bench looks at the processes while a run goes on.
const TICK: Duration = Duration::from_millis(1);
/// No reload is started this close to the end of a run, so the last one
/// can still be seen serving.
const TAIL: Duration = Duration::from_millis(500);
/// Per request: connect, send and the whole response.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long after the load stops the bench waits for the last reload to
/// finish and the master to settle back to its starting fds and children.
const SETTLE: Duration = Duration::from_secs(10);
/// An upgrade whose master pid has not changed by then has failed.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the bench waits for the first successful request.
const FIRST_OK_TIMEOUT: Duration = Duration::from_secs(10);

/// What the bench does every interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing: the throughput baseline.
    None,
    /// Send this signal to the master; the new workers' responses carry a
    /// higher `x-baton-generation` (baton).
    Reload(Signal),
    /// Send this signal to the master; the new workers' responses carry
    /// a worker pid (in the same header) that was not a child of the
    /// master at the signal (nginx, HAProxy).
    ReloadWorkers(Signal),
    /// SIGUSR2 to baton's master, a new master in the pid file, and the
    /// next one only once this one is done.
    Upgrade,
    /// SIGTERM to `hello`, wait until it has exited, start it again.
    Restart,
}

/// How to recognise a response from the generation a reload started.
#[derive(Clone, Debug)]
enum NewGeneration {
    /// A generation above this one.
    Above(Option<u64>),
    /// A worker pid not among these.
    NotIn(Vec<u64>),
    /// Any response to a request started at or after this run time.
    StartedAfter(Duration),
}

impl NewGeneration {
    fn matches(&self, sample: &baton_tests::load::Sample) -> bool {
        match self {
            NewGeneration::Above(g) => sample.generation > *g,
            NewGeneration::NotIn(pids) => sample.generation.is_some_and(|p| !pids.contains(&p)),
            NewGeneration::StartedAfter(t) => sample.start >= *t,
        }
    }
}

/// One reload as the bench saw it; times are since the signal.
#[derive(Clone, Debug)]
pub struct Cycle {
    /// The signal, in run time (the load client's clock).
    pub at: Duration,
    /// The first complete 2xx response from the new generation.
    pub new_serving: Option<Duration>,
    /// Every process that served before the signal has exited.
    pub old_gone: Option<Duration>,
    /// Upgrade: the new master's pid is in the pid file.
    pub new_master: Option<Duration>,
    /// Why this reload is known to have failed.
    pub failed: Option<String>,
    new: NewGeneration,
    /// The processes that served before the signal; the first
    /// `gone_before` of them are known to be gone.
    old: Vec<Pid>,
    gone_before: usize,
    /// Upgrade: the master the signal went to, until a new one shows up.
    upgrading_from: Option<Pid>,
}

impl Cycle {
    /// Whether the bench still waits to see something of this reload.
    fn pending(&self) -> bool {
        self.failed.is_none() && (self.old_gone.is_none() || self.upgrading_from.is_some())
    }
}

/// The master's resources at one moment.
#[derive(Clone, Copy, Debug)]
pub struct Snapshot {
    pub pid: Pid,
    pub memory: Option<Memory>,
    pub fds: Option<usize>,
    pub children: usize,
}

impl Snapshot {
    fn take(pid: Pid) -> Snapshot {
        Snapshot {
            pid,
            memory: procs::memory(pid),
            fds: procs::fd_count(pid),
            children: procs::children_of(pid).len(),
        }
    }
}

/// Everything one run measured.
pub struct Measured {
    pub report: Report,
    pub cycles: Vec<Cycle>,
    /// Each reload's window: from its signal until its new generation
    /// served and its old one was gone, cut at the next signal.
    pub windows: Vec<Range<Duration>>,
    pub start: Snapshot,
    /// What `end` should match: `start`, or for upgrades the master after
    /// the first upgrade (another process than the one started).
    pub baseline: Snapshot,
    pub end: Snapshot,
    pub notes: Vec<String>,
    /// CPUs' worth of time other sessions used during the load (0.5 = half
    /// a CPU), a sign the numbers were disturbed.
    pub other_cpu: f64,
}

impl Measured {
    /// The requests that started inside a reload window.
    pub fn in_windows(&self) -> Report {
        self.report.within(&self.windows)
    }
}

/// How hard and how long.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    pub mode: Mode,
    pub duration: Duration,
    pub interval: Duration,
    pub connections: usize,
}

/// Runs `load` against `server`, acting every interval.
pub fn run(server: &mut Server, action: Action, load: Load, stop: &AtomicBool) -> Measured {
    let start = Snapshot::take(server.master);
    let others_before = procs::other_sessions_cpu();
    let log_start = server.log.as_ref().map_or(0, |l| l.len());
    let handle = LoadHandle::start(LoadConfig {
        addr: server.addr,
        connections: load.connections,
        mode: load.mode,
        duration: load.duration,
        // A bound far above what loopback can do, so it never binds.
        max_requests: 1_000_000 * load.duration.as_secs().max(1),
        timeout: REQUEST_TIMEOUT,
        path: "/".into(),
    });
    let run_start = handle.run_start();
    let now = || run_start.elapsed();
    let mut notes = Vec::new();
    if !handle.wait_for_ok(1, FIRST_OK_TIMEOUT) {
        notes.push(format!("no request succeeded within {FIRST_OK_TIMEOUT:?}"));
    }

    let mut cycles: Vec<Cycle> = Vec::new();
    let mut baseline = start;
    let mut next = load.interval;
    let last_signal = load.duration.saturating_sub(TAIL);
    let mut abandoned = false;
    while !abandoned && !stop.load(Ordering::Relaxed) {
        let t = now();
        if t >= load.duration {
            break;
        }
        let upgrade_done = cycles.last().is_none_or(|c| !c.pending());
        let due = t >= next && t <= last_signal;
        if action != Action::None && due && (action != Action::Upgrade || upgrade_done) {
            if action == Action::Upgrade && cycles.len() == 1 {
                // The first new master, settled for an interval.
                baseline = Snapshot::take(server.master);
            }
            match act(server, action, &handle, run_start) {
                Ok(cycle) => cycles.push(cycle),
                Err(e) => {
                    notes.push(e);
                    abandoned = true;
                }
            }
            while next <= now() {
                next += load.interval;
            }
        }
        for cycle in cycles.iter_mut().filter(|c| c.pending()) {
            observe(server, cycle, now());
        }
        abandoned |= cycles.iter().any(|c| c.failed.is_some());
        std::thread::sleep(TICK);
    }
    let report = handle.stop();
    let other_cpu = procs::cpu_seconds_between(&others_before, &procs::other_sessions_cpu())
        / report.elapsed.as_secs_f64().max(0.001);
    if stop.load(Ordering::Relaxed) {
        notes.push(format!(
            "interrupted after {:.1} s",
            report.elapsed.as_secs_f64()
        ));
    }

    // The last reloads, and the master returning to where it started.
    let deadline = Instant::now() + SETTLE;
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        let t = now();
        let mut pending = false;
        for cycle in cycles.iter_mut().filter(|c| c.pending()) {
            observe(server, cycle, t);
            pending |= cycle.pending();
        }
        let settled = procs::children_of(server.master).len() == baseline.children
            && (server.log.is_none()
                || !comparable(&start, &baseline, server.master)
                || procs::fd_count(server.master) == baseline.fds);
        if !pending && settled {
            break;
        }
        std::thread::sleep(TICK * 10);
    }
    notes.extend(cycles.iter().filter_map(|c| c.failed.clone()));
    for cycle in cycles.iter().filter(|c| c.pending()) {
        notes.push(format!(
            "the reload at {:.3}s was not over {SETTLE:?} after the load stopped",
            cycle.at.as_secs_f64()
        ));
    }
    let end = Snapshot::take(server.master);
    if let Some(log) = &server.log {
        notes.extend(log_summary(&log.since(log_start), action));
    }
    if action == Action::Upgrade {
        notes.push(upgrade_summary(&cycles, start, baseline));
    }

    find_new_serving(&report, &mut cycles);
    let windows = windows(&cycles, report.elapsed);
    Measured {
        report,
        cycles,
        windows,
        start,
        baseline,
        end,
        notes,
        other_cpu,
    }
}

/// Starts one reload (for a naive restart: does all of it).
fn act(
    server: &mut Server,
    action: Action,
    handle: &LoadHandle,
    run_start: Instant,
) -> Result<Cycle, String> {
    let master = server.master;
    let mut cycle = Cycle {
        at: Duration::ZERO,
        new_serving: None,
        old_gone: None,
        new_master: None,
        failed: None,
        new: NewGeneration::Above(handle.latest_generation()),
        old: procs::workers_of(master),
        gone_before: 0,
        upgrading_from: None,
    };
    let signal = match action {
        Action::None => unreachable!("no action, no cycle"),
        Action::Reload(signal) => signal,
        Action::ReloadWorkers(signal) => {
            cycle.new = NewGeneration::NotIn(cycle.old.iter().map(|p| p.as_raw() as u64).collect());
            signal
        }
        Action::Upgrade => {
            cycle.old.insert(0, master);
            cycle.upgrading_from = Some(master);
            Signal::SIGUSR2
        }
        Action::Restart => {
            cycle.at = run_start.elapsed();
            let gone = server.restart()?.saturating_duration_since(run_start);
            cycle.old = vec![master];
            cycle.gone_before = 1;
            cycle.old_gone = Some(gone.saturating_sub(cycle.at));
            // Once the old process is gone, only the new one can answer.
            cycle.new = NewGeneration::StartedAfter(gone);
            return Ok(cycle);
        }
    };
    cycle.at = run_start.elapsed();
    kill(master, signal).map_err(|e| format!("cannot send {signal} to {master}: {e}"))?;
    Ok(cycle)
}

/// Looks at a pending reload's processes at run time `t`.
fn observe(server: &mut Server, cycle: &mut Cycle, t: Duration) {
    let since = t.saturating_sub(cycle.at);
    if let Some(old_master) = cycle.upgrading_from {
        match server.pid_file_pid() {
            Some(pid) if pid != old_master => {
                server.adopt(pid);
                server.master = pid;
                cycle.upgrading_from = None;
                cycle.new_master = Some(since);
            }
            _ if since >= UPGRADE_TIMEOUT => {
                cycle.failed = Some(upgrade_failure(server, cycle, old_master));
                return;
            }
            _ => {}
        }
    }
    // Only the first process not yet known to be gone is looked at: one
    // /proc read per tick.
    while cycle.gone_before < cycle.old.len() && !procs::alive(cycle.old[cycle.gone_before]) {
        cycle.gone_before += 1;
    }
    if cycle.old_gone.is_none() && cycle.gone_before == cycle.old.len() {
        cycle.old_gone = Some(since);
    }
}

fn upgrade_failure(server: &Server, cycle: &Cycle, old_master: Pid) -> String {
    let mut text = format!(
        "upgrade failed: master pid unchanged ({old_master}) {UPGRADE_TIMEOUT:?} after USR2"
    );
    let logged = server.log.as_ref().and_then(|log| {
        log.since(0)
            .iter()
            .rev()
            .find(|e| e["level"] == "ERROR")
            .map(|e| message(e).to_string())
    });
    if let Some(logged) = logged {
        text.push_str(&format!("; the master logged \"{logged}\""));
    }
    if procs::alive(old_master) && cycle.gone_before == 0 {
        text.push_str("; it still serves");
    }
    text
}

/// baton's own account of the reloads: committed, coalesced, failed.
fn log_summary(events: &[serde_json::Value], action: Action) -> Option<String> {
    // An upgrade's outcome is in the pid file (and its failure note).
    if !matches!(action, Action::Reload(_)) {
        return None;
    }
    let count = |p: &dyn Fn(&str) -> bool| events.iter().filter(|e| p(message(e))).count();
    let committed = count(&|m| m == "reload committed");
    let coalesced = count(&|m| m.contains("coalesced"));
    let failed = count(&|m| m.starts_with("reload failed"));
    Some(format!(
        "baton's log: {committed} reloads committed, {coalesced} signals coalesced into a follow-up, {failed} failed"
    ))
}

/// Whether the master `end` may be held to `baseline`'s fds: not when the
/// baseline is the master the bench started (which holds fds inherited
/// from the bench) and `end` another one, after a single upgrade.
pub fn comparable(start: &Snapshot, baseline: &Snapshot, end: Pid) -> bool {
    baseline.pid != start.pid || end == start.pid
}

/// How the upgrades went, beyond the tables.
fn upgrade_summary(cycles: &[Cycle], start: Snapshot, baseline: Snapshot) -> String {
    let mut times: Vec<Duration> = cycles.iter().filter_map(|c| c.new_master).collect();
    times.sort_unstable();
    let mut text = String::from(
        "each USR2 waits until the previous upgrade is over (new pid in the pid file, old master gone)",
    );
    if let (Some(first), Some(last)) = (times.first(), times.last()) {
        text.push_str(&format!(
            "; signal → new pid in the pid file: min {:.1} ms, median {:.1} ms, max {:.1} ms",
            first.as_secs_f64() * 1e3,
            times[times.len() / 2].as_secs_f64() * 1e3,
            last.as_secs_f64() * 1e3,
        ));
    }
    if baseline.pid != start.pid {
        text.push_str(&format!(
            "; fds and children are compared with master {} after the first upgrade \
             (the master started first, {}, held {} fds)",
            baseline.pid,
            start.pid,
            start.fds.map_or("?".into(), |n| n.to_string()),
        ));
    }
    text
}

/// Fills in each reload's first response from its new generation.
fn find_new_serving(report: &Report, cycles: &mut [Cycle]) {
    for cycle in cycles.iter_mut() {
        // A response that completes after the signal may have started up
        // to one request timeout before it.
        let from = report
            .samples
            .partition_point(|s| s.start + REQUEST_TIMEOUT < cycle.at);
        let mut first: Option<Duration> = None;
        for s in &report.samples[from..] {
            if first.is_some_and(|f| s.start >= f) {
                break;
            }
            let done = s.start + s.latency;
            if s.class == Class::Ok && done >= cycle.at && cycle.new.matches(s) {
                first = Some(first.map_or(done, |f| f.min(done)));
            }
        }
        cycle.new_serving = first.map(|f| f - cycle.at);
    }
}

fn windows(cycles: &[Cycle], elapsed: Duration) -> Vec<Range<Duration>> {
    cycles
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let limit = cycles.get(i + 1).map_or(elapsed, |n| n.at).max(c.at);
            let end = match (c.new_serving, c.old_gone) {
                (Some(new), Some(gone)) => (c.at + new.max(gone)).min(limit),
                _ => limit,
            };
            c.at..end
        })
        .collect()
}
