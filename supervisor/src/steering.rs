//! Steering a TCP port's new connections to one generation's socket.
//!
//! A server that does not link the SDK stops accepting only when its stop
//! signal arrives, and some close the connections they accepted but have not
//! read yet when they stop (uvicorn does, within its last event-loop turn).
//! On a socket shared by every generation that loses a request now and then
//! under load. So a generation of such workers gets its own socket on the
//! port (`SO_REUSEPORT`), and a one-instruction classic BPF program on the
//! port's group sends every new connection to the newest serving generation's
//! socket. The old generation gets its stop signal only once its socket's
//! accept queue has stayed empty for a moment (see
//! [`crate::fleet::Generation::hand_over`]): nothing it could drop is
//! left for it.
//!
//! The kernel keeps a group's sockets in an array: `listen(2)` appends one,
//! and a socket leaving (its last fd closed) has the last one moved into its
//! slot. The program returns an index into that array, so [`Group`] mirrors
//! it, holds every member open itself, and only lets one go when that cannot
//! move the socket the program points at. It lets one go with `shutdown(2)`
//! before closing it, which takes the socket out of the array even while
//! another process (a worker's escaped child) still holds a copy. Before it
//! adds or lets go of a socket it asks the kernel (`sock_diag`, one look at
//! every port for a whole reload or tidy: see [`Listening`]) which sockets
//! listen on the port:
//! while some are not its own (another process of the same user with
//! `SO_REUSEPORT`, or what a failed new master left behind) it changes
//! nothing, and generations share the listener's own socket, which stays
//! first in the array and so is always steered to correctly.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::rc::{Rc, Weak};

pub mod quic;

/// `SO_ATTACH_REUSEPORT_CBPF` from `asm-generic/socket.h` (x86, arm, riscv
/// and most others); the libc crate does not define it for glibc targets.
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// Who still uses a member socket.
#[derive(Debug)]
pub enum User {
    /// The listener's own socket: a member for as long as the group exists.
    Pinned,
    /// A generation's socket: in use while the token lives.
    Token(Weak<()>),
    /// A QUIC worker's socket adopted from another master (or image): in
    /// use while the token lives or the worker runs (its pidfd is not
    /// readable), as the kernel keeps a UDP socket in the port's group
    /// until its last fd, the worker's too, is closed.
    Worker(Weak<()>, OwnedFd),
}

impl User {
    fn retired(&self) -> bool {
        match self {
            User::Pinned => false,
            User::Token(token) => token.strong_count() == 0,
            User::Worker(token, pidfd) => {
                use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
                let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
                token.strong_count() == 0 && poll(&mut fds, PollTimeout::ZERO).unwrap_or(1) > 0
            }
        }
    }
}

#[derive(Debug)]
struct Member {
    /// Keeps the socket in the group until the group lets it go. `None`
    /// on a QUIC port: this master closed its copy, but another process
    /// still holds one (see [`Group::tidy_quic`]), so the socket still has
    /// its place in the kernel's array.
    fd: Option<OwnedFd>,
    ino: u64,
    user: User,
    /// On a QUIC port: whose socket it is.
    quic: QuicMember,
}

/// A QUIC port's member: the slot its worker's connection IDs start with
/// (0 for the listener's own socket), the worker's generation, and its pid
/// once it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QuicMember {
    /// 1 to 255; 0 for the listener's own socket.
    pub slot: u8,
    /// The generation of the worker that has it.
    pub generation: u64,
    /// The worker's pid, once started.
    pub pid: Option<u32>,
}

/// A QUIC port's group as handed to another master (or image): what
/// [`Layout`] does not say.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QuicLayout {
    /// Each member's, in the kernel's order.
    pub members: Vec<QuicMember>,
    /// The generation new connections go to.
    pub current: Option<u64>,
    /// The slot handed out last.
    pub last_slot: u8,
}

impl Member {
    /// Takes the socket out of the port's group now, not when its last fd
    /// closes: a process the master does not control (a worker's child that
    /// left its process group, say) may hold a copy forever, and the group
    /// must shrink exactly as [`Group`] mirrors it, or the program's index
    /// points at the wrong socket. `shutdown(2)` of a listening socket
    /// unhashes it from the port (for every holder): it leaves the kernel's
    /// array as a close would, and stops listening.
    fn leave(self) {
        let Some(fd) = self.fd else { return };
        if let Err(e) = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Both)
        {
            // ENOTCONN: it was not listening any more.
            if e != nix::errno::Errno::ENOTCONN {
                tracing::warn!(error = %e, "cannot take a socket out of its port group");
            }
        }
    }
}

/// The sockets sharing one TCP port, in the kernel's order, and the one new
/// connections go to.
#[derive(Debug)]
pub struct Group {
    members: Vec<Member>,
    steered: Option<usize>,
    /// What the program does besides returning `steered`.
    rules: Rules,
    /// The program this master attached last: what it returns, its rules,
    /// and the [`EPOCH`] it was attached in.
    attached: Option<(usize, Rules, u64)>,
    /// A QUIC port's: datagrams go by connection ID (see [`quic`]).
    quic: Option<Quic>,
}

/// What a QUIC port's group steers by besides its members' slots.
#[derive(Debug, Default)]
struct Quic {
    /// The generation whose sockets get new connections; until one is
    /// named, the newest generation's.
    current: Option<u64>,
    /// During a canary's probation: the standby generation, which gets the
    /// new connections whose flow hash is at or above the threshold.
    canary_rest: Option<(u64, u32)>,
    /// The routes of the program attached last, and the [`EPOCH`] it was
    /// attached in.
    attached: Option<(quic::Routes, u64)>,
    /// The slot handed out last.
    last_slot: u8,
    /// The member on its way out of the group ([`Group::tidy_quic`]).
    leaving: Option<Leaving>,
}

