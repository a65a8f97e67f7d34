//! The keeper: a small process that holds what the workers depend on, so
//! that the master's death stops nothing that serves.
//!
//! Each master starts one (this binary again, `baton __keeper`, with a
//! control channel as its stdin) before its first worker, or reattaches to
//! the one that started it. The master tells it:
//!
//! - how to start another master like itself ([`Message::Hello`]: its
//!   arguments, environment and directory, and how many deaths to survive);
//! - every worker it starts, with a pidfd, and every one it reaps;
//! - a copy of every fd the workers need ([`Message::Hold`]: the listeners
//!   and their port groups' sockets, the master's end of each SDK worker's
//!   channel, each generation's notify socket, the control socket, the
//!   admin endpoint), and after every
//!   change a snapshot of its state in a sealed memfd
//!   ([`Message::Snapshot`], see [`crate::adopt`]).
//!
//! While the keeper holds the master's end of a worker's channel, the
//! worker does not see the master die: it goes on serving. When the channel
//! to the master ends without [`Message::Retire`], the master is gone: the
//! keeper starts a new master (same binary, arguments and environment) and
//! hands it the fds and the snapshot; the new master adopts the workers
//! (see [`crate::adopt`]). It is this master's parent, and a subreaper: the
//! workers of a master it started are re-parented to it, and reaped here.
//!
//! Past `[supervisor] master_restarts` deaths in its window (or when a
//! master cannot be started, or restarts are off), the keeper gives up as
//! the guardian it once was: it lets go of every fd (SDK workers see their
//! channel end and drain), sends each other worker its stop signal, and
//! kills, at its drain deadline, the process group of every worker still
//! running. A master that stops, or hands over to an upgrade's new master,
//! retires its keeper first: then its death is only enforced, never
//! restarted. A master that re-executes itself hands the channel to its
//! new image, which greets the same keeper.
//!
//! The keeper ignores the signals a terminal or an init system sends to a
//! whole process group (it starts in the master's): only the channel
//! matters. As a container's PID 1 ([`init`]) it is the master's parent
//! instead, and passes the signals it gets on to the master.
//!
//! Under systemd with an fd store (see [`crate::fdstore`]), the master
//! stores its end of the channel too: the keeper does not see it die, and
//! systemd, not the keeper, starts the next master, which attaches to the
//! same channel. The channel ends only when the store lets go of it (the
//! service stopped for good): then the keeper gives up.

use anyhow::Context;
use baton_wire::channel::{self, Channel};
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::time::Duration;
use tokio::time::Instant;

/// The first argument that makes the `baton` binary a keeper.
pub const ARG: &str = "__keeper";
/// In a master the keeper started (or that re-executed itself): the fd
/// of the keeper's channel.
pub const KEEPER_FD_ENV: &str = "BATON_KEEPER_FD";
/// In a master whose keeper is its container's PID 1 (see [`init`]).
pub const INIT_ENV: &str = "BATON_KEEPER_INIT";
/// In a master the keeper started for `baton restart`: `drain` or `hard`.
pub const RESTART_ENV: &str = "BATON_ADOPT_RESTART";
/// In a master the keeper started: the snapshot's memfd.
pub const SNAPSHOT_FD_ENV: &str = "BATON_ADOPT_SNAPSHOT_FD";
/// In a master the keeper started: the fd where the snapshot's fds start
/// (they follow one another, in the snapshot's order).
pub const FDS_ENV: &str = "BATON_ADOPT_FDS";
/// In a master the keeper started: `PID:HOW`, the previous master and how
/// it ended.
pub const PREVIOUS_ENV: &str = "BATON_ADOPT_PREVIOUS";
/// In a master the keeper started: the workers the keeper watches, as
/// `PID,PID,...` (a worker started after the last snapshot is among them).
pub const WATCHED_ENV: &str = "BATON_ADOPT_WATCHED";

/// The variables naming what a master was handed at its start: it reads
/// them once, and no master it starts or image it execs may see them
/// again ([`crate::fds::scrub_handed`]): their fd numbers meant something
/// to this process's start only.
pub const HANDED_ENV: [&str; 11] = [
    KEEPER_FD_ENV,
    RESTART_ENV,
    SNAPSHOT_FD_ENV,
    FDS_ENV,
    PREVIOUS_ENV,
    WATCHED_ENV,
    crate::upgrade::exec::STATE_FD_ENV,
    crate::upgrade::handoff::UPGRADE_FD_ENV,
    crate::upgrade::handoff::BINARY_FD_ENV,
    crate::admin::ADMIN_FD_ENV,
    crate::control::CONTROL_FD_ENV,
];

/// What no master the keeper starts may inherit from the keeper's own
/// environment: the handed variables, and systemd's sockets (the keeper
/// hands the listeners itself).
const PRIVATE_ENV: [&str; 2] = ["LISTEN_FDS", "LISTEN_PID"];

/// The signals the keeper ignores (sent to a whole process group).
const IGNORED: [Signal; 10] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGTSTP,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGWINCH,
];

/// How many fds go in one [`Message::Hold`].
const HOLD_BATCH: usize = 200;

