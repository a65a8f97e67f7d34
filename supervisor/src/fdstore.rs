//! systemd's file descriptor store: under a unit with
//! `FileDescriptorStoreMax=`, what the keeper holds (see [`crate::keeper`])
//! goes to systemd too, and a master systemd starts again gets it back.
//!
//! The master is in fd-store mode when `$NOTIFY_SOCKET` is set and
//! `$FDSTORE` (set by systemd 254 and later to `FileDescriptorStoreMax=`;
//! older ones need `Environment=FDSTORE=` in the unit) is above 0. It then
//! sends systemd (`FDSTORE=1`, `FDNAME=`, `FDPOLL=0`, one fd a datagram):
//!
//! - each fd its keeper is told to hold, as `baton-fd-INODE`;
//! - its end of the keeper's channel, as `baton-keeper-INODE`: the keeper
//!   does not see this master die, and starts no master of its own (its
//!   `Hello` says so); the master systemd restarts attaches to it;
//! - after every change, the snapshot in a sealed memfd, as
//!   `baton-snapshot-N` (N: `CLOCK_MONOTONIC` in microseconds, so that the
//!   newest is the highest whichever master stored it), whose first line
//!   names the master's pid, the keeper channel's inode and each place's
//!   inode (a master given fds by name renumbers them by inode); the
//!   previous one is removed after (`FDSTOREREMOVE=1`), and so are the fds
//!   the snapshot no longer names: at every moment the store holds a
//!   snapshot and all it names.
//!
//! Only systemd's main process may store (`NotifyAccess=main`): the new
//! master of a binary upgrade stores nothing until the old one handed over
//! (it holds the control socket from then on), then everything.
//!
//! A master systemd starts with a `baton-snapshot-N` among
//! `LISTEN_FDNAMES` adopts the workers ([`take_adoption`]). A master that
//! stops for good (SIGTERM: `systemctl stop` or `restart`) leaves only its
//! listening sockets, as `baton-listener-NAME` ([`Store::leave`]): the
//! next master takes them as socket-activated sockets (see
//! [`crate::activation`]) and starts generation 1 on them, so connections
//! made meanwhile wait in their queues.

use crate::adopt::Adoption;
use anyhow::Context;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
use std::collections::{HashMap, HashSet};
use std::io::{IoSlice, Read, Seek};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

/// The name of each fd the keeper holds: `baton-fd-INODE`.
const FD: &str = "baton-fd-";
/// The master's end of the keeper's channel: `baton-keeper-INODE`.
const KEEPER: &str = "baton-keeper-";
/// A snapshot: `baton-snapshot-N`, the highest N the newest.
const SNAPSHOT: &str = "baton-snapshot-";
/// A listening socket left by a master that stopped: `baton-listener-NAME`.
pub const LISTENER: &str = "baton-listener";
/// Every name baton gives what it stores starts so.
pub const PREFIX: &str = "baton-";

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
const FIRST_FD: RawFd = 3;

/// systemd's store for this master, in fd-store mode.
#[derive(Debug)]
pub struct Store {
    socket: std::os::unix::net::UnixDatagram,
    address: UnixAddr,
    /// `FileDescriptorStoreMax=`.
    max: usize,
    /// Inodes stored as `baton-fd-INODE`.
    stored: HashSet<u64>,
    /// The keeper channel's inode, as stored.
    keeper: Option<u64>,
    /// The number of the snapshot stored last (or passed at the start:
    /// the next one is numbered after it).
    snapshot: Option<u64>,
    /// Names passed at this master's start (a snapshot, a keeper, listeners
    /// left by a stop), removed once this master stored its own.
    leftovers: Vec<String>,
    /// The last snapshot stored, and its places' inodes.
    last: Option<(Vec<u8>, Vec<u64>)>,
    /// Said once that the store is too small.
    warned: bool,
    /// Not systemd's main process (yet): systemd would refuse what it
    /// sends.
    paused: bool,
}

