//! Listeners: bound once by the master, shared by every generation that was
//! started with them, closed when the last one lets go. A generation of
//! workers that do not link the SDK gets a TCP socket of its own on the same
//! port instead (see [`crate::steering`]).

use crate::config::{ListenerAddress, ListenerConfig};
use crate::steering::{self, Group, Layout, User};
use anyhow::{bail, Context};
use baton_wire::protocol::{ListenerInfo, ListenerKind};
use nix::sys::socket::{
    bind, getsockname, getsockopt, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType,
    SockaddrIn, SockaddrIn6, SockaddrStorage, UnixAddr,
};
use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::rc::Rc;

/// A bound socket. Dropping the last reference closes it (and removes the
/// socket file of a Unix listener).
#[derive(Debug)]
pub struct Listener {
    /// The configuration it was bound from.
    pub config: ListenerConfig,
    /// Name, kind and actual bound address, as workers are told.
    pub info: ListenerInfo,
    fd: OwnedFd,
    unix_path: Option<PathBuf>,
    /// Cleared when the socket is handed to a new master, which keeps using
    /// the path.
    remove_path: std::cell::Cell<bool>,
    /// A TCP listener's port group: this socket and the generations' own.
    group: RefCell<Option<Group>>,
    /// A generation's own socket: the listener whose port it shares.
    primary: Option<Shared>,
    /// Lives as long as this listener; its group member is used until then.
    alive: Rc<()>,
    /// Whether sockets this master does not know were last seen on the port.
    strangers: std::cell::Cell<bool>,
    /// Passed by socket activation: its socket file is the service
    /// manager's, never removed by baton, whichever master holds it.
    activated: bool,
    /// The `listen(2)` backlog and `TCP_NODELAY` the socket has now: a
    /// reload that changes them applies them in place.
    backlog: Cell<i32>,
    nodelay: Cell<bool>,
}

/// Listeners are shared between the master's current set and the
/// generations using them.
pub type Shared = Rc<Listener>;

/// One look at the TCP sockets listening on some ports, or why it failed
/// (then no port group is touched).
pub type Kernel = std::io::Result<steering::Listening>;

/// Whether every UDP socket the kernel lists on `address` is a member of
/// `group`, a QUIC port's (a member this master closed may have left the
/// kernel's list before the group's).
fn quic_port_matches(group: &Group, address: SocketAddr) -> std::io::Result<bool> {
    let family = match address {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    } as u8;
    let sockets = crate::sockdiag::udp_sockets(family, address.port())?;
    let on_address: Vec<u64> = sockets
        .into_iter()
        .filter(|(local, _)| *local == address)
        .map(|(_, inode)| inode)
        .collect();
    Ok(group.has_all(&on_address))
}

/// One look at the TCP sockets listening on the ports of `listeners`.
pub fn kernel_view<'a>(listeners: impl IntoIterator<Item = &'a Shared>) -> Kernel {
    let addresses = listeners.into_iter().map(|l| l.info.address.as_str());
    steering::Listening::snapshot(&crate::sockdiag::tcp_ports(addresses))
}

impl Listener {
    /// Binds `config` with `SOCK_CLOEXEC` and starts listening.
    pub fn bind(config: &ListenerConfig) -> anyhow::Result<Listener> {
        bind_socket(config)
            .with_context(|| format!("binding listener `{}` on {}", config.name, config.address))
    }

    /// Adopts a socket handed over by a previous master, after checking it
    /// is what `info` says (type, listening, bound address). Its socket file
    /// stays the previous master's until [`Listener::own_path`]: a new master
    /// that fails must not remove the file the old one still serves on.
    pub fn adopt(
        config: ListenerConfig,
        info: ListenerInfo,
        fd: OwnedFd,
    ) -> anyhow::Result<Listener> {
        let verified = baton_wire::listener::verify(info, fd)
            .with_context(|| format!("adopting listener `{}`", config.name))?;
        let (info, fd) = verified;
        let unix_path = match &config.address {
            ListenerAddress::Unix(path) => Some(path.clone()),
            _ => None,
        };
        let nodelay = nodelay_of(&fd, info.kind);
        Ok(Listener {
            backlog: Cell::new(config.backlog),
            nodelay: Cell::new(nodelay),
            config,
            info,
            fd,
            unix_path,
            remove_path: std::cell::Cell::new(false),
            group: RefCell::new(None),
            primary: None,
            alive: Rc::new(()),
            strangers: std::cell::Cell::new(false),
            activated: false,
        })
    }

