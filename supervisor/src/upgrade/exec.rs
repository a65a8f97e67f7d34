//! In-place upgrade, for PID 1 (a container's init) and setups that need a
//! stable pid (`[supervisor] upgrade = "exec"`): after the new binary has
//! passed `check` on the config, the master re-executes itself, handing its
//! listeners, its workers' control channels and its generation table to the
//! new image in a memfd. The workers keep running and are adopted; the new
//! image then starts a fresh generation as a reload would.

use super::handoff::{HandedListener, BINARY_FD_ENV};
use crate::config::Config;
use crate::fleet::{Fleet, Generation, GenerationState};
use crate::listener::{Listener, Shared};
use crate::scale::ScaleOverride;
use crate::steering::Layout;
use crate::worker::{State, Worker};
use anyhow::Context;
use baton_wire::channel::Channel;
use serde::{Deserialize, Serialize};
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Names the memfd holding the [`ExecState`].
pub const STATE_FD_ENV: &str = "BATON_EXEC_STATE_FD";

/// Everything the new image needs to carry on.
#[derive(Debug, Serialize, Deserialize)]
pub struct ExecState {
    next_generation: u64,
    current: Option<u64>,
    scale: Option<(u32, u32)>,
    listeners: Vec<ExecListener>,
    generations: Vec<ExecGeneration>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ExecListener {
    handed: HandedListener,
    fd: RawFd,
    /// In the master's current set (not only held by a draining generation).
    current: bool,
    /// A generation's own socket: the index of the listener whose port it
    /// shares (always an earlier entry).
    #[serde(default)]
    port: Option<usize>,
    /// A TCP listener's port group: every member socket in the kernel's
    /// order, and the one new connections go to.
    #[serde(default)]
    group: Option<ExecGroup>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ExecGroup {
    members: Vec<RawFd>,
    steered: Option<usize>,
    /// A QUIC port's slots and generations.
    #[serde(default)]
    quic: Option<crate::steering::QuicLayout>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ExecGeneration {
    number: u64,
    state: String,
    processes: u32,
    /// The configuration it runs, in a snapshot for the keeper (an exec
    /// gives every generation the config it reads).
    #[serde(default)]
    config: Option<RunningConfig>,
    /// When it started, in `CLOCK_MONOTONIC` milliseconds (a snapshot).
    #[serde(default)]
    started_ms: Option<u64>,
    /// Its notify socket's fd and path (a snapshot).
    #[serde(default)]
    notify: Option<(RawFd, std::path::PathBuf)>,
    /// Indexes into [`ExecState::listeners`].
    listeners: Vec<usize>,
    workers: Vec<ExecWorker>,
    /// The version a deploy tool said it runs (`if_version`).
    #[serde(default)]
    deploy_version: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ExecWorker {
    pid: i32,
    index: u32,
    state: String,
    /// For a draining worker: time left until it is killed.
    kill_in_ms: Option<u64>,
    /// The same, in a snapshot: when, in `CLOCK_MONOTONIC` milliseconds
    /// (the same in every process; a snapshot taken twice in a row is the
    /// same).
    #[serde(default)]
    kill_at_ms: Option<u64>,
    /// Its start time (see [`crate::keeper::start_time`]): with the pid,
    /// the process an adopting master checks it finds.
    #[serde(default)]
    start_time: Option<u64>,
    /// The config version it was told to run (in-place reloads).
    #[serde(default)]
    app_version: Option<String>,
    restarts: u32,
    /// The SDK control channel (none for systemd/args workers).
    channel_fd: Option<RawFd>,
    /// Last `STATUS=` a notify worker sent.
    status: Option<String>,
    /// The listener addresses on which it takes connections handed over.
    #[serde(default)]
    adopts: Vec<String>,
}

/// A generation's configuration as it runs: the text and the
/// `app_config` files it was given.
#[derive(Debug, Serialize, Deserialize)]
struct RunningConfig {
    text: String,
    files: Vec<(String, Vec<u8>)>,
    version: String,
}

impl RunningConfig {
    fn of(config: &Config) -> RunningConfig {
        RunningConfig {
            text: config.text.to_string(),
            files: config
                .app
                .files
                .iter()
                .map(|(n, b)| (n.clone(), b.to_vec()))
                .collect(),
            version: config.app.version.clone(),
        }
    }

    fn parse(&self, path: &std::path::Path) -> anyhow::Result<Config> {
        let app = crate::config::AppFiles {
            files: self
                .files
                .iter()
                .map(|(n, b)| (n.clone(), Arc::new(b.clone())))
                .collect(),
            version: self.version.clone(),
        };
        Ok(Config::parse_with(path, &self.text, Some(app))?)
    }
}

/// How a state is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capture {
    /// For an exec: the port groups' members copied (kept open until the
    /// exec), times left counted from now.
    Exec,
    /// For the keeper: the fds as they are, times absolute, each
    /// generation's config along.
    Snapshot,
}

/// `at` in `CLOCK_MONOTONIC` milliseconds, exactly the same each time it
/// is asked for the same `at` in one process.
fn monotonic_ms(at: Instant) -> u64 {
    static BASE: std::sync::OnceLock<(Instant, Duration)> = std::sync::OnceLock::new();
    let (base, mono) = *BASE.get_or_init(|| {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(Duration::from)
            .unwrap_or_default();
        (Instant::now(), now)
    });
    let ms = if at >= base {
        mono + at.duration_since(base)
    } else {
        mono.saturating_sub(base.duration_since(at))
    };
    ms.as_millis() as u64
}

/// How long ago a process started `start` clock ticks after boot (its
/// `/proc/PID/stat` start time).
fn age_of(start: u64) -> Option<Duration> {
    // SAFETY: sysconf takes no pointers.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = u64::try_from(ticks).ok().filter(|t| *t > 0)?;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let started = start as f64 / ticks as f64;
    (uptime >= started).then(|| Duration::from_secs_f64(uptime - started))
}

/// The `Instant` of `CLOCK_MONOTONIC` milliseconds `ms` in this process.
fn from_monotonic_ms(ms: u64) -> Instant {
    let now = Instant::now();
    let mono = monotonic_ms(now);
    if ms >= mono {
        now + Duration::from_millis(ms - mono)
    } else {
        now.checked_sub(Duration::from_millis(mono - ms))
            .unwrap_or(now)
    }
}

/// What this master is, for its new image: the program, its config file,
/// its endpoints (the admin socket is inherited) and its log (batched
/// traces go first).
pub struct Image<'a> {
    /// The binary's `argv[0]`.
    pub program: &'a super::Program,
    /// `-c`.
    pub config: &'a std::path::Path,
    /// The admin endpoint to hand over.
    pub endpoints: &'a crate::endpoints::Endpoints,
    /// Flushed before the exec.
    pub log: &'a crate::logging::LogHandle,
    /// The keeper's channel, kept by the new image.
    pub keeper: Option<RawFd>,
}

/// Re-executes this process from `binary` with `fleet` handed over as it
/// is. Returns only if the exec failed; then nothing has changed.
pub fn exec_in_place(
    binary: &std::fs::File,
    fleet: &Fleet,
    image: Image<'_>,
) -> anyhow::Result<()> {
    let (state, mut inherit, _members) = ExecState::capture(fleet, Capture::Exec, |_| None)?;
    let json = serde_json::to_vec(&state)?;
    let memfd = nix::sys::memfd::memfd_create(
        c"baton-state",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .context("creating the state memfd")?;
    let mut file = std::fs::File::from(memfd);
    file.write_all(&json)?;
    file.rewind()?;
    inherit.push(file.as_raw_fd());
    inherit.push(binary.as_raw_fd());
    let mut command = std::process::Command::new(format!("/proc/self/fd/{}", binary.as_raw_fd()));
    crate::fds::scrub_handed(&mut command);
    command
        .arg0(&image.program.argv0)
        .arg("run")
        .arg("-c")
        .arg(image.config)
        .args(crate::watch::run_args())
        .env(STATE_FD_ENV, file.as_raw_fd().to_string())
        .env(BINARY_FD_ENV, binary.as_raw_fd().to_string());
    inherit.extend(image.endpoints.hand_admin_to(&mut command));
    inherit.extend(image.endpoints.hand_control_to(&mut command));
    match image.keeper {
        Some(fd) => {
            command.env(crate::keeper::KEEPER_FD_ENV, fd.to_string());
            inherit.push(fd);
        }
        None => {
            command.env_remove(crate::keeper::KEEPER_FD_ENV);
        }
    }
    crate::fds::hand_nofile_to(&mut command);
    for fd in &inherit {
        crate::fds::set_cloexec(*fd, false)?;
    }
    // The new image starts an exporter of its own; what this one
    // batched goes first.
    image.log.shutdown_traces();
    // From the main thread: the workers it forked keep their parent
    // thread, and with it their parent-death signal unsent.
    let error = crate::forker::exec(command);
    // Still here: the exec failed. Make every fd private again.
    for fd in &inherit {
        let _ = crate::fds::set_cloexec(*fd, true);
    }
    Err(error).context("re-executing in place")
}

impl ExecState {
    /// `fleet` as the new image adopts it: the state, the fds it names, and
    /// the port groups' member sockets (copies, to be kept open until the
    /// exec; none in a snapshot). `started` gives a worker's start time.
    pub fn capture(
        fleet: &Fleet,
        how: Capture,
        started: impl Fn(i32) -> Option<u64>,
    ) -> anyhow::Result<(ExecState, Vec<RawFd>, Vec<OwnedFd>)> {
        let snapshot = how == Capture::Snapshot;
        let mut all: Vec<Shared> = Vec::new();
        fn id(listener: &Shared, all: &mut Vec<Shared>) -> usize {
            if let Some(primary) = listener.primary() {
                id(primary, all);
            }
            all.iter()
                .position(|l| Rc::ptr_eq(l, listener))
                .unwrap_or_else(|| {
                    all.push(listener.clone());
                    all.len() - 1
                })
        }
        for listener in fleet.listeners() {
            id(listener, &mut all);
        }
        let now = Instant::now();
        let mut inherit = Vec::new();
        let generations = fleet
            .iter()
            .map(|g| ExecGeneration {
                number: g.number(),
                state: g.state().name().into(),
                processes: g.processes(),
                config: snapshot.then(|| RunningConfig::of(g.config())),
                started_ms: snapshot.then(|| monotonic_ms(g.started())),
                notify: g.notify().filter(|_| snapshot).map(|n| {
                    inherit.push(n.socket.fd());
                    (n.socket.fd(), n.socket.path().to_path_buf())
                }),
                listeners: g.listeners().iter().map(|l| id(l, &mut all)).collect(),
                deploy_version: g.deploy_version().map(str::to_string),
                workers: g
                    .workers()
                    .values()
                    .map(|w| {
                        let channel_fd = w.channel().as_ref().map(|c| c.as_raw_fd());
                        inherit.extend(channel_fd);
                        let kill_at = match w.state() {
                            State::Draining { kill_at } => Some(kill_at),
                            State::Killed => Some(now),
                            _ => None,
                        };
                        ExecWorker {
                            pid: w.pid().as_raw(),
                            index: w.index(),
                            state: w.state().name().into(),
                            kill_in_ms: kill_at
                                .filter(|_| !snapshot)
                                .map(|at| at.saturating_duration_since(now).as_millis() as u64),
                            kill_at_ms: kill_at.filter(|_| snapshot).map(monotonic_ms),
                            start_time: started(w.pid().as_raw()),
                            app_version: w.app_version().map(str::to_string),
                            restarts: w.restarts(),
                            channel_fd,
                            status: w.status().map(str::to_string),
                            adopts: w.adopted_addresses().map(str::to_string).collect(),
                        }
                    })
                    .collect(),
            })
            .collect();
        let mut members = Vec::new();
        let mut listeners = Vec::with_capacity(all.len());
        for l in &all {
            inherit.push(l.fd().as_raw_fd());
            let group = if snapshot {
                l.member_fds().map(|(fds, steered)| {
                    inherit.extend_from_slice(&fds);
                    ExecGroup {
                        members: fds,
                        steered,
                        quic: l.quic_layout(),
                    }
                })
            } else {
                l.layout()?.map(|layout| {
                    let fds: Vec<RawFd> = layout.members.iter().map(|m| m.as_raw_fd()).collect();
                    inherit.extend_from_slice(&fds);
                    members.extend(layout.members);
                    ExecGroup {
                        members: fds,
                        steered: layout.steered,
                        quic: layout.quic,
                    }
                })
            };
            listeners.push(ExecListener {
                handed: HandedListener::of(l),
                fd: l.fd().as_raw_fd(),
                current: fleet.listeners().iter().any(|c| Rc::ptr_eq(c, l)),
                port: l
                    .primary()
                    .and_then(|p| all.iter().position(|a| Rc::ptr_eq(a, p))),
                group,
            });
        }
        let state = ExecState {
            next_generation: fleet.peek_next_number(),
            current: fleet.current_number(),
            scale: fleet.scale().map(|s| (s.processes, s.config_processes)),
            listeners,
            generations,
        };
        Ok((state, inherit, members))
    }

    /// The fds it names, moved: each fd numbered `from` in the master that
    /// took it is `to(from)` here; an fd `to` does not know is an error.
    pub fn renumber(&mut self, to: impl Fn(RawFd) -> Option<RawFd>) -> anyhow::Result<()> {
        let map = |fd: &mut RawFd| -> anyhow::Result<()> {
            *fd = to(*fd).with_context(|| format!("the state names fd {fd}, not handed over"))?;
            Ok(())
        };
        for l in &mut self.listeners {
            map(&mut l.fd)?;
            if let Some(group) = &mut l.group {
                for m in &mut group.members {
                    map(m)?;
                }
            }
        }
        for g in &mut self.generations {
            if let Some((fd, _)) = &mut g.notify {
                map(fd)?;
            }
            for w in &mut g.workers {
                if let Some(fd) = &mut w.channel_fd {
                    map(fd)?;
                }
            }
        }
        Ok(())
    }

    /// The configuration of the generation that was current, as it ran
    /// (in a snapshot; `None` in an exec's state or without one).
    pub fn current_config(&self, path: &std::path::Path) -> Option<anyhow::Result<Config>> {
        let current = self.current?;
        let g = self.generations.iter().find(|g| g.number == current)?;
        g.config.as_ref().map(|c| c.parse(path))
    }

    /// The pid and start time of every worker it names.
    pub fn workers(&self) -> impl Iterator<Item = (i32, Option<u64>)> + '_ {
        self.generations
            .iter()
            .flat_map(|g| g.workers.iter().map(|w| (w.pid, w.start_time)))
    }

    /// In the new image: `fleet` adopts the listeners, generations and
    /// workers the previous image handed over, with `config` (or, in a
    /// snapshot, the config each generation ran); the workers' messages go
    /// to `events`, their exits to `children`.
    pub fn adopt(
        self,
        fleet: &mut Fleet,
        config: &Rc<Config>,
        events: &crate::master::Events,
        children: &mut crate::children::Children,
    ) -> anyhow::Result<()> {
        let state = self;
        let config = config.clone();
        let mut listeners: Vec<Shared> = Vec::new();
        let mut groups = Vec::new();
        for l in state.listeners {
            // SAFETY: the previous image of this process left this fd open
            // for us alone, as the state says; nothing else owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(l.fd) };
            crate::fds::set_cloexec(l.fd, true)?;
            let listener = match l.port {
                Some(port) => {
                    let primary = listeners
                        .get(port)
                        .context("generation socket of an unknown listener")?;
                    Listener::adopt_generation_socket(primary, fd)?
                }
                None => Rc::new(l.handed.adopt(fd)?),
            };
            // Same process, same owner.
            listener.own_path();
            if l.current {
                fleet.adopt_listener(listener.clone());
            }
            if let Some(group) = l.group {
                let mut members = Vec::with_capacity(group.members.len());
                for raw in group.members {
                    // SAFETY: as above: a port group member left open for us.
                    members.push(unsafe { OwnedFd::from_raw_fd(raw) });
                    crate::fds::set_cloexec(raw, true)?;
                }
                let layout = Layout {
                    members,
                    steered: group.steered,
                    quic: group.quic,
                };
                groups.push((listeners.len(), layout));
            }
            listeners.push(listener);
        }
        // Members no adopted generation uses are let go of when safe.
        let unused = Rc::new(());
        for (index, layout) in groups {
            listeners[index].adopt_group(layout, &listeners, &unused)?;
        }
        drop(unused);
        let mut restored = Vec::new();
        for g in state.generations {
            let state = match g.state.as_str() {
                "current" => GenerationState::Current,
                "draining" => GenerationState::Draining,
                "standby" => GenerationState::Standby,
                "starting" => GenerationState::Starting,
                _ => GenerationState::Failed,
            };
            let config =
                match g.config {
                    Some(running) => Rc::new(running.parse(&config.path).with_context(|| {
                        format!("the configuration generation {} runs", g.number)
                    })?),
                    None => config.clone(),
                };
            let held = g
                .listeners
                .iter()
                .map(|i| {
                    listeners
                        .get(*i)
                        .cloned()
                        .context("listener index out of range")
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mut generation = Generation::new(g.number, config.clone(), held, g.processes);
            generation.set_deploy_version(g.deploy_version.clone());
            if let Some(ms) = g.started_ms {
                generation.started_at(from_monotonic_ms(ms));
            }
            if let Some((raw, path)) = g.notify {
                // SAFETY: as the listeners: left open for this process
                // alone.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                crate::fds::set_cloexec(raw, true)?;
                generation.set_notify(crate::notify::Notifier::adopt(fd, path, g.number, events)?);
            }
            // Replaced, but its workers not yet told: it was handing over.
            let handing_over = state == GenerationState::Draining
                && g.workers
                    .iter()
                    .all(|w| w.kill_in_ms.is_none() && w.kill_at_ms.is_none());
            for w in g.workers {
                let pid = nix::unistd::Pid::from_raw(w.pid);
                let channel = match w.channel_fd {
                    Some(raw) => {
                        // SAFETY: as above: this worker's channel, left open
                        // for us alone.
                        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                        crate::fds::set_cloexec(raw, true)?;
                        Some(Arc::new(Channel::new(fd)?))
                    }
                    None => None,
                };
                let kill_at = match (w.kill_at_ms, w.kill_in_ms) {
                    (Some(at), _) => Some(from_monotonic_ms(at)),
                    (None, Some(ms)) => Some(Instant::now() + Duration::from_millis(ms)),
                    (None, None) => None,
                };
                let state = match (w.state.as_str(), kill_at) {
                    ("ready", _) => State::Ready,
                    (_, Some(kill_at)) => State::Draining { kill_at },
                    _ => State::Starting,
                };
                tracing::info!(
                    event = "worker.adopted",
                    generation = g.number,
                    worker = w.index,
                    pid = w.pid,
                    state = state.name(),
                    "worker adopted"
                );
                let forward = channel.clone();
                let mut worker = Worker::adopted(
                    pid,
                    w.index,
                    state,
                    w.restarts,
                    channel,
                    w.status,
                    config.worker.stop_signal.0,
                );
                if let Some(version) = w.app_version {
                    worker.runs_version(version);
                }
                for address in w.adopts {
                    worker.adopts(address);
                }
                if let Some(age) = w.start_time.and_then(age_of) {
                    worker.started_at(Instant::now().checked_sub(age).unwrap_or_else(Instant::now));
                }
                if let Some(channel) = forward {
                    worker.forwarded_by(crate::master::forward_worker(events, pid, channel));
                }
                generation.adopt_worker(pid, worker, children);
            }
            restored.push((generation, state, handing_over));
        }
        let scale = state
            .scale
            .map(|(processes, config_processes)| ScaleOverride {
                processes,
                config_processes,
            });
        fleet.restore(restored, state.current, state.next_generation, scale);
        Ok(())
    }
}

/// Reads the state a previous image of this process left, if any.
pub fn take_state_from_env() -> anyhow::Result<Option<ExecState>> {
    let Some(fd) = crate::fds::inherited(STATE_FD_ENV)? else {
        return Ok(None);
    };
    let mut file = std::fs::File::from(fd);
    let mut json = Vec::new();
    file.read_to_end(&mut json)?;
    Ok(Some(
        serde_json::from_slice(&json).context("reading the handed-over state")?,
    ))
}

/// Whether this master upgrades in place: as PID 1 or the child of a
/// keeper that is (a new master of its own would outlive it... or not),
/// or when configured.
pub fn in_place(config: &Config) -> bool {
    std::process::id() == 1
        || crate::keeper::under_init()
        || config.supervisor.upgrade == crate::config::UpgradeMode::Exec
}