/// The names systemd passed this process (`LISTEN_FDNAMES`), if
/// `LISTEN_PID` is this process, with their fds: 3, 4, ...
fn passed_names() -> Vec<(RawFd, String)> {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.trim().parse::<RawFd>().ok())
        .filter(|n| ours && (0..=4096).contains(n))
        .unwrap_or(0);
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let mut names = names.split(':');
    (FIRST_FD..FIRST_FD + count)
        .map(|fd| (fd, names.next().unwrap_or_default().to_string()))
        .collect()
}

/// The number in `name` after `prefix`.
fn numbered(name: &str, prefix: &str) -> Option<u64> {
    name.strip_prefix(prefix)?.parse().ok()
}

impl Store {
    /// The store, if this master runs under systemd with one
    /// (`$NOTIFY_SOCKET`, and `$FDSTORE` above 0).
    pub fn from_env() -> Option<Store> {
        let max: usize = std::env::var("FDSTORE").ok()?.trim().parse().ok()?;
        let path = std::env::var_os("NOTIFY_SOCKET").filter(|_| max > 0)?;
        let bytes = path.as_encoded_bytes();
        let address = match bytes.strip_prefix(b"@") {
            Some(name) => UnixAddr::new_abstract(name),
            None => UnixAddr::new(std::path::Path::new(&path)),
        };
        let address = match address {
            Ok(address) => address,
            Err(e) => {
                tracing::warn!(error = %e, "NOTIFY_SOCKET is not a socket address: no fd store");
                return None;
            }
        };
        let socket = std::os::unix::net::UnixDatagram::unbound().ok()?;
        let mut store = Store {
            socket,
            address,
            max,
            stored: HashSet::new(),
            keeper: None,
            snapshot: None,
            leftovers: Vec::new(),
            last: None,
            warned: false,
            paused: false,
        };
        for (_, name) in passed_names() {
            if let Some(ino) = numbered(&name, FD) {
                store.stored.insert(ino);
            } else if name.starts_with(PREFIX) {
                if let Some(n) = numbered(&name, SNAPSHOT) {
                    store.snapshot = store.snapshot.max(Some(n));
                }
                store.leftovers.push(name);
            }
        }
        tracing::info!(
            event = "fdstore.on",
            max,
            "systemd's fd store keeps what the workers need"
        );
        Some(store)
    }

    /// Whether this master is systemd's main process: one that becomes it
    /// stores everything again (systemd ignores what it holds already).
    pub fn set_main(&mut self, main: bool) {
        if main && self.paused {
            self.resync();
        }
        self.paused = !main;
    }

