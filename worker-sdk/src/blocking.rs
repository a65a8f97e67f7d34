//! The SDK for plain std programs, without tokio: connect from the
//! environment, take std listeners by name, report readiness, and learn
//! when to drain through something a thread can block on or poll.
//!
//! ```no_run
//! # fn run() -> Result<(), baton_worker::Error> {
//! use std::time::Duration;
//!
//! let mut worker = baton_worker::blocking::Worker::builder()
//!     .listener("http", "127.0.0.1:8080") // used only when run standalone
//!     .start()?;
//! let listener = worker.tcp_listener("http")?; // non-blocking
//! worker.ready()?;
//! let drain = worker.drain();
//! while !drain.is_draining() {
//!     match listener.accept() {
//!         Ok((stream, _)) => { /* serve it, on a thread of its own */ }
//!         Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
//!             // Nothing queued: sleep a little, waking at once on drain.
//!             drain.wait_timeout(Duration::from_millis(5));
//!         }
//!         Err(e) => return Err(e.into()),
//!     }
//! }
//! // Finish what is in flight before `drain.deadline()`, then return.
//! # Ok(()) }
//! ```
//!
//! As with the async [`Worker`](crate::Worker), the master's drain message
//! starts the drain, and so does the control channel's end of file (the
//! master is gone), with the hello's drain timeout. SIGTERM or SIGINT starts
//! it too, under baton or standalone: call [`Builder::start`] before
//! starting other threads, which then inherit the blocked signals that a
//! thread of the SDK waits for.
//!
//! Listeners and sockets come non-blocking, as from the async SDK, and stay
//! so: every worker of a generation holds the same open socket, so its
//! `O_NONBLOCK` flag is theirs in common. A worker that made it blocking,
//! even for a moment, would leave a sibling already in its accept loop
//! asleep in `accept(2)` until a connection comes, deaf to the drain.

use crate::handshake::{self, Handshake, Hello, HELLO_TIMEOUT};
use crate::listener::{self, Listener};
use crate::{standalone, Error, ListenerInfo, ListenerKind};
use baton_wire::channel::{BlockingChannel, ChannelError};
use baton_wire::protocol::{MasterMessage, WorkerMessage, CONTROL_FD_ENV};
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The default drain deadline when running standalone.
const STANDALONE_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A std program's view of its supervisor (or of itself, standalone).
///
/// ```no_run
/// # fn run() -> Result<(), baton_worker::Error> {
/// let mut worker = baton_worker::blocking::Worker::builder()
///     .listener("http", "127.0.0.1:8080")
///     .start()?;
/// let listener = worker.tcp_listener("http")?;
/// worker.ready()?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Worker {
    generation: u64,
    index: u32,
    listeners: BTreeMap<String, Listener>,
    control: Option<Arc<BlockingChannel>>,
    drain: Drain,
    /// The reload's W3C `traceparent`, from the hello.
    traceparent: Option<String>,
}

/// Configures a worker that also runs without baton.
///
/// ```no_run
/// # fn run() -> Result<(), baton_worker::Error> {
/// let worker = baton_worker::blocking::Worker::builder()
///     .listener("http", "127.0.0.1:8080")
///     .drain_timeout(std::time::Duration::from_secs(10))
///     .start()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Default)]
pub struct Builder {
    listeners: Vec<(String, String)>,
    drain_timeout: Option<Duration>,
}

impl Builder {
    /// Declares a listener to bind when running standalone, in the
    /// configuration's notation (`127.0.0.1:8080`, `unix:/run/app.sock`,
    /// `udp:127.0.0.1:5353`). Under baton the master's listeners are used.
    ///
    /// ```no_run
    /// # fn run() -> Result<(), baton_worker::Error> {
    /// let worker = baton_worker::blocking::Worker::builder()
    ///     .listener("http", "127.0.0.1:8080")
    ///     .listener("admin", "unix:/run/app-admin.sock")
    ///     .start()?;
    /// # Ok(()) }
    /// ```
    pub fn listener(mut self, name: impl Into<String>, address: impl Into<String>) -> Builder {
        self.listeners.push((name.into(), address.into()));
        self
    }

    /// The drain deadline used standalone after SIGTERM or SIGINT (default 30 s).
    ///
    /// ```no_run
    /// # fn run() -> Result<(), baton_worker::Error> {
    /// let worker = baton_worker::blocking::Worker::builder()
    ///     .drain_timeout(std::time::Duration::from_secs(5))
    ///     .start()?;
    /// # Ok(()) }
    /// ```
    pub fn drain_timeout(mut self, timeout: Duration) -> Builder {
        self.drain_timeout = Some(timeout);
        self
    }

