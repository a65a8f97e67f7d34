//! The gauges `/metrics` shows, set from the master's state and the
//! kernel's at each scrape.

use super::{
    ConfigLabels, GenerationLabel, Metrics, SocketLabels, WorkerLabels, WorkerVersionLabels,
};
use crate::fleet::{Fleet, GenerationState};
use crate::operation::Operation;
use crate::reload::Outcome;
use std::os::fd::AsFd;
use std::path::Path;

impl Metrics {
    /// Sets the gauges from the master's state (`fleet`, `operation`, the
    /// `last` reload's outcome, the config file, the traces dropped) and
    /// the kernel's.
    pub fn refresh(
        &self,
        fleet: &Fleet,
        operation: &Operation,
        last: Option<&Outcome>,
        config_path: &Path,
        spans_dropped: u64,
    ) {
        let m = self;
        m.generation.set(fleet.current_number().unwrap_or(0) as i64);
        m.config.clear();
        if let Some(current) = fleet.current() {
            m.config
                .get_or_create(&ConfigLabels {
                    generation: current.number().to_string(),
                    config_hash: current.config().hash.clone(),
                    version: current.config().app.version.clone(),
                    config: config_path.display().to_string(),
                })
                .set(1);
        }
        m.workers.clear();
        m.worker_config.clear();
        m.connections.clear();
        for g in fleet.iter() {
            let generation = g.number().to_string();
            for w in g.workers().values() {
                m.workers
                    .get_or_create(&WorkerLabels {
                        generation: generation.clone(),
                        state: w.state().name().into(),
                    })
                    .inc();
                // The version it serves, as it reported it: not the
                // generation's, which it may not have swapped in yet.
                if let Some(version) = w.app_version() {
                    m.worker_config
                        .get_or_create(&WorkerVersionLabels {
                            generation: generation.clone(),
                            worker: w.index().to_string(),
                            version: version.to_string(),
                        })
                        .set(1);
                }
            }
            // Capacity the crash-loop breaker gave up on.
            if !g.crash_looped().is_empty() {
                m.workers
                    .get_or_create(&WorkerLabels {
                        generation: generation.clone(),
                        state: "crash_loop".into(),
                    })
                    .set(g.crash_looped().len() as i64);
            }
            let reported: Vec<u64> = g
                .workers()
                .values()
                .filter_map(|w| w.connections())
                .collect();
            if !reported.is_empty() {
                m.connections
                    .get_or_create(&GenerationLabel {
                        generation: generation.clone(),
                    })
                    .set(reported.iter().sum::<u64>() as i64);
            }
        }
        let draining = fleet
            .iter()
            .filter(|g| g.state() == GenerationState::Draining && !g.workers().is_empty())
            .count();
        m.draining_generations.set(draining as i64);
        m.reload_in_progress
            .set(i64::from(operation.reload().is_some()));
        m.stopping.set(i64::from(operation.stopping().is_some()));
        if let Some(last) = last {
            m.last_reload_success.set(i64::from(last.failure.is_none()));
            let at = last
                .finished
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            m.last_reload_timestamp.set(at);
        }
        Metrics::follow(&m.otlp_spans_dropped, spans_dropped);
        self.refresh_listener_queues(fleet);
        if let Some((overflows, drops)) = host_listen_counters() {
            Metrics::follow(&m.listen_overflows, overflows);
            Metrics::follow(&m.listen_drops, drops);
        }
    }

    /// Each listening socket's accept queue and backlog, as `sock_diag`
    /// reports them: the listeners' own sockets (TCP and Unix) and the
    /// generations' own TCP sockets on their ports.
    fn refresh_listener_queues(&self, fleet: &Fleet) {
        let m = self;
        m.accept_queue.clear();
        m.backlog.clear();
        let addresses = fleet.listeners().iter().map(|l| l.info.address.as_str());
        let tcp = crate::sockdiag::listeners(&crate::sockdiag::tcp_ports(addresses));
        let unix = crate::sockdiag::unix_listeners();
        let kernel: Vec<(u64, u32, u32)> = match (tcp, unix) {
            (Ok(tcp), Ok(unix)) => tcp
                .into_iter()
                .map(|s| (s.inode, s.rqueue, s.wqueue))
                .chain(unix.into_iter().map(|s| (s.inode, s.queue, s.backlog)))
                .collect(),
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(error = %e, "sock_diag dump of listeners failed");
                return;
            }
        };
        let shared = fleet.listeners().iter().map(|l| (l, String::new()));
        let own = fleet.iter().flat_map(|g| {
            g.listeners()
                .iter()
                .filter(|l| l.primary().is_some())
                .map(|l| (l, g.number().to_string()))
        });
        for (socket, generation) in shared.chain(own) {
            let Ok(inode) = crate::steering::inode(socket.fd().as_fd()) else {
                continue;
            };
            let Some(&(_, queue, backlog)) = kernel.iter().find(|k| k.0 == inode) else {
                continue;
            };
            let labels = SocketLabels {
                listener: socket.info.name.clone(),
                address: socket.info.address.clone(),
                generation,
            };
            m.accept_queue.get_or_create(&labels).set(i64::from(queue));
            m.backlog.get_or_create(&labels).set(i64::from(backlog));
        }
    }
}

/// The host's `TcpExt: ListenOverflows ListenDrops` from `/proc/net/netstat`.
fn host_listen_counters() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines();
    while let Some(names) = lines.next() {
        let values = lines.next()?;
        if !names.starts_with("TcpExt:") {
            continue;
        }
        let pairs: Vec<(&str, &str)> = names
            .split_whitespace()
            .zip(values.split_whitespace())
            .collect();
        let get = |name: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == name)
                .and_then(|(_, v)| v.parse().ok())
        };
        return Some((get("ListenOverflows")?, get("ListenDrops")?));
    }
    None
}