    /// Stores what a snapshot names: the fds at `places` (their inodes
    /// `inodes`) not stored yet, `keeper` (the master's end of the keeper's
    /// channel), then the snapshot `json`; then removes the previous
    /// snapshot and the fds it alone named.
    pub fn sync(
        &mut self,
        json: &[u8],
        inodes: &[u64],
        places: &[BorrowedFd<'_>],
        keeper: BorrowedFd<'_>,
    ) {
        if self.paused
            || self
                .last
                .as_ref()
                .is_some_and(|(j, i)| j.as_slice() == json && i.as_slice() == inodes)
        {
            return;
        }
        // A listener left by a stopped master is stored under its name:
        // systemd ignores the same socket sent again under another.
        let listeners: Vec<String> = self
            .leftovers
            .iter()
            .filter(|n| n.starts_with(LISTENER))
            .cloned()
            .collect();
        for name in &listeners {
            self.remove(name);
        }
        self.leftovers.retain(|n| !n.starts_with(LISTENER));
        let keeper_ino = match crate::steering::inode(keeper) {
            Ok(ino) => ino,
            Err(e) => {
                tracing::warn!(error = %e, "cannot store the keeper's channel");
                return;
            }
        };
        let old_keeper = self.keeper.filter(|k| *k != keeper_ino);
        if self.keeper != Some(keeper_ino) {
            if !self.push(&format!("{KEEPER}{keeper_ino}"), keeper) {
                return;
            }
            self.keeper = Some(keeper_ino);
        }
        for (ino, fd) in inodes.iter().zip(places) {
            if !self.stored.contains(ino) {
                if !self.push(&format!("{FD}{ino}"), *fd) {
                    return self.resync();
                }
                self.stored.insert(*ino);
            }
        }
        let mut text = header(std::process::id(), keeper_ino, inodes).into_bytes();
        text.extend_from_slice(json);
        let memfd = match crate::keeper::sealed_memfd(&text) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot write the snapshot for the fd store");
                return;
            }
        };
        let number = monotonic_usec().max(self.snapshot.map_or(0, |n| n + 1));
        if !self.push(&format!("{SNAPSHOT}{number}"), memfd.as_fd()) {
            return;
        }
        // The new snapshot is stored: what only the old one named goes.
        if let Some(previous) = self.snapshot.replace(number) {
            self.remove(&format!("{SNAPSHOT}{previous}"));
        }
        if let Some(old) = old_keeper {
            self.remove(&format!("{KEEPER}{old}"));
        }
        for name in std::mem::take(&mut self.leftovers) {
            if name != format!("{KEEPER}{keeper_ino}") {
                self.remove(&name);
            }
        }
        let wanted: HashSet<u64> = inodes.iter().copied().collect();
        let gone: Vec<u64> = self.stored.difference(&wanted).copied().collect();
        for ino in gone {
            self.remove(&format!("{FD}{ino}"));
            self.stored.remove(&ino);
        }
        if self.stored.len() + 2 > self.max && !self.warned {
            self.warned = true;
            tracing::warn!(
                event = "fdstore.full",
                fds = self.stored.len() + 2,
                max = self.max,
                "FileDescriptorStoreMax= is below what the workers need: systemd drops the rest, and a master it restarts cannot adopt them"
            );
        }
        self.last = Some((json.to_vec(), inodes.to_vec()));
    }

    /// A push failed: the next sync sends every fd again (systemd ignores
    /// one it holds).
    fn resync(&mut self) {
        self.stored.clear();
        self.last = None;
    }

    /// This master stops for good: the store keeps only `listeners` (name
    /// and socket), under their names, for the next master to serve on;
    /// the snapshot, the keeper's channel (the keeper then sees its end)
    /// and every other fd go.
    pub fn leave(&mut self, listeners: &[(&str, BorrowedFd<'_>)]) {
        // Not systemd's main process (an upgrade's new master that never
        // took over): the store is not its to change.
        if self.paused {
            return;
        }
        let mut kept = 0;
        for (name, fd) in listeners {
            if let Ok(ino) = crate::steering::inode(*fd) {
                if self.stored.remove(&ino) {
                    self.remove(&format!("{FD}{ino}"));
                }
            }
            if self.push(&listener_name(name), *fd) {
                kept += 1;
            }
        }
        if let Some(n) = self.snapshot.take() {
            self.remove(&format!("{SNAPSHOT}{n}"));
        }
        if let Some(ino) = self.keeper.take() {
            self.remove(&format!("{KEEPER}{ino}"));
        }
        for ino in std::mem::take(&mut self.stored) {
            self.remove(&format!("{FD}{ino}"));
        }
        for name in std::mem::take(&mut self.leftovers) {
            self.remove(&name);
        }
        self.last = None;
        tracing::info!(
            event = "fdstore.left",
            listeners = kept,
            "the fd store keeps the listening sockets for the next start"
        );
    }

    fn push(&self, name: &str, fd: BorrowedFd<'_>) -> bool {
        let state = format!("FDSTORE=1\nFDNAME={name}\nFDPOLL=0");
        match self.send(&state, Some(fd)) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, name, "cannot store an fd in systemd's store");
                false
            }
        }
    }

    fn remove(&self, name: &str) {
        if let Err(e) = self.send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), None) {
            tracing::warn!(error = %e, name, "cannot remove an fd from systemd's store");
        }
    }

    fn send(&self, state: &str, fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
        let raw: Vec<RawFd> = fd.iter().map(|fd| fd.as_raw_fd()).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
        let iov = [IoSlice::new(state.as_bytes())];
        sendmsg(
            self.socket.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            Some(&self.address),
        )?;
        Ok(())
    }
}

