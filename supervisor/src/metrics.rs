//! The master's Prometheus metrics (`prometheus-client`). Counters and
//! histograms are updated where things happen (reloads, exits, kills,
//! upgrades); gauges are computed from the master's state when scraped, so
//! an idle master does no work for them.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;
use std::time::Duration;

mod gauges;

/// One label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// Why.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    trigger: String,
    kind: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ConfigLabels {
    pub generation: String,
    pub config_hash: String,
    /// The config version (`[worker]` settings and `app_config` files).
    pub version: String,
    pub config: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct WorkerLabels {
    pub generation: String,
    pub state: String,
}

/// One worker and the app config version it serves.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct WorkerVersionLabels {
    pub generation: String,
    /// Its index in the generation.
    pub worker: String,
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct GenerationLabel {
    pub generation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct SocketLabels {
    pub listener: String,
    pub address: String,
    /// Empty for the listener's own socket, shared by SDK generations; the
    /// generation's number for a generation's own socket on the port.
    pub generation: String,
}

type Seconds = Family<PhaseLabel, Histogram, fn() -> Histogram>;

/// Everything `/metrics` shows.
pub struct Metrics {
    registry: Registry,
    reloads: Family<ReloadLabels, Counter>,
    reload_phases: Seconds,
    reload_seconds: Histogram,
    pub(crate) worker_exits: Family<Reason, Counter>,
    pub(crate) worker_restarts: Family<Reason, Counter>,
    pub(crate) killed_at_drain_deadline: Counter,
    pub(crate) connections_handed_over: Counter,
    pub(crate) connections_closed_at_drain: Counter,
    drain_seconds: Histogram,
    upgrades: Family<OutcomeLabel, Counter>,
    // Computed when scraped.
    pub(crate) generation: Gauge,
    pub(crate) config: Family<ConfigLabels, Gauge>,
    pub(crate) workers: Family<WorkerLabels, Gauge>,
    pub(crate) worker_config: Family<WorkerVersionLabels, Gauge>,
    pub(crate) draining_generations: Gauge,
    pub(crate) connections: Family<GenerationLabel, Gauge>,
    pub(crate) accept_queue: Family<SocketLabels, Gauge>,
    pub(crate) backlog: Family<SocketLabels, Gauge>,
    pub(crate) listen_overflows: Counter,
    pub(crate) listen_drops: Counter,
    pub(crate) otlp_spans_dropped: Counter,
    master_adoptions: Counter,
    pub(crate) reload_in_progress: Gauge,
    pub(crate) stopping: Gauge,
    pub(crate) last_reload_success: Gauge,
    pub(crate) last_reload_timestamp: Gauge<f64, AtomicU64>,
}

fn phase_histogram() -> Histogram {
    // 1 ms to about 33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Every metric, registered with the `baton_` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("baton");
        let m = Metrics {
            reloads: Family::default(),
            reload_phases: Family::new_with_constructor(phase_histogram),
            reload_seconds: phase_histogram(),
            worker_exits: Family::default(),
            worker_restarts: Family::default(),
            killed_at_drain_deadline: Counter::default(),
            connections_handed_over: Counter::default(),
            connections_closed_at_drain: Counter::default(),
            // 10 ms to about 11 min.
            drain_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 17)),
            upgrades: Family::default(),
            generation: Gauge::default(),
            config: Family::default(),
            workers: Family::default(),
            worker_config: Family::default(),
            draining_generations: Gauge::default(),
            connections: Family::default(),
            accept_queue: Family::default(),
            backlog: Family::default(),
            listen_overflows: Counter::default(),
            listen_drops: Counter::default(),
            otlp_spans_dropped: Counter::default(),
            master_adoptions: Counter::default(),
            reload_in_progress: Gauge::default(),
            stopping: Gauge::default(),
            last_reload_success: Gauge::default(),
            last_reload_timestamp: Gauge::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "reloads",
            "Reload transactions by trigger, kind and outcome",
            m.reloads.clone(),
        );
        r.register_with_unit(
            "reload_phase_duration",
            "Duration of each phase of a reload",
            Unit::Seconds,
            m.reload_phases.clone(),
        );
        r.register_with_unit(
            "reload_duration",
            "Duration of a whole reload, start to outcome",
            Unit::Seconds,
            m.reload_seconds.clone(),
        );
        r.register(
            "worker_exits",
            "Worker exits by reason: exited or crashed while serving, failed_start, drained, killed",
            m.worker_exits.clone(),
        );
        r.register(
            "worker_restarts",
            "Workers respawned in the current generation, by why the previous one exited",
            m.worker_restarts.clone(),
        );
        r.register(
            "workers_killed_at_drain_deadline",
            "Draining workers still running at their drain deadline, killed",
            m.killed_at_drain_deadline.clone(),
        );
        r.register(
            "connections_handed_over",
            "Idle HTTP/1.1 connections of draining SDK workers handed over to the current generation",
            m.connections_handed_over.clone(),
        );
        r.register(
            "connections_closed_at_drain",
            "Connections of draining SDK workers that ended at the drain instead of being handed over",
            m.connections_closed_at_drain.clone(),
        );
        r.register_with_unit(
            "drain_duration",
            "How long a generation took from the start of its drain until its last worker exited",
            Unit::Seconds,
            m.drain_seconds.clone(),
        );
        r.register(
            "upgrades",
            "Binary upgrades by outcome (committed ones are counted by the new master)",
            m.upgrades.clone(),
        );
        r.register(
            "current_generation",
            "The generation serving (0 before the first one)",
            m.generation.clone(),
        );
        r.register(
            "config_info",
            "The configuration the current generation runs: 1, with the generation and config hash as labels",
            m.config.clone(),
        );
        r.register(
            "workers",
            "Live workers by generation and state",
            m.workers.clone(),
        );
        r.register(
            "worker_config_info",
            "The app config version each SDK worker with a reload handle serves, as it reported it: 1, with generation, worker index and version as labels",
            m.worker_config.clone(),
        );
        r.register(
            "draining_generations",
            "Generations draining (replaced, with workers still running)",
            m.draining_generations.clone(),
        );
        r.register(
            "connections",
            "Open connections SDK workers report, by generation",
            m.connections.clone(),
        );
        r.register(
            "listener_accept_queue",
            "Connections waiting in a listening socket's accept queue (sock_diag; TCP and Unix)",
            m.accept_queue.clone(),
        );
        r.register(
            "listener_backlog",
            "A listening socket's accept queue limit (sock_diag; TCP and Unix)",
            m.backlog.clone(),
        );
        r.register(
            "host_listen_overflows",
            "The host's TcpExt ListenOverflows: connections dropped on a full accept queue",
            m.listen_overflows.clone(),
        );
        r.register(
            "host_listen_drops",
            "The host's TcpExt ListenDrops: SYNs to a listening socket dropped",
            m.listen_drops.clone(),
        );
        r.register(
            "otlp_spans_dropped",
            "Trace spans not sent to the OTLP collector: export failed or timed out, queue full, or unsent when the flush at exit ran out of time",
            m.otlp_spans_dropped.clone(),
        );
        r.register(
            "master_adoptions",
            "Masters that died and whose workers a new master adopted (counted across the masters the keeper started)",
            m.master_adoptions.clone(),
        );
        r.register(
            "reload_in_progress",
            "1 while a reload transaction runs",
            m.reload_in_progress.clone(),
        );
        r.register(
            "stopping",
            "1 once the master is stopping",
            m.stopping.clone(),
        );
        r.register(
            "last_reload_success",
            "1 if the last reload committed, 0 if it failed",
            m.last_reload_success.clone(),
        );
        r.register_with_unit(
            "last_reload_timestamp",
            "When the last reload ended, in seconds since the epoch",
            Unit::Seconds,
            m.last_reload_timestamp.clone(),
        );
        Metrics { registry, ..m }
    }

    /// A finished reload: its outcome and its phases' durations.
    fn reload(
        &self,
        trigger: &str,
        kind: &str,
        outcome: &str,
        phases: &[(crate::reload::Phase, Duration)],
    ) {
        self.reloads
            .get_or_create(&ReloadLabels {
                trigger: trigger.into(),
                kind: kind.into(),
                outcome: outcome.into(),
            })
            .inc();
        for (phase, took) in phases {
            self.reload_phases
                .get_or_create(&PhaseLabel {
                    phase: phase.to_string(),
                })
                .observe(took.as_secs_f64());
        }
        let total: Duration = phases.iter().map(|(_, d)| *d).sum();
        self.reload_seconds.observe(total.as_secs_f64());
    }

    /// The metrics' view of a finished transaction: counted by trigger,
    /// kind and outcome, its phases timed, and an upgrade that committed
    /// counted as such.
    pub fn outcome(
        &self,
        outcome: &crate::reload::Outcome,
        report: &crate::control::protocol::ReloadOutcome,
    ) {
        let committed = outcome.failure.is_none();
        let label = if committed { "committed" } else { "failed" };
        self.reload(&report.trigger, &report.kind, label, &outcome.phases);
        if outcome.trigger == crate::reload::Trigger::Upgrade && committed {
            self.upgrade("committed");
        }
    }

    /// This master adopted the workers of one that died: `count` masters
    /// have, since the keeper's first.
    pub fn adopted(&self, count: u64) {
        Metrics::follow(&self.master_adoptions, count);
    }

    /// A binary upgrade's outcome.
    pub fn upgrade(&self, outcome: &str) {
        self.upgrades
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
    }

    /// A worker exit (`worker_exits_total{reason}`).
    pub fn worker_exited(&self, reason: &str) {
        self.worker_exits
            .get_or_create(&Reason {
                reason: reason.into(),
            })
            .inc();
    }

    /// A respawn (`worker_restarts_total{reason}`).
    pub fn worker_restarted(&self, reason: &str) {
        self.worker_restarts
            .get_or_create(&Reason {
                reason: reason.into(),
            })
            .inc();
    }

    /// A generation whose drain took `took` has finished.
    pub fn drained(&self, took: Duration) {
        self.drain_seconds.observe(took.as_secs_f64());
    }

    /// Raises a counter mirroring an external total to `value`.
    pub(crate) fn follow(counter: &Counter, value: u64) {
        let now = counter.get();
        if value > now {
            counter.inc_by(value - now);
        }
    }

    /// The exposition: OpenMetrics when `openmetrics`, else the classic
    /// Prometheus text format (version 0.0.4) that `promtool` and older
    /// scrapers read.
    pub fn encode(&self, openmetrics: bool) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        if openmetrics {
            text
        } else {
            classic(&text)
        }
    }
}

