//! The TCP connections a worker still holds open, whatever its protocol:
//! the socket inodes in `/proc/PID/fd` of the worker and of every process
//! in its process group (a gunicorn arbiter's workers, say), matched
//! against the kernel's `sock_diag` list. This is what keeps a draining
//! generation alive.

use crate::control::protocol::ConnectionStatus;
use crate::sockdiag::{self, TcpSocket};
use std::collections::HashSet;

/// The kernel's TCP connections, listed once for several workers.
pub struct Connections(Vec<TcpSocket>);

impl Connections {
    /// Lists every TCP connection on the host; empty if the kernel refuses.
    pub fn list() -> Connections {
        match sockdiag::connections() {
            Ok(all) => Connections(all),
            Err(e) => {
                tracing::debug!(error = %e, "sock_diag dump of connections failed");
                Connections(Vec::new())
            }
        }
    }

    /// The connections open in worker `pid`'s process group.
    pub fn of_worker(&self, pid: i32) -> Vec<ConnectionStatus> {
        let mut pids = sockdiag::process_group(pid);
        if !pids.contains(&pid) {
            pids.push(pid);
        }
        let inodes: HashSet<u64> = pids.into_iter().flat_map(sockdiag::socket_inodes).collect();
        let mut seen = HashSet::new();
        self.0
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