/// What a master tells its keeper.
#[derive(Debug, Serialize, Deserialize)]
enum Message {
    /// The first message of every master: how to start another one like
    /// it, and how many deaths to survive (`None`: none).
    Hello {
        argv: Vec<Vec<u8>>,
        env: Vec<(Vec<u8>, Vec<u8>)>,
        cwd: Vec<u8>,
        restarts: Option<(u32, u64)>,
        /// systemd's fd store holds the master's end: systemd restarts the
        /// master, never the keeper.
        #[serde(default)]
        store: bool,
    },
    /// A new worker, with a pidfd for it.
    Watch {
        pid: i32,
        drain_ms: u64,
        stop_signal: i32,
    },
    /// A worker was reaped.
    Forget { pid: i32 },
    /// Copies of fds to hold, one per socket inode listed, in order.
    Hold { inodes: Vec<u64> },
    /// The master's state, in the memfd it carries, and the inode of each
    /// fd it names, in its order. Held fds not listed are let go of.
    Snapshot { places: Vec<u64> },
    /// The master stops, or handed over to an upgrade: do not start
    /// another when it is gone.
    Retire,
    /// `baton restart`: the master exits now; start another from `exe`
    /// (not a death: no restart budget spent), which replaces the workers
    /// with a new generation, drained or (`hard`) stopped at once.
    Restart { exe: Vec<u8>, hard: bool },
    /// The master is done and its channel may never end (systemd's fd
    /// store holds it): exit, leaving every worker alone.
    Release,
}

/// The master's end: a running keeper.
#[derive(Debug)]
pub struct Keeper {
    /// Its pid, when it is this master's child (not when it started it).
    child: Option<Pid>,
    channel: std::sync::Arc<Channel>,
    /// Inodes of the fds it holds (as far as this master knows).
    held: HashSet<u64>,
    /// The last snapshot sent, and its places' inodes.
    last: Option<(Vec<u8>, Vec<u64>)>,
    /// Told to retire or exit: no more snapshots.
    retired: bool,
    /// Workers' start times, for the snapshot.
    started: HashMap<i32, u64>,
    /// When the next snapshot is due.
    pace: Pace,
    /// Told to start another master: this one exits.
    restarting: bool,
    /// systemd's fd store, which gets what the keeper gets.
    store: Option<crate::fdstore::Store>,
}

/// When snapshots are taken: after every turn of the loop, but ten times
/// as far apart as they take when they name more than
/// [`crate::adopt::SNAPSHOT_FDS`] fds.
#[derive(Debug, Default)]
struct Pace {
    /// No snapshot before this.
    next: Option<Instant>,
    /// A turn passed before `next`: a snapshot is due then.
    pending: bool,
}

impl Pace {
    fn due(&mut self, now: Instant) -> bool {
        if self.next.is_some_and(|next| now < next) {
            self.pending = true;
            return false;
        }
        self.pending = false;
        true
    }

    fn took(&mut self, now: Instant, cost: Duration, fds: usize) {
        self.next = (fds > crate::adopt::SNAPSHOT_FDS).then(|| now + cost * 10);
    }

    fn wakeup(&self) -> Option<Instant> {
        self.next.filter(|_| self.pending)
    }
}

/// How many deaths of the master its keeper survives, and the restart
/// budget's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Restarts allowed in the window.
    pub restarts: u32,
    /// The window.
    pub window: Duration,
}

impl Keeper {
    /// Starts a keeper as a child of this master, and greets it. Must run
    /// inside the master's tokio runtime.
    pub fn start(budget: Option<Budget>) -> anyhow::Result<Keeper> {
        let (mine, theirs) = channel::pair().context("creating the keeper's channel")?;
        let child = std::process::Command::new("/proc/self/exe")
            .arg(ARG)
            .stdin(std::process::Stdio::from(theirs))
            .env_clear()
            .spawn()
            .context("starting the keeper")?;
        let pid = Pid::from_raw(child.id() as i32);
        // The master reaps its children itself.
        drop(child);
        let channel = Channel::new(mine).context("registering the keeper's channel")?;
        tracing::debug!(pid = pid.as_raw(), "keeper started");
        let keeper = Keeper::new(Some(pid), channel);
        keeper.hello(budget);
        Ok(keeper)
    }

    /// In a master the keeper started, or whose previous image it kept:
    /// its channel, and greets it.
    pub fn attach(fd: OwnedFd, budget: Option<Budget>) -> anyhow::Result<Keeper> {
        let channel = Channel::new(fd).context("registering the keeper's channel")?;
        let keeper = Keeper::new(None, channel);
        keeper.hello(budget);
        Ok(keeper)
    }

    fn new(child: Option<Pid>, channel: Channel) -> Keeper {
        Keeper {
            child,
            channel: std::sync::Arc::new(channel),
            held: HashSet::new(),
            last: None,
            retired: false,
            started: HashMap::new(),
            pace: Pace::default(),
            restarting: false,
            store: crate::fdstore::Store::from_env(),
        }
    }

    /// systemd's fd store, to hand to the keeper replacing this one.
    pub fn take_store(&mut self) -> Option<crate::fdstore::Store> {
        self.store.take()
    }

    /// Goes on with the fd store of the keeper this one replaces (what it
    /// stored, and must remove).
    pub fn carry_store(&mut self, store: Option<crate::fdstore::Store>) {
        if store.is_some() {
            self.store = store;
        }
    }

