//! Connections moving between workers at a drain: the worker's side of the
//! master's relay.
//!
//! A draining worker offers each idle HTTP/1.1 connection (its socket and
//! the bytes already read from it) to the master, which passes it to a
//! worker of the current generation; the offers made at about the same time
//! travel in one [`WorkerMessage::Handover`]. Until the master answers, the
//! offering worker keeps its own copy of the socket untouched: taken, it
//! drops the copy (the socket lives on in the other worker, nothing is
//! sent); refused, it serves the connection again and closes it between
//! requests as without a handover.
//!
//! The adopting side: the serve loop of each listener registers under the
//! listener's address; connections adopted on it are queued to that loop,
//! which serves them as if it had accepted them.
//!
//! Without the `http` feature nothing offers or adopts connections: the hub
//! only answers the master (an adoption finds no serve loop, and is refused).
#![cfg_attr(not(feature = "http"), allow(dead_code))]

use baton_wire::channel::Channel;
use baton_wire::protocol::{
    HandedConnection, HandedSession, HandoverOrigin, WorkerMessage, MAX_FDS_PER_MESSAGE,
    MAX_SESSION_STATE,
};
use std::collections::HashMap;
use std::collections::HashSet;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// The most bytes already read that a connection may carry to another
/// worker; one with more (a large pipelined request) closes as without a
/// handover.
pub(crate) const MAX_PENDING: usize = 16 * 1024;

/// The most bytes of pending data (base64) in one handover message, well
/// under the protocol's message size limit.
const BATCH_BUDGET: usize = 64 * 1024;

/// How long offers are gathered into one message after the first: the
/// master reads a worker's messages 10 ms apart at most.
const GATHER: Duration = Duration::from_millis(10);

/// The least time between two reports of the connections closed at drain.
const REPORT_INTERVAL: Duration = Duration::from_millis(100);

/// After a new master adopted this worker, how long answers to offers made
/// to the previous one may take to come back through it, and then how
/// often whether the offered sockets are still held elsewhere is asked.
const RESOLVE_EVERY: Duration = Duration::from_millis(500);

/// What became of an offered connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Another worker serves it: drop the copy without a word.
    Taken,
    /// It stays: serve it and close it between requests.
    Refused(String),
    /// The master went away before answering: whether another worker got it
    /// is unknown, so the copy is dropped without a word (an idle
    /// connection's client sees at worst a close, as without a handover).
    Unknown,
}

/// A connection handed to this worker.
#[derive(Debug)]
pub(crate) struct Adoptee {
    /// Its socket.
    pub(crate) fd: OwnedFd,
    /// The bytes already read from it, to be served first.
    pub(crate) pending: Vec<u8>,
    /// The session it carries, resumed by the app's handler of that kind;
    /// `None` for an HTTP/1.1 connection.
    pub(crate) session: Option<HandedSession>,
}

/// A batch offered, waiting for the master's answer.
struct Waiting {
    answers: Vec<oneshot::Sender<Answer>>,
    /// Its sockets' inodes, to find whether another process holds them.
    sockets: Vec<u64>,
    /// [`State::masters`] when it was offered.
    master: u64,
}

/// One connection offered, waiting for its batch to be sent.
struct Offer {
    address: String,
    fd: OwnedFd,
    pending: Vec<u8>,
    session: Option<HandedSession>,
    answer: oneshot::Sender<Answer>,
}

/// The worker's handovers, both ways. Cheap to clone: every clone is the same
/// hub. Made by [`Worker::serve_options`](crate::Worker::serve_options) for
/// [`ServeOptions::handover`](crate::http::ServeOptions::handover); there is
/// nothing to configure.
///
/// ```no_run
/// # fn run(worker: &baton_worker::Worker) {
/// let options = worker.serve_options();
/// if options.handover.as_ref().is_some_and(|h| h.is_enabled()) {
///     println!("idle connections move to the next generation at a reload");
/// }
/// # }
/// ```
#[derive(Clone)]
pub struct Handover(Arc<Hub>);

impl std::fmt::Debug for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handover")
            .field("enabled", &self.0.enabled)
            .finish()
    }
}

