//! A master that adopts the workers of one that died.
//!
//! While it runs, a master keeps its keeper (see [`crate::keeper`]) up to
//! date: after every turn of its loop that changed something (less often
//! with more than [`SNAPSHOT_FDS`] fds), a [`Snapshot`] of its generations,
//! workers, listeners and port groups (the state an in-place upgrade hands
//! its new image, see [`crate::upgrade::exec`]), each generation's
//! configuration as it runs, what was in progress, and the fds all that
//! names.
//!
//! When the master dies (or exits for `baton restart`), the keeper starts
//! another with those fds at 3, 4, ... and the snapshot
//! ([`Adoption::take_from_env`]); under systemd with an fd store, systemd
//! starts it with them (see [`crate::fdstore`]). The new master:
//!
//! - serves the same control socket and admin endpoint (requests sent
//!   meanwhile waited in their queues) and the same listeners;
//! - checks each worker is the process the snapshot names (a pidfd, and
//!   the start time), watches its exit through the pidfd (the workers are
//!   not its children), and reattaches its channel: the workers see
//!   nothing;
//! - resolves what was in progress: a generation that was starting is
//!   stopped (the last committed one stays current), a probation rolls
//!   back, an upgrade's new master is stopped (the upgrade is abandoned as
//!   when it fails), a worker the keeper watches but the snapshot does not
//!   name (started after it) is stopped;
//! - starts no generation, unless none was current or this is a restart
//!   (then a new generation replaces the adopted ones, as a reload does).

use crate::config::Config;
use crate::upgrade::exec::{Capture, ExecState};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::io::{Read, Seek};
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// A snapshot naming more fds puts the next one off (by ten times what it
/// took): with hundreds of listeners, not every turn of the loop is
/// followed by one.
pub const SNAPSHOT_FDS: usize = 256;

/// What a master leaves its keeper.
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    /// The fds it names, by their number in the master that took it; the
    /// keeper hands them over in this order.
    places: Vec<RawFd>,
    state: ExecState,
    control: Option<RawFd>,
    admin: Option<RawFd>,
    /// A generation on probation, and the one standing by.
    probation: Option<(u64, u64)>,
    /// An upgrade's new master, and its start time.
    upgrade_child: Option<(i32, Option<u64>)>,
    /// How many masters died before this one and were adopted.
    adoptions: u64,
}

/// What the master in service looks like, for [`Snapshot::take`].
pub struct Service<'a> {
    /// The fleet.
    pub fleet: &'a crate::fleet::Fleet,
    /// The control socket's and admin endpoint's fds.
    pub endpoints: (Option<RawFd>, Option<RawFd>),
    /// A probation under way: the generation and its standby.
    pub probation: Option<(u64, u64)>,
    /// An upgrade's new master.
    pub upgrade_child: Option<i32>,
    /// Adoptions so far.
    pub adoptions: u64,
    /// Workers' start times.
    pub started: &'a dyn Fn(i32) -> Option<u64>,
}

impl Snapshot {
    /// The snapshot of `service`, as JSON, and the fds it names.
    pub fn take(service: Service<'_>) -> anyhow::Result<(Vec<u8>, Vec<RawFd>)> {
        let (state, fds, _) = ExecState::capture(service.fleet, Capture::Snapshot, |pid| {
            (service.started)(pid)
        })?;
        let (control, admin) = service.endpoints;
        let mut places = Vec::with_capacity(fds.len() + 2);
        let mut seen = HashSet::new();
        for fd in fds.into_iter().chain(control).chain(admin) {
            if seen.insert(fd) {
                places.push(fd);
            }
        }
        let snapshot = Snapshot {
            places: places.clone(),
            state,
            control,
            admin,
            probation: service.probation,
            upgrade_child: service
                .upgrade_child
                .map(|pid| (pid, crate::keeper::start_time(pid))),
            adoptions: service.adoptions,
        };
        Ok((serde_json::to_vec(&snapshot)?, places))
    }
}

/// The fds of `places`, borrowed.
///
/// # Safety
///
/// Each must be open, and stay open while the result lives.
pub unsafe fn borrow_all(places: &[RawFd]) -> Vec<BorrowedFd<'_>> {
    places
        .iter()
        // SAFETY: as the caller promises.
        .map(|fd| unsafe { BorrowedFd::borrow_raw(*fd) })
        .collect()
}

/// How the previous master ended, as the keeper saw it.
#[derive(Debug, Clone)]
pub struct Adopted {
    /// When this master started adopting.
    pub at: std::time::SystemTime,
    /// The previous master's pid.
    pub previous_pid: i32,
    /// `signal SIGKILL`, `exit status 1`, or why it is not known.
    pub how: String,
    /// How many masters died and were adopted, this one's predecessor
    /// included.
    pub count: u64,
}

/// What a master started by its keeper adopts.
pub struct Adoption {
    /// The fleet's state, its fds numbered as in this process.
    pub state: ExecState,
    /// The control socket.
    pub control: Option<OwnedFd>,
    /// The admin endpoint.
    pub admin: Option<OwnedFd>,
    /// This master's end of the keeper's channel (taken when greeted).
    pub keeper: Option<OwnedFd>,
    /// A probation under way: the generation and its standby.
    pub probation: Option<(u64, u64)>,
    /// An upgrade's new master, and its start time.
    pub upgrade_child: Option<(i32, Option<u64>)>,
    /// Who died, and how.
    pub adopted: Adopted,
    /// Workers the keeper watches.
    pub watched: Vec<i32>,
    /// Started for `baton restart`: replace the workers, `true` stopping
    /// them at once.
    pub restart: Option<bool>,
}