/// OpenMetrics as the classic text format, for what this registry emits:
/// no `# EOF` nor `# UNIT`, and a counter's `# HELP`/`# TYPE` name its
/// samples' `_total` name.
fn classic(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.strip_suffix(" counter"))
        {
            counters.insert(name.to_string());
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find(|p| line.starts_with(p));
        match meta {
            Some(prefix) => {
                let rest = &line[prefix.len()..];
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let total = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(&format!("{prefix}{name}{total} {tail}"));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_classic_format_names_counters_by_their_samples() {
        let m = Metrics::new();
        m.reload("cli", "new_generation", "committed", &[]);
        let text = m.encode(false);
        assert!(
            text.contains("# TYPE baton_reloads_total counter\n"),
            "{text}"
        );
        assert!(text.contains("# HELP baton_reloads_total Reload"), "{text}");
        assert!(
            text.contains(
                "baton_reloads_total{trigger=\"cli\",kind=\"new_generation\",outcome=\"committed\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        assert!(m.encode(true).ends_with("# EOF\n"));
    }

    #[test]
    fn followed_counters_only_go_up() {
        let c = Counter::default();
        Metrics::follow(&c, 5);
        Metrics::follow(&c, 3);
        Metrics::follow(&c, 7);
        assert_eq!(c.get(), 7);
    }
}