    /// Connects to the master if `BATON_CONTROL_FD` is set; otherwise takes
    /// systemd socket-activation fds or binds the declared listeners, and
    /// drains on SIGTERM or SIGINT.
    ///
    /// Before starting any thread (see the [module docs](self)):
    ///
    /// ```no_run
    /// fn main() -> Result<(), baton_worker::Error> {
    ///     let mut worker = baton_worker::blocking::Worker::builder()
    ///         .listener("http", "127.0.0.1:8080")
    ///         .start()?;
    ///     // ... now start threads, take listeners, `worker.ready()?` ...
    ///     Ok(())
    /// }
    /// ```
    pub fn start(self) -> Result<Worker, Error> {
        if std::env::var_os(CONTROL_FD_ENV).is_some() {
            return Worker::from_env();
        }
        let listeners = standalone::listeners(&self.listeners)?;
        let drain = Drain::new();
        let timeout = self.drain_timeout.unwrap_or(STANDALONE_DRAIN_TIMEOUT);
        spawn_signal_waiter(drain.clone(), timeout)?;
        Ok(Worker {
            generation: 0,
            index: 0,
            listeners,
            control: None,
            drain,
            traceparent: crate::context::traceparent(),
        })
    }
}

impl Worker {
    /// A builder for a worker that runs under baton or standalone.
    ///
    /// ```no_run
    /// # fn run() -> Result<(), baton_worker::Error> {
    /// let worker = baton_worker::blocking::Worker::builder().start()?;
    /// # Ok(()) }
    /// ```
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Connects to the master through `BATON_CONTROL_FD`: reads the hello and
    /// every listener, checking each fd against its metadata, and starts the
    /// thread that watches the channel for the drain.
    ///
    /// A program that only ever runs under baton:
    ///
    /// ```no_run
    /// # fn run() -> Result<(), baton_worker::Error> {
    /// let mut worker = baton_worker::blocking::Worker::from_env()?;
    /// # Ok(()) }
    /// ```
    pub fn from_env() -> Result<Worker, Error> {
        let channel = Arc::new(BlockingChannel::new(handshake::control_fd_from_env()?)?);
        let deadline = Instant::now() + HELLO_TIMEOUT;
        let mut handshake = Handshake::default();
        let hello = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let step = match channel.recv::<MasterMessage>(Some(left)) {
                Err(ChannelError::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut => Err(
                    Error::Protocol(format!("no hello from the master within {HELLO_TIMEOUT:?}")),
                ),
                received => handshake::received(received).and_then(|r| handshake.feed(r)),
            };
            match step {
                Ok(true) => break handshake.finish(),
                Ok(false) => {}
                Err(error) => {
                    let message = error.to_string();
                    let _ = channel.try_send(&WorkerMessage::Error { message });
                    return Err(error);
                }
            }
        };
        let Hello {
            generation,
            worker_index,
            drain_timeout,
            listeners,
            app_files,
            log_filter: _,
            traceparent,
            // Its connections are its own: it neither offers nor adopts any.
            handover: _,
        } = hello;
        if app_files.is_some() {
            let error = Error::Protocol(
                "`[worker] app_config` needs the async SDK (baton_worker::Worker); \
                 the blocking SDK does not reload app config files"
                    .into(),
            );
            let message = error.to_string();
            let _ = channel.try_send(&WorkerMessage::Error { message });
            return Err(error);
        }
        let drain = Drain::new();
        spawn_control_reader(channel.clone(), drain.clone(), drain_timeout)?;
        // As for the async worker: a SIGTERM or SIGINT that reaches the
        // worker past the master asks for a drain too.
        spawn_signal_waiter(drain.clone(), drain_timeout)?;
        Ok(Worker {
            generation,
            index: worker_index,
            listeners,
            control: Some(channel),
            drain,
            traceparent: traceparent.or_else(crate::context::traceparent),
        })
    }