    /// This master stops for good: systemd's fd store keeps only the
    /// `listeners` (see [`crate::fdstore::Store::leave`]).
    pub fn leave_store(&mut self, listeners: &[(&str, BorrowedFd<'_>)]) {
        if let Some(store) = &mut self.store {
            store.leave(listeners);
        }
    }

    /// Whether systemd's fd store gets what the keeper gets.
    pub fn stores(&self) -> bool {
        self.store.is_some()
    }

    /// Whether this master is systemd's main process, which alone may
    /// store (see [`crate::fdstore::Store::set_main`]).
    pub fn store_main(&mut self, main: bool) {
        if let Some(store) = &mut self.store {
            store.set_main(main);
        }
    }

    /// `baton restart`: the keeper starts a new master from `exe` once this
    /// one has exited (which it does next). The snapshot sent last is what
    /// the new master adopts.
    pub fn restart(&mut self, exe: &std::path::Path, hard: bool) -> bool {
        let message = Message::Restart {
            exe: exe.as_os_str().as_bytes().to_vec(),
            hard,
        };
        self.restarting = self.send(&message, &[]);
        self.restarting
    }

    /// Whether this master is to exit for `baton restart`.
    pub fn restarting(&self) -> bool {
        self.restarting
    }

    /// The next [`Keeper::due`] says yes (a restart's last snapshot).
    pub fn due_now(&mut self) {
        self.pace = Pace::default();
    }

    /// Whether a snapshot is to be taken now: after every turn of the
    /// loop, unless the last one took long (see [`Keeper::took`]); a turn
    /// before it is due again makes one due then (see [`Keeper::wakeup`]).
    /// Never once retired.
    pub fn due(&mut self, now: Instant) -> bool {
        !self.retired && self.pace.due(now)
    }

    /// The snapshot just taken, of `fds` fds, cost `cost`: with more than
    /// [`crate::adopt::SNAPSHOT_FDS`] fds (hundreds of listeners), the next
    /// one waits ten times as long, so that snapshots never take more than
    /// a tenth of the loop's time. Smaller ones follow every turn: the
    /// keeper never holds a state older than the last turn.
    pub fn took(&mut self, now: Instant, cost: Duration, fds: usize) {
        self.pace.took(now, cost, fds);
    }

    /// When the snapshot put off by [`Keeper::due`] is due.
    pub fn wakeup(&self) -> Option<Instant> {
        self.pace.wakeup().filter(|_| !self.retired)
    }

    fn hello(&self, budget: Option<Budget>) {
        let mut env: Vec<(Vec<u8>, Vec<u8>)> = std::env::vars_os()
            .filter(|(k, _)| {
                !HANDED_ENV
                    .iter()
                    .chain(&PRIVATE_ENV)
                    .any(|p| k.as_bytes() == p.as_bytes())
            })
            .map(|(k, v)| (k.into_vec(), v.into_vec()))
            .collect();
        if under_init() && !env.iter().any(|(k, _)| k.as_slice() == INIT_ENV.as_bytes()) {
            env.push((INIT_ENV.as_bytes().to_vec(), b"1".to_vec()));
        }
        if let Some((soft, _)) = crate::fds::workers_nofile() {
            env.retain(|(k, _)| k.as_slice() != crate::fds::NOFILE_ENV.as_bytes());
            env.push((
                crate::fds::NOFILE_ENV.as_bytes().to_vec(),
                soft.to_string().into_bytes(),
            ));
        }
        let message = Message::Hello {
            argv: std::env::args_os().map(OsString::into_vec).collect(),
            env,
            cwd: std::env::current_dir()
                .map(|d| d.into_os_string().into_vec())
                .unwrap_or_else(|_| b"/".to_vec()),
            restarts: budget
                .filter(|b| b.restarts > 0)
                .map(|b| (b.restarts, b.window.as_millis() as u64)),
            store: self.store.is_some(),
        };
        self.send(&message, &[]);
    }

    /// Its pid, when it is this master's child.
    pub fn pid(&self) -> Option<Pid> {
        self.child
    }

    /// A task that says when the keeper is gone (its channel ended): a new
    /// one is started then.
    pub fn on_gone(&self, gone: impl FnOnce() + Send + 'static) {
        let channel = self.channel.clone();
        tokio::spawn(async move {
            // The keeper sends nothing: whatever comes, or the end, means
            // it is gone.
            let _ = channel.recv::<()>().await;
            gone();
        });
    }

    /// Has the keeper watch worker `pid`: if this master dies and no other
    /// adopts it, it is sent `stop_signal` and its process group is killed
    /// `drain_timeout` later.
    pub fn watch(&mut self, pid: Pid, drain_timeout: Duration, stop_signal: Signal) {
        let pidfd = match crate::steering::pidfd(pid.as_raw() as u32) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(pid = pid.as_raw(), error = %e, "cannot open a pidfd for the keeper");
                return;
            }
        };
        if let Some(start) = start_time(pid.as_raw()) {
            self.started.insert(pid.as_raw(), start);
        }
        let message = Message::Watch {
            pid: pid.as_raw(),
            drain_ms: drain_timeout.as_millis() as u64,
            stop_signal: stop_signal as i32,
        };
        self.send(&message, &[pidfd.as_fd()]);
    }

