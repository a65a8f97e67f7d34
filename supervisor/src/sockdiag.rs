//! The kernel's `sock_diag` (inet_diag) view of TCP sockets: listening
//! sockets' accept queues for `/metrics`, and the connections a draining
//! worker still holds for `baton status` — found by socket inode, so that
//! it works for any server, SDK or not.

use nix::sys::socket::{
    recv, send, socket, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType,
};
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// `INET_DIAG_INFO`: a `struct tcp_info` after the message.
const INET_DIAG_INFO: u16 = 2;
/// `INET_DIAG_REQ_BYTECODE`: a filter the kernel runs on each socket.
const INET_DIAG_REQ_BYTECODE: u16 = 1;
/// Filter operations (`enum` in `linux/inet_diag.h`): jump, local port
/// equal to.
const INET_DIAG_BC_JMP: u8 = 1;
const INET_DIAG_BC_S_EQ: u8 = 11;
/// Ports per filter: 12 bytes of bytecode each, within the 16-bit jumps.
const PORTS_PER_FILTER: usize = 1024;

/// TCP state numbers (`include/net/tcp_states.h`).
pub const TCP_LISTEN: u8 = 10;
const TCP_TIME_WAIT: u8 = 6;

/// One TCP socket as the kernel lists it.
#[derive(Debug, Clone)]
pub struct TcpSocket {
    /// `TCP_ESTABLISHED` (1) ... `TCP_CLOSING` (11).
    pub state: u8,
    /// Local address.
    pub local: SocketAddr,
    /// Peer address (unspecified for a listener).
    pub peer: SocketAddr,
    /// A listener: its accept queue. A connection: bytes received, unread.
    pub rqueue: u32,
    /// A listener: its backlog. A connection: bytes not yet acknowledged.
    pub wqueue: u32,
    /// The socket's inode, as `/proc/PID/fd` links name it.
    pub inode: u64,
    /// Milliseconds since data was last sent and received, when asked for.
    pub idle_ms: Option<u32>,
}

/// A TCP state's name, as `ss` prints it.
pub fn state_name(state: u8) -> &'static str {
    match state {
        1 => "ESTAB",
        2 => "SYN-SENT",
        3 => "SYN-RECV",
        4 => "FIN-WAIT-1",
        5 => "FIN-WAIT-2",
        6 => "TIME-WAIT",
        7 => "CLOSE",
        8 => "CLOSE-WAIT",
        9 => "LAST-ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        _ => "UNKNOWN",
    }
}

