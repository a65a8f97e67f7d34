//! Steering a QUIC port's datagrams by destination connection ID.
//!
//! A QUIC connection lives in the process that accepted it, but its
//! datagrams carry no TCP-like connection for the kernel to follow: every
//! datagram is a new lookup among the port's reuseport group. So the SDK's
//! connection IDs start with a **slot** byte (1 to 255) naming the socket of
//! the worker that issued them, and the port's classic BPF program reads
//! that byte from each datagram's destination connection ID (RFC 9000
//! section 17, RFC 8999 for what every version keeps):
//!
//! - short header (first bit clear): the ID starts right after the first
//!   byte;
//! - long header (first bit set): a version word, the ID's length, then the
//!   ID. Handshake packets go by their slot. Initial and 0-RTT packets go
//!   by their slot when the ID carries the mark of an ID a worker issued
//!   ([`baton_wire::quic::ID_MARK`] after the slot): a client sends them
//!   with the server's ID once it has the server's first answer, and a
//!   reload in the middle of a handshake must not take the rest of it to
//!   the new generation. A client's first Initial and 0-RTT packets carry
//!   an ID it chose at random, without the mark: they go to the current
//!   generation, picked by the packet's flow hash so that its retransmitted
//!   Initials and its 0-RTT packets reach one worker. Version 0 (version
//!   negotiation, which a server never receives in earnest) goes there
//!   too;
//! - a slot no member has, a datagram too short to hold what is read (a
//!   load past the end would end the program with 0: member 0, whoever that
//!   is) and a zero-length ID go to the current generation too.
//!
//! For a UDP socket the kernel runs the program over the payload: offset 0
//! is the QUIC packet's first byte and `len` its length (the tests check
//! this against real sockets).

use std::io;

/// `SKF_AD_OFF + SKF_AD_RXHASH`: loads the packet's flow hash.
const SKF_AD_RXHASH: i32 = -0x1000 + 32;
/// `SKF_NET_OFF` from `linux/filter.h`: loads relative to the network
/// header.
const SKF_NET_OFF: i32 = -0x100000;
/// QUIC version 2 (RFC 9369), whose long-header types are numbered
/// differently from version 1's.
const QUIC_V2: u32 = 0x6b33_43cf;

/// How long a QUIC worker socket this master closed may stay open
/// elsewhere before that is logged: a forked child holds its copy until
/// its `execve`, the keeper until its next snapshot, milliseconds both.
pub const LEAVING_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether this master's keeper (its child, or its parent when it is a
/// container's init or started this master) holds an fd of the socket
/// `inode`: its copy goes with the next snapshot that no longer names it.
pub fn keeper_holds(inode: u64) -> bool {
    let parent = std::os::unix::process::parent_id() as i32;
    let keepers = crate::orphans::children()
        .into_iter()
        .map(nix::unistd::Pid::as_raw)
        .chain(std::iter::once(parent))
        .filter(|pid| is_keeper(*pid) || (*pid == parent && crate::keeper::under_init()));
    let wanted = format!("socket:[{inode}]");
    keepers
        .flat_map(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .into_iter()
                .flatten()
                .flatten()
        })
        .any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| target.as_os_str() == wanted.as_str())
        })
}

/// Whether process `pid` runs as a keeper (`baton __keeper`).
fn is_keeper(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|line| line.split(|b| *b == 0).nth(1) == Some(crate::keeper::ARG.as_bytes()))
}

/// Whether the kernel still lists the UDP socket `inode` on `port` (of
/// the address family of `v6`): some process holds an fd of it, so it
/// keeps its place in the port's group. When the kernel cannot be asked,
/// as if it did (the socket is let go of at a later look).
pub fn is_listed(port: u16, v6: bool, inode: u64) -> bool {
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET } as u8;
    match crate::sockdiag::udp_sockets(family, port) {
        Ok(sockets) => sockets.iter().any(|(_, listed)| *listed == inode),
        Err(e) => {
            tracing::warn!(error = %e, port, "cannot list the QUIC port's sockets");
            true
        }
    }
}