/// `CLOCK_MONOTONIC` in microseconds: it only grows, in every process.
fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| std::time::Duration::from(t).as_micros() as u64)
        .unwrap_or(0)
}

/// `baton-listener-NAME`, or `baton-listener` for a name systemd would not
/// take (`:` separates names in `LISTEN_FDNAMES`): such a socket is then
/// matched by its address.
fn listener_name(name: &str) -> String {
    let fits = !name.is_empty()
        && name.len() < 200
        && name.chars().all(|c| c.is_ascii_graphic() && c != ':');
    if fits {
        format!("{LISTENER}-{name}")
    } else {
        LISTENER.to_string()
    }
}

/// The listener a stored socket's name gives (`baton-listener-NAME`):
/// `Some(None)` for one stored without a name, `None` for another name.
pub fn stored_listener(name: &str) -> Option<Option<&str>> {
    match name.strip_prefix(LISTENER)? {
        "" => Some(None),
        rest => rest.strip_prefix('-').map(Some),
    }
}

/// The snapshot's first line: the master's pid, the keeper channel's
/// inode, and each place's inode.
fn header(pid: u32, keeper: u64, inodes: &[u64]) -> String {
    let inodes: Vec<String> = inodes.iter().map(u64::to_string).collect();
    format!("{pid} {keeper} {}\n", inodes.join(","))
}

/// What a stored snapshot's first line says (see [`header`]).
#[derive(Debug, PartialEq)]
struct Header {
    pid: i32,
    keeper: u64,
    inodes: Vec<u64>,
}

/// Reads [`header`], and the rest.
fn read_header(text: &[u8]) -> anyhow::Result<(Header, &[u8])> {
    let end = text
        .iter()
        .position(|b| *b == b'\n')
        .context("a stored snapshot without its first line")?;
    let line = std::str::from_utf8(&text[..end])?;
    let mut fields = line.split(' ');
    let mut next = || {
        fields
            .next()
            .context("a stored snapshot's first line is short")
    };
    let pid = next()?.parse()?;
    let keeper = next()?.parse()?;
    let inodes = next()?
        .split(',')
        .filter(|i| !i.is_empty())
        .map(str::parse)
        .collect::<Result<Vec<u64>, _>>()?;
    Ok((
        Header {
            pid,
            keeper,
            inodes,
        },
        &text[end + 1..],
    ))
}

