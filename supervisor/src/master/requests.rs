//! The master's answers to requests: the control socket's, the admin
//! endpoint's, and the signals that ask for something (reopen, scale). Each
//! is computed in the loop from the master's state at the moment of the
//! request.

use super::{Master, Stop, Waiter};
use crate::admin::respond::{Answer, Endpoint};
use crate::audit::Requester;
use crate::control::protocol::{
    GenerationStatus, ListenerStatus, MasterStatus, Reply, Request, Status, WorkerStatus,
};
use crate::operation::{Admission, Ask, ReloadRequest};
use crate::reload::Trigger;
use crate::scale::{ScaleChange, Scaled, MAX_PROCESSES};
use crate::worker::State;
use baton_wire::protocol::MasterMessage;
use std::os::fd::AsRawFd;
use std::time::SystemTime;
use tokio::sync::oneshot;
use tokio::time::Instant;

impl Master {
    /// Answers one control request; a reload answers when it has finished.
    pub(crate) fn on_control(&mut self, request: Request, reply: Waiter, from: Requester) {
        tracing::debug!(?request, "control request");
        let answer = match request {
            Request::Reload {
                canary,
                mode,
                if_version,
            } => {
                let canary = canary
                    .as_deref()
                    .map(crate::config::Share::parse)
                    .transpose();
                let mode = mode.as_deref().map(crate::inplace::Mode::parse).transpose();
                match (canary, mode) {
                    (Err(e), _) => Reply::error(format!("reload refused: --canary: {e}")),
                    (_, Err(e)) => Reply::error(format!("reload refused: {e}")),
                    (Ok(canary), Ok(mode)) => {
                        return self.request_reload(ReloadRequest {
                            trigger: match from.via.as_str() {
                                "admin" => Trigger::Admin,
                                "watch" => Trigger::Watch,
                                _ => Trigger::Cli,
                            },
                            canary,
                            mode: mode.unwrap_or_default(),
                            requested_by: Some(from),
                            waiters: vec![reply],
                            if_version,
                        });
                    }
                }
            }
            Request::Promote {} => return self.on_rollout_request(true, reply),
            Request::Rollback {} => return self.on_rollout_request(false, reply),
            Request::Status {} => {
                return crate::status::complete(self.status(), move |status| {
                    let _ = reply.send(Reply::ok(status));
                })
            }
            Request::Upgrade {} => return self.request_upgrade(Some(reply), Some(&from)),
            Request::Restart { hard } => match self.restart(hard, &from) {
                Ok(()) => Reply::ok(serde_json::json!({
                    "pid": std::process::id(),
                    "requested_at": std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0.0, |d| d.as_secs_f64()),
                })),
                Err(reason) => Reply::error(format!("restart refused: {reason}")),
            },
            Request::Stop { fast } => {
                self.stop(if fast { Stop::Fast } else { Stop::Graceful }, Some(&from));
                Reply::ok(serde_json::json!({ "pid": std::process::id() }))
            }
            Request::Drain { grace_ms } => {
                match self.drain(std::time::Duration::from_millis(grace_ms), Some(&from)) {
                    Ok(()) => Reply::ok(serde_json::json!({
                        "pid": std::process::id(),
                        "grace_ms": grace_ms,
                    })),
                    Err(reason) => Reply::error(format!("drain refused: {reason}")),
                }
            }
            Request::Reopen {} => {
                let workers = self.reopen();
                Reply::ok(serde_json::json!({ "workers": workers }))
            }
            Request::Scale { by, to } => {
                let change = match (by, to) {
                    (Some(by), None) => Ok(ScaleChange::By(by)),
                    (None, Some(to)) => Ok(ScaleChange::To(to)),
                    _ => Err("scale takes exactly one of \"by\" and \"to\"".to_string()),
                };
                match change.and_then(|change| self.scale(change, Some(&from))) {
                    Ok(scaled) => Reply::ok(scaled),
                    Err(reason) => Reply::error(reason),
                }
            }
        };
        let _ = reply.send(answer);
    }

    /// `baton promote` and `baton rollback`.
    fn on_rollout_request(&mut self, promote: bool, reply: Waiter) {
        let generation = self.operation.rollout().map(|r| r.generation());
        let Some(generation) = generation else {
            let _ = reply.send(Reply::error(
                "no reload is on probation (nothing to promote or roll back)",
            ));
            return;
        };
        let done = if promote {
            self.promote()
        } else {
            self.roll_back("asked by baton rollback")
        };
        let _ = reply.send(if done {
            Reply::ok(serde_json::json!({ "generation": generation }))
        } else {
            Reply::error("no reload is on probation")
        });
    }

    /// Reopens the master's log file and tells every worker to reopen its
    /// own; returns how many workers were told.
    pub fn reopen(&mut self) -> usize {
        if let Err(e) = self.log.reopen() {
            tracing::error!(error = %format!("{e:#}"), "cannot reopen the log file");
        }
        let mut told = 0;
        for generation in self.fleet.iter() {
            let signal = generation.config().worker.reopen_signal.0;
            for worker in generation.workers().values() {
                // SDK workers hear it on their channel: a signal would kill a
                // worker that does not expect it. Other servers get
                // `reopen_signal` (SIGUSR1 unless configured otherwise), to
                // their main process only, as nginx's master forwards it:
                // a server with children (gunicorn) passes it on itself.
                let result = match (&worker.channel(), signal) {
                    (Some(channel), _) => channel
                        .try_send(&MasterMessage::Reopen {}, &[])
                        .map_err(|e| e.to_string()),
                    (None, Some(signal)) => {
                        nix::sys::signal::kill(worker.pid(), signal).map_err(|e| e.to_string())
                    }
                    (None, None) => continue,
                };
                match result {
                    Ok(()) => told += 1,
                    Err(e) => {
                        tracing::warn!(pid = worker.pid().as_raw(), error = %e, "cannot tell worker to reopen")
                    }
                }
            }
        }
        tracing::info!(workers = told, "logs reopened");
        told
    }

    /// Answers an admin request.
    pub(crate) fn on_admin(&mut self, endpoint: Endpoint, reply: oneshot::Sender<Answer>) {
        let answer = match endpoint {
            Endpoint::Healthz => Answer::text(200, "ok\n".into()),
            Endpoint::Readyz => match self.not_ready() {
                None => Answer::text(200, "ready\n".into()),
                Some(reason) => Answer::text(503, format!("not ready: {reason}\n")),
            },
            Endpoint::Status => {
                return crate::status::complete(self.status(), move |status| {
                    let _ = reply.send(Answer {
                        status: 200,
                        content_type: "application/json",
                        body: serde_json::to_string_pretty(&status).expect("status serializes")
                            + "\n",
                    });
                })
            }
            Endpoint::Metrics { openmetrics } => {
                self.metrics.refresh(
                    &self.fleet,
                    &self.operation,
                    self.reloads.last(),
                    &self.config.path,
                    self.log.otlp_spans_dropped(),
                );
                Answer {
                    status: 200,
                    content_type: if openmetrics {
                        "application/openmetrics-text; version=1.0.0; charset=utf-8"
                    } else {
                        "text/plain; version=0.0.4; charset=utf-8"
                    },
                    body: self.metrics.encode(openmetrics),
                }
            }
        };
        let _ = reply.send(answer);
    }

    /// Why this master should get no traffic, if so: stopping, no current
    /// generation, or one whose workers are not all ready.
    fn not_ready(&self) -> Option<String> {
        // A request that reached this master just before it handed over to
        // a new one, which serves now.
        if self.lineage.successor().is_some() {
            return None;
        }
        if self.operation.serving_until().is_some() {
            return Some("the master is draining (`baton drain`): it stops after its grace".into());
        }
        if self.operation.stopping().is_some() {
            return Some("the master is stopping".into());
        }
        let Some(current) = self.fleet.current() else {
            return Some("no generation serves yet".into());
        };
        if !current.all_ready() {
            let ready = current
                .workers()
                .values()
                .filter(|w| w.state() == State::Ready)
                .count();
            let looped = if current.crash_looped().is_empty() {
                String::new()
            } else {
                format!(
                    "; worker(s) {:?} crash-looped and are not respawned (capacity lost until a reload)",
                    current.crash_looped()
                )
            };
            return Some(format!(
                "generation {}: {ready} of {} workers ready{looped}",
                current.number(),
                current.processes()
            ));
        }
        None
    }

    /// A snapshot of everything `baton status` shows but the draining
    /// workers' open connections, which [`complete`] adds off the event
    /// loop.
    pub fn status(&self) -> Status {
        let now = (Instant::now(), SystemTime::now());
        let generations = self
            .fleet
            .iter()
            .map(|g| GenerationStatus {
                number: g.number(),
                state: g.state().name().into(),
                age_s: g.started().elapsed().as_secs_f64(),
                processes: g.processes(),
                config_hash: g.config().hash.clone(),
                config_version: g.config().app.version.clone(),
                deploy_version: g.deploy_version().map(str::to_string),
                handed_over: self.handovers.counts(g.number()).handed_over,
                closed_at_drain: self.handovers.counts(g.number()).closed_at_drain,
                sockets: g.listeners().iter().map(|l| l.fd().as_raw_fd()).collect(),
                crash_loop: g.crash_looped().iter().copied().collect(),
                workers: g
                    .workers()
                    .values()
                    .map(|w| WorkerStatus {
                        pid: w.pid().as_raw(),
                        index: w.index(),
                        state: w.state().name().into(),
                        uptime_s: w.started().elapsed().as_secs_f64(),
                        restarts: w.restarts(),
                        connections: w.connections(),
                        status: w.status().map(str::to_string),
                        config_version: w.app_version().map(str::to_string),
                        drain_deadline: crate::status::deadline(&w.state(), now),
                        kill_in_s: match w.state() {
                            State::Draining { kill_at } => {
                                Some(kill_at.saturating_duration_since(now.0).as_secs_f64())
                            }
                            _ => None,
                        },
                        open_connections: None,
                    })
                    .collect(),
            })
            .collect();
        let last_reload = self.reloads.last().map(|outcome| {
            let pids = match (&outcome.failure, self.fleet.get(outcome.generation)) {
                (None, Some(g)) => g.workers().keys().map(|p| p.as_raw()).collect(),
                _ => Vec::new(),
            };
            outcome.report(pids)
        });
        Status {
            master: MasterStatus {
                pid: std::process::id(),
                uptime_s: self.program.started.elapsed().as_secs_f64(),
                config: self.config.path.display().to_string(),
                config_hash: self.config.hash.clone(),
                current_generation: self.fleet.current_number(),
                state: if self.operation.serving_until().is_some() {
                    "draining"
                } else if self.operation.stopping().is_some() {
                    "stopping"
                } else {
                    "running"
                }
                .into(),
                admin: self.endpoints.admin_address(),
                adopted: self.program.adopted.as_ref().map(|a| {
                    crate::control::protocol::AdoptedStatus {
                        at: a
                            .at
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0.0, |d| d.as_secs_f64()),
                        previous_pid: a.previous_pid,
                        died: a.how.clone(),
                        adoptions: a.count,
                    }
                }),
            },
            listeners: self
                .fleet
                .listeners()
                .iter()
                .map(|l| ListenerStatus {
                    name: l.info.name.clone(),
                    kind: l.info.kind.to_string(),
                    address: l.info.address.clone(),
                    fd: l.fd().as_raw_fd(),
                })
                .collect(),
            generations,
            reload_in_progress: self
                .operation
                .reload()
                .map(|r| r.generation())
                .or(self.operation.rollout().map(|r| r.generation()))
                .or(self.operation.in_place().map(|t| t.generation())),
            last_reload,
            last_drained: self.handovers.last_finished().map(|(generation, counts)| {
                crate::control::protocol::DrainedStatus {
                    generation,
                    handed_over: counts.handed_over,
                    closed_at_drain: counts.closed_at_drain,
                }
            }),
            rollout: self.operation.rollout().map(|rollout| {
                rollout.status(
                    self.probing
                        .as_ref()
                        .filter(|p| p.generation == rollout.generation())
                        .map(|p| p.failures),
                )
            }),
        }
    }

    /// Changes the current generation's worker count: new workers are started
    /// (and report ready as usual); surplus ones, highest index first, drain.
    /// While an in-place reload runs on the generation, new workers start
    /// when it ends, with the version it leaves in service.
    pub fn scale(
        &mut self,
        change: ScaleChange,
        by: Option<&crate::audit::Requester>,
    ) -> Result<Scaled, String> {
        let facts = Default::default();
        if let Admission::Refuse(reason) = self.operation.summary().admit(Ask::Scale, facts) {
            return Err(reason.to_string());
        }
        let config_processes = self.config.worker.processes;
        let held = self.operation.spawns_held();
        let Some(generation) = self.fleet.current_mut() else {
            return Err("no current generation".into());
        };
        let from = generation.processes();
        let wanted = match change {
            // `by` comes from a client: any i64.
            ScaleChange::By(n) => i64::from(from).saturating_add(n),
            ScaleChange::To(n) => n,
        };
        if !(1..=MAX_PROCESSES).contains(&wanted) {
            return Err(format!(
                "cannot scale generation {} from {from} to {wanted} workers: the count must be between 1 and {MAX_PROCESSES}",
                generation.number()
            ));
        }
        let wanted = wanted as u32;
        let number = generation.number();
        // While an in-place reload runs, new workers start once it ends,
        // with the version it leaves in service.
        let hold = held == Some(number);
        generation.scale_to(wanted, hold, &self.events, &mut self.children)?;
        self.fleet.set_scale(wanted, config_processes);
        let requested_by = by.map(ToString::to_string);
        tracing::info!(
            event = "generation.scaled",
            generation = number,
            from,
            processes = wanted,
            requested_by,
            "generation scaled"
        );
        Ok(Scaled {
            generation: number,
            from,
            processes: wanted,
        })
    }

    /// Scales from a signal: the outcome goes to the log only.
    pub fn scale_logged(&mut self, change: ScaleChange, by: Option<&crate::audit::Requester>) {
        if let Err(reason) = self.scale(change, by) {
            tracing::error!(%reason, "scale refused");
        }
    }
}