    /// The worker `pid` was reaped.
    pub fn forget(&mut self, pid: Pid) {
        self.started.remove(&pid.as_raw());
        self.send(&Message::Forget { pid: pid.as_raw() }, &[]);
    }

    /// The start time of worker `pid` (see [`start_time`]), as watched.
    pub fn started(&self, pid: i32) -> Option<u64> {
        self.started.get(&pid).copied()
    }

    /// Records a start time known from a snapshot (an adopted worker).
    pub fn remember_start(&mut self, pid: i32, start: u64) {
        self.started.insert(pid, start);
    }

    /// Sends `json`, the master's state naming `places` (fds open in this
    /// process), unless it is what was sent last. The fds the keeper does
    /// not hold yet go first.
    pub fn sync(&mut self, json: Vec<u8>, places: &[BorrowedFd<'_>]) {
        if self.retired {
            return;
        }
        let mut inodes = Vec::with_capacity(places.len());
        for fd in places {
            match crate::steering::inode(*fd) {
                Ok(ino) => inodes.push(ino),
                Err(e) => {
                    tracing::warn!(fd = fd.as_raw_fd(), error = %e, "cannot snapshot an fd for the keeper");
                    return;
                }
            }
        }
        if let Some(store) = &mut self.store {
            // SAFETY: the channel owns this fd and outlives the call.
            let channel = unsafe { BorrowedFd::borrow_raw(self.channel.as_raw_fd()) };
            store.sync(&json, &inodes, places, channel);
        }
        if self
            .last
            .as_ref()
            .is_some_and(|(j, i)| *j == json && *i == inodes)
        {
            return;
        }
        let mut new: Vec<(u64, BorrowedFd<'_>)> = Vec::new();
        let mut seen = HashSet::new();
        for (ino, fd) in inodes.iter().zip(places) {
            if !self.held.contains(ino) && seen.insert(*ino) {
                new.push((*ino, *fd));
            }
        }
        for batch in new.chunks(HOLD_BATCH) {
            let message = Message::Hold {
                inodes: batch.iter().map(|(i, _)| *i).collect(),
            };
            let fds: Vec<BorrowedFd<'_>> = batch.iter().map(|(_, f)| *f).collect();
            if !self.send(&message, &fds) {
                return self.resync();
            }
        }
        let memfd = match sealed_memfd(&json) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot write the keeper's snapshot");
                return;
            }
        };
        let message = Message::Snapshot {
            places: inodes.clone(),
        };
        if !self.send(&message, &[memfd.as_fd()]) {
            return self.resync();
        }
        self.held = inodes.iter().copied().collect();
        self.last = Some((json, inodes));
    }

    /// A message was lost: the next sync sends every fd again.
    fn resync(&mut self) {
        self.held.clear();
        self.last = None;
    }

    /// This master stops or hands over: the keeper starts no other one.
    pub fn retire(&mut self) {
        if !self.retired {
            self.retired = true;
            self.send(&Message::Retire, &[]);
        }
    }

    /// Its channel's fd: a master that re-executes itself hands it to its
    /// new image ([`KEEPER_FD_ENV`]), which greets the same keeper.
    pub fn channel_fd(&self) -> RawFd {
        self.channel.as_raw_fd()
    }

    /// Tells the keeper to exit and leave every worker alone: the master
    /// is done, and its channel, held by systemd's fd store, would not end.
    pub fn release(&mut self) {
        self.retired = true;
        self.send(&Message::Release, &[]);
    }

    fn send(&self, message: &Message, fds: &[BorrowedFd<'_>]) -> bool {
        match self.channel.try_send(message, fds) {
            Ok(()) => true,
            Err(e) => {
                // Its end is noticed by `on_gone`.
                if !e.is_peer_gone() {
                    tracing::warn!(error = %e, "cannot tell the keeper");
                }
                false
            }
        }
    }
}

/// A process's start time (`/proc/PID/stat`, field 22, in clock ticks since
/// boot): with the pid, it names one process.
pub fn start_time(pid: i32) -> Option<u64> {
    crate::orphans::stat(pid)?
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// A memfd holding `bytes`, sealed against any change.
pub(crate) fn sealed_memfd(bytes: &[u8]) -> anyhow::Result<OwnedFd> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    let fd = memfd_create(
        c"baton-snapshot",
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)?;
    fcntl(
        file.as_raw_fd(),
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_SEAL
                | SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_WRITE,
        ),
    )?;
    Ok(file.into())
}

/// The keeper's channel a previous image of this master handed over
/// across its exec, or that the keeper as PID 1 gave its first master
/// ([`KEEPER_FD_ENV`], without the adoption's variables).
pub fn inherited_channel() -> Option<OwnedFd> {
    if let Some(from_init) = FROM_INIT.get() {
        if let Some(fd) = from_init.lock().ok()?.take() {
            return Some(fd);
        }
    }
    if std::env::var_os(FDS_ENV).is_some() {
        return None;
    }
    crate::fds::inherited(KEEPER_FD_ENV).ok().flatten()
}