impl Adoption {
    /// Reads what the keeper handed over, if this master was started by
    /// one: the snapshot, and the fds it names, renumbered.
    pub fn take_from_env() -> anyhow::Result<Option<Adoption>> {
        use crate::keeper::{FDS_ENV, KEEPER_FD_ENV, PREVIOUS_ENV, SNAPSHOT_FD_ENV, WATCHED_ENV};
        let Ok(first) = std::env::var(FDS_ENV) else {
            return Ok(None);
        };
        let first: RawFd = first
            .parse()
            .with_context(|| format!("{FDS_ENV}={first:?}"))?;
        let present = |name: &str| -> anyhow::Result<OwnedFd> {
            crate::fds::inherited(name)?.with_context(|| format!("{name} is not set"))
        };
        let mut snapshot_file = std::fs::File::from(present(SNAPSHOT_FD_ENV)?);
        let keeper = present(KEEPER_FD_ENV)?;
        snapshot_file.rewind()?;
        let mut json = Vec::new();
        snapshot_file.read_to_end(&mut json)?;
        drop(snapshot_file);
        let previous = std::env::var(PREVIOUS_ENV).unwrap_or_default();
        let (previous_pid, how) = previous.split_once(':').unwrap_or(("0", "unknown"));
        let watched = std::env::var(WATCHED_ENV)
            .unwrap_or_default()
            .split(',')
            .filter_map(|p| p.parse().ok())
            .collect();
        let mut adoption = Adoption::from_snapshot(
            &json,
            |i| Some(first + i as RawFd),
            Some(keeper),
            previous_pid.parse().unwrap_or(0),
            how.to_string(),
            watched,
        )?;
        adoption.restart = std::env::var(crate::keeper::RESTART_ENV)
            .ok()
            .map(|mode| mode == "hard");
        Ok(Some(adoption))
    }

    /// The adoption `json` (a [`Snapshot`]) describes, the fd of its
    /// `i`th place being `place(i)` in this process (each handed to this
    /// process once, for the adoption to own).
    pub fn from_snapshot(
        json: &[u8],
        place: impl Fn(usize) -> Option<RawFd>,
        keeper: Option<OwnedFd>,
        previous_pid: i32,
        how: String,
        watched: Vec<i32>,
    ) -> anyhow::Result<Adoption> {
        let snapshot: Snapshot =
            serde_json::from_slice(json).context("reading the keeper's snapshot")?;
        let moved = |from: RawFd| -> Option<RawFd> {
            let i = snapshot.places.iter().position(|p| *p == from)?;
            place(i)
        };
        let take = |fd: Option<RawFd>| -> anyhow::Result<Option<OwnedFd>> {
            fd.map(|fd| {
                let fd = moved(fd).context("the snapshot names an fd it does not hand over")?;
                crate::fds::set_cloexec(fd, true)?;
                // SAFETY: handed over at this number, once.
                Ok(unsafe { OwnedFd::from_raw_fd(fd) })
            })
            .transpose()
        };
        let control = take(snapshot.control)?;
        let admin = take(snapshot.admin)?;
        let mut state = snapshot.state;
        state.renumber(moved)?;
        Ok(Adoption {
            state,
            control,
            admin,
            keeper,
            probation: snapshot.probation,
            upgrade_child: snapshot.upgrade_child,
            adopted: Adopted {
                at: std::time::SystemTime::now(),
                previous_pid,
                how,
                count: snapshot.adoptions + 1,
            },
            watched,
            restart: None,
        })
    }

    /// The configuration the adopted current generation runs (the
    /// master's configuration in service), if one was current.
    pub fn config(&self, path: &std::path::Path) -> Option<anyhow::Result<Config>> {
        self.state.current_config(path)
    }
}

/// A worker this master adopted but did not start: its pidfd, if it is
/// still the process the snapshot names. Its exit is seen through it.
pub fn verify(pid: i32, start: Option<u64>) -> Option<OwnedFd> {
    let pidfd = crate::steering::pidfd(pid as u32).ok()?;
    // The pidfd names the process now at `pid`; the start time says it is
    // the one the snapshot named (and not a process that reused the pid).
    let now = crate::keeper::start_time(pid)?;
    (start.is_none_or(|s| s == now) && !crate::keeper::exited(&pidfd)).then_some(pidfd)
}

/// Sends `events` the exit of adopted worker `pid` when `pidfd` says it
/// has exited (at once, without one).
pub fn watch_exit(events: &crate::master::Events, pid: i32, pidfd: Option<OwnedFd>) {
    let events = events.clone();
    let pid = nix::unistd::Pid::from_raw(pid);
    let Some(pidfd) = pidfd else {
        let _ = events.send(crate::master::Event::AdoptedExit { pid });
        return;
    };
    // SAFETY: the pidfd moves into the `AsyncFd` and stays there,
    // unchanged, until it is dropped.
    match unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
    } {
        Ok(fd) => {
            tokio::spawn(async move {
                let _ = fd.readable().await;
                let _ = events.send(crate::master::Event::AdoptedExit { pid });
            });
        }
        Err(_) => {
            let _ = events.send(crate::master::Event::AdoptedExit { pid });
        }
    }
}
