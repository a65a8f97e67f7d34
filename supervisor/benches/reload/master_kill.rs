//! The `master-kill` scenario: the master killed with SIGKILL under load,
//! [`KILLS`] times, baton beside nginx and HAProxy (`-W`), with keep-alive
//! connections and with a new connection per request. Each kill comes
//! once the previous one is over (a master is in charge again and a reload
//! worked) and the server has served [`PAUSE`] since.
//!
//! After each kill the bench does what an operator's script would to get a
//! server it can reload again, at once, and times it from the kill:
//!
//! - **baton**: nothing. The keeper starts another master, which adopts
//!   the running workers. *Managed again* is when `baton status` names a
//!   master other than the one killed; then `baton reload`, *reloaded* when
//!   its reply says the reload committed.
//! - **nginx**: no keeper. `nginx -s reload` first (the pid file names the
//!   dead master), then nginx started again with the command that first
//!   started it. While the orphaned workers still listen, that fails
//!   (`bind()`: address already in use, after nginx's own retries); the
//!   orphans then get SIGQUIT, nginx's graceful stop, and once they are
//!   gone nginx is started once more. *Managed again* is the first response
//!   from a worker that is not an orphan; then `nginx -s reload`,
//!   *reloaded* at the first response from a worker that the reload
//!   started.
//! - **HAProxy -W**: started again at once with the same command (its
//!   orphaned worker, if any is still running then, would get SIGUSR1, its
//!   graceful stop, only if that start failed); then USR2 to the new
//!   master, timed as for nginx.
//!
//! Whether the workers that served before a kill were still the processes
//! serving once a master was in charge again is checked after every kill:
//! for baton from `baton status`, for the others from `/proc`.

use crate::procs;
use crate::servers::{self, Binaries, Kind, Server};
use crate::summary::{failures_by_class, mode_name, ms};
use baton::control::client;
use baton::control::protocol::Request;
use baton_tests::harness::exchange;
use baton_tests::load::{Class, LoadConfig, LoadHandle, Mode, Report};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use std::fmt::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// For `--only`.
pub const NAME: &str = "master-kill";
/// Kills per run.
const KILLS: usize = 5;
/// Serving undisturbed before the first kill, between the end of one kill
/// (a reload worked) and the next, and after the last.
const PAUSE: Duration = Duration::from_secs(1);
/// Each step of a recovery: a master in charge again, a restart serving,
/// orphans gone, a reload taking effect.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);
/// The load's bound, far above what [`KILLS`] recoveries take.
const RUN_LIMIT: Duration = Duration::from_secs(150);
/// Per request of the load: connect, send and the whole response.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the bench waits for HAProxy's master to log a reload before
/// it sends USR2 again.
const USR2_AGAIN: Duration = Duration::from_millis(20);
/// How often the bench looks again while it waits.
const POLL: Duration = Duration::from_millis(5);

/// The systems, in run order.
const SYSTEMS: [Kind; 3] = [Kind::Baton, Kind::Nginx, Kind::Haproxy];

/// One system in one client mode.
pub struct Row {
    pub system: String,
    pub mode: Mode,
    /// Why it did not run: `not installed`, or what failed before the
    /// first kill.
    pub outcome: Result<Figures, String>,
}

/// What one run measured.
pub struct Figures {
    pub report: Report,
    pub kills: Vec<Kill>,
    /// Why the run stopped before its last kill.
    pub stopped: Option<String>,
    /// CPUs' worth of time other sessions used during the run (see
    /// [`procs::other_sessions_cpu`]).
    pub other_cpu: f64,
}

/// One kill and the recovery after it; times are since the kill.
pub struct Kill {
    /// A master in charge again: baton's status names a new master; the
    /// restarted nginx or HAProxy serves.
    pub managed: Duration,
    /// The reload after that took effect.
    pub reloaded: Duration,
    /// The workers serving before the kill were the ones serving once a
    /// master was in charge again.
    pub workers_kept: bool,
    /// When every orphaned worker had exited (nginx, HAProxy).
    pub orphans_gone: Option<Duration>,
    /// What the operator ran into on the way, e.g. a restart that failed.
    pub steps: Vec<String>,
}