/// Where each datagram of a QUIC port goes, as indices into the kernel's
/// array of the port's sockets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    /// A socket by the slot its worker's connection IDs start with (1 to
    /// 255; 0 names no socket).
    pub slots: Vec<(u8, usize)>,
    /// The current generation's sockets, which get new connections. Empty:
    /// they go to member 0 (the listener's own socket).
    pub current: Vec<usize>,
    /// During a canary's probation: the standby generation's sockets, and
    /// the share they leave to `current`. A new connection whose flow hash
    /// is at or above the threshold goes to these; below it, to `current`.
    /// By the hash, not at random, so that every Initial and 0-RTT packet
    /// of one client address reaches the same worker.
    pub rest: Option<(Vec<usize>, u32)>,
}

/// One instruction before jump targets are resolved.
#[derive(Debug, Clone, Copy)]
enum Insn {
    Stmt(u32, u32),
    /// A conditional jump: true and false targets are labels.
    Jump(u32, u32, usize, usize),
    /// An unconditional jump, which reaches any distance.
    Always(usize),
    /// Marks where a label is; no instruction.
    Here(usize),
}

/// A classic BPF program with symbolic jump targets.
#[derive(Debug, Default)]
struct Assembler {
    code: Vec<Insn>,
    labels: usize,
}

impl Assembler {
    fn label(&mut self) -> usize {
        self.labels += 1;
        self.labels - 1
    }

    fn stmt(&mut self, code: u32, k: u32) {
        self.code.push(Insn::Stmt(code, k));
    }

    fn jump(&mut self, code: u32, k: u32, t: usize, f: usize) {
        self.code.push(Insn::Jump(code, k, t, f));
    }

    fn always(&mut self, to: usize) {
        self.code.push(Insn::Always(to));
    }

    fn here(&mut self, label: usize) {
        self.code.push(Insn::Here(label));
    }

    /// Resolves the labels; a conditional jump further than 255
    /// instructions is an error (route it through [`Assembler::always`]).
    fn finish(self) -> io::Result<Vec<libc::sock_filter>> {
        let mut at = vec![None; self.labels];
        let mut n = 0usize;
        for insn in &self.code {
            match insn {
                Insn::Here(label) => at[*label] = Some(n),
                _ => n += 1,
            }
        }
        let target = |label: usize, from: usize| -> io::Result<usize> {
            let to = at[label].ok_or_else(|| io::Error::other("a jump to no label"))?;
            to.checked_sub(from + 1)
                .ok_or_else(|| io::Error::other("a jump backwards"))
        };
        let mut code = Vec::with_capacity(n);
        for insn in &self.code {
            let pc = code.len();
            let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
                code: code as u16,
                jt,
                jf,
                k,
            };
            match *insn {
                Insn::Here(_) => continue,
                Insn::Stmt(c, k) => code.push(op(c, 0, 0, k)),
                Insn::Jump(c, k, t, f) => {
                    let short = |label| {
                        u8::try_from(target(label, pc)?)
                            .map_err(|_| io::Error::other("a conditional jump too far"))
                    };
                    code.push(op(c, short(t)?, short(f)?, k));
                }
                Insn::Always(to) => {
                    let k = u32::try_from(target(to, pc)?).map_err(io::Error::other)?;
                    code.push(op(libc::BPF_JMP | libc::BPF_JA, 0, 0, k));
                }
            }
        }
        if code.len() > libc::BPF_MAXINSNS as usize {
            return Err(io::Error::other("the steering program is too long"));
        }
        Ok(code)
    }
}