/// In the first master of a keeper that is PID 1: its end of the channel.
static FROM_INIT: std::sync::OnceLock<std::sync::Mutex<Option<OwnedFd>>> =
    std::sync::OnceLock::new();

/// Whether this master's keeper is its container's PID 1 (the first
/// master, or one it started: [`INIT_ENV`]).
pub fn under_init() -> bool {
    FROM_INIT.get().is_some() || std::env::var_os(INIT_ENV).is_some()
}

/// The signals the keeper ignored, back to their defaults: a master the
/// keeper started inherits its dispositions. Must run before any thread
/// starts.
pub fn restore_signals() {
    for signal in IGNORED {
        // SAFETY: SIG_DFL installs no handler code; no other thread runs.
        let _ = unsafe { nix::sys::signal::signal(signal, nix::sys::signal::SigHandler::SigDfl) };
    }
}

/// A watched worker.
struct Watched {
    pidfd: OwnedFd,
    drain: Duration,
    stop_signal: i32,
}

/// What the keeper holds for the master.
#[derive(Default)]
struct Kept {
    hello: Option<Hello>,
    /// One fd per socket inode.
    held: HashMap<u64, OwnedFd>,
    /// The last snapshot and the inode of each fd it names.
    snapshot: Option<(OwnedFd, Vec<u64>)>,
    watched: BTreeMap<i32, Watched>,
    retired: bool,
    /// When masters died, within the budget's window.
    deaths: VecDeque<Instant>,
    /// `baton restart` asked: the binary and whether hard.
    restart: Option<(Vec<u8>, bool)>,
    /// Told to exit, leaving every worker alone.
    released: bool,
    /// The master's exit status, as `waitpid` gives it, once reaped (it
    /// may be before its channel's end is read).
    master_status: Option<i32>,
}

struct Hello {
    argv: Vec<Vec<u8>>,
    env: Vec<(Vec<u8>, Vec<u8>)>,
    cwd: Vec<u8>,
    restarts: Option<(u32, u64)>,
    store: bool,
}

/// `baton __keeper`: runs until the masters are gone for good and every worker left has exited or been killed. Returns
/// the exit code.
pub fn main() -> i32 {
    for signal in IGNORED {
        // SAFETY: SIG_IGN installs no handler code; nothing else in this
        // process touches signal dispositions.
        let _ = unsafe { nix::sys::signal::signal(signal, nix::sys::signal::SigHandler::SigIgn) };
    }
    let stdin = match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("baton keeper: {e}");
            return 1;
        }
    };
    // Its stdin goes to no master it starts.
    if let Ok(null) = std::fs::File::open("/dev/null") {
        let _ = nix::unistd::dup2(null.as_raw_fd(), 0);
    }
    // The first master is this keeper's parent; the later ones, its
    // children.
    run(stdin, nix::unistd::getppid(), false)
}

/// As a container's PID 1 (the first `baton run` of a pid namespace):
/// forks. The child returns `None` and goes on as the master, with a
/// channel to the parent; the parent stays PID 1 as the master's keeper
/// (it reaps every orphan, passes the signals it gets to the master, and
/// starts another master if that one dies), and returns `Some` with its
/// exit code: the last master's. Must run before any thread starts.
pub fn init() -> Option<i32> {
    let (keeper_end, master_end) = match channel::pair() {
        Ok(pair) => pair,
        Err(e) => {
            eprintln!("baton: cannot create the keeper's channel, running without a keeper: {e}");
            return None;
        }
    };
    // SAFETY: no other thread runs yet (the caller's promise): the child
    // may do anything the parent could.
    match unsafe { nix::unistd::fork() } {
        Err(e) => {
            eprintln!("baton: cannot fork the master from its keeper, running without one: {e}");
            None
        }
        Ok(nix::unistd::ForkResult::Child) => {
            drop(keeper_end);
            // Taken by `inherited_channel`.
            let _ = FROM_INIT.set(std::sync::Mutex::new(Some(master_end)));
            None
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            drop(master_end);
            Some(run(keeper_end, child, true))
        }
    }
}

/// Runs the keeper on `channel`, to `master`.
fn run(channel: OwnedFd, master: Pid, init: bool) -> i32 {
    // The workers of a master it started are re-parented here when that
    // master dies, and reaped here.
    crate::orphans::become_subreaper();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("baton keeper: {e}");
            return 1;
        }
    };
    runtime.block_on(keep(channel, master, init))
}

/// The signals a keeper that is PID 1 passes to the master: what a
/// container runtime or an operator sends the container.
const FORWARDED: [Signal; 9] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGWINCH,
];

/// The signals to pass on, once they arrive.
struct Forward(Vec<(Signal, tokio::signal::unix::Signal)>);

impl Forward {
    fn new(init: bool) -> Forward {
        if !init {
            return Forward(Vec::new());
        }
        Forward(
            FORWARDED
                .iter()
                .filter_map(|s| {
                    let kind = tokio::signal::unix::SignalKind::from_raw(*s as i32);
                    Some((*s, tokio::signal::unix::signal(kind).ok()?))
                })
                .collect(),
        )
    }

    /// The next signal to pass on (never, when there is none).
    async fn recv(&mut self) -> Signal {
        if self.0.is_empty() {
            return std::future::pending().await;
        }
        let waits = self.0.iter_mut().map(|(signal, stream)| {
            Box::pin(async move {
                stream.recv().await;
                *signal
            })
        });
        futures_select_all(waits).await
    }
}

