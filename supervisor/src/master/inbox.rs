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

/// Forwards every message on `channel` into the event loop as `wrap(message)`
/// until the peer is gone (end of file or reset: its exit, reaped, says why),
/// the channel breaks, or the peer sends what does not decode: that is
/// forwarded as the last thing it said, since it broke the protocol. At most
/// [`MESSAGES_PER_SECOND`] are read a second, so that no peer floods the loop.
pub fn forward<T>(
    events: &Events,
    channel: Arc<Channel>,
    wrap: impl Fn(Result<T, ChannelError>) -> Event + Send + 'static,
) -> tokio::task::AbortHandle
where
    T: for<'de> serde::Deserialize<'de> + Send + 'static,
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
    T: for<'de> serde::Deserialize<'de> + Send + 'static,
{
    let events = events.clone();
    tokio::spawn(async move {
        let mut window = crate::ratelimit::Window::new(
            MESSAGES_PER_SECOND,
            Duration::from_secs(1),
            Instant::now(),
        );
        loop {
            tokio::time::sleep_until(window.spend(1, Instant::now())).await;
            let message = match channel.recv::<T>().await {
                Ok(Some(received)) => Ok(received),
                Ok(None) => return,
                Err(e) if e.is_peer_gone() => return,
                Err(e) => Err(e),
            };
            let last = message.is_err();
            if events.send(wrap(message)).is_err() || last {
                return;
            }
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