struct Hub {
    channel: Arc<Channel>,
    /// `[worker] handover`, from the hello.
    enabled: bool,
    offers: mpsc::UnboundedSender<Offer>,
    state: Mutex<State>,
    closed_at_drain: AtomicU64,
}

#[derive(Default)]
struct State {
    next_id: u64,
    /// Offers sent, by handover id, waiting for the master's answer.
    waiting: HashMap<u64, Waiting>,
    /// New masters that adopted this worker so far.
    masters: u64,
    /// The serve loops taking adopted connections, by listener address.
    adopters: HashMap<String, mpsc::UnboundedSender<Adoptee>>,
    /// Queues announced and not yet taken by their serve loop.
    announced: HashMap<String, mpsc::UnboundedReceiver<Adoptee>>,
    /// The last count of connections closed at drain sent, and when.
    reported: Option<(u64, Instant)>,
    /// The app's session handlers, by kind, that resume sessions other
    /// workers hand over.
    #[cfg(feature = "http")]
    resumers: HashMap<String, crate::http::session::Resume>,
}

impl Handover {
    /// The hub of a supervised worker; `enabled` is the hello's `handover`.
    /// Spawns the task that batches offers: must be called in a runtime.
    pub(crate) fn new(channel: Arc<Channel>, enabled: bool) -> Handover {
        let (offers, queue) = mpsc::unbounded_channel();
        let hub = Arc::new(Hub {
            channel,
            enabled,
            offers,
            state: Mutex::default(),
            closed_at_drain: AtomicU64::new(0),
        });
        tokio::spawn(send_batches(Arc::downgrade(&hub), queue));
        Handover(hub)
    }