/// Runs every system in both client modes, unless interrupted.
pub fn run(bins: &Binaries, connections: usize, interrupted: &AtomicBool) -> Vec<Row> {
    let mut rows = Vec::new();
    for kind in SYSTEMS {
        let system = system_name(kind, bins);
        for mode in [Mode::KeepAlive, Mode::NewConnection] {
            if interrupted.load(Ordering::Relaxed) {
                return rows;
            }
            eprint!(
                "reload bench: {system} / master SIGKILL / {} ... ",
                mode_name(mode)
            );
            let outcome = Server::start(kind, bins).and_then(|server| {
                let mut scene = Scene(server);
                measure(&mut scene, kind, mode, connections, interrupted)
            });
            match &outcome {
                Ok(f) => eprintln!(
                    "{} kills, {} ok, {} failed{}",
                    f.kills.len(),
                    f.report.ok(),
                    f.report.failed(),
                    f.stopped
                        .as_ref()
                        .map_or(String::new(), |s| format!("; stopped: {s}"))
                ),
                Err(e) => eprintln!("{e}"),
            }
            rows.push(Row {
                system: system.clone(),
                mode,
                outcome,
            });
        }
    }
    rows
}

fn system_name(kind: Kind, bins: &Binaries) -> String {
    match kind {
        Kind::Nginx => bins
            .nginx
            .as_deref()
            .and_then(servers::version)
            .unwrap_or_else(|| "nginx".into()),
        Kind::Haproxy => format!(
            "{} -W",
            bins.haproxy
                .as_deref()
                .and_then(servers::version)
                .unwrap_or_else(|| "HAProxy".into())
        ),
        _ => "baton + hello".into(),
    }
}

/// A server whose every process is killed when the run ends, however it
/// ends: also the orphaned workers of a killed master, found by their
/// working directory (the server's own), before the server's guard kills
/// what it started and its directory is removed.
struct Scene(Server);