/// In a master systemd started with a stored snapshot among its fds: the
/// workers to adopt, the fds renumbered by inode, the keeper's channel.
/// Every fd systemd passed is taken (those nothing names are closed: a
/// `.socket` unit's socket is among the snapshot's too). `None`, touching
/// nothing, without a snapshot. Call once, before anything else could use
/// fds 3 and up.
pub fn take_adoption() -> anyhow::Result<Option<Adoption>> {
    let passed = passed_names();
    let Some(newest) = passed
        .iter()
        .filter_map(|(_, name)| numbered(name, SNAPSHOT))
        .max()
    else {
        return Ok(None);
    };
    let mut snapshot = None;
    let mut keepers: HashMap<u64, OwnedFd> = HashMap::new();
    let mut fds: HashMap<u64, OwnedFd> = HashMap::new();
    for (raw, name) in passed {
        nix::fcntl::fcntl(raw, nix::fcntl::FcntlArg::F_GETFD)
            .with_context(|| format!("LISTEN_FDS names fd {raw}, which is not open"))?;
        // SAFETY: by the socket-activation convention fds 3..3+LISTEN_FDS
        // belong to this process (LISTEN_PID matched), once each; the fd
        // is open (checked above).
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        crate::fds::set_cloexec(raw, true)?;
        if numbered(&name, SNAPSHOT) == Some(newest) {
            snapshot = Some(fd);
        } else if let Some(ino) = numbered(&name, KEEPER) {
            keepers.insert(ino, fd);
        } else if let Some(ino) = numbered(&name, FD) {
            fds.insert(ino, fd);
        }
        // Anything else (an older snapshot, a socket unit's socket) is
        // closed here.
    }
    let mut file = std::fs::File::from(snapshot.expect("found above"));
    file.rewind()?;
    let mut text = Vec::new();
    file.read_to_end(&mut text)
        .context("reading the snapshot in systemd's fd store")?;
    let (
        Header {
            pid,
            keeper,
            inodes,
        },
        json,
    ) = read_header(&text).context("reading the snapshot in systemd's fd store")?;
    let keeper = keepers.remove(&keeper);
    if keeper.is_none() {
        tracing::warn!("the fd store holds no channel to the keeper: another is started");
    }
    // The fds the snapshot names stay open for the adoption, which owns
    // them from here (by number); the others close.
    // A socket the snapshot names twice (a listener, and the copy its port
    // group keeps) was stored once: each place gets an fd of its own.
    let mut places: Vec<Option<RawFd>> = Vec::with_capacity(inodes.len());
    let mut first: HashMap<u64, RawFd> = HashMap::new();
    for ino in &inodes {
        let fd = match (fds.remove(ino), first.get(ino)) {
            (Some(fd), _) => Some(fd),
            (None, Some(raw)) => {
                // SAFETY: `raw` was taken into `places` above and stays
                // open until the adoption owns it.
                let borrowed = unsafe { BorrowedFd::borrow_raw(*raw) };
                Some(borrowed.try_clone_to_owned()?)
            }
            (None, None) => None,
        };
        let raw = fd.map(IntoRawFd::into_raw_fd);
        if let Some(raw) = raw {
            first.entry(*ino).or_insert(raw);
        }
        places.push(raw);
    }
    let adoption = Adoption::from_snapshot(
        json,
        |i| places.get(i).copied().flatten(),
        keeper,
        pid,
        "unknown: restarted by systemd".into(),
        Vec::new(),
    )
    .context("adopting the workers from systemd's fd store");
    if adoption.is_err() {
        for fd in places.into_iter().flatten() {
            // SAFETY: taken above with `into_raw_fd`, owned by nothing
            // since the adoption failed.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    adoption.map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_header_reads_back() {
        let mut text = header(42, 7, &[1, 2, 3]).into_bytes();
        text.extend_from_slice(b"{\"a\":1}");
        let (read, json) = read_header(&text).unwrap();
        let want = Header {
            pid: 42,
            keeper: 7,
            inodes: vec![1, 2, 3],
        };
        assert_eq!(read, want);
        assert_eq!(json, b"{\"a\":1}");
        let empty = header(1, 2, &[]);
        let want = Header {
            pid: 1,
            keeper: 2,
            inodes: vec![],
        };
        assert_eq!(read_header(empty.as_bytes()).unwrap().0, want);
        assert!(read_header(b"no newline").is_err());
    }

    #[test]
    fn listener_names_are_what_systemd_takes() {
        assert_eq!(listener_name("http"), "baton-listener-http");
        assert_eq!(listener_name("a:b"), "baton-listener");
        assert_eq!(stored_listener("baton-listener-http"), Some(Some("http")));
        assert_eq!(stored_listener("baton-listener"), Some(None));
        assert_eq!(stored_listener("baton-listenerx"), None);
        assert_eq!(stored_listener("http"), None);
    }

    #[test]
    fn names_carry_their_numbers() {
        assert_eq!(numbered("baton-snapshot-12", SNAPSHOT), Some(12));
        assert_eq!(numbered("baton-fd-99", FD), Some(99));
        assert_eq!(numbered("baton-fd-x", FD), None);
        assert_eq!(numbered("http", KEEPER), None);
    }
}