/// The TCP ports of listener `addresses` (as `127.0.0.1:8080`; Unix and
/// UDP ones have none), sorted, each once.
pub fn tcp_ports<'a>(addresses: impl IntoIterator<Item = &'a str>) -> Vec<u16> {
    let mut ports: Vec<u16> = addresses
        .into_iter()
        .filter_map(|a| a.parse::<SocketAddr>().ok())
        .map(|a| a.port())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Listening TCP sockets of both families on `ports`.
pub fn listeners(ports: &[u16]) -> io::Result<Vec<TcpSocket>> {
    dump_both(1 << TCP_LISTEN, false, ports)
}

/// The listening TCP sockets of `family` (`AF_INET` or `AF_INET6`) on
/// `ports`.
pub fn listening(family: u8, ports: &[u16]) -> io::Result<Vec<TcpSocket>> {
    dump(family, 1 << TCP_LISTEN, false, ports)
}

/// The `INET_DIAG_REQ_BYTECODE` attribute that keeps the sockets whose
/// local port is one of `ports`. An operation is 4 bytes: its code, how far
/// to jump when true (at most 255) and when false; a port comparison takes
/// the port from the next 4 bytes' last two. Ending exactly at the end
/// accepts, anywhere else rejects. Per port: "equal? then fall into a jump
/// to the end, else skip it"; after the last, a jump past the end.
fn port_filter(ports: &[u16]) -> Vec<u8> {
    let op = |code: u8, yes: u8, no: u16| {
        let mut op = vec![code, yes];
        op.extend_from_slice(&no.to_ne_bytes());
        op
    };
    let length = ports.len() * 12 + 4;
    let mut bytecode = Vec::with_capacity(length);
    for port in ports {
        bytecode.extend(op(INET_DIAG_BC_S_EQ, 8, 12));
        bytecode.extend(op(0, 0, *port));
        let left = (length - bytecode.len()) as u16;
        bytecode.extend(op(INET_DIAG_BC_JMP, 4, left));
    }
    bytecode.extend(op(INET_DIAG_BC_JMP, 4, 8));
    let mut attribute = Vec::with_capacity(4 + length);
    attribute.extend_from_slice(&(4 + length as u16).to_ne_bytes());
    attribute.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
    attribute.extend(bytecode);
    attribute
}

/// TCP connections of both families on `ports` (every state but listening
/// and time-wait, which belong to no process), with their idle times.
pub fn connections(ports: &[u16]) -> io::Result<Vec<TcpSocket>> {
    let all: u32 = (1 << 12) - 2;
    dump_both(
        all & !(1 << TCP_LISTEN) & !(1 << TCP_TIME_WAIT),
        true,
        ports,
    )
}

fn dump_both(states: u32, info: bool, ports: &[u16]) -> io::Result<Vec<TcpSocket>> {
    let mut sockets = dump(libc::AF_INET as u8, states, info, ports)?;
    sockets.extend(dump(libc::AF_INET6 as u8, states, info, ports)?);
    Ok(sockets)
}

/// The sockets of `family` in `states` whose local port is one of `ports`.
/// The kernel filters ([`port_filter`]): with thousands of sockets on the
/// host, a few ports cost a fraction of them all.
fn dump(family: u8, states: u32, info: bool, ports: &[u16]) -> io::Result<Vec<TcpSocket>> {
    let mut sockets = Vec::new();
    for ports in ports.chunks(PORTS_PER_FILTER) {
        let mut request = request(family, states, info);
        request.extend_from_slice(&port_filter(ports));
        dump_raw(&request, |message| sockets.extend(parse(message)))?;
    }
    Ok(sockets)
}

/// The UDP sockets of `family` bound to `port`: each one's address and
/// inode. The kernel lists a port's sockets under the lock of the port's
/// hash slot, in one answer: they are the port's sockets at one instant
/// (`/proc/net/udp`, read a page at a time while sockets come and go, can
/// skip one).
pub fn udp_sockets(family: u8, port: u16) -> io::Result<Vec<(SocketAddr, u64)>> {
    let mut request = request_for(family, libc::IPPROTO_UDP as u8, u32::MAX, false);
    request.extend_from_slice(&port_filter(&[port]));
    let mut sockets = Vec::new();
    dump_raw(&request, |message| {
        sockets.extend(parse(message).map(|socket| (socket.local, socket.inode)));
    })?;
    Ok(sockets)
}

/// An `inet_diag_req_v2` (56 bytes): family, protocol, the extensions
/// wanted (a bit per attribute, less one), pad, the states bitmask, and an
/// unused socket id.
fn request(family: u8, states: u32, info: bool) -> Vec<u8> {
    request_for(family, libc::IPPROTO_TCP as u8, states, info)
}

/// [`request`] for sockets of `protocol`.
fn request_for(family: u8, protocol: u8, states: u32, info: bool) -> Vec<u8> {
    let ext = if info { 1u8 << (INET_DIAG_INFO - 1) } else { 0 };
    let mut request = vec![family, protocol, ext, 0];
    request.extend_from_slice(&states.to_ne_bytes());
    request.resize(56, 0);
    request
}

/// Sends one `SOCK_DIAG_BY_FAMILY` dump request with `request` after the
/// netlink header, and hands each answer's payload to `each`.
fn dump_raw(request: &[u8], mut each: impl FnMut(&[u8])) -> io::Result<()> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?;
    // nlmsghdr (16 bytes): length, type, flags, sequence, port.
    let length = 16 + request.len();
    let mut message = Vec::with_capacity(length);
    message.extend_from_slice(&(length as u32).to_ne_bytes());
    message.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    message.extend_from_slice(&flags.to_ne_bytes());
    message.extend_from_slice(&1u32.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    message.extend_from_slice(request);
    send(fd.as_raw_fd(), &message, MsgFlags::empty())?;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = recv(fd.as_raw_fd(), &mut buffer, MsgFlags::empty())?;
        if n == 0 {
            return Ok(());
        }
        let mut data = &buffer[..n];
        while data.len() >= 16 {
            let len = (u32_at(data, 0) as usize).min(data.len());
            if len < 16 {
                break;
            }
            match u16::from_ne_bytes([data[4], data[5]]) {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno = data.get(16..20).map_or(0, |_| u32_at(data, 16) as i32);
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                _ => each(&data[16..len]),
            }
            data = data.get((len + 3) & !3..).unwrap_or_default();
        }
    }
}