/// A QUIC port's member on its way out of the group.
#[derive(Debug)]
struct Leaving {
    /// Its socket's inode.
    ino: u64,
    /// Since when.
    since: std::time::Instant,
    /// Whether its taking long was logged.
    warned: bool,
}

/// Bumped when another master may attach programs to this master's port
/// groups ([`others_may_steer`]): each group attaches its program again at
/// its next steer, whatever it attached before.
static EPOCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Another master (an upgrade's) may attach programs to the port groups
/// from now on.
pub fn others_may_steer() {
    EPOCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Exceptions to "every new connection goes to the steered socket".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Rules {
    /// A share of new connections goes to this member: those for which a
    /// random `u32` is below the threshold (a canary).
    canary: Option<(usize, u32)>,
    /// Connections from this source (the last 32 bits of its address, and
    /// its port) go to this member: the master's own probes of a generation
    /// that is not steered to.
    probe: Option<(u32, u16, usize)>,
}

/// A group as handed to another master: its members in the kernel's order,
/// and the index the program returns.
#[derive(Debug)]
pub struct Layout {
    /// Every member socket, in the kernel's order.
    pub members: Vec<OwnedFd>,
    /// The member new connections go to.
    pub steered: Option<usize>,
    /// A QUIC port's slots and generations.
    pub quic: Option<QuicLayout>,
}

impl Group {
    /// A group of one: `primary`, which just started listening. Steers to
    /// it, so that a generation socket joining later gets nothing until it
    /// is steered to.
    pub fn new(primary: BorrowedFd<'_>) -> io::Result<Group> {
        let mut group = Group {
            members: vec![Member {
                fd: Some(primary.try_clone_to_owned()?),
                ino: inode(primary)?,
                user: User::Pinned,
                quic: QuicMember::default(),
            }],
            steered: None,
            rules: Rules::default(),
            attached: None,
            quic: None,
        };
        group.steer_index(0)?;
        Ok(group)
    }

    /// A QUIC port's group of one: `primary`, a bound UDP socket with
    /// `SO_REUSEPORT`. Workers' sockets join it with a slot each
    /// ([`Group::join_quic`]); until then every datagram reaches
    /// `primary`. No program is attached yet: the kernel makes the port's
    /// group when a second socket joins, and a socket bound without
    /// `SO_REUSEPORT` (so that a port someone holds is refused) has none
    /// to attach one to before.
    pub fn new_quic(primary: BorrowedFd<'_>) -> io::Result<Group> {
        Ok(Group {
            members: vec![Member {
                fd: Some(primary.try_clone_to_owned()?),
                ino: inode(primary)?,
                user: User::Pinned,
                quic: QuicMember::default(),
            }],
            steered: None,
            rules: Rules::default(),
            attached: None,
            quic: Some(Quic::default()),
        })
    }

    /// Whether this is a QUIC port's group.
    pub fn is_quic(&self) -> bool {
        self.quic.is_some()
    }

    /// Records `socket`, a UDP socket that just joined the QUIC port (and
    /// so was appended to the kernel's array), as used by a worker of
    /// `generation` while `token` lives, and gives it a slot no member has.
    /// Returns the slot; the program is attached again with it.
    pub fn join_quic(
        &mut self,
        socket: BorrowedFd<'_>,
        token: &Rc<()>,
        generation: u64,
    ) -> io::Result<u8> {
        if self.quic.is_none() {
            return Err(io::Error::other("not a QUIC port"));
        }
        let taken: std::collections::HashSet<u8> =
            self.members.iter().map(|m| m.quic.slot).collect();
        // The next free slot after the one handed out last, wrapping: a
        // slot that fell free is handed out again as late as can be.
        let last = self.quic.as_ref().map_or(0, |q| q.last_slot);
        let slot = (1..=255u16)
            .map(|i| ((u16::from(last) + i - 1) % 255 + 1) as u8)
            .find(|s| !taken.contains(s))
            .ok_or_else(|| {
                io::Error::other("255 worker sockets on the port already: no QUIC slot is free")
            })?;
        if let Some(quic) = self.quic.as_mut() {
            quic.last_slot = slot;
        }
        self.members.push(Member {
            fd: Some(socket.try_clone_to_owned()?),
            ino: inode(socket)?,
            user: User::Token(Rc::downgrade(token)),
            quic: QuicMember {
                slot,
                generation,
                pid: None,
            },
        });
        self.route()?;
        Ok(slot)
    }

    /// Records that `socket`, a member, is worker `pid`'s (for a handover).
    pub fn quic_owner(&mut self, socket: BorrowedFd<'_>, pid: u32) -> io::Result<()> {
        let index = self.index_of(socket)?;
        self.members[index].quic.pid = Some(pid);
        Ok(())
    }

    /// A QUIC port's slots and generations, for the keeper's snapshot
    /// (the group as it will be, [`Group::settled`]).
    pub fn quic_layout(&self) -> Option<QuicLayout> {
        self.quic_layout_of(self.settled())
    }

    /// A QUIC port's slots and generations of `members`.
    fn quic_layout_of<'a>(&self, members: impl Iterator<Item = &'a Member>) -> Option<QuicLayout> {
        self.quic.as_ref().map(|quic| QuicLayout {
            members: members.map(|m| m.quic).collect(),
            current: quic.current,
            last_slot: quic.last_slot,
        })
    }

    /// New connections go to the sockets of `generation`'s workers.
    pub fn quic_current(&mut self, generation: u64) -> io::Result<()> {
        if let Some(quic) = self.quic.as_mut() {
            quic.current = Some(generation);
            quic.canary_rest = None;
            self.route()?;
        }
        Ok(())
    }

    /// A canary: new connections go to `generation`'s workers' sockets when
    /// their flow hash is below `threshold`, to `standby`'s otherwise.
    pub fn quic_canary(&mut self, generation: u64, standby: u64, threshold: u32) -> io::Result<()> {
        if let Some(quic) = self.quic.as_mut() {
            quic.current = Some(generation);
            quic.canary_rest = Some((standby, threshold));
            self.route()?;
        }
        Ok(())
    }

    /// The QUIC routes of the members as they are, attached unless they
    /// are what was attached last.
    fn route(&mut self) -> io::Result<()> {
        let Some(quic) = self.quic.as_ref() else {
            return Ok(());
        };
        let newest = self
            .members
            .iter()
            .map(|m| m.quic.generation)
            .max()
            .unwrap_or(0);
        let current = quic.current.unwrap_or(newest);
        let mut routes = quic::Routes::default();
        let mut rest = Vec::new();
        for (i, member) in self.members.iter().enumerate().skip(1) {
            routes.slots.push((member.quic.slot, i));
            if member.user.retired() {
                continue;
            }
            if member.quic.generation == current {
                routes.current.push(i);
            } else if quic
                .canary_rest
                .is_some_and(|(g, _)| g == member.quic.generation)
            {
                rest.push(i);
            }
        }
        // The standby's workers gone, or the canary's not started: no split.
        if let Some((_, threshold)) = quic.canary_rest {
            if !rest.is_empty() && !routes.current.is_empty() {
                routes.rest = Some((rest, threshold));
            }
        }
        let epoch = EPOCH.load(std::sync::atomic::Ordering::Relaxed);
        if self.members.len() < 2 || quic.attached.as_ref() == Some(&(routes.clone(), epoch)) {
            return Ok(());
        }
        let primary = self.primary()?;
        attach_program(primary, &quic::program(&routes, is_v6(primary)?)?)?;
        if let Some(quic) = self.quic.as_mut() {
            quic.attached = Some((routes, epoch));
        }
        Ok(())
    }

    /// Takes the members of a QUIC port whose workers are gone out of the
    /// group, one at a time, and attaches the program for what is left;
    /// returns whether one is still on its way out (look again shortly).
    ///
    /// A UDP socket leaves the kernel's array when its last fd closes, the
    /// last member taking its place: the program must be attached again at
    /// once, or the moved member's datagrams go astray. So the last fd to
    /// close must be this master's, closed right before it attaches the
    /// program. The worker's closed when it exited; the keeper's goes with
    /// the snapshot sent at the end of the turn in which the member starts
    /// leaving (a snapshot names the group as it will be,
    /// [`Group::settled`]), and this master closes its own once the keeper
    /// holds it no more ([`quic::keeper_holds`]). A child forked meanwhile
    /// holds a copy until its `execve`: then the member keeps its place in
    /// the mirror (its fd `None`) until the kernel lists it no more. One
    /// member leaves at a time: with two, the kernel's array would depend
    /// on which holder closed its copies first.
    fn tidy_quic(&mut self) -> bool {
        let (port, v6) = match self.primary().and_then(|p| Ok((local_port(p)?, is_v6(p)?))) {
            Ok(found) => found,
            Err(e) => {
                tracing::error!(error = %e, "cannot tidy the QUIC port's sockets");
                return false;
            }
        };
        let again = loop {
            if let Some(i) = self.leaving() {
                let ino = self.members[i].ino;
                if self.members[i].fd.is_some() {
                    if quic::keeper_holds(ino) {
                        break true;
                    }
                    // Most likely the last copy: the kernel let the socket
                    // go as it closed, so the program follows at once,
                    // before the kernel is asked (which takes longer than a
                    // datagram does to arrive).
                    self.members[i].fd = None;
                    let member = self.members.swap_remove(i);
                    self.steer_quic();
                    if quic::is_listed(port, v6, ino) {
                        // A child forked meanwhile holds a copy: the member
                        // is back in its place until that one closes.
                        self.members.push(member);
                        let last = self.members.len() - 1;
                        self.members.swap(i, last);
                        self.steer_quic();
                        break true;
                    }
                } else if quic::is_listed(port, v6, ino) {
                    break true;
                } else {
                    self.members.swap_remove(i);
                    self.steer_quic();
                }
                if let Some(quic) = self.quic.as_mut() {
                    quic.leaving = None;
                }
            }
            let Some(i) = self.members.iter().position(|m| m.user.retired()) else {
                break false;
            };
            let ino = self.members[i].ino;
            if let Some(quic) = self.quic.as_mut() {
                quic.leaving = Some(Leaving {
                    ino,
                    since: std::time::Instant::now(),
                    warned: false,
                });
            }
        };
        if let Some(leaving) = self.quic.as_mut().and_then(|q| q.leaving.as_mut()) {
            if !leaving.warned && leaving.since.elapsed() >= quic::LEAVING_PATIENCE {
                leaving.warned = true;
                tracing::warn!(
                    event = "steering.quic_socket_held",
                    "a QUIC worker socket is still open elsewhere (a child of a worker?): the port's other finished worker sockets stay until it closes"
                );
            }
        }
        again
    }

    /// An upgrade's new master has taken the QUIC port over, with copies
    /// of every member: this master lets go of its own (but the listener's
    /// socket), so that the new master's copy of a finished worker's socket
    /// is the last one, closed when the new master steers without it. This
    /// master steers the port no more.
    pub fn hand_over_quic(&mut self) {
        if let Some(quic) = self.quic.as_mut() {
            quic.leaving = None;
            quic.attached = None;
            self.members.truncate(1);
        }
    }

    /// [`Group::route`], logging what fails.
    fn steer_quic(&mut self) {
        if let Err(e) = self.route() {
            tracing::error!(error = %e, "cannot steer the QUIC port's datagrams");
        }
    }

    /// The index of the QUIC member on its way out, if one is.
    fn leaving(&self) -> Option<usize> {
        let ino = self.quic.as_ref()?.leaving.as_ref()?.ino;
        self.members.iter().position(|m| m.ino == ino)
    }

    /// The members as the kernel's array will hold them once the QUIC
    /// member on its way out has left it (the last one in its place): what
    /// another master adopts, and the keeper holds.
    fn settled(&self) -> impl Iterator<Item = &Member> {
        let mut order: Vec<&Member> = self.members.iter().collect();
        if let Some(i) = self.leaving() {
            order.swap_remove(i);
        }
        order.into_iter()
    }

    /// The listener's own socket, member 0 (which never leaves).
    fn primary(&self) -> io::Result<BorrowedFd<'_>> {
        self.members
            .first()
            .and_then(|m| m.fd.as_ref())
            .map(AsFd::as_fd)
            .ok_or_else(|| io::Error::other("the port group has no primary socket"))
    }

    /// Rebuilds a group handed over by another master (or a previous image
    /// of this one). `user_of` names the user of each member by its socket
    /// inode; `None` makes it retired as soon as `fallback` dies.
    pub fn adopt(
        layout: Layout,
        user_of: impl Fn(u64) -> Option<User>,
        fallback: &Rc<()>,
    ) -> io::Result<Group> {
        let mut members = Vec::with_capacity(layout.members.len());
        let quic_members = match &layout.quic {
            Some(quic) if quic.members.len() != layout.members.len() => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "QUIC members do not match the group's",
                ))
            }
            Some(quic) => quic.members.clone(),
            None => vec![QuicMember::default(); layout.members.len()],
        };
        for (fd, quic) in layout.members.into_iter().zip(quic_members) {
            let ino = inode(fd.as_fd())?;
            let user = user_of(ino).unwrap_or_else(|| {
                let token = Rc::downgrade(fallback);
                match quic.pid.map(pidfd) {
                    Some(Ok(pidfd)) => User::Worker(token, pidfd),
                    _ => User::Token(token),
                }
            });
            members.push(Member {
                fd: Some(fd),
                ino,
                user,
                quic,
            });
        }
        if layout.steered.is_some_and(|i| i >= members.len()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "steered member out of range",
            ));
        }
        Ok(Group {
            members,
            steered: layout.steered,
            rules: Rules::default(),
            attached: None,
            quic: layout.quic.map(|quic| Quic {
                current: quic.current,
                // As the TCP rules: an upgrade does not start during a
                // probation.
                canary_rest: None,
                attached: None,
                last_slot: quic.last_slot,
                leaving: None,
            }),
        })
    }

    /// Every member socket's fd, in the kernel's order, and the steered
    /// index.
    pub fn member_fds(&self) -> (Vec<std::os::fd::RawFd>, Option<usize>) {
        (
            self.settled()
                .filter_map(|m| m.fd.as_ref().map(AsRawFd::as_raw_fd))
                .collect(),
            self.steered,
        )
    }

    /// The group as handed to another master: copies of its members. A
    /// QUIC member on its way out that this master still holds stays in it
    /// (an upgrade stops this master's tidying, so its copy stays open until
    /// it exits; the new master lets it go); one it closed is left out, as
    /// the kernel will soon have it.
    pub fn layout(&self) -> io::Result<Layout> {
        let handed = || {
            let closed = self.members.iter().position(|m| m.fd.is_none());
            let mut order: Vec<&Member> = self.members.iter().collect();
            if let Some(i) = closed {
                order.swap_remove(i);
            }
            order.into_iter()
        };
        Ok(Layout {
            members: handed()
                .filter_map(|m| m.fd.as_ref().map(OwnedFd::try_clone))
                .collect::<io::Result<_>>()?,
            steered: self.steered,
            quic: self.quic_layout_of(handed()),
        })
    }

    /// Records `socket`, which just started listening on the port (and so
    /// was appended to the kernel's array), as used while `token` lives.
    pub fn join(&mut self, socket: BorrowedFd<'_>, token: &Rc<()>) -> io::Result<()> {
        self.members.push(Member {
            fd: Some(socket.try_clone_to_owned()?),
            ino: inode(socket)?,
            user: User::Token(Rc::downgrade(token)),
            quic: QuicMember::default(),
        });
        Ok(())
    }

    /// Drops the member that joined last, never steered to: when its socket
    /// closes it leaves the kernel's array, moving at most sockets behind it.
    pub fn forget_last(&mut self) {
        if self.members.len() > 1 && self.steered != Some(self.members.len() - 1) {
            if let Some(member) = self.members.pop() {
                member.leave();
            }
        }
    }

    /// Sends every new connection to `socket`, a member (ending a canary).
    pub fn steer(&mut self, socket: BorrowedFd<'_>) -> io::Result<()> {
        let index = self.index_of(socket)?;
        self.rules.canary = None;
        self.steer_index(index)
    }

    /// Sends the share of new connections below `threshold` (out of
    /// `u32::MAX`), drawn at random per connection, to `canary`, and the
    /// rest to `main`; both members.
    pub fn split(
        &mut self,
        main: BorrowedFd<'_>,
        canary: BorrowedFd<'_>,
        threshold: u32,
    ) -> io::Result<()> {
        let (main, canary) = (self.index_of(main)?, self.index_of(canary)?);
        self.rules.canary = Some((canary, threshold));
        self.steer_index(main)
    }

    /// Sends connections from `source` (the master's probe socket) to
    /// `target`, a member, whatever else the program does; `None` ends
    /// that.
    pub fn probe(&mut self, source: Option<(SocketAddr, BorrowedFd<'_>)>) -> io::Result<()> {
        self.rules.probe = match source {
            Some((from, target)) => {
                let last = match from {
                    SocketAddr::V4(a) => u32::from_be_bytes(a.ip().octets()),
                    SocketAddr::V6(a) => {
                        let o = a.ip().octets();
                        u32::from_be_bytes([o[12], o[13], o[14], o[15]])
                    }
                };
                Some((last, from.port(), self.index_of(target)?))
            }
            None => None,
        };
        match self.steered {
            Some(index) => self.steer_index(index),
            None => Ok(()),
        }
    }

    fn index_of(&self, socket: BorrowedFd<'_>) -> io::Result<usize> {
        let ino = inode(socket)?;
        self.members
            .iter()
            .position(|m| m.ino == ino)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "not a member of the group"))
    }

    /// Attaches the program that returns `index` under the current rules,
    /// unless it is the one attached already: the program names a slot of
    /// the kernel's array, not a socket, so it stays right as members come
    /// and go (the steered one never moves, see [`Group::tidy`]), and a
    /// reload that keeps its sockets (SDK workers) attaches nothing. Only
    /// another master can have changed it, hence [`EPOCH`].
    fn steer_index(&mut self, index: usize) -> io::Result<()> {
        if self.quic.is_some() {
            // A QUIC port steers by connection ID, never to one socket.
            return self.route();
        }
        let wanted = (
            index,
            self.rules,
            EPOCH.load(std::sync::atomic::Ordering::Relaxed),
        );
        if self.attached != Some(wanted) {
            let primary = self.primary()?;
            attach_program(primary, &program(index, &self.rules, is_v6(primary)?)?)?;
            self.attached = Some(wanted);
        }
        self.steered = Some(index);
        Ok(())
    }

    /// Closes the members nobody uses any more, as far as that cannot move
    /// the steered socket: a member that is not last has the last one moved
    /// into its slot.
    ///
    /// The steered socket's index can only change by it moving, so what is
    /// ahead of it stays until it is replaced. Hence, while the last socket
    /// is a new one not steered to yet, the first unused one goes: the new
    /// socket moves to the front, and once it is steered to, everything
    /// behind it can go from the end as it falls out of use.
    ///
    /// Returns whether to look again shortly: a QUIC member is on its way
    /// out ([`Group::tidy_quic`]).
    pub fn tidy(&mut self) -> bool {
        if self.quic.is_some() {
            return self.tidy_quic();
        }
        // While the program points at more than one member, nothing moves.
        if self.rules != Rules::default() {
            return false;
        }
        while let Some(last) = self.members.len().checked_sub(1) {
            let steered_live = self
                .steered
                .is_some_and(|s| !self.members[s].user.retired());
            let i = if self.members[last].user.retired() {
                last
            } else if steered_live && self.steered == Some(last) {
                return false;
            } else {
                match self.members.iter().position(|m| m.user.retired()) {
                    Some(i) => i,
                    None => return false,
                }
            };
            self.members.swap_remove(i).leave();
            self.steered = match self.steered {
                Some(s) if s == i => None,
                Some(s) if s == last => Some(i),
                other => other,
            };
        }
        false
    }

    /// How many sockets the group holds.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the group is empty (never: the primary is pinned).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

