//! The master's inboxes: the events that reach its loop, the tasks that
//! forward a peer's channel into them (rate-limited), and the order the
//! loop takes them in.

use crate::config::Config;
use crate::control::protocol::{Reply, Request};
use crate::upgrade::handoff::{NewMessage, OldMessage};
use baton_wire::channel::{Channel, ChannelError, Received};
use baton_wire::protocol::WorkerMessage;
use nix::unistd::Pid;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Something a worker's channel said.
#[derive(Debug)]
pub enum Event {
    /// A message, or why it could not be read.
    Message {
        /// The worker.
        pid: Pid,
        /// What arrived.
        message: Result<WorkerMessage, ChannelError>,
        /// The fds it carried (a handover's sockets).
        fds: Vec<std::os::fd::OwnedFd>,
        /// Whether some of its fds were lost (this master at its fd limit).
        fds_truncated: bool,
    },
    /// A message from the new master during a binary upgrade.
    Upgrade {
        /// What arrived.
        message: Result<NewMessage, ChannelError>,
    },
    /// From the old master, in a new master after an upgrade: `None` when
    /// the old master is gone.
    OldMaster {
        /// What arrived.
        message: Option<OldMessage>,
        /// The fds it carried (connections handed over); `None` when some
        /// were lost (this master at its fd limit).
        fds: Option<Vec<std::os::fd::OwnedFd>>,
    },
    /// In a new master after an upgrade: the old master has exited.
    OldMasterExited,
    /// A worker this master adopted from one that died (not its child)
    /// has exited (see [`crate::adopt`]).
    AdoptedExit {
        /// The worker.
        pid: Pid,
    },
    /// The keeper's channel ended: it is gone (see [`crate::keeper`]).
    KeeperGone,
    /// A datagram on a generation's notify socket (`ready = "notify"`).
    Notify {
        /// The generation.
        generation: u64,
        /// What arrived, and from whom.
        datagram: crate::notify::Datagram,
    },
    /// A readiness probe's attempt ended.
    Probe {
        /// The generation it probed.
        generation: u64,
        /// Passed, or why not.
        result: Result<(), String>,
    },
    /// A worker started off the loop has exec'd, or why it could not.
    Spawned {
        /// Its generation.
        generation: u64,
        /// Its index.
        index: u32,
        /// The child, or why it failed.
        result: Result<std::process::Child, String>,
    },
    /// A reload's configuration, read off the event loop.
    ConfigLoaded(Box<Result<Config, String>>),
    /// A request to the admin endpoint, and where its answer goes.
    Admin {
        /// What was asked.
        endpoint: crate::admin::respond::Endpoint,
        /// The answer channel.
        reply: oneshot::Sender<crate::admin::respond::Answer>,
    },
    /// A request from the control socket, and where its reply goes.
    Control {
        /// The request.
        request: Request,
        /// The reply channel.
        reply: oneshot::Sender<Reply>,
        /// Who asked.
        from: crate::audit::Requester,
    },
}

/// Where a reload's outcome is reported besides the log.
pub type Waiter = oneshot::Sender<Reply>;

/// Requests served in a row before the next event of the main inbox, when
/// both wait: a flood of requests does not starve the workers' messages.
pub(super) const REQUESTS_IN_A_ROW: u32 = 8;

/// The next event of the inboxes, and whether it is a request: the
/// requests' first (probes, then the rest) when `requests_first`, else the
/// main inbox's first.
pub(super) async fn next_event(
    inbox: &mut mpsc::UnboundedReceiver<Event>,
    requests: [&mut mpsc::UnboundedReceiver<Event>; 2],
    requests_first: bool,
) -> (bool, Event) {
    let [probes, requests] = requests;
    std::future::poll_fn(|cx| {
        use std::task::Poll;
        if requests_first {
            for requests in [&mut *probes, &mut *requests] {
                if let Poll::Ready(Some(request)) = requests.poll_recv(cx) {
                    return Poll::Ready((true, request));
                }
            }
        }
        if let Poll::Ready(Some(event)) = inbox.poll_recv(cx) {
            return Poll::Ready((false, event));
        }
        for requests in [&mut *probes, &mut *requests] {
            if let Poll::Ready(Some(request)) = requests.poll_recv(cx) {
                return Poll::Ready((true, request));
            }
        }
        // Every sender lives as long as the master: never closed.
        Poll::Pending
    })
    .await
}

/// The event loop's inbox, as the tasks that feed it hold it.
pub type Events = mpsc::UnboundedSender<Event>;

/// Messages a second the master reads from one channel; a peer sending
/// more waits on its full socket buffer.
pub const MESSAGES_PER_SECOND: u64 = 100;

/// Handover messages a second the master reads from one channel, on top of
/// [`MESSAGES_PER_SECOND`]: a draining worker's batches of connections and
/// a taker's answers (see [`Budgeted`]).
pub const HANDOVER_MESSAGES_PER_SECOND: u64 = 1000;

/// A message that may travel outside a channel's general budget.
///
/// Handover messages get their own: at a drain every worker of the old
/// generation sends its idle connections in batches (one each 10 ms while
/// they come to rest), and each worker of the new generation answers every
/// batch it gets from any of them, as after a binary upgrade the new master
/// does for all of the old master's workers on one channel; with many
/// workers that passes 100 a second, and a reader held to the general
/// budget would sit until the end of its window, up to a second, with the
/// handovers waiting behind. Each such message costs the master one
/// `sendmsg` (or a map lookup), and the batch carries up to 252
/// connections; its own limit still bounds a peer that sends nothing else.
pub trait Budgeted {
    /// Whether it counts against [`HANDOVER_MESSAGES_PER_SECOND`] rather than
    /// [`MESSAGES_PER_SECOND`].
    fn is_handover(&self) -> bool {
        false
    }
}