    /// Adopts a socket the service manager passed (socket activation) for
    /// `config`. A TCP socket that systemd bound with `ReusePort=yes` gets a
    /// port group, so generations of non-SDK workers get sockets of their
    /// own; otherwise they share it, as UDP and Unix listeners do. Its
    /// socket file, if any, stays the service manager's.
    pub fn inherited(config: ListenerConfig, fd: OwnedFd) -> anyhow::Result<Listener> {
        let bound: SockaddrStorage = getsockname(fd.as_raw_fd())?;
        let kind = match &config.address {
            ListenerAddress::Tcp(_) => ListenerKind::Tcp,
            ListenerAddress::Udp(_) => ListenerKind::Udp,
            ListenerAddress::Unix(_) => ListenerKind::Unix,
        };
        let info = ListenerInfo {
            name: config.name.clone(),
            kind,
            address: baton_wire::listener::describe(&bound).unwrap_or_default(),
            quic_slot: None,
        };
        let reuseport = kind == ListenerKind::Tcp
            && nix::sys::socket::getsockopt(&fd, sockopt::ReusePort).unwrap_or(false);
        let group = match reuseport.then(|| Group::new(fd.as_fd())) {
            Some(Ok(group)) => Some(group),
            Some(Err(e)) => {
                tracing::warn!(listener = %config.name, error = %e, "cannot steer the inherited socket: generations share it");
                None
            }
            None => None,
        };
        let nodelay = nodelay_of(&fd, kind);
        Ok(Listener {
            backlog: Cell::new(config.backlog),
            nodelay: Cell::new(nodelay),
            config,
            info,
            fd,
            unix_path: None,
            remove_path: std::cell::Cell::new(false),
            group: RefCell::new(group),
            primary: None,
            alive: Rc::new(()),
            strangers: std::cell::Cell::new(false),
            activated: true,
        })
    }

    /// Adopts a generation's own socket on `primary`'s port, handed over
    /// like a listener.
    pub fn adopt_generation_socket(primary: &Shared, fd: OwnedFd) -> anyhow::Result<Shared> {
        let (info, fd) = baton_wire::listener::verify(primary.info.clone(), fd)
            .with_context(|| format!("adopting a socket of listener `{}`", primary.info.name))?;
        Ok(Rc::new(Listener::generation_socket_of(primary, info, fd)))
    }

    fn generation_socket_of(primary: &Shared, info: ListenerInfo, fd: OwnedFd) -> Listener {
        Listener {
            config: primary.config.clone(),
            info,
            fd,
            unix_path: None,
            remove_path: std::cell::Cell::new(false),
            group: RefCell::new(None),
            primary: Some(primary.clone()),
            alive: Rc::new(()),
            strangers: std::cell::Cell::new(false),
            activated: false,
            backlog: Cell::new(primary.backlog.get()),
            nodelay: Cell::new(primary.nodelay.get()),
        }
    }