/// The steering program for `routes`; `v6` says where the source port is
/// (for the flow hash when the kernel has none).
pub fn program(routes: &Routes, v6: bool) -> io::Result<Vec<libc::sock_filter>> {
    use libc::{
        BPF_ABS, BPF_ALU, BPF_AND, BPF_B, BPF_H, BPF_IND, BPF_JEQ, BPF_JGE, BPF_JMP, BPF_JSET,
        BPF_K, BPF_LD, BPF_LDX, BPF_LEN, BPF_MOD, BPF_MSH, BPF_MUL, BPF_RET, BPF_W,
    };
    let index = |i: usize| u32::try_from(i).map_err(io::Error::other);
    let (ld_len, ld_b, ld_w, ld_h) = (
        BPF_LD | BPF_W | BPF_LEN,
        BPF_LD | BPF_B | BPF_ABS,
        BPF_LD | BPF_W | BPF_ABS,
        BPF_LD | BPF_H | BPF_ABS,
    );
    let (jeq, jge, jset, ret) = (
        BPF_JMP | BPF_JEQ | BPF_K,
        BPF_JMP | BPF_JGE | BPF_K,
        BPF_JMP | BPF_JSET | BPF_K,
        BPF_RET | BPF_K,
    );
    let and = BPF_ALU | BPF_AND | BPF_K;
    let mut a = Assembler::default();
    let [long, short, read, v1, v2, marked, has_id, to_current, dispatch, current] =
        std::array::from_fn(|_| a.label());

    // The first byte, if any.
    a.stmt(ld_len, 0);
    let first = a.label();
    a.jump(jge, 1, first, to_current);
    a.here(first);
    a.stmt(ld_b, 0);
    a.jump(jset, 0x80, long, short);

    // Short header: the ID's first byte is the second byte.
    a.here(short);
    a.stmt(ld_len, 0);
    a.jump(jge, 2, read, to_current);
    a.here(read);
    a.stmt(ld_b, 1);
    a.always(dispatch);

    // Long header: first byte, version (1..5), ID length (5), ID (6..).
    a.here(long);
    a.stmt(ld_len, 0);
    let version = a.label();
    a.jump(jge, 7, version, to_current);
    a.here(version);
    a.stmt(ld_w, 1);
    let not_negotiation = a.label();
    a.jump(jeq, 0, to_current, not_negotiation);
    a.here(not_negotiation);
    a.jump(jeq, QUIC_V2, v2, v1);
    // Version 1 (and any other): Initial 0b00, 0-RTT 0b01, Handshake
    // 0b10, Retry 0b11.
    a.here(v1);
    a.stmt(ld_b, 0);
    a.stmt(and, 0x30);
    a.jump(jge, 0x20, has_id, marked);
    // Version 2: Retry 0b00, Initial 0b01, 0-RTT 0b10, Handshake 0b11.
    a.here(v2);
    a.stmt(ld_b, 0);
    a.stmt(and, 0x30);
    let not_handshake = a.label();
    a.jump(jeq, 0x30, has_id, not_handshake);
    a.here(not_handshake);
    a.jump(jeq, 0, to_current, marked);
    // Initial and 0-RTT: by the slot if the ID (4 bytes or more) has the
    // mark after it, else to the current generation.
    a.here(marked);
    a.stmt(ld_b, 5);
    let long_enough = a.label();
    a.jump(jge, 4, long_enough, to_current);
    a.here(long_enough);
    a.stmt(ld_len, 0);
    let holds_it = a.label();
    a.jump(jge, 10, holds_it, to_current);
    a.here(holds_it);
    a.stmt(ld_w, 6);
    a.stmt(and, 0x00ff_ffff);
    let [m0, m1, m2] = baton_wire::quic::ID_MARK;
    a.jump(jeq, u32::from_be_bytes([0, m0, m1, m2]), has_id, to_current);
    a.here(has_id);
    a.stmt(ld_b, 5);
    let id = a.label();
    a.jump(jeq, 0, to_current, id);
    a.here(id);
    a.stmt(ld_b, 6);
    a.always(dispatch);

    a.here(to_current);
    a.always(current);

    // The slot in A: its socket, if a member has it.
    a.here(dispatch);
    for &(slot, member) in &routes.slots {
        if slot == 0 {
            continue;
        }
        let (hit, miss) = (a.label(), a.label());
        a.jump(jeq, u32::from(slot), hit, miss);
        a.here(hit);
        a.stmt(ret, index(member)?);
        a.here(miss);
    }

    // New connections: one of the current generation's sockets (or, for a
    // canary, of the standby's), by the flow hash, or by the source port
    // where the kernel computed none (loopback).
    a.here(current);
    let spread = routes.current.len() > 1 || routes.rest.is_some();
    if !spread {
        match routes.current.first() {
            None => a.stmt(ret, 0),
            Some(only) => a.stmt(ret, index(*only)?),
        }
        return a.finish();
    }
    a.stmt(ld_w, SKF_AD_RXHASH as u32);
    let (hashed, by_port) = (a.label(), a.label());
    a.jump(jeq, 0, by_port, hashed);
    a.here(by_port);
    // The UDP header's source port: after a 40-byte IPv6 header, or an
    // IPv4 header of the length its first byte says; spread over 32 bits
    // as a hash is (Knuth's multiplicative hash: ephemeral ports are not
    // spread evenly over 16 bits, a canary's threshold needs them to be).
    if v6 {
        a.stmt(ld_h, (SKF_NET_OFF + 40) as u32);
    } else {
        a.stmt(BPF_LDX | BPF_B | BPF_MSH, SKF_NET_OFF as u32);
        a.stmt(BPF_LD | BPF_H | BPF_IND, SKF_NET_OFF as u32);
    }
    a.stmt(BPF_ALU | BPF_MUL | BPF_K, 0x9E37_79B1);
    a.here(hashed);
    let pick = |a: &mut Assembler, members: &[usize]| -> io::Result<()> {
        match members {
            [] => a.stmt(ret, 0),
            [only] => a.stmt(ret, index(*only)?),
            members => {
                a.stmt(BPF_ALU | BPF_MOD | BPF_K, index(members.len())?);
                for (i, &member) in members.iter().enumerate() {
                    let (hit, miss) = (a.label(), a.label());
                    a.jump(jeq, index(i)?, hit, miss);
                    a.here(hit);
                    a.stmt(ret, index(member)?);
                    a.here(miss);
                }
                a.stmt(ret, index(members[0])?);
            }
        }
        Ok(())
    };
    if let Some((rest, threshold)) = &routes.rest {
        let (to_rest, to_current) = (a.label(), a.label());
        a.jump(jge, *threshold, to_rest, to_current);
        a.here(to_rest);
        pick(&mut a, rest)?;
        a.here(to_current);
    }
    pick(&mut a, &routes.current)?;
    a.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{SocketAddr, UdpSocket};
    use std::os::fd::{AsFd, AsRawFd};
    use std::time::{Duration, Instant};

    /// A UDP socket on 127.0.0.1: port 0 binds a new port (SO_REUSEPORT set
    /// after bind, as a listener's own socket), another joins that port's
    /// group.
    fn udp(port: u16) -> UdpSocket {
        use nix::sys::socket::*;
        let fd = socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .unwrap();
        if port != 0 {
            setsockopt(&fd, sockopt::ReusePort, &true).unwrap();
        }
        bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, port)).unwrap();
        setsockopt(&fd, sockopt::ReusePort, &true).unwrap();
        UdpSocket::from(fd)
    }

    /// A port's group: the primary (member 0) and `n` more, in the
    /// kernel's order.
    fn group(n: usize) -> (SocketAddr, Vec<UdpSocket>) {
        let primary = udp(0);
        let address = primary.local_addr().unwrap();
        let mut members = vec![primary];
        members.extend((0..n).map(|_| udp(address.port())));
        (address, members)
    }

    fn attach(members: &[UdpSocket], routes: &Routes) {
        let code = program(routes, false).unwrap();
        super::super::attach_program(members[0].as_fd(), &code).unwrap();
    }

    /// Sends `datagram` from `client` and returns the index of the member
    /// that received it (exactly one must).
    fn landing(
        client: &UdpSocket,
        to: SocketAddr,
        members: &[UdpSocket],
        datagram: &[u8],
    ) -> usize {
        client.send_to(datagram, to).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buffer = [0u8; 2048];
        loop {
            for (i, member) in members.iter().enumerate() {
                if let Ok((len, _)) = member.recv_from(&mut buffer) {
                    assert_eq!(&buffer[..len], datagram, "member {i}");
                    return i;
                }
            }
            assert!(Instant::now() < deadline, "nobody received {datagram:02x?}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn short(id: &[u8]) -> Vec<u8> {
        let mut packet = vec![0x40];
        packet.extend_from_slice(id);
        packet.extend_from_slice(&[0xaa; 24]);
        packet
    }

    /// A long-header packet: first byte, version, the destination ID, an
    /// empty source ID and some payload.
    fn long(first: u8, version: u32, id: &[u8]) -> Vec<u8> {
        let mut packet = vec![first];
        packet.extend_from_slice(&version.to_be_bytes());
        packet.push(id.len() as u8);
        packet.extend_from_slice(id);
        packet.push(0);
        packet.extend_from_slice(&[0xbb; 40]);
        packet
    }

    const V1: u32 = 1;

    #[test]
    fn datagrams_reach_the_socket_their_connection_id_names() {
        let (to, members) = group(4);
        // Slots 7 and 9 for members 1 and 2 (a draining generation), the
        // current generation is members 3 and 4 (slots 11 and 12).
        let routes = Routes {
            slots: vec![(7, 1), (9, 2), (11, 3), (12, 4)],
            current: vec![3, 4],
            rest: None,
        };
        attach(&members, &routes);
        let client = udp_client();
        let mut id = [0x5a_u8; 8];
        for (slot, member) in [(7, 1), (9, 2), (11, 3), (12, 4)] {
            id[0] = slot;
            assert_eq!(
                landing(&client, to, &members, &short(&id)),
                member,
                "short, slot {slot}"
            );
            // Handshake (v1: type 0b10) and Retry-typed long headers go by slot.
            assert_eq!(
                landing(&client, to, &members, &long(0xe0, V1, &id)),
                member,
                "handshake"
            );
            // v2's Handshake is type 0b11.
            assert_eq!(
                landing(&client, to, &members, &long(0xf0, QUIC_V2, &id)),
                member,
                "v2 handshake"
            );
            // A one-byte ID still has its slot.
            assert_eq!(landing(&client, to, &members, &short(&[slot])), member);
            // Initial and 0-RTT packets with an ID a worker issued (the
            // mark after the slot): the rest of a handshake.
            let [m0, m1, m2] = baton_wire::quic::ID_MARK;
            let issued = [slot, m0, m1, m2, 0x12, 0x34, 0x56, 0x78];
            for (first, version) in [(0xc0, V1), (0xd0, V1), (0xd0, QUIC_V2), (0xe0, QUIC_V2)] {
                assert_eq!(
                    landing(&client, to, &members, &long(first, version, &issued)),
                    member,
                    "Initial or 0-RTT {first:02x} v{version:x}, slot {slot}"
                );
            }
            assert_eq!(
                landing(&client, to, &members, &long(0xc0, V1, &issued[..4])),
                member
            );
        }
    }

    #[test]
    fn a_canary_gets_its_share_of_new_connections_and_each_client_address_keeps_its_side() {
        let (to, members) = group(4);
        // The canary generation is members 3 and 4; the standby's, 1 and 2.
        let share = crate::config::Share::parse("25%").unwrap();
        let routes = Routes {
            slots: vec![(7, 1), (9, 2), (11, 3), (12, 4)],
            current: vec![3, 4],
            rest: Some((vec![1, 2], share.threshold())),
        };
        attach(&members, &routes);
        let initial = long(0xc0, V1, &[0x77; 8]);
        let mut canary = 0;
        for _ in 0..200 {
            // A new client address (port) each time, its Initial sent twice
            // (a retransmission): both land on the same member.
            let client = udp_client();
            let first = landing(&client, to, &members, &initial);
            assert_eq!(landing(&client, to, &members, &initial), first);
            assert_ne!(first, 0, "the listener's own socket gets nothing");
            if first >= 3 {
                canary += 1;
            }
        }
        // 25% of 200: a binomial with a standard deviation of about 6.
        assert!((25..=75).contains(&canary), "{canary} of 200 to the canary");
        // Existing connections still go by their slot, on either side.
        let client = udp_client();
        for (slot, member) in [(7, 1), (9, 2), (11, 3), (12, 4)] {
            assert_eq!(
                landing(&client, to, &members, &short(&[slot, 1, 2, 3])),
                member
            );
        }
    }

    #[test]
    fn new_connections_and_what_names_no_socket_go_to_the_current_generation() {
        let (to, members) = group(4);
        let routes = Routes {
            slots: vec![(7, 1), (9, 2), (11, 3), (12, 4)],
            current: vec![3, 4],
            rest: None,
        };
        attach(&members, &routes);
        let current = |i: usize| i == 3 || i == 4;
        let client = udp_client();
        let mut gone = [0x11_u8; 8];
        gone[0] = 8;
        // A slot that is gone, slot 0, a truncated short header, an empty
        // datagram is not sendable as a QUIC packet but a 1-byte one is.
        for datagram in [
            short(&gone),
            short(&[0; 8]),
            vec![0x40],
            vec![0xc0],
            vec![0xc0, 0, 0, 0, 1, 8],
            // Version negotiation, even with a slot in the ID.
            long(0x80, 0, &[7; 8]),
            // v1 Initial (0b00) and 0-RTT (0b01) with IDs naming slots: the
            // client chose them at random.
            long(0xc0, V1, &[7; 8]),
            long(0xd0, V1, &[9; 20]),
            long(0xc0, V1, &[7; 20]),
            // v2 Initial (0b01) and 0-RTT (0b10).
            long(0xd0, QUIC_V2, &[7; 8]),
            long(0xe0, QUIC_V2, &[9; 8]),
            // A long header with an empty ID.
            long(0xe0, V1, &[]),
            // The mark with a slot nobody has, with a byte of it wrong, in
            // an ID too short to hold it, or in a v2 Retry.
            long(0xc0, V1, &[8, 0xba, 0x70, 0x4e, 1, 2, 3, 4]),
            long(0xc0, V1, &[7, 0xba, 0x70, 0x4f, 1, 2, 3, 4]),
            long(0xc0, V1, &[7, 0xba, 0x70]),
            long(0xc0, QUIC_V2, &[7, 0xba, 0x70, 0x4e, 1, 2, 3, 4]),
        ] {
            let member = landing(&client, to, &members, &datagram);
            assert!(current(member), "{datagram:02x?} went to member {member}");
        }
        // The datagram of one client's address and port all land on one
        // member; over many clients, on every member of the generation.
        let mut seen = [0usize; 5];
        for _ in 0..64 {
            let client = udp_client();
            let first = landing(&client, to, &members, &long(0xc0, V1, &[3; 8]));
            for datagram in [
                long(0xc0, V1, &[4; 8]),
                long(0xd0, V1, &[5; 8]),
                short(&[8; 8]),
            ] {
                assert_eq!(landing(&client, to, &members, &datagram), first);
            }
            seen[first] += 1;
        }
        assert_eq!(seen[..3], [0, 0, 0], "{seen:?}");
        assert!(seen[3] > 0 && seen[4] > 0, "{seen:?}");
    }

    #[test]
    fn with_no_current_socket_new_connections_go_to_the_listeners_own() {
        let (to, members) = group(1);
        attach(
            &members,
            &Routes {
                slots: vec![(1, 1)],
                current: vec![],
                rest: None,
            },
        );
        let client = udp_client();
        assert_eq!(landing(&client, to, &members, &long(0xc0, V1, &[1; 8])), 0);
        assert_eq!(landing(&client, to, &members, &short(&[1; 8])), 1);
    }

    #[test]
    fn every_slot_fits_one_program() {
        let (to, members) = group(3);
        let mut slots: Vec<(u8, usize)> = (1..=255).map(|s| (s, 1)).collect();
        slots[254] = (255, 2);
        let current: Vec<usize> = vec![3; 255];
        let routes = Routes {
            slots,
            current,
            rest: None,
        };
        assert!(program(&routes, false).unwrap().len() > 1000);
        attach(&members, &routes);
        let client = udp_client();
        assert_eq!(landing(&client, to, &members, &short(&[255; 8])), 2);
        assert_eq!(landing(&client, to, &members, &short(&[1; 8])), 1);
        assert_eq!(landing(&client, to, &members, &short(&[0; 8])), 3);
        assert_eq!(landing(&client, to, &members, &[0x40]), 3);
    }

    /// A worker socket of `generation` joining `group` on `port`: its
    /// token, socket and slot.
    fn worker(
        group: &mut super::super::Group,
        port: u16,
        generation: u64,
    ) -> (std::rc::Rc<()>, UdpSocket, u8) {
        let token = std::rc::Rc::new(());
        let socket = udp(port);
        let slot = group.join_quic(socket.as_fd(), &token, generation).unwrap();
        (token, socket, slot)
    }

    #[test]
    fn a_quic_group_routes_old_connections_to_old_workers_and_new_ones_to_the_current() {
        let primary = udp(0);
        let to = primary.local_addr().unwrap();
        let mut group = super::super::Group::new_quic(primary.as_fd()).unwrap();
        let (a_token, a, a_slot) = worker(&mut group, to.port(), 1);
        let (_b_token, b, b_slot) = worker(&mut group, to.port(), 1);
        assert_ne!(a_slot, b_slot);
        group.quic_current(1).unwrap();
        let client = udp_client();
        let sockets = |extra: &[&UdpSocket]| {
            let mut all = vec![
                primary.try_clone().unwrap(),
                a.try_clone().unwrap(),
                b.try_clone().unwrap(),
            ];
            all.extend(extra.iter().map(|s| s.try_clone().unwrap()));
            all
        };
        let initial = long(0xc0, V1, &[0x77; 8]);
        assert!([1, 2].contains(&landing(&client, to, &sockets(&[]), &initial)));
        // Generation 2 joins: not current yet.
        let (_c_token, c, c_slot) = worker(&mut group, to.port(), 2);
        let (_d_token, d, d_slot) = worker(&mut group, to.port(), 2);
        let all = sockets(&[&c, &d]);
        for _ in 0..16 {
            assert!([1, 2].contains(&landing(&udp_client(), to, &all, &initial)));
        }
        group.quic_current(2).unwrap();
        for _ in 0..16 {
            assert!([3, 4].contains(&landing(&udp_client(), to, &all, &initial)));
        }
        for (slot, member) in [(a_slot, 1), (b_slot, 2), (c_slot, 3), (d_slot, 4)] {
            assert_eq!(landing(&client, to, &all, &short(&[slot; 8])), member);
        }
        // Worker `a` exits: its socket goes, `d` takes its place in the
        // kernel's array, and every slot still reaches its socket.
        // The worker's copies close at its exit, before the master tidies.
        drop((a, all));
        drop(a_token);
        group.tidy();
        assert_eq!(group.len(), 4);
        let all = [
            primary.try_clone().unwrap(),
            d.try_clone().unwrap(),
            b.try_clone().unwrap(),
            c.try_clone().unwrap(),
        ];
        for (slot, member) in [(b_slot, 2), (c_slot, 3), (d_slot, 1)] {
            assert_eq!(landing(&client, to, &all, &short(&[slot; 8])), member);
        }
        // `a`'s slot names nobody now: new connections' sockets get it.
        assert!([1, 3].contains(&landing(&client, to, &all, &short(&[a_slot; 8]))));
        // A new worker gets a slot nobody had lately.
        let (_e_token, _e, e_slot) = worker(&mut group, to.port(), 2);
        assert!(![a_slot, b_slot, c_slot, d_slot].contains(&e_slot));
    }

    #[test]
    fn worker_sockets_held_elsewhere_leave_one_at_a_time_and_every_slot_keeps_its_socket() {
        let primary = udp(0);
        let to = primary.local_addr().unwrap();
        let mut group = super::super::Group::new_quic(primary.as_fd()).unwrap();
        let (a_token, a, _) = worker(&mut group, to.port(), 1);
        let (b_token, b, _) = worker(&mut group, to.port(), 1);
        let (_c_token, c, c_slot) = worker(&mut group, to.port(), 2);
        let (_d_token, d, d_slot) = worker(&mut group, to.port(), 2);
        group.quic_current(2).unwrap();
        // Workers `a` and `b` exit; another process (the keeper, a child
        // not yet exec'd) still holds a copy of each socket.
        let (a_held, b_held) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        drop((a, b, a_token, b_token));
        let (c_ino, d_ino) = (
            super::super::inode(c.as_fd()).unwrap(),
            super::super::inode(d.as_fd()).unwrap(),
        );
        let client = udp_client();
        let kernel_order = [&primary, &a_held, &b_held, &c, &d];
        let all: Vec<UdpSocket> = kernel_order
            .iter()
            .map(|s| s.try_clone().unwrap())
            .collect();
        // One is on its way out; the kernel's array is as it was, and so
        // are the routes.
        assert!(group.tidy());
        assert_eq!(group.len(), 5);
        for (slot, member) in [(c_slot, 3), (d_slot, 4)] {
            assert_eq!(landing(&client, to, &all, &short(&[slot; 8])), member);
        }
        // What another master would adopt: the array once it has left.
        assert_eq!(group.layout().unwrap().members.len(), 4);
        // The copies close in the other order than the group let them go.
        drop((b_held, all));
        assert!(group.tidy());
        drop(a_held);
        let deadline = Instant::now() + Duration::from_secs(5);
        while group.tidy() {
            assert!(Instant::now() < deadline, "the sockets never left");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(group.len(), 3);
        let left = group.layout().unwrap();
        let inodes: Vec<u64> = left
            .members
            .iter()
            .map(|fd| super::super::inode(fd.as_fd()).unwrap())
            .collect();
        assert_eq!(&inodes[1..], [d_ino, c_ino]);
        let all = [
            primary.try_clone().unwrap(),
            d.try_clone().unwrap(),
            c.try_clone().unwrap(),
        ];
        for _ in 0..4 {
            assert_eq!(landing(&client, to, &all, &short(&[c_slot; 8])), 2);
            assert_eq!(landing(&client, to, &all, &short(&[d_slot; 8])), 1);
        }
    }

    #[test]
    fn with_the_current_generations_sockets_gone_new_connections_reach_the_listeners_own() {
        let primary = udp(0);
        let to = primary.local_addr().unwrap();
        let mut group = super::super::Group::new_quic(primary.as_fd()).unwrap();
        let (_a_token, a, a_slot) = worker(&mut group, to.port(), 1);
        let (b_token, b, _) = worker(&mut group, to.port(), 2);
        group.quic_current(2).unwrap();
        let client = udp_client();
        let initial = long(0xc0, V1, &[0x77; 8]);
        let all = [
            primary.try_clone().unwrap(),
            a.try_clone().unwrap(),
            b.try_clone().unwrap(),
        ];
        assert_eq!(landing(&client, to, &all, &initial), 2);
        // Generation 2's only worker exits (it failed, say) and generation
        // 1's drains: new connections go to the listener's own socket, not
        // to the draining worker, and `a`'s still reach it.
        drop((b, b_token, all));
        while group.tidy() {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(group.len(), 2);
        let all = [primary.try_clone().unwrap(), a.try_clone().unwrap()];
        for _ in 0..8 {
            assert_eq!(landing(&udp_client(), to, &all, &initial), 0);
        }
        assert_eq!(landing(&client, to, &all, &short(&[a_slot; 8])), 1);
    }

    #[test]
    fn slots_run_out_at_255_sockets() {
        let primary = udp(0);
        let port = primary.local_addr().unwrap().port();
        let mut group = super::super::Group::new_quic(primary.as_fd()).unwrap();
        let mut held = Vec::new();
        let mut slots = std::collections::HashSet::new();
        for _ in 0..255 {
            let (token, socket, slot) = worker(&mut group, port, 1);
            assert!(slot != 0 && slots.insert(slot));
            held.push((token, socket));
        }
        let token = std::rc::Rc::new(());
        let extra = udp(port);
        let e = group.join_quic(extra.as_fd(), &token, 1).unwrap_err();
        assert!(e.to_string().contains("no QUIC slot is free"), "{e}");
    }

    #[test]
    fn a_handed_over_quic_group_keeps_routing_and_keeps_each_worker_socket_while_it_runs() {
        let sleep = || {
            std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .unwrap()
        };
        let primary = udp(0);
        let to = primary.local_addr().unwrap();
        let mut group = super::super::Group::new_quic(primary.as_fd()).unwrap();
        // Two workers (`sleep` stands in for each), one per generation.
        let (mut a_worker, mut b_worker) = (sleep(), sleep());
        let (a_token, a, a_slot) = worker(&mut group, to.port(), 1);
        let (b_token, b, b_slot) = worker(&mut group, to.port(), 2);
        group.quic_owner(a.as_fd(), a_worker.id()).unwrap();
        group.quic_owner(b.as_fd(), b_worker.id()).unwrap();
        group.quic_current(2).unwrap();
        let layout = group.layout().unwrap();
        assert_eq!(layout.quic.as_ref().map(|q| q.current), Some(Some(2)));
        // The old image is gone; the workers hold their sockets.
        drop((group, a_token, b_token));
        let primary_ino = super::super::inode(primary.as_fd()).unwrap();
        let image = std::rc::Rc::new(());
        let mut adopted = super::super::Group::adopt(
            layout,
            |ino| (ino == primary_ino).then_some(super::super::User::Pinned),
            &image,
        )
        .unwrap();
        drop(image);
        assert!(adopted.is_quic());
        adopted.quic_current(2).unwrap();
        let client = udp_client();
        let all = [
            primary.try_clone().unwrap(),
            a.try_clone().unwrap(),
            b.try_clone().unwrap(),
        ];
        assert_eq!(landing(&client, to, &all, &short(&[a_slot; 8])), 1);
        assert_eq!(landing(&client, to, &all, &short(&[b_slot; 8])), 2);
        assert_eq!(landing(&client, to, &all, &long(0xc0, V1, &[a_slot; 8])), 2);
        // While its worker runs, a socket stays.
        adopted.tidy();
        assert_eq!(adopted.len(), 3);
        a_worker.kill().unwrap();
        a_worker.wait().unwrap();
        drop((a, all));
        adopted.tidy();
        assert_eq!(adopted.len(), 2);
        let all = [primary.try_clone().unwrap(), b.try_clone().unwrap()];
        assert_eq!(landing(&client, to, &all, &short(&[b_slot; 8])), 1);
        // Slots go on from where the old image left them.
        let (_c_token, _c, c_slot) = worker(&mut adopted, to.port(), 3);
        assert!(![a_slot, b_slot].contains(&c_slot));
        b_worker.kill().unwrap();
        b_worker.wait().unwrap();
    }

    fn udp_client() -> UdpSocket {
        UdpSocket::bind("127.0.0.1:0").unwrap()
    }
}