    /// Whether connections move at a drain (`[worker] handover`, on by
    /// default).
    ///
    /// ```no_run
    /// # fn run(handover: &baton_worker::http::Handover) {
    /// if !handover.is_enabled() {
    ///     println!("[worker] handover = false: connections close at a reload");
    /// }
    /// # }
    /// ```
    pub fn is_enabled(&self) -> bool {
        self.0.enabled
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Offers a connection of the listener at `address` to the current
    /// generation and waits for the master's answer. `fd` is a copy of the
    /// socket: the caller keeps its own untouched until the answer.
    /// `session`: the session it carries, if any.
    pub(crate) async fn offer(
        &self,
        address: &str,
        fd: OwnedFd,
        pending: Vec<u8>,
        session: Option<HandedSession>,
    ) -> Answer {
        let (answer, answered) = oneshot::channel();
        let offer = Offer {
            address: address.to_string(),
            fd,
            pending,
            session,
            answer,
        };
        if self.0.offers.send(offer).is_err() {
            return Answer::Refused("the handover task is gone".into());
        }
        answered.await.unwrap_or(Answer::Unknown)
    }

    /// The master's answer to handover `id`.
    pub(crate) fn answer(&self, id: u64, answer: Answer) {
        let Some(waiting) = self.lock().waiting.remove(&id) else {
            return;
        };
        for sender in waiting.answers {
            let _ = sender.send(answer.clone());
        }
    }

    /// A new master adopted this worker. An offer the previous one read
    /// but had not passed on died with it, and nothing else will answer
    /// it; one it passed on is answered through the new master (the taker
    /// echoes its origin). So the offers made before are given a moment
    /// for those answers, then each whose sockets no other process holds
    /// is refused (this worker serves them again), and the others are
    /// asked again until they are answered or let go.
    pub(crate) fn new_master(&self) {
        let master = {
            let mut state = self.lock();
            state.masters += 1;
            state.masters
        };
        let hub = Arc::downgrade(&self.0);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RESOLVE_EVERY).await;
                let Some(hub) = hub.upgrade() else { return };
                let handover = Handover(hub);
                if handover.resolve_orphans(master) == 0 {
                    return;
                }
            }
        });
    }

    /// Refuses the offers made before new master `master` whose sockets no
    /// other process holds; how many such offers are still waiting.
    fn resolve_orphans(&self, master: u64) -> usize {
        let orphans: Vec<(u64, Vec<u64>)> = self
            .lock()
            .waiting
            .iter()
            .filter(|(_, w)| w.master < master)
            .map(|(id, w)| (*id, w.sockets.clone()))
            .collect();
        if orphans.is_empty() {
            return 0;
        }
        let Ok(held) = sockets_held_elsewhere() else {
            return orphans.len();
        };
        let mut left = 0;
        for (id, sockets) in orphans {
            if sockets.iter().any(|inode| held.contains(inode)) {
                left += 1;
            } else {
                let why = "the master it was offered to is gone, and no worker took it";
                self.answer(id, Answer::Refused(why.into()));
            }
        }
        left
    }

    /// The master is gone: no answer will come.
    pub(crate) fn master_gone(&self) {
        self.lock().waiting.clear();
    }

    /// Tells the master this worker takes connections on the listener at
    /// `address`, before it says it is ready: the master then knows as soon
    /// as it commits the generation and drains the previous one.
    /// Connections adopted meanwhile wait for [`Handover::adopt_on`].
    pub(crate) fn announce(&self, address: &str) {
        if !self.0.enabled || self.lock().adopters.contains_key(address) {
            return;
        }
        let (sender, receiver) = mpsc::unbounded_channel();
        let message = WorkerMessage::Adopts {
            address: address.to_string(),
        };
        if self.0.channel.try_send(&message, &[]).is_ok() {
            let mut state = self.lock();
            state.adopters.insert(address.to_string(), sender);
            state.announced.insert(address.to_string(), receiver);
        }
    }

    /// Takes connections adopted on the listener at `address` from now on
    /// (announcing it to the master unless [`Handover::announce`] did),
    /// until the receiver is dropped or [`Handover::stop_adopting`].
    pub(crate) fn adopt_on(&self, address: &str) -> Option<mpsc::UnboundedReceiver<Adoptee>> {
        if !self.0.enabled {
            return None;
        }
        self.announce(address);
        self.lock().announced.remove(address)
    }

    /// The serve loop of `address` stops taking adopted connections.
    pub(crate) fn stop_adopting(&self, address: &str) {
        let mut state = self.lock();
        state.adopters.remove(address);
        state.announced.remove(address);
    }

    /// Connections the master passes to this worker: queued to the serve
    /// loop of their listener. The answer for the master.
    pub(crate) fn adopt(
        &self,
        id: u64,
        address: &str,
        connections: Vec<HandedConnection>,
        fds: Vec<OwnedFd>,
        fds_truncated: bool,
        origin: Option<HandoverOrigin>,
    ) -> WorkerMessage {
        let refuse = |reason: String| WorkerMessage::AdoptRefused { id, reason, origin };
        if fds_truncated {
            return refuse("their fds did not arrive (the worker is at its fd limit)".into());
        }
        if fds.len() != connections.len() {
            return refuse(format!(
                "{} connections with {} fds",
                connections.len(),
                fds.len()
            ));
        }
        let Some(adopter) = self.lock().adopters.get(address).cloned() else {
            return refuse(format!("the worker does not serve {address}"));
        };
        for session in connections.iter().filter_map(|c| c.session.as_ref()) {
            if session.state.len() > MAX_SESSION_STATE {
                return refuse(format!(
                    "a session of kind {:?} carries {} bytes of state, over the limit of {MAX_SESSION_STATE}",
                    session.kind,
                    session.state.len()
                ));
            }
            if self.resumer(&session.kind).is_none() {
                return refuse(format!(
                    "the worker has no session handler of kind {:?}",
                    session.kind
                ));
            }
        }
        // Those queued before a failure are dropped with the receiver: the
        // draining worker still holds every socket, and serves them again.
        for (connection, fd) in connections.into_iter().zip(fds) {
            let adoptee = Adoptee {
                fd,
                pending: connection.pending,
                session: connection.session,
            };
            if adopter.send(adoptee).is_err() {
                return refuse(format!("the worker stopped serving {address}"));
            }
        }
        WorkerMessage::Adopted { id, origin }
    }

    /// Registers the app's handler resuming sessions of `kind` handed over
    /// by other workers (replacing an earlier one of the same kind).
    #[cfg(feature = "http")]
    pub(crate) fn resume_sessions(&self, kind: &str, resume: crate::http::session::Resume) {
        self.lock().resumers.insert(kind.to_string(), resume);
    }

    /// The app's handler resuming sessions of `kind`.
    #[cfg(feature = "http")]
    pub(crate) fn resumer(&self, kind: &str) -> Option<crate::http::session::Resume> {
        self.lock().resumers.get(kind).cloned()
    }

    /// Without serving HTTP, no session is resumed.
    #[cfg(not(feature = "http"))]
    fn resumer(&self, _kind: &str) -> Option<()> {
        None
    }

    /// One more connection closed at the drain instead of handed over.
    pub(crate) fn closed_at_drain(&self) {
        self.0.closed_at_drain.fetch_add(1, Ordering::Relaxed);
    }

    /// Tells the master how many connections were closed at drain, if that
    /// changed, at most once per 100 ms unless `now`.
    pub(crate) fn report_closed(&self, now: bool) {
        let count = self.0.closed_at_drain.load(Ordering::Relaxed);
        let mut state = self.lock();
        let due = match state.reported {
            None => count > 0,
            Some((reported, at)) => reported != count && (now || at.elapsed() >= REPORT_INTERVAL),
        };
        if due
            && self
                .0
                .channel
                .try_send(&WorkerMessage::ClosedAtDrain { count }, &[])
                .is_ok()
        {
            state.reported = Some((count, Instant::now()));
        }
    }
}