/// The first of `futures` to finish.
async fn futures_select_all<F: std::future::Future<Output = Signal> + Unpin>(
    futures: impl Iterator<Item = F>,
) -> Signal {
    let mut futures: Vec<F> = futures.collect();
    std::future::poll_fn(move |cx| {
        for f in futures.iter_mut() {
            if let std::task::Poll::Ready(signal) = std::pin::Pin::new(f).poll(cx) {
                return std::task::Poll::Ready(signal);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

async fn keep(channel: OwnedFd, first: Pid, init: bool) -> i32 {
    let mut channel = match Channel::new(channel) {
        Ok(channel) => channel,
        Err(e) => {
            eprintln!("baton keeper: not a control channel: {e}");
            return 1;
        }
    };
    let mut sigchld = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("baton keeper: {e}");
            return 1;
        }
    };
    let mut forward = Forward::new(init);
    let mut kept = Kept::default();
    let mut master = first;
    let mut master_is_child = init;
    let mut code;
    loop {
        serve(&channel, &mut kept, &mut sigchld, &mut forward, master).await;
        if kept.released {
            return 0;
        }
        if let Some((exe, hard)) = kept.restart.take() {
            // Not a death: the master asked for it.
            if master_is_child {
                let _ = master_exit(master, &mut kept, Duration::from_secs(1)).await;
            }
            let how = "exited for `baton restart`";
            match start_master(&kept, master.as_raw(), how, Some((exe, hard))) {
                Ok((pid, mine)) => {
                    eprintln!("baton keeper: the master (pid {master}) {how}: started pid {pid}");
                    channel = mine;
                    master = pid;
                    master_is_child = true;
                    continue;
                }
                Err(e) => {
                    eprintln!("baton keeper: the master (pid {master}) {how} and no other could be started ({e:#}): starting one like it");
                }
            }
        }
        let (how, status) = if master_is_child {
            // A master that stops may take a while to exit; one that died
            // is a zombie now.
            let patience = if kept.retired && init {
                Duration::from_secs(120)
            } else {
                Duration::from_secs(1)
            };
            master_exit(master, &mut kept, patience).await
        } else {
            // Its parent's, read while it is a zombie, if it still is.
            zombie_exit(master.as_raw()).map_or_else(
                || {
                    (
                        "status unknown: it was not the keeper's child".to_string(),
                        None,
                    )
                },
                |(how, status)| (how, Some(status)),
            )
        };
        code = status.map_or(1, exit_code);
        if kept.retired {
            break;
        }
        let Some(hello) = &kept.hello else { break };
        if hello.store {
            eprintln!("baton keeper: systemd's fd store let go of the master's channel (the service stopped for good): stopping its workers");
            break;
        }
        let Some((budget, window)) = hello.restarts else {
            eprintln!("baton keeper: the master (pid {master}) died ({how}) and master_restarts is off: stopping its workers");
            break;
        };
        let now = Instant::now();
        let window = Duration::from_millis(window);
        kept.deaths.retain(|d| now.duration_since(*d) < window);
        if kept.deaths.len() >= budget as usize {
            eprintln!(
                "baton keeper: the master (pid {master}) died ({how}), the {}th death within {window:?} (master_restarts = \"{budget} in {window:?}\"): stopping its workers",
                kept.deaths.len() + 1
            );
            break;
        }
        kept.deaths.push_back(now);
        match start_master(&kept, master.as_raw(), &how, None) {
            Ok((pid, mine)) => {
                eprintln!(
                    "baton keeper: the master (pid {master}) died ({how}): started pid {pid} to adopt its workers"
                );
                channel = mine;
                master = pid;
                master_is_child = true;
                kept.retired = false;
            }
            Err(e) => {
                eprintln!("baton keeper: the master (pid {master}) died ({how}) and no other could be started ({e:#}): stopping its workers");
                break;
            }
        }
    }
    drop(channel);
    give_up(kept, &mut sigchld).await;
    if init {
        // As PID 1: every process of the namespace ends with this one.
        code
    } else {
        0
    }
}

/// The exit code a `waitpid` status makes for a shell: the status, or
/// 128 and the signal.
fn exit_code(status: i32) -> i32 {
    if status & 0x7f != 0 {
        128 + (status & 0x7f)
    } else {
        (status >> 8) & 0xff
    }
}

/// Reads the master's messages until it is gone,
/// reaping the children re-parented here meanwhile, and passing on the
/// signals a keeper that is PID 1 gets.
async fn serve(
    channel: &Channel,
    kept: &mut Kept,
    sigchld: &mut tokio::signal::unix::Signal,
    forward: &mut Forward,
    master: Pid,
) {
    loop {
        let received = tokio::select! {
            received = channel.recv::<Message>() => received,
            _ = sigchld.recv() => {
                kept.master_status = kept.master_status.or(reap(Some(master)));
                continue;
            }
            signal = forward.recv() => {
                let _ = nix::sys::signal::kill(master, signal);
                continue;
            }
        };
        match received {
            Ok(Some(received)) => {
                let mut fds = received.fds.into_iter();
                match received.message {
                    Message::Hello {
                        argv,
                        env,
                        cwd,
                        restarts,
                        store,
                    } => {
                        kept.hello = Some(Hello {
                            argv,
                            env,
                            cwd,
                            restarts,
                            store,
                        })
                    }
                    Message::Watch {
                        pid,
                        drain_ms,
                        stop_signal,
                    } => {
                        if let Some(pidfd) = fds.next() {
                            let drain = Duration::from_millis(drain_ms);
                            kept.watched.insert(
                                pid,
                                Watched {
                                    pidfd,
                                    drain,
                                    stop_signal,
                                },
                            );
                        }
                    }
                    Message::Forget { pid } => {
                        kept.watched.remove(&pid);
                    }
                    Message::Hold { inodes } => {
                        for (ino, fd) in inodes.into_iter().zip(fds) {
                            kept.held.insert(ino, fd);
                        }
                    }
                    Message::Snapshot { places } => {
                        if let Some(memfd) = fds.next() {
                            let wanted: HashSet<u64> = places.iter().copied().collect();
                            kept.held.retain(|ino, _| wanted.contains(ino));
                            kept.snapshot = Some((memfd, places));
                        }
                    }
                    Message::Retire => kept.retired = true,
                    Message::Restart { exe, hard } => kept.restart = Some((exe, hard)),
                    Message::Release => {
                        kept.released = true;
                        return;
                    }
                }
            }
            Ok(None) => return,
            Err(e) if e.is_peer_gone() => return,
            Err(channel::ChannelError::Io(e)) => {
                eprintln!("baton keeper: reading the master's channel: {e}");
                return;
            }
            // A message it cannot decode: from a master of another
            // version, or garbage. Ignore it.
            Err(_) => continue,
        }
    }
}

/// Reaps every exited child; returns `master`'s `waitpid` status if it was
/// among them (the others, orphans re-parented here, are only reaped).
fn reap(master: Option<Pid>) -> Option<i32> {
    let mut found = None;
    loop {
        let (pid, status) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, (code & 0xff) << 8),
            Ok(WaitStatus::Signaled(pid, signal, _)) => (pid, signal as i32),
            Ok(WaitStatus::StillAlive) | Err(_) => return found,
            Ok(_) => continue,
        };
        if Some(pid) == master {
            found = Some(status);
        }
    }
}

/// How the master (a child of the keeper) ended, and its `waitpid`
/// status: its channel is closed, so it exits now; waits for its status
/// `patience` at most.
async fn master_exit(master: Pid, kept: &mut Kept, patience: Duration) -> (String, Option<i32>) {
    let deadline = Instant::now() + patience;
    loop {
        kept.master_status = kept.master_status.or(reap(Some(master)));
        if let Some(status) = kept.master_status.take() {
            return (describe_status(status), Some(status));
        }
        if Instant::now() >= deadline {
            return ("status unknown".into(), None);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// How `pid`, a zombie not reaped yet, ended (`/proc/PID/stat`, field 52,
/// the status `waitpid` would give).
fn zombie_exit(pid: i32) -> Option<(String, i32)> {
    let stat = crate::orphans::stat(pid)?;
    let fields: Vec<&str> = stat.split_whitespace().collect();
    if fields.first() != Some(&"Z") {
        return None;
    }
    let status = fields.get(49)?.parse().ok()?;
    Some((describe_status(status), status))
}

/// A `waitpid` status as the log says it.
fn describe_status(status: i32) -> String {
    if status & 0x7f != 0 {
        match Signal::try_from(status & 0x7f) {
            Ok(signal) => format!("signal {signal}"),
            Err(_) => format!("signal {}", status & 0x7f),
        }
    } else {
        format!("exit status {}", (status >> 8) & 0xff)
    }
}

/// Starts a master to adopt what the dead one left: the fds of the last
/// snapshot at 3, 4, ..., then the snapshot and the new master's end of a
/// channel to the keeper.
fn start_master(
    kept: &Kept,
    previous: i32,
    how: &str,
    restart: Option<(Vec<u8>, bool)>,
) -> anyhow::Result<(Pid, Channel)> {
    let hello = kept.hello.as_ref().context("the master never said hello")?;
    let (snapshot, places) = kept
        .snapshot
        .as_ref()
        .context("the master left no snapshot")?;
    let mut fds: Vec<RawFd> = Vec::with_capacity(places.len() + 2);
    for ino in places {
        let fd = kept
            .held
            .get(ino)
            .with_context(|| format!("the snapshot names socket inode {ino}, not held"))?;
        fds.push(fd.as_raw_fd());
    }
    let (mine, theirs) = channel::pair().context("creating a channel for the new master")?;
    let first = 3;
    let snapshot_fd = first + fds.len() as RawFd;
    fds.push(snapshot.as_raw_fd());
    fds.push(theirs.as_raw_fd());
    let os = |b: &[u8]| OsString::from_vec(b.to_vec());
    let mut env: Vec<(OsString, OsString)> =
        hello.env.iter().map(|(k, v)| (os(k), os(v))).collect();
    let watched: Vec<String> = kept.watched.keys().map(i32::to_string).collect();
    let exe = match &restart {
        Some((exe, hard)) => {
            let mode = if *hard { "hard" } else { "drain" };
            env.push((RESTART_ENV.into(), mode.into()));
            os(exe).into()
        }
        None => std::path::PathBuf::from("/proc/self/exe"),
    };
    for (key, value) in [
        (FDS_ENV, first.to_string()),
        (SNAPSHOT_FD_ENV, snapshot_fd.to_string()),
        (KEEPER_FD_ENV, (snapshot_fd + 1).to_string()),
        (PREVIOUS_ENV, format!("{previous}:{how}")),
        (WATCHED_ENV, watched.join(",")),
    ] {
        env.push((key.into(), value.into()));
    }
    let command = hello
        .argv
        .iter()
        .map(|a| String::from_utf8(a.clone()).context("an argument is not UTF-8"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!command.is_empty(), "the master said hello without argv");
    let plan = crate::exec::Plan {
        command,
        exe: Some(exe),
        env,
        listen_pid: false,
        fds: crate::exec::Fds::Place(fds),
        cwd: Some(os(&hello.cwd).into()),
        credentials: None,
        rlimit_nofile: None,
        nonblocking: false,
        death_signal: None,
        capture_output: false,
        process_group: false,
    };
    let child = crate::exec::spawn(plan)?;
    let pid = Pid::from_raw(child.id() as i32);
    // Reaped by `reap`.
    drop(child);
    drop(theirs);
    let channel = Channel::new(mine).context("registering the new master's channel")?;
    Ok((pid, channel))
}

/// No master will come: lets go of every fd (SDK workers see their channel
/// end and drain), stops the other workers, and waits until each watched
/// worker has exited or its drain deadline passed, then kills its process
/// group.
async fn give_up(kept: Kept, sigchld: &mut tokio::signal::unix::Signal) {
    let Kept {
        held,
        snapshot,
        mut watched,
        ..
    } = kept;
    drop(held);
    drop(snapshot);
    for w in watched.values() {
        if !exited(&w.pidfd) {
            let _ = pidfd_signal(&w.pidfd, w.stop_signal);
        }
    }
    let start = Instant::now();
    loop {
        watched.retain(|pid, w| {
            if exited(&w.pidfd) {
                return false;
            }
            if start.elapsed() < w.drain {
                return true;
            }
            eprintln!(
                "baton keeper: the master is gone and worker {pid} still runs after its drain timeout ({:?}): killed",
                w.drain
            );
            // The pidfd says the process leading the group still lives,
            // so the group id is still its.
            let _ = killpg(Pid::from_raw(*pid), Signal::SIGKILL);
            let _ = pidfd_signal(&w.pidfd, libc::SIGKILL);
            false
        });
        if watched.is_empty() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = sigchld.recv() => {}
        }
        reap(None);
    }
}

/// Whether the process behind `pidfd` has exited (a pidfd polls readable).
pub fn exited(pidfd: &OwnedFd) -> bool {
    let mut fds = [libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: poll on one pollfd on the stack, without waiting.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
    rc > 0 && fds[0].revents != 0
}

/// `signal` through the pidfd: never reaches a process that reused the pid.
pub fn pidfd_signal(pidfd: &OwnedFd, signal: i32) -> std::io::Result<()> {
    // SAFETY: pidfd_send_signal(2) with a null siginfo and no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_start_time_is_read_and_stable() {
        let me = std::process::id() as i32;
        let first = start_time(me).expect("this process has a start time");
        assert_eq!(start_time(me), Some(first));
        assert_eq!(start_time(i32::MAX), None);
    }

    #[test]
    fn small_snapshots_follow_every_turn_large_ones_a_tenth_of_the_time() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let mut pace = Pace::default();
        assert!(pace.due(now));
        pace.took(now, ms(3), 10);
        assert!(pace.due(now), "a small snapshot is never put off");
        assert_eq!(pace.wakeup(), None);
        pace.took(now, ms(3), 2000);
        assert!(
            !pace.due(now + ms(29)),
            "a large one waits ten times its cost"
        );
        assert_eq!(pace.wakeup(), Some(now + ms(30)), "and is due then");
        assert!(pace.due(now + ms(30)));
        assert_eq!(pace.wakeup(), None);
    }

    #[test]
    fn exit_codes_are_a_shells() {
        assert_eq!(exit_code(9), 137);
        assert_eq!(exit_code(15), 143);
        assert_eq!(exit_code(3 << 8), 3);
        assert_eq!(exit_code(0), 0);
    }

    #[test]
    fn wait_statuses_read_as_the_log_says_them() {
        assert_eq!(describe_status(9), "signal SIGKILL");
        assert_eq!(describe_status(9 | 0x80), "signal SIGKILL");
        assert_eq!(describe_status(3 << 8), "exit status 3");
        assert_eq!(describe_status(0), "exit status 0");
    }

    #[test]
    fn a_sealed_snapshot_cannot_change() {
        let fd = sealed_memfd(b"{}").unwrap();
        let mut file = std::fs::File::from(fd);
        assert!(file.write_all(b"x").is_err());
        let mut text = String::new();
        use std::io::{Read, Seek};
        file.rewind().unwrap();
        file.read_to_string(&mut text).unwrap();
        assert_eq!(text, "{}");
    }
}