/// Each netlink attribute (`rtattr`: length, type, payload) in `data`.
fn attributes(mut data: &[u8], mut each: impl FnMut(u16, &[u8])) {
    while data.len() >= 4 {
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let kind = u16::from_ne_bytes([data[2], data[3]]);
        if len < 4 || len > data.len() {
            return;
        }
        each(kind, &data[4..len]);
        data = data.get((len + 3) & !3..).unwrap_or_default();
    }
}

/// A listening Unix stream socket: its inode, accept queue and backlog.
#[derive(Debug, Clone, Copy)]
pub struct UnixListening {
    /// The socket's inode.
    pub inode: u64,
    /// Connections waiting to be accepted.
    pub queue: u32,
    /// Its backlog.
    pub backlog: u32,
}

/// Listening Unix stream sockets, with their queues (`UNIX_DIAG_RQLEN`).
pub fn unix_listeners() -> io::Result<Vec<UnixListening>> {
    const UDIAG_SHOW_RQLEN: u32 = 0x10;
    const UNIX_DIAG_RQLEN: u16 = 4;
    // unix_diag_req (24 bytes): family, protocol, pad, the states bitmask,
    // an inode, what to show, a cookie (inode and cookie: any).
    let mut request = vec![libc::AF_UNIX as u8, 0, 0, 0];
    request.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    request.extend_from_slice(&0u32.to_ne_bytes());
    request.extend_from_slice(&UDIAG_SHOW_RQLEN.to_ne_bytes());
    request.resize(24, 0xff);
    let mut sockets = Vec::new();
    dump_raw(&request, |message| {
        // unix_diag_msg (16 bytes): family, type, state, pad, inode,
        // cookie[2]; then attributes.
        if message.len() < 16 || message[1] != libc::SOCK_STREAM as u8 {
            return;
        }
        let inode = u64::from(u32_at(message, 4));
        attributes(&message[16..], |kind, payload| {
            if kind == UNIX_DIAG_RQLEN && payload.len() >= 8 {
                sockets.push(UnixListening {
                    inode,
                    queue: u32_at(payload, 0),
                    backlog: u32_at(payload, 4),
                });
            }
        });
    })?;
    Ok(sockets)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("four bytes"))
}

/// An `inet_diag_msg` (72 bytes: family, state, timer, retrans, the socket
/// id — sport, dport, src[16], dst[16], if, cookie — expires, rqueue,
/// wqueue, uid, inode) and its attributes.
fn parse(message: &[u8]) -> Option<TcpSocket> {
    if message.len() < 72 {
        return None;
    }
    let address = |at: usize, port: [u8; 2]| {
        let port = u16::from_be_bytes(port);
        let ip = if message[0] == libc::AF_INET as u8 {
            IpAddr::V4(Ipv4Addr::new(
                message[at],
                message[at + 1],
                message[at + 2],
                message[at + 3],
            ))
        } else {
            let octets: [u8; 16] = message[at..at + 16].try_into().expect("16 bytes");
            IpAddr::V6(Ipv6Addr::from(octets))
        };
        SocketAddr::new(ip, port)
    };
    let mut socket = TcpSocket {
        state: message[1],
        local: address(8, [message[4], message[5]]),
        peer: address(24, [message[6], message[7]]),
        rqueue: u32_at(message, 56),
        wqueue: u32_at(message, 60),
        inode: u64::from(u32_at(message, 68)),
        idle_ms: None,
    };
    // struct tcp_info: tcpi_last_data_sent at 44, tcpi_last_data_recv at 52
    // (milliseconds ago).
    attributes(&message[72..], |kind, payload| {
        if kind == INET_DIAG_INFO && payload.len() >= 56 {
            socket.idle_ms = Some(u32_at(payload, 44).min(u32_at(payload, 52)));
        }
    });
    Some(socket)
}