impl Group {
    /// Whether `kernel`, the sockets the kernel lists on the port, are
    /// exactly this group's members, so that its picture of the kernel's
    /// array is right.
    pub fn matches_kernel(&self, kernel: &[u64]) -> bool {
        let mut kernel = kernel.to_vec();
        let mut mine: Vec<u64> = self.members.iter().map(|m| m.ino).collect();
        kernel.sort_unstable();
        mine.sort_unstable();
        kernel == mine
    }

    /// Whether each of `kernel`'s sockets is a member.
    pub fn has_all(&self, kernel: &[u64]) -> bool {
        kernel
            .iter()
            .all(|ino| self.members.iter().any(|m| m.ino == *ino))
    }

    /// Whether a member is no longer used, so that [`Group::tidy`] may
    /// have something to let go of.
    pub fn has_retired(&self) -> bool {
        self.members.iter().any(|m| m.user.retired())
    }
}

/// The TCP sockets listening on each address of some ports, by inode, as
/// the kernel's `sock_diag` interface lists them. One look serves many
/// ports: the kernel goes through every listening socket each time.
#[derive(Debug, Default)]
pub struct Listening(HashMap<SocketAddr, Vec<u64>>);

impl Listening {
    /// Asks the kernel about `ports`, once per address family.
    pub fn snapshot(ports: &[u16]) -> io::Result<Listening> {
        let mut by_address: HashMap<SocketAddr, Vec<u64>> = HashMap::new();
        for family in [libc::AF_INET, libc::AF_INET6] {
            for socket in crate::sockdiag::listening(family as u8, ports)? {
                by_address
                    .entry(socket.local)
                    .or_default()
                    .push(socket.inode);
            }
        }
        Ok(Listening(by_address))
    }