    /// The generation this worker belongs to; 0 when standalone.
    ///
    /// ```no_run
    /// # fn run(worker: &baton_worker::blocking::Worker) {
    /// println!("generation {} worker {}", worker.generation(), worker.index());
    /// # }
    /// ```
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The worker's index within its generation; 0 when standalone.
    ///
    /// ```no_run
    /// # fn run(worker: &baton_worker::blocking::Worker) {
    /// let runs_jobs = worker.index() == 0;
    /// # }
    /// ```
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The W3C `traceparent` of the reload that started this worker, as
    /// [`crate::Worker::traceparent`] gives it.
    ///
    /// ```no_run
    /// # fn run(worker: &baton_worker::blocking::Worker) {
    /// if let Some(parent) = worker.traceparent() {
    ///     println!("started by the reload {parent}");
    /// }
    /// # }
    /// ```
    pub fn traceparent(&self) -> Option<&str> {
        self.traceparent.as_deref()
    }

    /// Whether a baton master supervises this worker.
    ///
    /// ```no_run
    /// # fn run(worker: &baton_worker::blocking::Worker) {
    /// if !worker.is_supervised() {
    ///     eprintln!("running standalone: Ctrl-C drains");
    /// }
    /// # }
    /// ```
    pub fn is_supervised(&self) -> bool {
        self.control.is_some()
    }

    /// The names and metadata of the listeners not yet taken.
    ///
    /// ```no_run
    /// # fn run(worker: &baton_worker::blocking::Worker) {
    /// for listener in worker.listeners() {
    ///     println!("{} is {} {}", listener.name, listener.kind, listener.address);
    /// }
    /// # }
    /// ```
    pub fn listeners(&self) -> impl Iterator<Item = &ListenerInfo> {
        self.listeners.values().map(|l| &l.info)
    }

    /// Takes the TCP listener named `name`, non-blocking (see the [module
    /// docs](self) for why): `accept` says `WouldBlock` when nothing is
    /// queued.
    ///
    /// ```no_run
    /// # fn run(mut worker: baton_worker::blocking::Worker) -> Result<(), baton_worker::Error> {
    /// let listener = worker.tcp_listener("http")?;
    /// worker.ready()?;
    /// let drain = worker.drain();
    /// while !drain.is_draining() {
    ///     match listener.accept() {
    ///         Ok((stream, peer)) => { /* serve it on a thread */ }
    ///         Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
    ///             drain.wait_timeout(std::time::Duration::from_millis(5));
    ///         }
    ///         Err(e) => return Err(e.into()),
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn tcp_listener(&mut self, name: &str) -> Result<std::net::TcpListener, Error> {
        let fd = listener::take(&mut self.listeners, name, ListenerKind::Tcp)?;
        let listener = std::net::TcpListener::from(fd);
        listener.set_nonblocking(true)?;
        Ok(listener)
    }

    /// Takes the Unix stream listener named `name`, non-blocking as
    /// [`tcp_listener`](Worker::tcp_listener)'s.
    ///
    /// ```no_run
    /// # fn run(mut worker: baton_worker::blocking::Worker) -> Result<(), baton_worker::Error> {
    /// let admin = worker.unix_listener("admin")?;
    /// match admin.accept() {
    ///     Ok((stream, _)) => { /* serve it */ }
    ///     Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => { /* none queued */ }
    ///     Err(e) => return Err(e.into()),
    /// }
    /// # Ok(()) }
    /// ```
    pub fn unix_listener(&mut self, name: &str) -> Result<std::os::unix::net::UnixListener, Error> {
        let fd = listener::take(&mut self.listeners, name, ListenerKind::Unix)?;
        let listener = std::os::unix::net::UnixListener::from(fd);
        listener.set_nonblocking(true)?;
        Ok(listener)
    }

    /// Takes the UDP socket named `name`, non-blocking as
    /// [`tcp_listener`](Worker::tcp_listener)'s.
    ///
    /// ```no_run
    /// # fn run(mut worker: baton_worker::blocking::Worker) -> Result<(), baton_worker::Error> {
    /// let socket = worker.udp_socket("dns")?;
    /// let drain = worker.drain();
    /// let mut packet = [0u8; 512];
    /// while !drain.is_draining() {
    ///     match socket.recv_from(&mut packet) {
    ///         Ok((len, from)) => { /* answer it */ }
    ///         Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
    ///             drain.wait_timeout(std::time::Duration::from_millis(5));
    ///         }
    ///         Err(e) => return Err(e.into()),
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn udp_socket(&mut self, name: &str) -> Result<std::net::UdpSocket, Error> {
        let fd = listener::take(&mut self.listeners, name, ListenerKind::Udp)?;
        let socket = std::net::UdpSocket::from(fd);
        socket.set_nonblocking(true)?;
        Ok(socket)
    }