impl Drop for Scene {
    fn drop(&mut self) {
        // A keeper may start one more master while the sweep goes on.
        for _ in 0..5 {
            let running = procs::running_in(self.0.dir());
            if running.is_empty() {
                break;
            }
            for pid in running {
                let _ = kill(pid, Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn measure(
    scene: &mut Scene,
    kind: Kind,
    mode: Mode,
    connections: usize,
    interrupted: &AtomicBool,
) -> Result<Figures, String> {
    let server = &mut scene.0;
    let others_before = procs::other_sessions_cpu();
    let handle = LoadHandle::start(LoadConfig {
        connections,
        mode,
        duration: RUN_LIMIT,
        timeout: REQUEST_TIMEOUT,
        ..LoadConfig::new(server.addr)
    });
    if !handle.wait_for_ok(1, STEP_TIMEOUT) {
        handle.stop();
        return Err(format!("no request succeeded within {STEP_TIMEOUT:?}"));
    }
    let run_start = handle.run_start();
    let mut kills = Vec::new();
    let mut stopped = None;
    for n in 1..=KILLS {
        std::thread::sleep(PAUSE);
        if interrupted.load(Ordering::Relaxed) {
            stopped = Some("interrupted".to_string());
            break;
        }
        // Room for the worst recovery, inside the load's bound.
        if run_start.elapsed() + 4 * STEP_TIMEOUT > RUN_LIMIT {
            stopped = Some(format!("out of time after {:?}", run_start.elapsed()));
            break;
        }
        let killed = match kind {
            Kind::Baton => kill_baton(server),
            _ => kill_external(server, kind, n),
        };
        match killed {
            Ok(k) => kills.push(k),
            Err(e) => {
                stopped = Some(format!("kill {n}: {e}"));
                break;
            }
        }
    }
    std::thread::sleep(PAUSE);
    let report = handle.stop();
    let other_cpu = procs::cpu_seconds_between(&others_before, &procs::other_sessions_cpu())
        / report.elapsed.as_secs_f64().max(0.001);
    Ok(Figures {
        report,
        kills,
        stopped,
        other_cpu,
    })
}

/// baton's status, through its control socket.
fn status(socket: &Path, timeout: Duration) -> Result<Value, String> {
    let reply = client::request(socket, &Request::Status {}, timeout)
        .map_err(|e| format!("baton status: {e}"))?;
    reply
        .result
        .filter(|_| reply.ok)
        .ok_or_else(|| format!("baton status: {}", reply.error.unwrap_or_default()))
}

fn master_of(status: &Value) -> Result<Pid, String> {
    status["master"]["pid"]
        .as_i64()
        .map(|pid| Pid::from_raw(pid as i32))
        .ok_or_else(|| format!("a status without the master's pid: {status}"))
}

fn kill_baton(server: &mut Server) -> Result<Kill, String> {
    let socket = server.dir().join("baton.sock");
    let before = status(&socket, STEP_TIMEOUT)?;
    let old_master = master_of(&before)?;
    let workers = baton_tests::harness::current_worker_pids(&before);
    let killed = Instant::now();
    server.kill_master()?;
    // The keeper holds the control socket: a request waits in its backlog
    // until a new master takes it.
    let after = loop {
        if let Ok(status) = status(&socket, Duration::from_secs(1)) {
            if master_of(&status)? != old_master {
                break status;
            }
        }
        if killed.elapsed() >= STEP_TIMEOUT {
            return Err(format!(
                "no other master answered `baton status` within {STEP_TIMEOUT:?}"
            ));
        }
        std::thread::sleep(POLL);
    };
    let managed = killed.elapsed();
    server.master = master_of(&after)?;
    let workers_kept =
        !workers.is_empty() && baton_tests::harness::current_worker_pids(&after) == workers;
    let reload = Request::Reload {
        canary: None,
        mode: None,
        if_version: None,
    };
    let reply = client::request(&socket, &reload, STEP_TIMEOUT)
        .map_err(|e| format!("baton reload: {e}"))?;
    if !reply.ok {
        return Err(format!(
            "baton reload failed: {}",
            reply.error.unwrap_or_default()
        ));
    }
    // What the new master says of the one before it.
    let adopted = &after["master"]["adopted"];
    let steps = vec![format!(
        "`baton status` after the kill: adopted, the previous master {} ({})",
        if adopted["previous_pid"].as_i64() == Some(old_master.as_raw().into()) {
            "is the one killed"
        } else {
            "is not the one killed"
        },
        adopted["died"].as_str().unwrap_or("no cause given"),
    )];
    Ok(Kill {
        managed,
        reloaded: killed.elapsed(),
        workers_kept,
        orphans_gone: None,
        steps,
    })
}

/// The worker pid in the `x-baton-generation` header of a 2xx answer to
/// one request on a new connection (nginx and HAProxy are configured to
/// send it there).
fn probe(addr: SocketAddr) -> Option<Pid> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    stream
        .set_write_timeout(Some(Duration::from_secs(1)))
        .ok()?;
    let (status, head, _) = exchange(stream, "/").ok()?;
    if !(200..300).contains(&status) {
        return None;
    }
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("x-baton-generation")
            .then(|| v.trim().parse().ok().map(Pid::from_raw))?
    })
}

/// Watches the orphans of a killed master: when the last one is gone.
struct Orphans {
    pids: Vec<Pid>,
    killed: Instant,
    gone: Option<Duration>,
}

impl Orphans {
    fn look(&mut self) {
        if self.gone.is_none() && !self.pids.iter().any(|p| procs::alive(*p)) {
            self.gone = Some(self.killed.elapsed());
        }
    }

    fn alive(&self) -> Vec<Pid> {
        self.pids
            .iter()
            .copied()
            .filter(|p| procs::alive(*p))
            .collect()
    }
}

/// How a start of the server again ended.
enum Started {
    /// A worker that is not an orphan answered.
    Serving,
    /// It exited first: its status and first line of output.
    Exited(String),
}

/// Starts the server again and waits until one of its own workers
/// answers, or it exits.
fn start_again(server: &mut Server, log: &str, orphans: &mut Orphans) -> Result<Started, String> {
    let pid = server.start_again(log)?;
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        orphans.look();
        if let Some(status) = server.exited(pid) {
            let output = std::fs::read_to_string(server.dir().join(log)).unwrap_or_default();
            let first = output.lines().next().unwrap_or("no output").trim();
            return Ok(Started::Exited(format!("{}: {first}", exit(status))));
        }
        if probe(server.addr).is_some_and(|p| !orphans.pids.contains(&p)) {
            return Ok(Started::Serving);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "started again, it did not serve within {STEP_TIMEOUT:?}"
            ));
        }
        std::thread::sleep(POLL);
    }
}

fn exit(status: ExitStatus) -> String {
    match status.code() {
        Some(code) => format!("exit status {code}"),
        None => status.to_string(),
    }
}