/// Sends the offers in batches: one message per listener for those made at
/// about the same time (a drain makes every idle connection ready at once),
/// within the protocol's fd and size limits.
async fn send_batches(hub: std::sync::Weak<Hub>, mut queue: mpsc::UnboundedReceiver<Offer>) {
    while let Some(first) = queue.recv().await {
        // At a drain every idle connection comes to rest at once: they
        // travel together (the master reads at most 100 messages a second
        // from a worker).
        tokio::time::sleep(GATHER).await;
        let mut offers = vec![first];
        while let Ok(offer) = queue.try_recv() {
            offers.push(offer);
        }
        let Some(hub) = hub.upgrade() else { return };
        let handover = Handover(hub);
        for batch in batches(offers) {
            handover.send(batch);
        }
    }
}

/// Groups offers by listener, each group within [`MAX_FDS_PER_MESSAGE`]
/// fds and [`BATCH_BUDGET`] bytes of pending data and session state.
/// Sessions travel apart from plain connections: a taker without the
/// session's handler refuses its whole batch.
fn batches(offers: Vec<Offer>) -> Vec<Vec<Offer>> {
    // By listener and whether they are sessions: the groups of each, and
    // the bytes in the last group.
    type Key = (String, bool);
    let mut by_address: Vec<(Key, Vec<Vec<Offer>>, usize)> = Vec::new();
    for offer in offers {
        let state = offer
            .session
            .as_ref()
            .map_or(0, |s| s.state.len() + s.kind.len());
        let size = (offer.pending.len() + state) * 4 / 3 + 64;
        let key = (offer.address.clone(), offer.session.is_some());
        let slot = match by_address.iter().position(|(k, _, _)| *k == key) {
            Some(slot) => slot,
            None => {
                by_address.push((key, vec![Vec::new()], 0));
                by_address.len() - 1
            }
        };
        let (_, groups, used) = &mut by_address[slot];
        let full = groups.last().is_some_and(|g| {
            !g.is_empty() && (g.len() >= MAX_FDS_PER_MESSAGE || *used + size > BATCH_BUDGET)
        });
        if full {
            groups.push(Vec::new());
            *used = 0;
        }
        *used += size;
        groups.last_mut().expect("one group at least").push(offer);
    }
    by_address.into_iter().flat_map(|(_, g, _)| g).collect()
}