    /// The inodes of the sockets listening on exactly `address`.
    pub fn on(&self, address: SocketAddr) -> &[u64] {
        // The kernel lists no IPv6 flow label or scope: neither may differ.
        let address = SocketAddr::new(address.ip(), address.port());
        self.0.get(&address).map_or(&[], Vec::as_slice)
    }
}

/// `SKF_NET_OFF` from `linux/filter.h`: loads relative to the network
/// header (the program itself runs past the TCP header).
const SKF_NET_OFF: i32 = -0x100000;
/// `SKF_AD_OFF + SKF_AD_RANDOM`: loads a random `u32`.
const SKF_AD_RANDOM: i32 = -0x1000 + 56;

/// The steering program: `ret #steered`, preceded by the probe and canary
/// rules when set.
fn program(steered: usize, rules: &Rules, v6: bool) -> io::Result<Vec<libc::sock_filter>> {
    let index = |i: usize| u32::try_from(i).map_err(io::Error::other);
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let (ld_w, ld_h) = (
        libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
        libc::BPF_LD | libc::BPF_H | libc::BPF_ABS,
    );
    let (jeq, jge, ret) = (
        libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
        libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
        libc::BPF_RET | libc::BPF_K,
    );
    let mut code = Vec::new();
    if let Some((address, port, target)) = rules.probe {
        // The source address's last 32 bits and the source port; IPv4
        // without options (as a local connect sends its SYN), or IPv6.
        let (address_at, port_at) = if v6 { (20, 40) } else { (12, 20) };
        code.push(op(ld_w, 0, 0, (SKF_NET_OFF + address_at) as u32));
        code.push(op(jeq, 0, 3, address));
        code.push(op(ld_h, 0, 0, (SKF_NET_OFF + port_at) as u32));
        code.push(op(jeq, 0, 1, u32::from(port)));
        code.push(op(ret, 0, 0, index(target)?));
    }
    if let Some((canary, threshold)) = rules.canary {
        code.push(op(ld_w, 0, 0, SKF_AD_RANDOM as u32));
        code.push(op(jge, 0, 1, threshold));
        code.push(op(ret, 0, 0, index(steered)?));
        code.push(op(ret, 0, 0, index(canary)?));
    } else {
        code.push(op(ret, 0, 0, index(steered)?));
    }
    Ok(code)
}