/// nginx's and HAProxy's graceful stop of a worker.
fn graceful_stop(kind: Kind) -> Signal {
    if kind == Kind::Nginx {
        Signal::SIGQUIT
    } else {
        Signal::SIGUSR1
    }
}

fn kill_external(server: &mut Server, kind: Kind, n: usize) -> Result<Kill, String> {
    let old_master = server.master;
    let mut orphans = Orphans {
        pids: procs::workers_of(old_master),
        killed: Instant::now(),
        gone: None,
    };
    server.kill_master()?;
    let mut steps = Vec::new();
    if kind == Kind::Nginx {
        // What an nginx operator types first: the pid file still names the
        // dead master.
        let (status, text) = server.run_again_with(&["-s", "reload"])?;
        let text = text.replace(&old_master.to_string(), "PID");
        steps.push(format!(
            "`nginx -s reload` before a restart: {}{}",
            exit(status),
            text.lines()
                .next()
                .map_or(String::new(), |l| format!(" ({l})"))
        ));
    }
    let mut log = format!("restart-{n}.log");
    if let Started::Exited(why) = start_again(server, &log, &mut orphans)? {
        steps.push(format!("started again at once: {why}"));
        let signal = graceful_stop(kind);
        let alive = orphans.alive();
        for pid in &alive {
            let _ = kill(*pid, signal);
        }
        let deadline = Instant::now() + STEP_TIMEOUT;
        while !orphans.alive().is_empty() {
            if Instant::now() >= deadline {
                for pid in orphans.alive() {
                    let _ = kill(pid, Signal::SIGKILL);
                }
                steps.push(format!(
                    "orphans still running {STEP_TIMEOUT:?} after {signal}: killed"
                ));
                break;
            }
            std::thread::sleep(POLL);
        }
        orphans.look();
        steps.push(format!(
            "{} orphaned worker(s) sent {signal}, then started again",
            alive.len()
        ));
        log = format!("restart-{n}-again.log");
        if let Started::Exited(why) = start_again(server, &log, &mut orphans)? {
            return Err(format!(
                "started again once the orphans were gone, it failed: {why}"
            ));
        }
    }
    if kind == Kind::Haproxy {
        // Its master takes USR2 once it says so; its worker may serve
        // before.
        wait_logged(&server.dir().join(&log), "Loading success.")?;
    }
    let managed = orphans.killed.elapsed();
    let mut serving = procs::workers_of(server.master);
    serving.sort();
    let mut before = orphans.pids.clone();
    before.sort();
    let workers_kept = !before.is_empty() && serving == before;

    let reloaded_from = procs::workers_of(server.master);
    if kind == Kind::Nginx {
        let (status, text) = server.run_again_with(&["-s", "reload"])?;
        if !status.success() {
            return Err(format!(
                "`nginx -s reload` failed: {}: {text}",
                exit(status)
            ));
        }
    }
    let output = server.dir().join(&log);
    let reloads_logged =
        || std::fs::read_to_string(&output).map_or(0, |t| t.matches("Reloading HAProxy").count());
    let logged_before = reloads_logged();
    let mut usr2_sent = 0;
    let mut last_usr2 = Instant::now();
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        orphans.look();
        // A USR2 that reaches HAProxy's master in the first milliseconds
        // after it logged `Loading success.` is lost: sent again while its
        // log shows no reload.
        if kind == Kind::Haproxy
            && (usr2_sent == 0
                || (last_usr2.elapsed() >= USR2_AGAIN && reloads_logged() == logged_before))
        {
            kill(server.master, Signal::SIGUSR2)
                .map_err(|e| format!("USR2 to {}: {e}", server.master))?;
            usr2_sent += 1;
            last_usr2 = Instant::now();
        }
        let by = probe(server.addr);
        if by.is_some_and(|p| !reloaded_from.contains(&p) && !orphans.pids.contains(&p)) {
            break;
        }
        if Instant::now() >= deadline {
            let master = server.master;
            return Err(format!(
                "no worker of the reload answered within {STEP_TIMEOUT:?} (the last answer \
                 was from {by:?}; workers at the reload {reloaded_from:?}; master {master} {}; \
                 its output: {})",
                if procs::alive(master) {
                    "alive"
                } else {
                    "gone"
                },
                tail(&output, 6),
            ));
        }
        std::thread::sleep(POLL);
    }
    let reloaded = orphans.killed.elapsed();
    orphans.look();
    if usr2_sent > 1 {
        steps.push(format!(
            "USR2 sent {usr2_sent} times, {USR2_AGAIN:?} apart, before the restarted master \
             logged a reload"
        ));
    }
    Ok(Kill {
        managed,
        reloaded,
        workers_kept,
        orphans_gone: orphans.gone,
        steps,
    })
}

