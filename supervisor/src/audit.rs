//! Who asked: every reload, upgrade, scale and stop records its requester —
//! for the control socket the peer's uid, pid and command (`SO_PEERCRED`),
//! for a signal its sender's pid and uid when the kernel provides them.
//!
//! tokio's signal streams say only that a signal arrived, not who sent it,
//! so the master also registers a `SA_SIGINFO` action for each signal it
//! handles (through `signal-hook-registry`, the registry tokio's own
//! handlers live in, so both run): it stores `si_pid` and `si_uid` in
//! atomics, read when the loop sees the signal. Signals of one kind that
//! arrive together are coalesced by the kernel and tokio alike: the last
//! sender is the one recorded. Signals the kernel sends itself (a
//! terminal's Ctrl-C) carry no sender.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

/// Who asked the master for something.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requester {
    /// `control` (the control socket), `signal`, `admin` or `watch`
    /// (`baton run --watch`).
    pub via: String,
    /// The signal, for `via = "signal"`: `SIGHUP`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// The requesting process.
    pub pid: Option<i32>,
    /// Its uid.
    pub uid: Option<u32>,
    /// Its command line, as `/proc/PID/cmdline` read when the request came.
    pub command: Option<String>,
    /// For `via = "admin"` over TCP: the client's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// For `via = "admin"`: the token that let it write, as the file and
    /// line it is on (never the token itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// For `via = "watch"`: the watched files whose change asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed: Option<String>,
}

impl Requester {
    /// A control-socket peer.
    pub fn control(pid: Option<i32>, uid: u32) -> Requester {
        Requester {
            via: "control".into(),
            signal: None,
            pid,
            uid: Some(uid),
            command: pid.and_then(command_of),
            address: None,
            token: None,
            changed: None,
        }
    }

    /// A writer on the admin endpoint, let through by `grant`.
    pub fn admin(
        caller: crate::admin::auth::Caller,
        grant: &crate::admin::auth::Grant,
    ) -> Requester {
        use crate::admin::auth::{Caller, Grant};
        let (pid, uid, address) = match caller {
            Caller::Tcp(address) => (None, None, Some(address.to_string())),
            Caller::Unix { pid, uid } => (pid, Some(uid), None),
        };
        Requester {
            via: "admin".into(),
            signal: None,
            pid,
            uid,
            command: pid.and_then(command_of),
            address,
            token: match grant {
                Grant::Token(line) => Some(line.clone()),
                Grant::Peer => None,
            },
            changed: None,
        }
    }

    /// `baton run --watch`, for the change of `changed`: the master
    /// itself.
    pub fn watch(changed: &str) -> Requester {
        Requester {
            via: "watch".into(),
            signal: None,
            pid: None,
            uid: None,
            command: None,
            address: None,
            token: None,
            changed: Some(changed.to_string()),
        }
    }

    /// Whether `baton run --watch` asked.
    pub fn is_watch(&self) -> bool {
        self.via == "watch"
    }

    /// The sender of the last `signal` received, as recorded by the action
    /// [`record_signal_senders`] installed.
    pub fn signal(signal: i32) -> Requester {
        let slot = slot(signal);
        let pid = slot
            .map(|s| SENDER_PIDS[s].swap(0, Ordering::Relaxed))
            .filter(|p| *p > 0);
        let uid = slot.map(|s| SENDER_UIDS[s].load(Ordering::Relaxed));
        Requester {
            via: "signal".into(),
            signal: nix::sys::signal::Signal::try_from(signal)
                .ok()
                .map(|s| s.as_str().to_string()),
            pid,
            uid: pid.and(uid),
            command: pid.and_then(command_of),
            address: None,
            token: None,
            changed: None,
        }
    }
}