    /// A socket of `primary`'s own for one generation: a TCP listener on
    /// the same address (`SO_REUSEPORT`), which gets new connections once
    /// steered to. Listeners without a port group (UDP, Unix), and ports
    /// where `kernel` lists sockets this master does not know, share the
    /// listener's socket. A stranger may join between `kernel` and the new
    /// socket: [`Listener::confirm`] it against a look taken afterwards.
    pub fn for_generation(primary: &Shared, kernel: &Kernel) -> anyhow::Result<Shared> {
        if primary.is_quic() || !primary.group_matches(kernel) {
            return Ok(primary.clone());
        }
        let mut guard = primary.group.borrow_mut();
        let Some(group) = guard.as_mut() else {
            return Ok(primary.clone());
        };
        let socket = || -> anyhow::Result<OwnedFd> {
            let bound: SockaddrStorage = getsockname(primary.fd.as_raw_fd())?;
            let family = nix::sys::socket::SockaddrLike::family(&bound)
                .context("listener has no address family")?;
            let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
            setsockopt(&fd, sockopt::ReuseAddr, &true)?;
            setsockopt(&fd, sockopt::ReusePort, &true)?;
            if family == AddressFamily::Inet6 {
                setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
            }
            setsockopt(&fd, sockopt::TcpNoDelay, &primary.nodelay.get())?;
            bind(fd.as_raw_fd(), &bound)?;
            listen(&fd, primary.backlog.get())?;
            Ok(fd)
        };
        let fd = socket().with_context(|| {
            format!(
                "binding a generation socket for listener `{}` on {}",
                primary.info.name, primary.info.address
            )
        })?;
        let info = primary.info.clone();
        let listener = Rc::new(Listener::generation_socket_of(primary, info, fd));
        group.join(listener.fd(), &listener.alive)?;
        Ok(listener)
    }

    /// A UDP socket of its own on a QUIC listener's port for one SDK
    /// worker of `generation`, with a slot of the port's its connection
    /// IDs name (in its `info`); `None` for other listeners. It gets the
    /// datagrams of those IDs for as long as it lives, and new connections
    /// while `generation` is current ([`Listener::quic_current`]).
    pub fn for_quic_worker(primary: &Shared, generation: u64) -> anyhow::Result<Option<Shared>> {
        if primary.is_quic() {
            // Logs a stranger on the port (the kernel view is for TCP).
            primary.group_matches(&Ok(steering::Listening::default()));
        }
        let mut guard = primary.group.borrow_mut();
        let Some(group) = guard.as_mut().filter(|g| g.is_quic()) else {
            return Ok(None);
        };
        let context = || {
            format!(
                "binding a QUIC worker socket for listener `{}` on {}",
                primary.info.name, primary.info.address
            )
        };
        let socket = || -> anyhow::Result<OwnedFd> {
            let bound: SockaddrStorage = getsockname(primary.fd.as_raw_fd())?;
            let family = nix::sys::socket::SockaddrLike::family(&bound)
                .context("listener has no address family")?;
            let fd = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
            setsockopt(&fd, sockopt::ReuseAddr, &true)?;
            setsockopt(&fd, sockopt::ReusePort, &true)?;
            if family == AddressFamily::Inet6 {
                setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
            }
            bind(fd.as_raw_fd(), &bound)?;
            Ok(fd)
        };
        let fd = socket().with_context(context)?;
        let mut listener = Listener::generation_socket_of(primary, primary.info.clone(), fd);
        let slot = group
            .join_quic(listener.fd(), &listener.alive, generation)
            .with_context(context)?;
        listener.info.quic_slot = Some(slot);
        Ok(Some(Rc::new(listener)))
    }

    /// Whether this is a QUIC listener, whose datagrams are steered by
    /// connection ID (`quic = true`).
    pub fn is_quic(&self) -> bool {
        self.port()
            .group
            .borrow()
            .as_ref()
            .is_some_and(Group::is_quic)
    }

    /// On a QUIC worker's socket: it is worker `pid`'s (a handover names
    /// it, so that the next master keeps it while the worker runs).
    pub fn set_quic_owner(&self, pid: u32) {
        if let Some(group) = self.port().group.borrow_mut().as_mut() {
            if let Err(e) = group.quic_owner(self.fd(), pid) {
                tracing::error!(listener = %self.info.name, error = %e, "cannot record a QUIC socket's worker");
            }
        }
    }

    /// A QUIC listener's slots and generations, for a handover.
    pub fn quic_layout(&self) -> Option<steering::QuicLayout> {
        self.group.borrow().as_ref().and_then(Group::quic_layout)
    }

    /// On a QUIC listener: new connections go to the sockets of
    /// `generation`'s workers from now on.
    pub fn quic_current(&self, generation: u64) {
        if let Some(group) = self.port().group.borrow_mut().as_mut() {
            if let Err(e) = group.quic_current(generation) {
                tracing::error!(listener = %self.info.name, error = %e, "cannot steer the QUIC port's new connections");
            }
        }
    }