/// Whether `fd` is an IPv6 socket.
/// The port `fd` is bound to.
fn local_port(fd: BorrowedFd<'_>) -> io::Result<u16> {
    let address: nix::sys::socket::SockaddrStorage = nix::sys::socket::getsockname(fd.as_raw_fd())?;
    address
        .as_sockaddr_in()
        .map(|a| a.port())
        .or_else(|| address.as_sockaddr_in6().map(|a| a.port()))
        .ok_or_else(|| io::Error::other("not an IP socket"))
}

fn is_v6(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let address: nix::sys::socket::SockaddrStorage = nix::sys::socket::getsockname(fd.as_raw_fd())?;
    Ok(nix::sys::socket::SockaddrLike::family(&address)
        == Some(nix::sys::socket::AddressFamily::Inet6))
}

/// Attaches `code` as the group's steering program through `fd`.
pub(crate) fn attach_program(fd: BorrowedFd<'_>, code: &[libc::sock_filter]) -> io::Result<()> {
    let mut code = code.to_vec();
    let program = libc::sock_fprog {
        len: code.len() as u16,
        filter: code.as_mut_ptr(),
    };
    // SAFETY: `program` points at `code`, both alive for the call; the
    // kernel copies the program.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&program as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// How many connections wait in a listening TCP socket's accept queue.
pub fn accept_queue(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: tcp_info is plain old data; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // For a listening socket the kernel reports its accept queue here.
    Ok(info.tcpi_unacked)
}

/// A pidfd for `pid`: readable once that process has exited.
pub fn pidfd(pid: u32) -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open(2) takes a pid and flags; it returns a new fd
    // (close-on-exec) or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd this process owns alone.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as i32) })
}