impl fmt::Display for Requester {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(changed) = &self.changed {
            return write!(f, "watch: {changed}");
        }
        match (&self.signal, &self.via[..]) {
            (Some(signal), _) => write!(f, "{signal}")?,
            (None, "admin") => write!(f, "admin endpoint")?,
            (None, _) => write!(f, "control socket")?,
        }
        match (self.pid, &self.address) {
            (_, Some(address)) => write!(f, " from {address}")?,
            (Some(pid), None) => write!(f, " from pid {pid}")?,
            (None, None) => write!(f, " from an unknown sender")?,
        }
        if let Some(uid) = self.uid {
            write!(f, " uid {uid}")?;
        }
        if let Some(command) = &self.command {
            write!(f, " ({command})")?;
        }
        if let Some(token) = &self.token {
            write!(f, " with the token of {token}")?;
        }
        Ok(())
    }
}

/// A process's command line, arguments joined by spaces, at most 200 bytes.
fn command_of(pid: i32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut text = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(String::from_utf8_lossy)
        .collect::<Vec<_>>()
        .join(" ");
    if text.len() > 200 {
        let mut end = 200;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    (!text.is_empty()).then_some(text)
}

/// The signals whose senders are recorded.
const SIGNALS: [i32; 8] = [
    libc::SIGHUP,
    libc::SIGUSR2,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGUSR1,
    libc::SIGTTIN,
    libc::SIGTTOU,
];

static SENDER_PIDS: [AtomicI32; SIGNALS.len()] = [const { AtomicI32::new(0) }; SIGNALS.len()];
static SENDER_UIDS: [AtomicU32; SIGNALS.len()] = [const { AtomicU32::new(0) }; SIGNALS.len()];

fn slot(signal: i32) -> Option<usize> {
    SIGNALS.iter().position(|s| *s == signal)
}

/// Records the sender of each signal the master handles from now on.
pub fn record_signal_senders() -> std::io::Result<()> {
    for (index, signal) in SIGNALS.into_iter().enumerate() {
        // SAFETY: the action only reads the siginfo the kernel passed and
        // stores two integers into atomics: async-signal-safe, no
        // allocation, no lock, no panic. `si_pid`/`si_uid` are read as the
        // union member `kill(2)` and `sigqueue(3)` fill; for a signal the
        // kernel raised they hold 0, which means "unknown".
        unsafe {
            signal_hook_registry::register_sigaction(signal, move |info: &libc::siginfo_t| {
                SENDER_UIDS[index].store(info.si_uid(), Ordering::Relaxed);
                SENDER_PIDS[index].store(info.si_pid(), Ordering::Relaxed);
            })?;
        }
    }
    Ok(())
}

/// The signal numbers a [`crate::signals::SignalEvent`] may have come from.
pub fn signals_of(event: crate::signals::SignalEvent) -> &'static [i32] {
    use crate::signals::SignalEvent;
    match event {
        SignalEvent::Reload => &[libc::SIGHUP],
        SignalEvent::Upgrade => &[libc::SIGUSR2],
        SignalEvent::GracefulStop => &[libc::SIGQUIT],
        SignalEvent::Terminate => &[libc::SIGTERM],
        SignalEvent::Interrupt => &[libc::SIGINT],
        SignalEvent::Reopen => &[libc::SIGUSR1],
        SignalEvent::ScaleUp => &[libc::SIGTTIN],
        SignalEvent::ScaleDown => &[libc::SIGTTOU],
        SignalEvent::Child => &[],
    }
}

/// The requester of a signal event: the recorded sender of whichever of its
/// signals last arrived.
pub fn signal_requester(event: crate::signals::SignalEvent) -> Option<Requester> {
    let signals = signals_of(event);
    let sent = signals
        .iter()
        .copied()
        .find(|s| slot(*s).is_some_and(|i| SENDER_PIDS[i].load(Ordering::Relaxed) != 0));
    Some(Requester::signal(sent.or(signals.first().copied())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_control_peer_is_named_by_pid_uid_and_command() {
        let me = std::process::id() as i32;
        let r = Requester::control(Some(me), 1000);
        let text = r.to_string();
        assert!(
            text.starts_with(&format!("control socket from pid {me} uid 1000 (")),
            "{text}"
        );
        assert!(r.command.is_some());
    }
}