    /// On a QUIC listener, a canary: new connections go to the sockets of
    /// `generation`'s workers for the `threshold` share of flow hashes
    /// (see [`crate::config::Share::threshold`]), to `standby`'s for the
    /// rest.
    pub fn quic_canary(&self, generation: u64, standby: u64, threshold: u32) {
        if let Some(group) = self.port().group.borrow_mut().as_mut() {
            if let Err(e) = group.quic_canary(generation, standby, threshold) {
                tracing::error!(listener = %self.info.name, error = %e, "cannot split the QUIC port's new connections");
            }
        }
    }

    /// Keeps a socket [`Listener::for_generation`] just made if `kernel`,
    /// looked at since, lists exactly its group on the port; otherwise the
    /// listener's own socket is shared. Closing the new socket again moves
    /// at most a stranger (behind it) into its slot, never one of the
    /// group's.
    pub fn confirm(socket: Shared, kernel: &Kernel) -> Shared {
        let Some(primary) = socket.primary.clone() else {
            return socket;
        };
        if primary.group_matches(kernel) {
            return socket;
        }
        if let Some(group) = primary.group.borrow_mut().as_mut() {
            group.forget_last();
        }
        primary
    }

    /// For a generation's own socket: the listener whose port it shares.
    pub fn primary(&self) -> Option<&Shared> {
        self.primary.as_ref()
    }

    /// The listener whose port this socket is on: itself, or the listener a
    /// generation's own socket was made for.
    pub fn port(&self) -> &Listener {
        self.primary.as_deref().unwrap_or(self)
    }

    /// Sends every new connection on this port to this socket.
    pub fn steer_here(&self) -> anyhow::Result<()> {
        if let Some(group) = self.port().group.borrow_mut().as_mut() {
            group
                .steer(self.fd())
                .with_context(|| format!("steering listener `{}`", self.info.name))?;
        }
        Ok(())
    }

    /// Sends the share of new connections on this port below `threshold`
    /// (out of `u32::MAX`) to `canary`, and the rest to this socket.
    pub fn split_with(&self, canary: &Listener, threshold: u32) -> anyhow::Result<()> {
        if let Some(group) = self.port().group.borrow_mut().as_mut() {
            group
                .split(self.fd(), canary.fd(), threshold)
                .with_context(|| format!("splitting listener `{}`", self.info.name))?;
        }
        Ok(())
    }

    /// Sends connections from `from` (a probe's socket) to this socket
    /// whatever the port is steered to; `None` ends that.
    pub fn probe_from(&self, from: Option<SocketAddr>) {
        if let Some(group) = self.port().group.borrow_mut().as_mut() {
            let target = from.map(|f| (f, self.fd()));
            if let Err(e) = group.probe(target) {
                tracing::error!(listener = %self.info.name, error = %e, "cannot steer the probe");
            }
        }
    }

    /// Whether new connections can be steered away from this socket (a TCP
    /// listener's, with its port group).
    pub fn steerable(&self) -> bool {
        self.port()
            .group
            .borrow()
            .as_ref()
            .is_some_and(|g| !g.is_quic())
    }

    /// Connections waiting in this TCP socket's accept queue.
    pub fn queued(&self) -> u32 {
        steering::accept_queue(self.fd()).unwrap_or(0)
    }

    /// Whether the port group has sockets no generation uses any more.
    pub fn has_retired(&self) -> bool {
        self.port()
            .group
            .borrow()
            .as_ref()
            .is_some_and(Group::has_retired)
    }

    /// Lets go of the port group's sockets no generation uses any more,
    /// unless `kernel` lists sockets this master does not know on the port.
    /// Returns whether to look again shortly (see [`Group::tidy`]).
    pub fn tidy(&self, kernel: &Kernel) -> bool {
        let port = self.port();
        if port.group.borrow().is_none() || !port.group_matches(kernel) {
            return false;
        }
        port.group.borrow_mut().as_mut().is_some_and(Group::tidy)
    }