/// The socket's inode number: the same for every fd of one socket.
pub fn inode(fd: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(nix::sys::stat::fstat(fd.as_raw_fd())?.st_ino)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    /// Port 0: a new port, bound as a listener's own socket (SO_REUSEPORT
    /// set after bind); otherwise a generation socket joining `port`.
    fn listener(port: u16) -> OwnedFd {
        use nix::sys::socket::*;
        let fd = tcp_socket();
        if port != 0 {
            setsockopt(&fd, sockopt::ReusePort, &true).unwrap();
        }
        let addr = SockaddrIn::new(127, 0, 0, 1, port);
        bind(fd.as_raw_fd(), &addr).unwrap();
        setsockopt(&fd, sockopt::ReusePort, &true).unwrap();
        listen(&fd, Backlog::new(64).unwrap()).unwrap();
        fd
    }

    /// What the kernel lists on `address` now.
    fn on_port(address: SocketAddr) -> Vec<u64> {
        Listening::snapshot(&[address.port()])
            .unwrap()
            .on(address)
            .to_vec()
    }

    /// A listener's own socket on a new port: the socket, the port, the
    /// address, and its group.
    fn new_port() -> (OwnedFd, u16, SocketAddr, Group) {
        let primary = listener(0);
        let address = TcpListener::from(primary.try_clone().unwrap())
            .local_addr()
            .unwrap();
        let group = Group::new(primary.as_fd()).unwrap();
        (primary, address.port(), address, group)
    }

    /// A generation socket that joined `group` on `port`, in use while the
    /// token lives.
    fn joined(group: &mut Group, port: u16) -> (Rc<()>, OwnedFd) {
        let token = Rc::new(());
        let socket = listener(port);
        group.join(socket.as_fd(), &token).unwrap();
        (token, socket)
    }

    /// Connects `n` times and returns each socket's accept-queue length.
    fn probe(port: u16, sockets: &[&OwnedFd], n: usize) -> Vec<u32> {
        let clients: Vec<_> = (0..n)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        let counts = loop {
            let counts: Vec<u32> = sockets
                .iter()
                .map(|s| accept_queue(s.as_fd()).unwrap())
                .collect();
            if counts.iter().sum::<u32>() as usize == n || Instant::now() > deadline {
                break counts;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        for s in sockets {
            let l = TcpListener::from(s.as_fd().try_clone_to_owned().unwrap());
            l.set_nonblocking(true).unwrap();
            while l.accept().is_ok() {}
        }
        drop(clients);
        counts
    }

    #[test]
    fn every_connection_goes_to_the_steered_socket_and_tidying_never_moves_it() {
        let (primary, port, _, mut group) = new_port();
        let (a_token, b_token, c_token) = (Rc::new(()), Rc::new(()), Rc::new(()));
        let a = listener(port);
        group.join(a.as_fd(), &a_token).unwrap();
        assert_eq!(
            probe(port, &[&primary, &a], 16),
            [16, 0],
            "steered to the primary"
        );
        group.steer(a.as_fd()).unwrap();
        let b = listener(port);
        group.join(b.as_fd(), &b_token).unwrap();
        assert_eq!(probe(port, &[&primary, &a, &b], 16), [0, 16, 0]);
        group.steer(b.as_fd()).unwrap();
        // `a` is unused, but `b` is last and steered: closing `a` would move
        // `b` into its slot, so it stays.
        drop((a_token, a));
        group.tidy();
        assert_eq!(group.len(), 3);
        assert_eq!(probe(port, &[&primary, &b], 16), [0, 16]);
        // A newer socket behind `b` makes it safe.
        let c = listener(port);
        group.join(c.as_fd(), &c_token).unwrap();
        group.tidy();
        assert_eq!(group.len(), 3);
        assert_eq!(probe(port, &[&primary, &b, &c], 16), [0, 16, 0]);
        group.steer(c.as_fd()).unwrap();
        assert_eq!(probe(port, &[&primary, &b, &c], 16), [0, 0, 16]);
        // `c` was moved into `a`'s slot; dropping `b` (now last) is safe.
        drop((b_token, b));
        group.tidy();
        assert_eq!(group.len(), 2);
        assert_eq!(probe(port, &[&primary, &c], 16), [0, 16]);
    }

    #[test]
    fn a_burst_of_replaced_sockets_is_let_go_of_after_the_next_switch() {
        let (primary, port, _, mut group) = new_port();
        // Five generations, each replaced before the previous one is gone.
        let mut sockets = Vec::new();
        for _ in 0..5 {
            let (token, fd) = joined(&mut group, port);
            group.steer(fd.as_fd()).unwrap();
            sockets.push((token, fd));
        }
        let (_current_token, current) = sockets.pop().unwrap();
        drop(sockets);
        group.tidy();
        assert_eq!(group.len(), 6, "all ahead of the steered socket");
        let (_next_token, next) = joined(&mut group, port);
        group.tidy();
        assert_eq!(probe(port, &[&primary, &current, &next], 16), [0, 16, 0]);
        group.steer(next.as_fd()).unwrap();
        drop((_current_token, current));
        group.tidy();
        assert_eq!(group.len(), 2, "only the primary and the steered socket");
        assert_eq!(probe(port, &[&primary, &next], 16), [0, 16]);
    }

    #[test]
    fn the_kernel_lists_exactly_the_groups_sockets_until_a_stranger_joins() {
        let (_primary, port, address, mut group) = new_port();
        let (_token, _a) = joined(&mut group, port);
        assert_eq!(on_port(address).len(), 2);
        assert!(group.matches_kernel(&on_port(address)));
        // Another socket of the same user on the port: not ours.
        let stranger = listener(port);
        assert!(!group.matches_kernel(&on_port(address)));
        drop(stranger);
        assert!(group.matches_kernel(&on_port(address)));
        let v6 = {
            use nix::sys::socket::*;
            let fd = socket(
                AddressFamily::Inet6,
                SockType::Stream,
                SockFlag::empty(),
                None,
            )
            .unwrap();
            bind(
                fd.as_raw_fd(),
                &SockaddrIn6::from("[::1]:0".parse::<std::net::SocketAddrV6>().unwrap()),
            )
            .unwrap();
            listen(&fd, Backlog::new(8).unwrap()).unwrap();
            fd
        };
        let v6_address = TcpListener::from(v6.try_clone().unwrap())
            .local_addr()
            .unwrap();
        assert_eq!(on_port(v6_address), vec![inode(v6.as_fd()).unwrap()]);
    }

    #[test]
    fn a_socket_given_up_after_a_stranger_joined_behind_it_moves_only_the_stranger() {
        let (primary, port, address, mut group) = new_port();
        let (token, a) = joined(&mut group, port);
        let stranger = listener(port);
        assert!(!group.matches_kernel(&on_port(address)));
        group.forget_last();
        drop((token, a));
        // The stranger took `a`'s slot; the primary is still first.
        assert_eq!(group.len(), 1);
        assert_eq!(probe(port, &[&primary, &stranger], 16), [16, 0]);
        drop(stranger);
        assert!(group.matches_kernel(&on_port(address)));
    }

    #[test]
    fn a_canary_gets_its_share_of_new_connections_and_steering_ends_it() {
        let (primary, port, _, mut group) = new_port();
        let (_old_token, old) = joined(&mut group, port);
        let (_new_token, new) = joined(&mut group, port);
        group.steer(old.as_fd()).unwrap();
        let share = crate::config::Share::parse("20%").unwrap();
        group
            .split(old.as_fd(), new.as_fd(), share.threshold())
            .unwrap();
        // In rounds that fit the backlog.
        let mut counts = [0u32; 3];
        for _ in 0..20 {
            let round = probe(port, &[&primary, &old, &new], 40);
            for (total, n) in counts.iter_mut().zip(round) {
                *total += n;
            }
        }
        assert_eq!(counts[0], 0, "{counts:?}");
        // 20% of 800: a binomial with a standard deviation of about 11.
        assert!((110..=210).contains(&counts[2]), "{counts:?}");
        // Nothing is let go of while both are pointed at.
        group.tidy();
        assert_eq!(group.len(), 3);
        group.steer(new.as_fd()).unwrap();
        assert_eq!(probe(port, &[&primary, &old, &new], 50), [0, 0, 50]);
    }

    #[test]
    fn the_probe_socket_reaches_the_probed_member_and_nobody_else_does() {
        let (primary, port, _, mut group) = new_port();
        let (_old_token, old) = joined(&mut group, port);
        let (_new_token, new) = joined(&mut group, port);
        group.steer(old.as_fd()).unwrap();
        let client = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let from = client.local_addr().unwrap();
        drop(client);
        group.probe(Some((from, new.as_fd()))).unwrap();
        // Everyone else still goes to `old`.
        assert_eq!(probe(port, &[&primary, &old, &new], 16), [0, 16, 0]);
        let client = bound_client(from);
        nix::sys::socket::connect(
            client.as_raw_fd(),
            &nix::sys::socket::SockaddrIn::new(127, 0, 0, 1, port),
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while accept_queue(new.as_fd()).unwrap() != 1 {
            assert!(Instant::now() < deadline, "the probe did not reach `new`");
            std::thread::sleep(Duration::from_millis(1));
        }
        let accepted = TcpListener::from(new.try_clone().unwrap());
        drop(accepted.accept().unwrap());
        group.probe(None).unwrap();
        assert_eq!(probe(port, &[&primary, &old, &new], 8), [0, 8, 0]);
    }

    /// A blocking IPv4 TCP socket with SO_REUSEADDR, not bound yet.
    fn tcp_socket() -> OwnedFd {
        use nix::sys::socket::*;
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        setsockopt(&fd, sockopt::ReuseAddr, &true).unwrap();
        fd
    }

    /// A TCP socket bound to `from`, ready to connect.
    fn bound_client(from: SocketAddr) -> OwnedFd {
        let fd = tcp_socket();
        let SocketAddr::V4(from) = from else {
            panic!("v4")
        };
        nix::sys::socket::bind(fd.as_raw_fd(), &nix::sys::socket::SockaddrIn::from(from)).unwrap();
        fd
    }

    #[test]
    fn a_second_listener_without_reuseport_cannot_take_the_port() {
        let (_primary, port, _, _group) = new_port();
        assert!(TcpListener::bind(("127.0.0.1", port)).is_err());
    }

    #[test]
    fn a_program_another_master_attached_is_replaced_at_the_next_steer() {
        let (primary, port, _, mut group) = new_port();
        let (_token, a) = joined(&mut group, port);
        group.steer(a.as_fd()).unwrap();
        group.steer(a.as_fd()).unwrap();
        assert_eq!(probe(port, &[&primary, &a], 8), [0, 8]);
        // An upgrade's new master steers the port back to the primary.
        others_may_steer();
        let back = program(0, &Rules::default(), false).unwrap();
        attach_program(primary.as_fd(), &back).unwrap();
        assert_eq!(probe(port, &[&primary, &a], 8), [8, 0]);
        group.steer(a.as_fd()).unwrap();
        assert_eq!(probe(port, &[&primary, &a], 8), [0, 8]);
    }

    #[test]
    fn an_adopted_layout_keeps_steering() {
        let (primary, port, _, mut group) = new_port();
        let (token, a) = joined(&mut group, port);
        group.steer(a.as_fd()).unwrap();
        let layout = group.layout().unwrap();
        drop(group);
        let old_master = Rc::new(());
        let primary_ino = inode(primary.as_fd()).unwrap();
        let mut adopted = Group::adopt(
            layout,
            |ino| (ino == primary_ino).then_some(User::Pinned),
            &old_master,
        )
        .unwrap();
        assert_eq!(probe(port, &[&primary, &a], 8), [0, 8]);
        let (_mine, b) = joined(&mut adopted, port);
        adopted.steer(b.as_fd()).unwrap();
        drop((token, a));
        adopted.tidy();
        assert_eq!(adopted.len(), 3, "the old master may still use it");
        drop(old_master);
        adopted.tidy();
        assert_eq!(adopted.len(), 3, "b is last and steered");
        assert_eq!(probe(port, &[&primary, &b], 8), [0, 8]);
    }
}