impl Budgeted for WorkerMessage {
    fn is_handover(&self) -> bool {
        matches!(
            self,
            WorkerMessage::Handover { .. }
                | WorkerMessage::Adopted { .. }
                | WorkerMessage::AdoptRefused { .. }
        )
    }
}

impl Budgeted for NewMessage {
    fn is_handover(&self) -> bool {
        matches!(
            self,
            NewMessage::HandedOver { .. } | NewMessage::HandoverRefused { .. }
        )
    }
}

/// A channel's two budgets, in fixed windows of a second.
struct Budget {
    general: crate::ratelimit::Window,
    handovers: crate::ratelimit::Window,
}

impl Budget {
    fn new(now: Instant) -> Budget {
        let second = Duration::from_secs(1);
        Budget {
            general: crate::ratelimit::Window::new(MESSAGES_PER_SECOND, second, now),
            handovers: crate::ratelimit::Window::new(HANDOVER_MESSAGES_PER_SECOND, second, now),
        }
    }

    /// Counts one message read: when the next may be read.
    fn spend(&mut self, handover: bool, now: Instant) -> Instant {
        match handover {
            true => self.handovers.spend(1, now),
            false => self.general.spend(1, now),
        }
    }
}

/// Forwards every message on `channel` into the event loop as `wrap(message)`
/// until the peer is gone (end of file or reset: its exit, reaped, says why),
/// the channel breaks, or the peer sends what does not decode: that is
/// forwarded as the last thing it said, since it broke the protocol. At most
/// [`MESSAGES_PER_SECOND`] are read a second, and as many as
/// [`HANDOVER_MESSAGES_PER_SECOND`] handover messages besides, so that no
/// peer floods the loop.
pub fn forward<T>(
    events: &Events,
    channel: Arc<Channel>,
    wrap: impl Fn(Result<T, ChannelError>) -> Event + Send + 'static,
) -> tokio::task::AbortHandle
where
    T: for<'de> serde::Deserialize<'de> + Budgeted + Send + 'static,
{
    forward_received(events, channel, move |received| {
        wrap(received.map(|received| received.message))
    })
}

/// [`forward`], with the fds each message carried.
fn forward_received<T>(
    events: &Events,
    channel: Arc<Channel>,
    wrap: impl Fn(Result<Received<T>, ChannelError>) -> Event + Send + 'static,
) -> tokio::task::AbortHandle
where
    T: for<'de> serde::Deserialize<'de> + Budgeted + Send + 'static,
{
    let events = events.clone();
    tokio::spawn(async move {
        let mut budget = Budget::new(Instant::now());
        loop {
            let message = match channel.recv::<T>().await {
                Ok(Some(received)) => Ok(received),
                Ok(None) => return,
                Err(e) if e.is_peer_gone() => return,
                Err(e) => Err(e),
            };
            // Which budget a message counts against is known once it is
            // read: past either, the next read waits for its window's end.
            let handover = matches!(&message, Ok(r) if r.message.is_handover());
            let resume = budget.spend(handover, Instant::now());
            let last = message.is_err();
            if events.send(wrap(message)).is_err() || last {
                return;
            }
            tokio::time::sleep_until(resume).await;
        }
    })
    .abort_handle()
}

/// Forwards a worker's channel into the event loop.
pub fn forward_worker(
    events: &Events,
    pid: Pid,
    channel: Arc<Channel>,
) -> tokio::task::AbortHandle {
    forward_received(events, channel, move |received| match received {
        Ok(received) => Event::Message {
            pid,
            message: Ok(received.message),
            fds: received.fds,
            fds_truncated: received.fds_truncated,
        },
        Err(e) => Event::Message {
            pid,
            message: Err(e),
            fds: Vec::new(),
            fds_truncated: false,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handover_messages_have_a_budget_of_their_own() {
        let start = Instant::now();
        let mut budget = Budget::new(start);
        // A drain's batches and answers beyond the general budget are read
        // on at once.
        for _ in 0..MESSAGES_PER_SECOND {
            assert_eq!(budget.spend(false, start), start);
        }
        assert_eq!(budget.spend(false, start), start + Duration::from_secs(1));
        for _ in 0..HANDOVER_MESSAGES_PER_SECOND {
            assert_eq!(budget.spend(true, start), start);
        }
        // A peer sending nothing but handover messages is still held.
        assert_eq!(budget.spend(true, start), start + Duration::from_secs(1));
    }

    #[test]
    fn only_batches_and_their_answers_are_handover_messages() {
        let handover = WorkerMessage::Handover {
            id: 1,
            address: "127.0.0.1:1".into(),
            connections: Vec::new(),
        };
        assert!(handover.is_handover());
        assert!(WorkerMessage::Adopted {
            id: 1,
            origin: None
        }
        .is_handover());
        assert!(!WorkerMessage::Ready.is_handover());
        assert!(!WorkerMessage::Connections { count: 1 }.is_handover());
        assert!(NewMessage::HandedOver { id: 1 }.is_handover());
    }
}
