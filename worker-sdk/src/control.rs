//! The worker's side of the control channel once the handshake is done:
//! drain and reopen requests, the two phases of an in-place reload, and
//! the connection counts the worker reports.

use crate::app_config::Reloadable;
use crate::drain::Drain;
use crate::handover::{Answer, Handover};
use crate::reopen;
use baton_wire::channel::Channel;
use baton_wire::protocol::{AppFile, AppPhase, MasterMessage, WorkerMessage};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Reload handles registered by the worker.
pub(crate) type Handles = Arc<std::sync::Mutex<Vec<Arc<dyn Reloadable>>>>;

/// Reports connection counts to the master, if there is one.
#[derive(Debug, Clone)]
pub(crate) struct Reporter(Option<Arc<Channel>>);

impl Reporter {
    pub(crate) fn new(control: Option<Arc<Channel>>) -> Reporter {
        Reporter(control)
    }

    /// Best effort: never waits.
    pub(crate) fn report_connections(&self, count: u64) {
        if let Some(control) = &self.0 {
            let _ = control.try_send(&WorkerMessage::Connections { count }, &[]);
        }
    }
}

/// Watches the channel for the rest of the worker's life. A drain message
/// starts the drain; end of file (the master is gone) or a broken channel
/// starts it too, with the hello's deadline, so no worker outlives its master
/// by more than `drain_timeout`.
pub(crate) fn spawn_reader(
    channel: Arc<Channel>,
    drain: Drain,
    drain_timeout: Duration,
    reopen: watch::Sender<u64>,
    handles: Handles,
    handover: Handover,
) {
    tokio::spawn(async move {
        loop {
            match channel.recv::<MasterMessage>().await {
                Ok(Some(received)) => match received.message {
                    MasterMessage::Drain { deadline_ms } => {
                        drain.start(Duration::from_millis(deadline_ms))
                    }
                    MasterMessage::Reopen {} => reopen::request(&reopen),
                    MasterMessage::AppFiles {
                        phase: AppPhase::Prepare,
                        version,
                        files,
                        log_filter,
                    } => {
                        // Off the runtime's threads: a slow parser must not
                        // stall serving.
                        let fd = received.fds.into_iter().next();
                        let handles = handles.clone();
                        let answer = tokio::task::spawn_blocking(move || {
                            prepare(&handles, &version, fd, &files, log_filter.as_deref())
                        })
                        .await;
                        if let Ok(answer) = answer {
                            let _ = channel.send(&answer).await;
                        }
                    }
                    MasterMessage::AppCommit { version } => {
                        let answer = commit(&handles, version);
                        let _ = channel.send(&answer).await;
                    }
                    MasterMessage::AppAbort { .. } => {
                        let all = handles.lock().unwrap_or_else(|e| e.into_inner()).clone();
                        for handle in &all {
                            handle.abort();
                        }
                    }
                    MasterMessage::Adopt {
                        id,
                        address,
                        connections,
                        origin,
                    } => {
                        let answer = handover.adopt(
                            id,
                            &address,
                            connections,
                            received.fds,
                            received.fds_truncated,
                            origin,
                        );
                        let _ = channel.send(&answer).await;
                    }
                    MasterMessage::NewMaster {} => handover.new_master(),
                    MasterMessage::HandedOver { id } => handover.answer(id, Answer::Taken),
                    MasterMessage::HandoverRefused { id, reason } => {
                        handover.answer(id, Answer::Refused(reason))
                    }
                    MasterMessage::Hello { .. }
                    | MasterMessage::Listeners { .. }
                    | MasterMessage::AppFiles { .. } => {}
                },
                Ok(None) | Err(_) => {
                    handover.master_gone();
                    drain.start(drain_timeout);
                    return;
                }
            }
        }
    });
}

/// An in-place reload's first phase: every handle builds its value from the
/// new files; one refusal refuses for all (and drops what the others built).
fn prepare(
    handles: &Handles,
    version: &str,
    fd: Option<OwnedFd>,
    entries: &[AppFile],
    log_filter: Option<&str>,
) -> WorkerMessage {
    let refuse = |reason: String| WorkerMessage::AppRefused {
        version: version.to_string(),
        reason,
    };
    let Some(fd) = fd else {
        return refuse("app config files without their memfd".into());
    };
    let files = match crate::app_config::from_memfd(fd, entries) {
        Ok(files) => files,
        Err(e) => return refuse(e),
    };
    let all = handles.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if all.is_empty() {
        return refuse("no reload handle registered".into());
    }
    for handle in &all {
        if let Err(reason) = handle.prepare(version, &files, log_filter) {
            for handle in &all {
                handle.abort();
            }
            return refuse(reason);
        }
    }
    WorkerMessage::AppPrepared {
        version: version.to_string(),
    }
}

/// An in-place reload's second phase: every handle swaps in what it
/// prepared for `version`. Committed only if every one did: a handle that
/// had nothing prepared for it (registered after the prepare went by) keeps
/// serving its own version, and the master is told so rather than told a
/// version the worker does not serve.
fn commit(handles: &Handles, version: String) -> WorkerMessage {
    let all = handles.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let missing = all.iter().filter(|h| !h.commit(&version)).count();
    if all.is_empty() || missing > 0 {
        let reason = format!(
            "{missing} of {} reload handles had not prepared version {version}",
            all.len()
        );
        return WorkerMessage::AppRefused { version, reason };
    }
    WorkerMessage::AppCommitted { version }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app_config::{AppConfig, Files};

    #[test]
    fn a_commit_of_a_version_not_prepared_is_refused_not_confirmed() {
        let files = Files::new([("a".to_string(), b"1".to_vec())]);
        let parse = |f: &Files| f.only_text().map(str::to_string);
        let config = AppConfig::new("v1".into(), &files, parse).unwrap();
        let handles: Handles = Arc::new(std::sync::Mutex::new(vec![config.reloadable()]));
        // A worker that joined after the prepare went by.
        let answer = commit(&handles, "v2".into());
        assert!(
            matches!(&answer, WorkerMessage::AppRefused { version, .. } if version == "v2"),
            "{answer:?}"
        );
        assert_eq!(config.version(), "v1");
        let handle = handles.lock().unwrap()[0].clone();
        handle.prepare("v2", &files, None).unwrap();
        assert_eq!(
            commit(&handles, "v2".into()),
            WorkerMessage::AppCommitted {
                version: "v2".into()
            }
        );
        assert_eq!(config.version(), "v2");
    }
}