    /// Whether this listener has a port group and `kernel` lists exactly
    /// its sockets on the port; logs when that changes. Without a port
    /// group, true.
    fn group_matches(&self, kernel: &Kernel) -> bool {
        let group = self.group.borrow();
        let Some(group) = group.as_ref() else {
            return true;
        };
        let Ok(address) = self.info.address.parse::<SocketAddr>() else {
            return false;
        };
        let matches = match group.is_quic() {
            // `kernel` holds TCP listeners: a QUIC port's UDP sockets are
            // asked about on their own.
            true => quic_port_matches(group, address),
            false => kernel
                .as_ref()
                .map(|listening| group.matches_kernel(listening.on(address)))
                .map_err(|e| std::io::Error::new(e.kind(), e.to_string())),
        };
        let strangers = !matches.as_ref().is_ok_and(|m| *m);
        if strangers != self.strangers.replace(strangers) {
            match matches {
                Ok(false) if group.is_quic() => tracing::warn!(
                    event = "listener.strangers",
                    listener = %self.info.name,
                    address = %self.info.address,
                    "sockets this master does not know are bound to the QUIC port (another process with SO_REUSEPORT?): datagrams may reach them, and finished workers' sockets stay, until they are gone"
                ),
                Ok(false) => tracing::warn!(
                    listener = %self.info.name,
                    address = %self.info.address,
                    "sockets this master does not know listen on the port (another process with SO_REUSEPORT?): new generations share the listener's socket until they are gone"
                ),
                Err(e) => tracing::warn!(
                    listener = %self.info.name,
                    error = %e,
                    "cannot list the sockets on the port: new generations share the listener's socket"
                ),
                Ok(true) => tracing::info!(
                    listener = %self.info.name,
                    "the port's sockets are all this master's again"
                ),
            }
        }
        !strangers
    }

    /// Whether the kernel lists sockets this master does not know on its
    /// QUIC port, as [`Listener::tidy`] and
    /// [`Listener::for_quic_worker`] see it (logged when that changes).
    pub fn has_strangers(&self) -> bool {
        self.strangers.get()
    }

    /// The port group's member sockets as this master holds them, and the
    /// one steered to; `None` without a group.
    pub fn member_fds(&self) -> Option<(Vec<RawFd>, Option<usize>)> {
        self.group.borrow().as_ref().map(Group::member_fds)
    }

    /// The port group as handed to another master; `None` without one.
    pub fn layout(&self) -> std::io::Result<Option<Layout>> {
        self.group.borrow().as_ref().map(Group::layout).transpose()
    }

    /// Takes over a port group handed over with this listener. Members not
    /// among `sockets` (generation sockets adopted along) stay until
    /// `previous_owner` dies.
    pub fn adopt_group(
        &self,
        layout: Layout,
        sockets: &[Shared],
        previous_owner: &Rc<()>,
    ) -> anyhow::Result<()> {
        let primary = steering::inode(self.fd())?;
        let inodes: Vec<(u64, &Shared)> = sockets
            .iter()
            .filter(|s| std::ptr::eq(s.port(), self))
            .map(|s| Ok((steering::inode(s.fd())?, s)))
            .collect::<std::io::Result<_>>()?;
        let user_of = |ino: u64| {
            if ino == primary {
                return Some(User::Pinned);
            }
            inodes
                .iter()
                .find(|(i, _)| *i == ino)
                .map(|(_, s)| User::Token(Rc::downgrade(&s.alive)))
        };
        let group = Group::adopt(layout, user_of, previous_owner)
            .with_context(|| format!("adopting the sockets of listener `{}`", self.info.name))?;
        *self.group.borrow_mut() = Some(group);
        Ok(())
    }

    /// Takes over an adopted listener's socket file: it is removed when this
    /// master lets go of the socket (unless the service manager passed it).
    pub fn own_path(&self) {
        self.remove_path.set(!self.activated);
    }

    /// Whether the socket came from socket activation.
    pub fn activated(&self) -> bool {
        self.activated
    }

    /// Marks a socket handed over by a previous master as one that came
    /// from socket activation.
    pub fn with_activated(mut self, activated: bool) -> Listener {
        self.activated = activated;
        self
    }