/// Waits until `path` holds `text`.
fn wait_logged(path: &Path, text: &str) -> Result<(), String> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !std::fs::read_to_string(path).is_ok_and(|t| t.contains(text)) {
        if Instant::now() >= deadline {
            return Err(format!(
                "no `{text}` in {} within {STEP_TIMEOUT:?}: {}",
                path.display(),
                tail(path, 6)
            ));
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

/// The last `n` lines of `path`, on one line.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// The longest time between two consecutive ok responses, by when they
/// completed: how long the server answered nothing (or failed everything).
fn longest_gap(report: &Report) -> Option<Duration> {
    let mut ends: Vec<Duration> = report
        .samples
        .iter()
        .filter(|s| s.class == Class::Ok)
        .map(|s| s.start + s.latency)
        .collect();
    ends.sort_unstable();
    ends.windows(2).map(|w| w[1] - w[0]).max()
}

/// `p50 / max` of one time over the kills.
fn p50_max(kills: &[Kill], pick: impl Fn(&Kill) -> Option<Duration>) -> String {
    let mut times: Vec<Duration> = kills.iter().filter_map(pick).collect();
    times.sort_unstable();
    match (times.get((times.len().max(1) - 1) / 2), times.last()) {
        (Some(p50), Some(max)) => format!("{} / {}", ms(*p50), ms(*max)),
        _ => "—".into(),
    }
}

/// The results as a markdown table, then what the operator ran into.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = format!(
        "### Master killed (SIGKILL), {KILLS} times under load\n\n\
         | system | mode | kills | load | ok | failed | failures by class | longest without an ok response | kill → managed again (p50 / max) | kill → a reload took effect (p50 / max) | same workers after the kill | other load |\n\
         | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | --- | --- | --- | ---: |\n"
    );
    let mut notes = Vec::new();
    for row in rows {
        let head = format!("| {} | {} |", row.system, mode_name(row.mode));
        let f = match &row.outcome {
            Ok(f) => f,
            Err(e) => {
                let _ = writeln!(out, "{head} {e} | | | | | | | | | |");
                continue;
            }
        };
        let kept = f.kills.iter().filter(|k| k.workers_kept).count();
        let _ = writeln!(
            out,
            "{head} {} | {:.1} s | {} | {} | {} | {} | {} | {} | {kept} of {} | {:.2} |",
            f.kills.len(),
            f.report.elapsed.as_secs_f64(),
            f.report.ok(),
            f.report.failed(),
            failures_by_class(&f.report),
            longest_gap(&f.report).map_or("—".into(), ms),
            p50_max(&f.kills, |k| Some(k.managed)),
            p50_max(&f.kills, |k| Some(k.reloaded)),
            f.kills.len(),
            f.other_cpu,
        );
        let label = format!("{}, {}", row.system, mode_name(row.mode));
        if let Some(stopped) = &f.stopped {
            notes.push(format!("- {label}: stopped early: {stopped}"));
        }
        // The same step after every kill is said once, with its count.
        let mut steps: Vec<(&str, usize)> = Vec::new();
        for step in f.kills.iter().flat_map(|k| &k.steps) {
            match steps.iter_mut().find(|(s, _)| s == step) {
                Some((_, n)) => *n += 1,
                None => steps.push((step, 1)),
            }
        }
        for (step, n) in steps {
            notes.push(format!(
                "- {label}: {step} (after {n} of {} kills)",
                f.kills.len()
            ));
        }
        if f.kills.iter().any(|k| k.orphans_gone.is_some()) {
            notes.push(format!(
                "- {label}: kill → every orphaned worker gone (p50 / max): {}",
                p50_max(&f.kills, |k| k.orphans_gone)
            ));
        }
    }
    if !notes.is_empty() {
        out.push('\n');
        out.push_str(&notes.join("\n"));
        out.push('\n');
    }
    out
}