    /// Takes the raw fd of the listener named `name`, whatever its kind.
    ///
    /// ```no_run
    /// # fn run(mut worker: baton_worker::blocking::Worker) -> Result<(), baton_worker::Error> {
    /// let (info, fd) = worker.take_fd("http")?;
    /// println!("{} on {}", info.name, info.address);
    /// # Ok(()) }
    /// ```
    pub fn take_fd(&mut self, name: &str) -> Result<(ListenerInfo, OwnedFd), Error> {
        listener::take_fd(&mut self.listeners, name)
    }

    /// Tells the master this worker serves. Standalone, does nothing.
    ///
    /// ```no_run
    /// # fn run(mut worker: baton_worker::blocking::Worker) -> Result<(), baton_worker::Error> {
    /// let listener = worker.tcp_listener("http")?;
    /// worker.ready()?; // from now on the master may retire the previous generation
    /// # Ok(()) }
    /// ```
    pub fn ready(&self) -> Result<(), Error> {
        if let Some(control) = &self.control {
            control
                .send(&WorkerMessage::Ready)
                .map_err(Error::channel)?;
        }
        Ok(())
    }

    /// Reports the number of open connections (shown in `baton status`).
    /// Best effort: never waits.
    ///
    /// ```no_run
    /// # fn run(worker: &baton_worker::blocking::Worker, open: &[std::thread::JoinHandle<()>]) {
    /// let open = open.iter().filter(|c| !c.is_finished()).count();
    /// worker.report_connections(open as u64);
    /// # }
    /// ```
    pub fn report_connections(&self, count: u64) {
        if let Some(control) = &self.control {
            let _ = control.try_send(&WorkerMessage::Connections { count });
        }
    }

    /// The drain signal.
    ///
    /// ```no_run
    /// # fn run(worker: &baton_worker::blocking::Worker) {
    /// let drain = worker.drain();
    /// std::thread::spawn(move || {
    ///     let deadline = drain.wait();
    ///     // stop the accept loop, finish before `deadline`
    /// });
    /// # }
    /// ```
    pub fn drain(&self) -> Drain {
        self.drain.clone()
    }
}

/// Cloneable handle on the worker's drain state, for threads to block on
/// ([`wait`](Drain::wait), [`wait_timeout`](Drain::wait_timeout)) or poll
/// ([`is_draining`](Drain::is_draining)).
///
/// ```no_run
/// # fn run(worker: &baton_worker::blocking::Worker, listener: std::net::TcpListener) -> std::io::Result<()> {
/// use std::time::Duration;
///
/// let drain = worker.drain();
/// while !drain.is_draining() {
///     match listener.accept() {
///         Ok((stream, _)) => { /* serve it on a thread */ }
///         Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
///             drain.wait_timeout(Duration::from_millis(5));
///         }
///         Err(e) => return Err(e),
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Drain {
    state: Arc<(Mutex<Option<Instant>>, Condvar)>,
}