    /// Keeps a Unix listener's socket file when this master lets go of it:
    /// the new master serves on it. A QUIC port's group lets go of its
    /// workers' sockets ([`Group::hand_over_quic`]).
    pub fn hand_over(&self) {
        self.remove_path.set(false);
        if let Some(group) = self.group.borrow_mut().as_mut() {
            group.hand_over_quic();
        }
    }

    /// The socket.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Applies `config`'s backlog and `TCP_NODELAY` to the listening
    /// socket in place when they changed: Linux accepts `listen(2)` again
    /// on a listening socket. New generation sockets on the port get them
    /// too; connections accepted before keep what they had.
    pub fn apply(&self, config: &ListenerConfig) -> anyhow::Result<()> {
        let context = |what: &str| {
            format!(
                "changing the {what} of listener `{}` on {}",
                self.info.name, self.info.address
            )
        };
        if self.config.quic != config.quic {
            bail!(
                "listener `{}` on {}: quic is set when a listener is bound, and a reload cannot change it (a restart can)",
                self.info.name,
                self.info.address
            );
        }
        if self.info.kind != ListenerKind::Udp && self.backlog.get() != config.backlog {
            listen(&self.fd, config.backlog).with_context(|| context("backlog"))?;
            self.backlog.set(config.backlog);
        }
        if self.info.kind == ListenerKind::Tcp && self.nodelay.get() != config.nodelay() {
            setsockopt(&self.fd, sockopt::TcpNoDelay, &config.nodelay())
                .with_context(|| context("nodelay"))?;
            self.nodelay.set(config.nodelay());
        }
        Ok(())
    }

    /// The `listen(2)` backlog asked of the kernel (which caps it at
    /// `net.core.somaxconn`).
    pub fn backlog(&self) -> i32 {
        self.backlog.get()
    }