impl Handover {
    /// Sends one batch (same listener) and files its answers under a new id;
    /// a batch that cannot be sent (a full channel) is refused at once.
    fn send(&self, batch: Vec<Offer>) {
        let Some(address) = batch.first().map(|o| o.address.clone()) else {
            return;
        };
        let mut answers = Vec::with_capacity(batch.len());
        let mut fds = Vec::with_capacity(batch.len());
        let mut connections = Vec::with_capacity(batch.len());
        for offer in batch {
            answers.push(offer.answer);
            fds.push(offer.fd);
            connections.push(HandedConnection {
                pending: offer.pending,
                session: offer.session,
            });
        }
        let id = {
            let mut state = self.lock();
            state.next_id += 1;
            state.next_id
        };
        let sockets = fds.iter().filter_map(|fd| inode(fd.as_fd())).collect();
        // Filed before sending: the answer may come before `try_send` returns.
        {
            let mut state = self.lock();
            let master = state.masters;
            state.waiting.insert(
                id,
                Waiting {
                    answers,
                    sockets,
                    master,
                },
            );
        }
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|fd| fd.as_fd()).collect();
        let message = WorkerMessage::Handover {
            id,
            address,
            connections,
        };
        if let Err(e) = self.0.channel.try_send(&message, &borrowed) {
            self.answer(id, Answer::Refused(e.to_string()));
        }
        // The copies sent are the master's now; ours go.
        drop(fds);
    }
}

/// The inode of a socket, as `/proc/PID/fd` names it (`socket:[INODE]`).
fn inode(fd: BorrowedFd<'_>) -> Option<u64> {
    use std::os::fd::AsRawFd;
    nix::sys::stat::fstat(fd.as_raw_fd())
        .ok()
        .map(|stat| stat.st_ino)
}

