//! The client connections a worker still holds open, whatever its
//! protocol: the kernel's `sock_diag` list of TCP connections on the
//! master's listening ports, matched against the socket inodes in
//! `/proc/PID/fd` of the worker and of every process in its process group
//! (a gunicorn arbiter's workers, say). This is what keeps a draining
//! generation alive.

use crate::control::protocol::ConnectionStatus;
use crate::sockdiag::{self, TcpSocket};
use std::collections::{HashMap, HashSet};

/// The kernel's TCP connections on some ports, listed once for several
/// workers.
pub struct Connections {
    sockets: Vec<TcpSocket>,
    /// The processes of each process group, read from `/proc` once.
    groups: std::cell::OnceCell<HashMap<i32, Vec<i32>>>,
}

impl Connections {
    /// Lists the TCP connections whose local port is one of `addresses`'
    /// (the listeners', as `127.0.0.1:8080`; others are ignored); none if
    /// the kernel refuses.
    pub fn on<'a>(addresses: impl IntoIterator<Item = &'a str>) -> Connections {
        let ports = sockdiag::tcp_ports(addresses);
        let sockets = if ports.is_empty() {
            Vec::new()
        } else {
            sockdiag::connections(&ports).unwrap_or_else(|e| {
                tracing::debug!(error = %e, "sock_diag dump of connections failed");
                Vec::new()
            })
        };
        Connections {
            sockets,
            groups: std::cell::OnceCell::new(),
        }
    }

    /// The connections open in worker `pid`'s process group. Its fds are
    /// only looked at when there is a connection to find: a worker holds
    /// one per listener, thousands with many listeners.
    pub fn of_worker(&self, pid: i32) -> Vec<ConnectionStatus> {
        if self.sockets.is_empty() {
            return Vec::new();
        }
        let groups = self.groups.get_or_init(sockdiag::process_groups);
        let mut pids = groups.get(&pid).cloned().unwrap_or_default();
        if !pids.contains(&pid) {
            pids.push(pid);
        }
        let inodes: HashSet<u64> = pids.into_iter().flat_map(sockdiag::socket_inodes).collect();
        let mut seen = HashSet::new();
        self.sockets
            .iter()
            .filter(|s| inodes.contains(&s.inode) && seen.insert(s.inode))
            .map(|s| ConnectionStatus {
                local: s.local.to_string(),
                peer: s.peer.to_string(),
                state: sockdiag::state_name(s.state).into(),
                idle_s: s.idle_ms.map(|ms| f64::from(ms) / 1000.0),
                recv_queue: s.rqueue,
                send_queue: s.wqueue,
            })
            .collect()
    }
}

/// `peer (state, idle 3.2s, queued 0/0)` for each connection, for logs.
pub fn describe(connections: &[ConnectionStatus]) -> String {
    let parts: Vec<String> = connections
        .iter()
        .map(|c| {
            let idle = c
                .idle_s
                .map_or(String::new(), |s| format!(", idle {s:.1}s"));
            format!(
                "{} ({}{idle}, queued in {} out {})",
                c.peer, c.state, c.recv_queue, c.send_queue
            )
        })
        .collect();
    parts.join(", ")
}