impl Drain {
    /// A drain that has not started.
    fn new() -> Drain {
        Drain {
            state: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.state.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts draining with `within` left until the deadline. Later calls
    /// only move the deadline earlier.
    fn start(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let mut slot = self.lock();
        *slot = Some(slot.map_or(deadline, |d| d.min(deadline)));
        self.state.1.notify_all();
    }

    /// Whether draining has started.
    ///
    /// ```no_run
    /// # fn run(drain: &baton_worker::blocking::Drain) {
    /// while !drain.is_draining() {
    ///     // accept and serve
    /// }
    /// # }
    /// ```
    pub fn is_draining(&self) -> bool {
        self.lock().is_some()
    }

    /// The deadline by which the worker must have exited, once draining.
    ///
    /// ```no_run
    /// # fn run(drain: &baton_worker::blocking::Drain, connections: Vec<std::thread::JoinHandle<()>>) {
    /// use std::time::Instant;
    ///
    /// let deadline = drain.deadline().unwrap_or_else(Instant::now);
    /// while connections.iter().any(|c| !c.is_finished()) && Instant::now() < deadline {
    ///     std::thread::sleep(std::time::Duration::from_millis(10));
    /// }
    /// # }
    /// ```
    pub fn deadline(&self) -> Option<Instant> {
        *self.lock()
    }

    /// Blocks until draining starts; returns the deadline.
    ///
    /// ```no_run
    /// # fn run(worker: &baton_worker::blocking::Worker) {
    /// let deadline = worker.drain().wait(); // blocks this thread until the drain
    /// # }
    /// ```
    pub fn wait(&self) -> Instant {
        let mut slot = self.lock();
        loop {
            if let Some(deadline) = *slot {
                return deadline;
            }
            slot = self.state.1.wait(slot).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Blocks until draining starts or `timeout` passes; returns the
    /// deadline once draining.
    ///
    /// ```no_run
    /// # fn run(drain: &baton_worker::blocking::Drain) {
    /// // Sleeps at most 5 ms, waking at once when the drain starts.
    /// if let Some(deadline) = drain.wait_timeout(std::time::Duration::from_millis(5)) {
    ///     println!("draining until {deadline:?}");
    /// }
    /// # }
    /// ```
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Instant> {
        let slot = self.lock();
        let (slot, _) = self
            .state
            .1
            .wait_timeout_while(slot, timeout, |deadline| deadline.is_none())
            .unwrap_or_else(|e| e.into_inner());
        *slot
    }
}

/// Watches the channel for the rest of the worker's life on a thread of its
/// own. A drain message starts the drain; end of file (the master is gone)
/// or a broken channel starts it too, with the hello's deadline.
fn spawn_control_reader(
    channel: Arc<BlockingChannel>,
    drain: Drain,
    drain_timeout: Duration,
) -> Result<(), Error> {
    std::thread::Builder::new()
        .name("baton-control".into())
        .spawn(move || loop {
            match channel.recv::<MasterMessage>(None) {
                Ok(Some(received)) => {
                    if let MasterMessage::Drain { deadline_ms } = received.message {
                        drain.start(Duration::from_millis(deadline_ms));
                    }
                }
                Ok(None) | Err(_) => {
                    drain.start(drain_timeout);
                    return;
                }
            }
        })?;
    Ok(())
}

/// Blocks SIGTERM and SIGINT in this thread (and so in the threads it starts
/// later) and waits for them on a thread of the SDK's.
fn spawn_signal_waiter(drain: Drain, timeout: Duration) -> Result<(), Error> {
    use nix::sys::signal::{SigSet, Signal};
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().map_err(std::io::Error::from)?;
    std::thread::Builder::new()
        .name("baton-signals".into())
        .spawn(move || {
            if signals.wait().is_ok() {
                drain.start(timeout);
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn taking_a_listener_never_makes_a_siblings_accept_block() {
        // The sibling: a worker of the same generation already in its
        // accept loop, on the same open socket (SCM_RIGHTS shares it as
        // dup does, O_NONBLOCK included).
        let sibling = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        sibling.set_nonblocking(true).unwrap();
        let info = ListenerInfo {
            name: "http".into(),
            kind: ListenerKind::Tcp,
            address: sibling.local_addr().unwrap().to_string(),
            quic_slot: None,
        };
        // This worker's copy, as the hello gives it.
        let fd = OwnedFd::from(sibling.try_clone().unwrap());
        let mut worker = Worker {
            generation: 1,
            index: 1,
            listeners: BTreeMap::from([("http".to_string(), Listener { info, fd })]),
            control: None,
            drain: Drain::new(),
            traceparent: None,
        };
        let taken = worker.tcp_listener("http").unwrap();
        // Checked on the flag, not by accepting: on a blocking socket the
        // sibling's accept would sleep until a connection came, past any
        // drain, and so would this test.
        let flags = nix::fcntl::fcntl(sibling.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).unwrap();
        assert!(
            nix::fcntl::OFlag::from_bits_truncate(flags).contains(nix::fcntl::OFlag::O_NONBLOCK),
            "taking the listener made the shared socket blocking"
        );
        for listener in [&sibling, &taken] {
            let e = listener.accept().unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        }
    }

    #[test]
    fn drain_wakes_a_blocked_thread_with_the_earliest_deadline() {
        let drain = Drain::new();
        assert_eq!(drain.wait_timeout(Duration::from_millis(10)), None);
        let waiter = {
            let drain = drain.clone();
            std::thread::spawn(move || drain.wait())
        };
        drain.start(Duration::from_secs(60));
        let first = waiter.join().unwrap();
        drain.start(Duration::from_secs(1));
        assert!(drain.is_draining());
        assert!(
            drain.deadline().unwrap() < first,
            "a second drain moves it earlier"
        );
        assert_eq!(drain.wait_timeout(Duration::ZERO), drain.deadline());
    }
}