    /// Whether `TCP_NODELAY` is set on the socket (false for UDP and Unix
    /// listeners).
    pub fn nodelay(&self) -> bool {
        self.nodelay.get()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(path) = self.unix_path.as_ref().filter(|_| self.remove_path.get()) {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn bind_socket(config: &ListenerConfig) -> anyhow::Result<Listener> {
    let flags = SockFlag::SOCK_CLOEXEC;
    let (fd, kind, unix_path) = match &config.address {
        ListenerAddress::Tcp(addr) | ListenerAddress::Udp(addr) => {
            let (kind, ty) = match config.address {
                ListenerAddress::Udp(_) => (ListenerKind::Udp, SockType::Datagram),
                _ => (ListenerKind::Tcp, SockType::Stream),
            };
            let family = match addr {
                SocketAddr::V4(_) => AddressFamily::Inet,
                SocketAddr::V6(_) => AddressFamily::Inet6,
            };
            let fd = socket(family, ty, flags, None)?;
            setsockopt(&fd, sockopt::ReuseAddr, &true)?;
            match addr {
                SocketAddr::V4(a) => bind(fd.as_raw_fd(), &SockaddrIn::from(*a))?,
                SocketAddr::V6(a) => {
                    setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
                    bind(fd.as_raw_fd(), &SockaddrIn6::from(*a))?
                }
            }
            // Bound without SO_REUSEPORT, so that a port someone else holds
            // is refused; set afterwards, so that generations' own sockets
            // can join it. Accepted connections inherit TCP_NODELAY from the
            // listening socket: a server handed the socket need not set it
            // (uvicorn's `--fd` takes it for a Unix socket and does not).
            if kind == ListenerKind::Tcp {
                setsockopt(&fd, sockopt::ReusePort, &true)?;
                setsockopt(&fd, sockopt::TcpNoDelay, &config.nodelay())?;
            }
            // A QUIC port's workers get UDP sockets of their own on it.
            if kind == ListenerKind::Udp && config.quic {
                setsockopt(&fd, sockopt::ReusePort, &true)?;
            }
            (fd, kind, None)
        }
        ListenerAddress::Unix(path) => {
            remove_stale_socket(path)?;
            let fd = socket(AddressFamily::Unix, SockType::Stream, flags, None)?;
            bind(fd.as_raw_fd(), &UnixAddr::new(path.as_path())?)?;
            (fd, ListenerKind::Unix, Some(path.clone()))
        }
    };
    if kind != ListenerKind::Udp {
        listen(&fd, config.backlog)?;
    }
    let bound: SockaddrStorage = getsockname(fd.as_raw_fd())?;
    let info = ListenerInfo {
        name: config.name.clone(),
        kind,
        address: baton_wire::listener::describe(&bound).unwrap_or_default(),
        quic_slot: None,
    };
    let group = match kind {
        ListenerKind::Tcp => Some(Group::new(fd.as_fd())?),
        ListenerKind::Udp if config.quic => Some(Group::new_quic(fd.as_fd())?),
        _ => None,
    };
    Ok(Listener {
        config: config.clone(),
        info,
        fd,
        unix_path,
        remove_path: std::cell::Cell::new(true),
        group: RefCell::new(group),
        primary: None,
        alive: Rc::new(()),
        strangers: std::cell::Cell::new(false),
        activated: false,
        backlog: Cell::new(config.backlog),
        nodelay: Cell::new(kind == ListenerKind::Tcp && config.nodelay()),
    })
}

/// `listen(2)` with `backlog` as configured (1 to 65535). nix's `Backlog`
/// refuses values from `SOMAXCONN` (4096) up, which Linux takes and caps
/// at `net.core.somaxconn` itself.
fn listen(fd: &impl AsFd, backlog: i32) -> std::io::Result<()> {
    socket2::SockRef::from(fd).listen(backlog)
}

/// Whether `TCP_NODELAY` is set on a socket handed over or inherited.
fn nodelay_of(fd: &OwnedFd, kind: ListenerKind) -> bool {
    kind == ListenerKind::Tcp && getsockopt(fd, sockopt::TcpNoDelay).unwrap_or(false)
}

/// A socket file left by a dead process is removed; one that still accepts
/// connections is someone's live socket and is never stolen.
fn remove_stale_socket(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        bail!("{} exists and is not a socket", path.display());
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => bail!("{} is in use by a running process", path.display()),
        Err(_) => {
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(backlog: i32, nodelay: Option<bool>) -> ListenerConfig {
        ListenerConfig {
            name: "http".into(),
            address: "127.0.0.1:0".parse().unwrap(),
            backlog,
            nodelay,
            quic: false,
        }
    }

    /// The backlog the kernel reports for `listener` (`sock_diag`).
    fn kernel_backlog(listener: &Listener) -> u32 {
        let port = listener.info.address.parse::<SocketAddr>().unwrap().port();
        let inode = steering::inode(listener.fd()).unwrap();
        let listening = crate::sockdiag::listeners(&[port]).unwrap();
        listening.iter().find(|s| s.inode == inode).unwrap().wqueue
    }

    fn somaxconn() -> u32 {
        std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn every_valid_backlog_binds_and_the_kernel_caps_it_at_somaxconn() {
        for backlog in [1, 4095, 4096, 65535] {
            let listener = Listener::bind(&tcp(backlog, None)).unwrap();
            let expected = (backlog as u32).min(somaxconn());
            assert_eq!(kernel_backlog(&listener), expected, "{backlog}");
            // Changed in place, both ways.
            listener.apply(&tcp(65535, None)).unwrap();
            assert_eq!(kernel_backlog(&listener), 65535.min(somaxconn()));
            listener.apply(&tcp(7, None)).unwrap();
            assert_eq!((kernel_backlog(&listener), listener.backlog()), (7, 7));
        }
    }

    /// Whether the connection `listener` accepts next has `TCP_NODELAY`.
    fn accepted_nodelay(listener: &Listener) -> bool {
        let address: SocketAddr = listener.info.address.parse().unwrap();
        let _client = std::net::TcpStream::connect(address).unwrap();
        let fd = nix::sys::socket::accept(listener.fd().as_raw_fd()).unwrap();
        // SAFETY: accept(2) just returned this fd, owned by nobody else.
        let accepted = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        getsockopt(&accepted, sockopt::TcpNoDelay).unwrap()
    }

    #[test]
    fn accepted_connections_inherit_nodelay_unless_it_is_off() {
        let on = Listener::bind(&tcp(16, None)).unwrap();
        assert!(on.nodelay() && accepted_nodelay(&on));
        let off = Listener::bind(&tcp(16, Some(false))).unwrap();
        assert!(!off.nodelay() && !accepted_nodelay(&off));
        // A reload switches it in place, for connections accepted from then on.
        off.apply(&tcp(16, Some(true))).unwrap();
        assert!(accepted_nodelay(&off));
        on.apply(&tcp(16, Some(false))).unwrap();
        assert!(!accepted_nodelay(&on));
    }

    /// A QUIC listener `h3` on a free loopback port.
    fn quic_config() -> ListenerConfig {
        ListenerConfig {
            name: "h3".into(),
            address: "udp:127.0.0.1:0".parse().unwrap(),
            backlog: 16,
            nodelay: None,
            quic: true,
        }
    }

    #[test]
    fn a_quic_listeners_workers_get_sockets_with_slots_and_quic_cannot_change_in_place() {
        let config = quic_config();
        let primary = Rc::new(Listener::bind(&config).unwrap());
        assert!(primary.is_quic() && !primary.steerable());
        let a = Listener::for_quic_worker(&primary, 1).unwrap().unwrap();
        let b = Listener::for_quic_worker(&primary, 1).unwrap().unwrap();
        assert_eq!(
            (a.info.address.as_str(), a.info.kind),
            (primary.info.address.as_str(), ListenerKind::Udp)
        );
        assert!(a.info.quic_slot.is_some() && a.info.quic_slot != b.info.quic_slot);
        assert_eq!(primary.info.quic_slot, None);
        // Generations of other workers share the listener's socket.
        let kernel = kernel_view([&primary]);
        assert!(Rc::ptr_eq(
            &Listener::for_generation(&primary, &kernel).unwrap(),
            &primary
        ));
        let e = primary
            .apply(&ListenerConfig {
                quic: false,
                ..config.clone()
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("listener `h3`") && e.contains("quic"), "{e}");
        // Without `quic`, no worker sockets.
        let plain = Rc::new(
            Listener::bind(&ListenerConfig {
                quic: false,
                ..config
            })
            .unwrap(),
        );
        assert!(Listener::for_quic_worker(&plain, 1).unwrap().is_none());
    }

    #[test]
    fn a_stranger_on_a_quic_port_is_reported_and_finished_sockets_stay_until_it_leaves() {
        use nix::sys::socket::{
            bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
        };
        let config = quic_config();
        let primary = Rc::new(Listener::bind(&config).unwrap());
        let a = Listener::for_quic_worker(&primary, 1).unwrap().unwrap();
        assert!(!primary.has_strangers());
        // Another process's socket (same user, SO_REUSEPORT) joins the port.
        let port: SocketAddr = primary.info.address.parse().unwrap();
        let stranger = socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        setsockopt(&stranger, sockopt::ReusePort, &true).unwrap();
        bind(
            stranger.as_raw_fd(),
            &SockaddrIn::new(127, 0, 0, 1, port.port()),
        )
        .unwrap();
        let _b = Listener::for_quic_worker(&primary, 2).unwrap().unwrap();
        assert!(primary.has_strangers());
        let members = || primary.member_fds().unwrap().0.len();
        assert_eq!(members(), 3);
        // Worker `a` is gone, but letting its socket go would move the
        // stranger into a member's place in the kernel's array.
        drop(a);
        assert!(primary.has_retired());
        assert!(!primary.tidy(&kernel_view([&primary])));
        assert_eq!(members(), 3);
        drop(stranger);
        while primary.tidy(&kernel_view([&primary])) {}
        assert!(!primary.has_strangers());
        assert_eq!(members(), 2);
    }

    #[test]
    fn a_generation_socket_gets_the_listeners_backlog_and_nodelay() {
        let primary = Rc::new(Listener::bind(&tcp(5000, Some(false))).unwrap());
        let kernel = kernel_view([&primary]);
        let own = Listener::for_generation(&primary, &kernel).unwrap();
        assert!(own.primary().is_some(), "a socket of its own");
        assert_eq!(kernel_backlog(&own), 5000.min(somaxconn()));
        own.steer_here().unwrap();
        assert!(!accepted_nodelay(&own));
    }
}
