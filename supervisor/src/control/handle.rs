//! The master's answers to control requests.

use super::protocol::{Reply, Request};
use crate::audit::Requester;
use crate::master::{Master, Stop, Waiter};
use crate::operation::ReloadRequest;
use crate::reload::Trigger;
use crate::scale::ScaleChange;
use baton_wire::protocol::MasterMessage;

impl Master {
    /// Answers one control request; a reload answers when it has finished.
    pub(crate) fn on_control(&mut self, request: Request, reply: Waiter, from: Requester) {
        tracing::debug!(?request, "control request");
        let answer = match request {
            Request::Reload { canary, mode } => {
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
                            trigger: Trigger::Cli,
                            canary,
                            mode: mode.unwrap_or_default(),
                            requested_by: Some(from),
                            waiters: vec![reply],
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
            Request::Stop { fast } => {
                self.stop(if fast { Stop::Fast } else { Stop::Graceful }, Some(&from));
                Reply::ok(serde_json::json!({ "pid": std::process::id() }))
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
}