/// The inodes of the sockets other processes hold, read from every
/// `/proc/PID/fd` this process may read.
fn sockets_held_elsewhere() -> std::io::Result<HashSet<u64>> {
    let me = std::process::id().to_string();
    let mut held = HashSet::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(pid) = name.to_str() else { continue };
        if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let inode = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok());
            held.extend(inode);
        }
    }
    Ok(held)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(address: &str, pending: usize) -> Offer {
        Offer {
            address: address.into(),
            fd: std::fs::File::open("/dev/null").unwrap().into(),
            pending: vec![b'x'; pending],
            session: None,
            answer: oneshot::channel().0,
        }
    }

    #[test]
    fn offers_are_batched_by_listener_within_the_fd_and_size_limits() {
        let mut offers: Vec<Offer> = (0..MAX_FDS_PER_MESSAGE + 3)
            .map(|_| offer("a", 0))
            .collect();
        offers.push(offer("b", 0));
        let sizes: Vec<(String, usize)> = batches(offers)
            .iter()
            .map(|b| (b[0].address.clone(), b.len()))
            .collect();
        assert_eq!(
            sizes,
            [
                ("a".into(), MAX_FDS_PER_MESSAGE),
                ("a".into(), 3),
                ("b".into(), 1)
            ]
        );
        let big: Vec<Offer> = (0..8).map(|_| offer("a", MAX_PENDING)).collect();
        let lens: Vec<usize> = batches(big).iter().map(Vec::len).collect();
        assert!(
            lens.len() > 1 && lens.iter().sum::<usize>() == 8,
            "{lens:?}"
        );
    }

    #[tokio::test]
    async fn a_batch_the_master_does_not_read_is_refused_and_an_answer_reaches_every_offer() {
        let (master, worker) = baton_wire::channel::pair().unwrap();
        let master = Channel::new(master).unwrap();
        let handover = Handover::new(Arc::new(Channel::new(worker).unwrap()), true);
        let (a, ()) = tokio::join!(
            handover.offer("127.0.0.1:1", fd(), b"GET".to_vec(), None),
            async {
                let got = master.recv::<WorkerMessage>().await.unwrap().unwrap();
                let WorkerMessage::Handover {
                    id, connections, ..
                } = got.message
                else {
                    panic!("{:?}", got.message);
                };
                assert_eq!(got.fds.len(), 1);
                assert_eq!(connections[0].pending, b"GET");
                handover.answer(id, Answer::Taken);
            }
        );
        assert_eq!(a, Answer::Taken);
        // The master gone: no answer comes, the copy is dropped.
        drop(master);
        let answer = handover.offer("127.0.0.1:1", fd(), Vec::new(), None).await;
        assert!(matches!(answer, Answer::Refused(_)), "{answer:?}");
    }

    #[tokio::test]
    async fn an_offer_meeting_a_full_channel_is_refused_at_once() {
        let (master, worker) = baton_wire::channel::pair().unwrap();
        let _master = Channel::new(master).unwrap();
        let worker = Arc::new(Channel::new(worker).unwrap());
        // The master reads nothing: its socket buffer fills up.
        while worker.try_send(&WorkerMessage::Ready, &[]).is_ok() {}
        let handover = Handover::new(worker, true);
        let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let answer = handover.offer("127.0.0.1:1", fd, Vec::new(), None).await;
        let Answer::Refused(reason) = answer else {
            panic!("{answer:?}");
        };
        assert!(reason.contains("send buffer full"), "{reason}");
    }

    /// A hub whose master reads nothing, taking connections on
    /// `127.0.0.1:1`: the master's end, the hub, and the adopted queue.
    fn adopting_hub() -> (Channel, Handover, mpsc::UnboundedReceiver<Adoptee>) {
        let (master, worker) = baton_wire::channel::pair().unwrap();
        let master = Channel::new(master).unwrap();
        let handover = Handover::new(Arc::new(Channel::new(worker).unwrap()), true);
        let adopted = handover.adopt_on("127.0.0.1:1").unwrap();
        (master, handover, adopted)
    }

    fn fd() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    #[tokio::test]
    async fn adopted_connections_reach_the_loop_of_their_listener_or_are_refused() {
        let (_master, handover, mut adopted) = adopting_hub();
        let conn = |p: &[u8]| HandedConnection {
            pending: p.to_vec(),
            session: None,
        };
        let answer = handover.adopt(1, "127.0.0.1:1", vec![conn(b"x")], vec![fd()], false, None);
        assert_eq!(
            answer,
            WorkerMessage::Adopted {
                id: 1,
                origin: None
            }
        );
        assert_eq!(adopted.try_recv().unwrap().pending, b"x");
        for (answer, reason) in [
            (
                handover.adopt(2, "127.0.0.1:2", vec![conn(b"")], vec![fd()], false, None),
                "does not serve",
            ),
            (
                handover.adopt(3, "127.0.0.1:1", vec![conn(b"")], vec![], true, None),
                "fd limit",
            ),
            (
                handover.adopt(4, "127.0.0.1:1", vec![conn(b"")], vec![], false, None),
                "1 connections with 0 fds",
            ),
        ] {
            let WorkerMessage::AdoptRefused { reason: got, .. } = &answer else {
                panic!("{answer:?}");
            };
            assert!(got.contains(reason), "{got}");
        }
        handover.stop_adopting("127.0.0.1:1");
        let answer = handover.adopt(5, "127.0.0.1:1", vec![conn(b"")], vec![fd()], false, None);
        assert!(matches!(answer, WorkerMessage::AdoptRefused { .. }));
    }

    #[cfg(feature = "http")]
    #[tokio::test]
    async fn a_session_is_adopted_only_by_a_worker_with_its_handler() {
        let (_master, handover, mut adopted) = adopting_hub();
        // Adopts one connection carrying a session of `kind` with `state`
        // bytes of state, as handover `id`.
        let adopt = |id: u64, kind: &str, state: usize| {
            let connection = HandedConnection {
                pending: b"\x81".to_vec(),
                session: Some(HandedSession {
                    kind: kind.into(),
                    state: vec![7; state],
                }),
            };
            handover.adopt(id, "127.0.0.1:1", vec![connection], vec![fd()], false, None)
        };
        let answer = adopt(1, "echo", 8);
        let WorkerMessage::AdoptRefused { reason, .. } = &answer else {
            panic!("{answer:?}");
        };
        assert!(
            reason.contains(r#"no session handler of kind "echo""#),
            "{reason}"
        );
        handover.resume_sessions("echo", Arc::new(|_raw, _state| Box::pin(async {})));
        let answer = adopt(2, "echo", 8);
        assert_eq!(
            answer,
            WorkerMessage::Adopted {
                id: 2,
                origin: None
            }
        );
        let adoptee = adopted.try_recv().unwrap();
        assert_eq!(adoptee.session.unwrap().state, vec![7; 8]);
        let answer = adopt(3, "echo", MAX_SESSION_STATE + 1);
        let WorkerMessage::AdoptRefused { reason, .. } = &answer else {
            panic!("{answer:?}");
        };
        assert!(reason.contains("over the limit"), "{reason}");
    }
}