/// The socket inodes open in process `pid` (`/proc/PID/fd`); empty when it
/// is gone or not ours to read.
pub fn socket_inodes(pid: i32) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let target = std::fs::read_link(entry.path()).ok()?;
            let target = target.to_str()?;
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// Every process on the host by process group, from `/proc`.
pub fn process_groups() -> HashMap<i32, Vec<i32>> {
    let mut groups: HashMap<i32, Vec<i32>> = HashMap::new();
    for (pid, fields) in crate::orphans::process_stats() {
        // `STATE PPID PGRP ...`
        if let Some(pgrp) = fields
            .split_whitespace()
            .nth(2)
            .and_then(|g| g.parse().ok())
        {
            groups.entry(pgrp).or_default().push(pid);
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_connection_is_found_by_inode_with_its_peer_and_queue() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let mut client = std::net::TcpStream::connect(address).unwrap();
        let (server, _) = listener.accept().unwrap();
        client.write_all(b"unread").unwrap();
        let inode = crate::steering::inode(std::os::fd::AsFd::as_fd(&server)).unwrap();
        assert!(socket_inodes(std::process::id() as i32).contains(&inode));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let found = loop {
            let all = connections(&[address.port()]).unwrap();
            let found = all.into_iter().find(|s| s.inode == inode).unwrap();
            if found.rqueue == 6 || std::time::Instant::now() > deadline {
                break found;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(found.peer, client.local_addr().unwrap());
        assert_eq!(found.local, address);
        assert_eq!(state_name(found.state), "ESTAB");
        assert_eq!(found.rqueue, 6);
        assert!(found.idle_ms.is_some());
        let listening = listeners(&[address.port()]).unwrap();
        let inode = crate::steering::inode(std::os::fd::AsFd::as_fd(&listener)).unwrap();
        let ours = listening.iter().find(|s| s.inode == inode).unwrap();
        assert_eq!(ours.local, address);
        assert_eq!(ours.rqueue, 0);
        assert!(ours.wqueue > 0, "backlog {}", ours.wqueue);
    }

    #[test]
    fn listening_sockets_are_asked_for_by_port() {
        let bound: Vec<std::net::TcpListener> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let ports: Vec<u16> = bound
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        let listed = |asked: &[u16]| -> Vec<u16> {
            let mut found: Vec<u16> = listening(libc::AF_INET as u8, asked)
                .unwrap()
                .iter()
                .map(|s| s.local.port())
                .collect();
            found.sort_unstable();
            found
        };
        let sorted = |mut ports: Vec<u16>| {
            ports.sort_unstable();
            ports
        };
        assert_eq!(listed(&ports[1..2]), [ports[1]]);
        assert_eq!(
            listed(&[ports[2], ports[0]]),
            sorted(vec![ports[0], ports[2]])
        );
        assert_eq!(listed(&ports), sorted(ports.clone()));
        assert_eq!(listed(&[]), Vec::<u16>::new());
        // More ports than one filter holds: asked in several.
        let many: Vec<u16> = (1..=PORTS_PER_FILTER as u16 + 10)
            .chain([ports[1]])
            .collect();
        assert!(listed(&many).contains(&ports[1]));
    }

    #[test]
    fn a_unix_listeners_queue_and_backlog_are_listed() {
        let dir = std::env::temp_dir().join(format!("baton-sockdiag-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let _waiting = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let inode = crate::steering::inode(std::os::fd::AsFd::as_fd(&listener)).unwrap();
        let found = unix_listeners()
            .unwrap()
            .into_iter()
            .find(|s| s.inode == inode);
        std::fs::remove_dir_all(&dir).unwrap();
        let found = found.expect("our listener is listed");
        assert_eq!(found.queue, 1);
        assert!(found.backlog > 0);
    }
}
