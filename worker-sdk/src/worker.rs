//! The worker's handle on its supervisor: connect, take listeners by name,
//! report readiness, learn when to drain.

use crate::app_config::Reloadable;
use crate::app_config::{AppConfig, Files};
use crate::control::{self, Handles, Reporter};
use crate::drain::Drain;
use crate::handshake::{self, Handshake, Hello, HELLO_TIMEOUT};
use crate::listener::{self, Listener};
use crate::reopen::{self, Reopen};
use crate::{standalone, Error, ListenerInfo, ListenerKind};
use baton_wire::channel::{Channel, Received};
use baton_wire::protocol::{MasterMessage, WorkerMessage, CONTROL_FD_ENV};
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The default drain deadline when running standalone.
const STANDALONE_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A worker process's view of its supervisor (or of itself, standalone).
///
/// ```no_run
/// # async fn run() -> Result<(), baton_worker::Error> {
/// let mut worker = baton_worker::Worker::builder()
///     .listener("http", "127.0.0.1:8080") // bound by the program itself when standalone
///     .start()
///     .await?;
/// let listener = worker.tcp_listener("http")?;
/// worker.ready().await?;
/// # drop(listener);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Worker {
    generation: u64,
    index: u32,
    listeners: BTreeMap<String, Listener>,
    control: Option<Arc<Channel>>,
    drain: Drain,
    reopen: Reopen,
    app: App,
    /// The reload's W3C `traceparent`, from the hello.
    traceparent: Option<String>,
    /// Connections moving to and from other workers (supervised only).
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    handover: Option<crate::handover::Handover>,
}

/// The worker's side of in-place reloads.
#[derive(Default)]
struct App {
    /// The app config files the worker starts with, and their version.
    initial: Option<(String, Files)>,
    /// The workers' log filter the worker starts with (`[worker] log_filter`).
    log_filter: Option<String>,
    /// Standalone: the files to read.
    paths: Vec<std::path::PathBuf>,
    /// The registered handles, driven by the control channel.
    handles: Handles,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("initial", &self.initial.as_ref().map(|(v, _)| v))
            .field("paths", &self.paths)
            .finish()
    }
}

/// Configures a worker that also runs without baton.
///
/// ```no_run
/// # async fn run() -> Result<(), baton_worker::Error> {
/// use std::time::Duration;
///
/// let worker = baton_worker::Worker::builder()
///     .listener("http", "127.0.0.1:8080")
///     .listener("admin", "unix:/run/app-admin.sock")
///     .drain_timeout(Duration::from_secs(10))
///     .start()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Default)]
pub struct Builder {
    listeners: Vec<(String, String)>,
    drain_timeout: Option<Duration>,
    app_config: Vec<std::path::PathBuf>,
}

impl Builder {
    /// Declares a listener to bind when running standalone. `address` uses the
    /// configuration's notation: `127.0.0.1:8080`, `[::1]:8080`,
    /// `unix:/run/app.sock` or `udp:127.0.0.1:5353`. Under baton the master's
    /// listeners are used instead.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), baton_worker::Error> {
    /// let worker = baton_worker::Worker::builder()
    ///     .listener("http", "[::1]:8080")
    ///     .listener("dns", "udp:127.0.0.1:5353")
    ///     .start()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn listener(mut self, name: impl Into<String>, address: impl Into<String>) -> Builder {
        self.listeners.push((name.into(), address.into()));
        self
    }

    /// An application config file read by [`Worker::app_config`] when
    /// running standalone (under baton, `[worker] app_config` names them).
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), baton_worker::Error> {
    /// let mut worker = baton_worker::Worker::builder()
    ///     .app_config_file("limits.toml")
    ///     .start()
    ///     .await?;
    /// let limits = worker.app_config(|files| files.only_text().map(str::to_string))?;
    /// # Ok(()) }
    /// ```
    pub fn app_config_file(mut self, path: impl Into<std::path::PathBuf>) -> Builder {
        self.app_config.push(path.into());
        self
    }

    /// The drain deadline used standalone after SIGTERM or SIGINT (default 30 s).
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), baton_worker::Error> {
    /// let worker = baton_worker::Worker::builder()
    ///     .drain_timeout(std::time::Duration::from_secs(5))
    ///     .start()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn drain_timeout(mut self, timeout: Duration) -> Builder {
        self.drain_timeout = Some(timeout);
        self
    }

    /// Connects to the master if `BATON_CONTROL_FD` is set; otherwise takes
    /// systemd socket-activation fds (`LISTEN_FDS`) or binds the declared
    /// listeners, and drains on SIGTERM or SIGINT.
    ///
    /// ```no_run
    /// #[tokio::main]
    /// async fn main() -> Result<(), baton_worker::Error> {
    ///     let mut worker = baton_worker::Worker::builder()
    ///         .listener("http", "127.0.0.1:8080")
    ///         .start()
    ///         .await?;
    ///     // ... take listeners, then `worker.ready().await?` ...
    ///     Ok(())
    /// }
    /// ```
    pub async fn start(self) -> Result<Worker, Error> {
        if std::env::var_os(CONTROL_FD_ENV).is_some() {
            return Worker::from_env().await;
        }
        let app = App {
            paths: self.app_config,
            ..App::default()
        };
        let listeners = standalone::listeners(&self.listeners)?;
        let drain = Drain::new();
        let (reopen_tx, reopen) = Reopen::channel();
        spawn_signal_handlers(
            drain.clone(),
            self.drain_timeout.unwrap_or(STANDALONE_DRAIN_TIMEOUT),
            Some(reopen_tx),
        )?;
        Ok(Worker {
            generation: 0,
            index: 0,
            listeners,
            control: None,
            drain,
            reopen,
            app,
            traceparent: crate::context::traceparent(),
            handover: None,
        })
    }
}

impl Worker {
    /// A builder for a worker that runs under baton or standalone.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), baton_worker::Error> {
    /// let worker = baton_worker::Worker::builder().start().await?;
    /// # Ok(()) }
    /// ```
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Connects to the master through `BATON_CONTROL_FD`: reads the hello and
    /// every listener, checking each fd against its metadata. Must be called
    /// inside a tokio runtime. From then on SIGTERM and SIGINT start a drain
    /// (with the master's drain timeout) instead of killing the process.
    ///
    /// A program that only ever runs under baton:
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), baton_worker::Error> {
    /// let mut worker = baton_worker::Worker::from_env().await?;
    /// # Ok(()) }
    /// ```
    pub async fn from_env() -> Result<Worker, Error> {
        let fd = handshake::control_fd_from_env()?;
        let channel = Arc::new(Channel::new(fd)?);
        match tokio::time::timeout(HELLO_TIMEOUT, handshake(&channel)).await {
            Ok(Ok(worker)) => Ok(worker),
            Ok(Err(error)) => {
                let _ = channel.try_send(
                    &WorkerMessage::Error {
                        message: error.to_string(),
                    },
                    &[],
                );
                Err(error)
            }
            Err(_) => Err(Error::Protocol(format!(
                "no hello from the master within {HELLO_TIMEOUT:?}"
            ))),
        }
    }

    /// The generation this worker belongs to; 0 when standalone.
    ///
    /// ```no_run
    /// # fn run(worker: &baton_worker::Worker) {
    /// println!("generation {} worker {}", worker.generation(), worker.index());
    /// # }
    /// ```
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The worker's index within its generation; 0 when standalone.
    ///
    /// ```no_run
    /// # fn run(worker: &baton_worker::Worker) {
    /// // One worker of each generation runs the periodic job.
    /// let runs_jobs = worker.index() == 0;
    /// # }
    /// ```
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The W3C `traceparent` (`00-TRACEID-SPANID-FLAGS`) of the reload that
    /// started this worker, when the master exports traces (`[supervisor]
    /// otlp_endpoint`): the master's hello carries it, as does
    /// `TRACEPARENT`. It names the reload's spawn phase, so a span the
    /// worker parents on it (its startup) or links to it (its requests)
    /// shows in the reload's trace. `None` otherwise.
    ///
    /// ```no_run
    /// # fn run(worker: &baton_worker::Worker) {
    /// if let Some(parent) = worker.traceparent() {
    ///     // e.g. extract it with opentelemetry's TraceContextPropagator and
    ///     // parent the startup span on it
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
    /// # fn run(worker: &baton_worker::Worker) {
    /// if !worker.is_supervised() {
    ///     eprintln!("running standalone: Ctrl-C drains");
    /// }
    /// # }
    /// ```
    pub fn is_supervised(&self) -> bool {
        self.control.is_some()
    }

    /// Whether [`Worker::app_config`] has files to build from: the
    /// master sent `[worker] app_config`, or (standalone) the builder named
    /// some with [`Builder::app_config_file`].
    ///
    /// ```no_run
    /// # fn run(mut worker: baton_worker::Worker) -> Result<(), baton_worker::Error> {
    /// let greeting = if worker.has_app_config() {
    ///     Some(worker.app_config(|files| files.only_text().map(str::to_string))?)
    /// } else {
    ///     None // built-in defaults
    /// };
    /// # Ok(()) }
    /// ```
    pub fn has_app_config(&self) -> bool {
        match &self.control {
            Some(_) => self.app.initial.is_some(),
            None => !self.app.paths.is_empty(),
        }
    }

    /// The names and metadata of the listeners not yet taken.
    ///
    /// ```no_run
    /// # fn run(worker: &baton_worker::Worker) {
    /// for listener in worker.listeners() {
    ///     println!("{} is {} {}", listener.name, listener.kind, listener.address);
    /// }
    /// # }
    /// ```
    pub fn listeners(&self) -> impl Iterator<Item = &ListenerInfo> {
        self.listeners.values().map(|l| &l.info)
    }

    /// Takes the TCP listener named `name`.
    ///
    /// ```no_run
    /// # async fn run(mut worker: baton_worker::Worker) -> Result<(), baton_worker::Error> {
    /// let listener = worker.tcp_listener("http")?;
    /// worker.ready().await?;
    /// let (stream, peer) = listener.accept().await?;
    /// # Ok(()) }
    /// ```
    pub fn tcp_listener(&mut self, name: &str) -> Result<tokio::net::TcpListener, Error> {
        let fd = self.take(name, ListenerKind::Tcp)?;
        let std = std::net::TcpListener::from(fd);
        std.set_nonblocking(true)?;
        Ok(tokio::net::TcpListener::from_std(std)?)
    }

    /// Takes the Unix stream listener named `name`.
    ///
    /// ```no_run
    /// # async fn run(mut worker: baton_worker::Worker) -> Result<(), baton_worker::Error> {
    /// let admin = worker.unix_listener("admin")?;
    /// let (stream, _) = admin.accept().await?;
    /// # Ok(()) }
    /// ```
    pub fn unix_listener(&mut self, name: &str) -> Result<tokio::net::UnixListener, Error> {
        let fd = self.take(name, ListenerKind::Unix)?;
        let std = std::os::unix::net::UnixListener::from(fd);
        std.set_nonblocking(true)?;
        Ok(tokio::net::UnixListener::from_std(std)?)
    }

    /// Takes the UDP socket named `name`.
    ///
    /// ```no_run
    /// # async fn run(mut worker: baton_worker::Worker) -> Result<(), baton_worker::Error> {
    /// let socket = worker.udp_socket("dns")?;
    /// let mut packet = [0u8; 512];
    /// let (len, from) = socket.recv_from(&mut packet).await?;
    /// # Ok(()) }
    /// ```
    pub fn udp_socket(&mut self, name: &str) -> Result<tokio::net::UdpSocket, Error> {
        let fd = self.take(name, ListenerKind::Udp)?;
        let std = std::net::UdpSocket::from(fd);
        std.set_nonblocking(true)?;
        Ok(tokio::net::UdpSocket::from_std(std)?)
    }

    /// Takes the raw fd of the listener named `name`, whatever its kind.
    ///
    /// For a socket the SDK does not wrap, or to hand to another library:
    ///
    /// ```no_run
    /// # fn run(mut worker: baton_worker::Worker) -> Result<(), baton_worker::Error> {
    /// let (info, fd) = worker.take_fd("http")?;
    /// let listener = std::net::TcpListener::from(fd);
    /// # Ok(()) }
    /// ```
    pub fn take_fd(&mut self, name: &str) -> Result<(ListenerInfo, OwnedFd), Error> {
        listener::take_fd(&mut self.listeners, name)
    }

    fn take(&mut self, name: &str, kind: ListenerKind) -> Result<OwnedFd, Error> {
        listener::take(&mut self.listeners, name, kind)
    }

    /// Tells the master this worker serves. Standalone, does nothing.
    ///
    /// Call it once every listener is taken and the program can serve: until
    /// then the previous generation keeps serving alone.
    ///
    /// ```no_run
    /// # async fn run(mut worker: baton_worker::Worker) -> Result<(), baton_worker::Error> {
    /// let listener = worker.tcp_listener("http")?;
    /// // ... warm caches, open pools ...
    /// worker.ready().await?;
    /// # Ok(()) }
    /// ```
    pub async fn ready(&self) -> Result<(), Error> {
        if let Some(control) = &self.control {
            control
                .send(&WorkerMessage::Ready)
                .await
                .map_err(Error::channel)?;
        }
        Ok(())
    }

    /// Reports the number of open connections (shown in `baton status`).
    /// Best effort: never waits.
    ///
    /// [`Worker::serve`] and [`Worker::serve_options`] report for you; a
    /// hand-written accept loop reports its own count:
    ///
    /// ```no_run
    /// # fn run(worker: &baton_worker::Worker, open: &std::sync::atomic::AtomicU64) {
    /// worker.report_connections(open.load(std::sync::atomic::Ordering::Relaxed));
    /// # }
    /// ```
    pub fn report_connections(&self, count: u64) {
        self.reporter().report_connections(count);
    }

    /// The worker's kinds of WebSocket sessions, which move to the next
    /// generation at a reload (see [`ws`](crate::ws)). Standalone, sessions
    /// are served and closed at the drain.
    ///
    /// ```no_run
    /// # fn run(worker: &baton_worker::Worker) {
    /// let echo = worker.sessions().route("echo", |session| async move { drop(session) });
    /// # }
    /// ```
    #[cfg(feature = "ws")]
    pub fn sessions(&self) -> crate::ws::Sessions {
        crate::ws::Sessions::new(self.handover.clone())
    }

    /// The worker's handovers, when supervised.
    #[cfg(feature = "http")]
    pub(crate) fn handover(&self) -> Option<crate::handover::Handover> {
        self.handover.clone()
    }

    /// A handle that reports connections, for hooks that outlive `&self`.
    pub(crate) fn reporter(&self) -> Reporter {
        Reporter::new(self.control.clone())
    }

    /// The kind of the listener `name`, if it was received and not taken.
    #[cfg(feature = "http")]
    pub(crate) fn listener_kind(&self, name: &str) -> Option<ListenerKind> {
        self.listeners.get(name).map(|l| l.info.kind)
    }

    /// Registers how to build the application's configuration from the
    /// bytes of its files, and returns the reload handle: a reload that
    /// changes only `[worker] app_config` files (or `log_filter`) then runs
    /// in place, calling `parse` on the new bytes and swapping the value in
    /// only when every worker accepted it (see [`AppConfig`]).
    /// An `Err` from `parse` is the worker's refusal, shown by `baton
    /// reload`. Standalone, the files are read from disk (those given to
    /// [`Builder::app_config_file`]), so the program runs unchanged in
    /// development.
    ///
    /// ```no_run
    /// # fn run(mut worker: baton_worker::Worker) -> Result<(), baton_worker::Error> {
    /// #[derive(serde::Deserialize)]
    /// struct Limits {
    ///     rate: u32,
    /// }
    ///
    /// let limits = worker.app_config(|files| {
    ///     let limits: Limits = toml::from_str(files.text("limits.toml")?).map_err(|e| e.to_string())?;
    ///     if limits.rate == 0 {
    ///         return Err("rate must be > 0".to_string()); // `baton reload` shows it
    ///     }
    ///     Ok(limits)
    /// })?;
    /// // In a request:
    /// let rate = limits.load().rate;
    /// # Ok(()) }
    /// ```
    pub fn app_config<T, E>(
        &mut self,
        parse: impl Fn(&Files) -> Result<T, E> + Send + Sync + 'static,
    ) -> Result<AppConfig<T>, Error>
    where
        T: Send + Sync + 'static,
        E: std::fmt::Display,
    {
        let parse = move |files: &Files| parse(files).map_err(|e| e.to_string());
        let (version, files) = match (&self.control, self.app.initial.clone()) {
            (Some(_), Some(initial)) => initial,
            (Some(_), None) => {
                return Err(Error::AppConfig(
                    "the master sent no app config files: set [worker] app_config".into(),
                ))
            }
            (None, _) => {
                let mut files = Vec::new();
                for path in &self.app.paths {
                    let bytes = std::fs::read(path).map_err(|e| {
                        Error::AppConfig(format!("reading {}: {e}", path.display()))
                    })?;
                    files.push((path.display().to_string(), bytes));
                }
                let files = Files::new(files);
                (crate::app_config::standalone_version(&files), files)
            }
        };
        let config = AppConfig::new(version.clone(), &files, parse).map_err(Error::AppConfig)?;
        self.app
            .handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(config.reloadable());
        if let Some(control) = &self.control {
            let _ = control.try_send(&WorkerMessage::AppRegistered { version }, &[]);
        }
        Ok(config)
    }

    /// Registers a handle that another part of the SDK drives (the log
    /// filter), announcing it to the master.
    #[cfg_attr(not(feature = "tracing"), allow(dead_code))]
    pub(crate) fn register(&mut self, handle: Arc<dyn Reloadable>) {
        self.app
            .handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle);
        if let (Some(control), Some((version, _))) = (&self.control, &self.app.initial) {
            let _ = control.try_send(
                &WorkerMessage::AppRegistered {
                    version: version.clone(),
                },
                &[],
            );
        }
    }

    /// The log filter the master sent, if any.
    #[cfg_attr(not(feature = "tracing"), allow(dead_code))]
    pub(crate) fn initial_log_filter(&self) -> Option<&str> {
        self.app.log_filter.as_deref()
    }

    /// The drain signal: select on [`Drain::wait`] or [`Drain::token`].
    ///
    /// ```no_run
    /// # async fn run(worker: baton_worker::Worker) {
    /// let drain = worker.drain();
    /// let deadline = drain.wait().await;
    /// # }
    /// ```
    pub fn drain(&self) -> Drain {
        self.drain.clone()
    }

    /// Reopen requests (`baton reopen`; SIGUSR1 when standalone).
    ///
    /// ```no_run
    /// # async fn run(worker: baton_worker::Worker) {
    /// let mut reopen = worker.reopen();
    /// tokio::spawn(async move {
    ///     while reopen.requested().await {
    ///         // reopen the access log at its path
    ///     }
    /// });
    /// # }
    /// ```
    pub fn reopen(&self) -> Reopen {
        self.reopen.clone()
    }
}

async fn handshake(channel: &Arc<Channel>) -> Result<Worker, Error> {
    let mut handshake = Handshake::default();
    while !handshake.feed(recv_master(channel).await?)? {}
    let Hello {
        generation,
        worker_index,
        drain_timeout,
        listeners,
        app_files,
        log_filter,
        traceparent,
        handover,
    } = handshake.finish();
    let app = App {
        initial: app_files,
        log_filter,
        ..App::default()
    };
    let drain = Drain::new();
    let (reopen_tx, reopen) = Reopen::channel();
    let handover = crate::handover::Handover::new(channel.clone(), handover);
    control::spawn_reader(
        channel.clone(),
        drain.clone(),
        drain_timeout,
        reopen_tx,
        app.handles.clone(),
        handover.clone(),
    );
    // A SIGTERM or SIGINT that reaches the worker past the master (a
    // container runtime or `kill` aimed at every process, the master's fast
    // stop) asks for a drain too: requests in flight complete.
    spawn_signal_handlers(drain.clone(), drain_timeout, None)?;
    Ok(Worker {
        generation,
        index: worker_index,
        listeners,
        control: Some(channel.clone()),
        drain,
        reopen,
        app,
        traceparent: traceparent.or_else(crate::context::traceparent),
        handover: Some(handover),
    })
}

async fn recv_master(channel: &Channel) -> Result<Received<MasterMessage>, Error> {
    handshake::received(channel.recv::<MasterMessage>().await)
}

/// Drains on SIGTERM or SIGINT within `timeout`; with `reopen` (standalone),
/// SIGUSR1 requests a reopen (under baton that comes over the channel).
fn spawn_signal_handlers(
    drain: Drain,
    timeout: Duration,
    reopen: Option<watch::Sender<u64>>,
) -> Result<(), Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut usr1 = match reopen {
        Some(_) => Some(signal(SignalKind::user_defined1())?),
        None => None,
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = next_signal(&mut usr1) => {
                    if let Some(reopen) = &reopen {
                        reopen::request(reopen);
                    }
                }
            }
        }
        drain.start(timeout);
    });
    Ok(())
}

/// The next delivery of `signal`, or never without one.
async fn next_signal(signal: &mut Option<tokio::signal::unix::Signal>) {
    match signal {
        Some(signal) => {
            signal.recv().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_wire::channel::pair;
    use std::os::fd::{AsFd, AsRawFd};

    /// The hello of a generation-1 worker with one listener.
    fn send_hello(master: &Channel) {
        let hello = MasterMessage::Hello {
            generation: 1,
            worker_index: 0,
            listener_count: 1,
            drain_timeout_ms: 1000,
            app_config: false,
            traceparent: None,
            handover: true,
        };
        master.try_send(&hello, &[]).unwrap();
    }

    /// Announces the TCP listener `http` at `address`, with `fds` attached.
    fn send_listener(master: &Channel, address: &str, fds: &[std::os::fd::BorrowedFd<'_>]) {
        let batch = MasterMessage::Listeners {
            offset: 0,
            listeners: vec![ListenerInfo {
                name: "http".into(),
                kind: ListenerKind::Tcp,
                address: address.into(),
                quic_slot: None,
            }],
        };
        master.try_send(&batch, fds).unwrap();
    }

    /// Runs the handshake of a worker with no listeners whose hello
    /// carries `traceparent`.
    async fn worker_with_traceparent(traceparent: &str) -> Worker {
        let (master, worker) = pair().unwrap();
        let master = Channel::new(master).unwrap();
        let hello = MasterMessage::Hello {
            generation: 4,
            worker_index: 0,
            listener_count: 0,
            drain_timeout_ms: 1000,
            app_config: false,
            traceparent: Some(traceparent.into()),
            handover: true,
        };
        master.try_send(&hello, &[]).unwrap();
        handshake(&Arc::new(Channel::new(worker).unwrap()))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn the_hello_gives_the_reloads_trace_context_and_a_malformed_one_is_ignored() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let worker = worker_with_traceparent(good).await;
        assert_eq!(worker.traceparent(), Some(good));
        assert_eq!(worker.generation(), 4);
        if std::env::var_os("TRACEPARENT").is_none() {
            let worker = worker_with_traceparent("00-not-a-trace-01").await;
            assert_eq!(worker.traceparent(), None);
        }
    }

    #[tokio::test]
    async fn a_master_speaking_another_version_is_a_clear_error() {
        let (master, worker) = pair().unwrap();
        let other = baton_wire::protocol::PROTOCOL_VERSION + 1;
        nix::sys::socket::send(
            master.as_fd().as_raw_fd(),
            format!(r#"{{"v":{other},"type":"hello","generation":1}}"#).as_bytes(),
            nix::sys::socket::MsgFlags::empty(),
        )
        .unwrap();
        let channel = Arc::new(Channel::new(worker).unwrap());
        let error = handshake(&channel).await.unwrap_err();
        assert!(
            matches!(error, Error::Version { master } if master == other),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            format!(
                "the master speaks protocol version {other}, this SDK speaks version {}",
                other - 1
            )
        );
    }

    #[tokio::test]
    async fn a_listener_batch_that_does_not_fit_is_a_protocol_error() {
        let (master, worker) = pair().unwrap();
        let master = Channel::new(master).unwrap();
        send_hello(&master);
        // Metadata for one listener, but no fd attached.
        send_listener(&master, "127.0.0.1:1", &[]);
        let channel = Arc::new(Channel::new(worker).unwrap());
        let error = handshake(&channel).await.unwrap_err();
        assert!(matches!(error, Error::Protocol(_)), "{error:?}");
    }

    #[tokio::test]
    async fn an_fd_that_is_not_the_announced_socket_is_refused() {
        let (master, worker) = pair().unwrap();
        let master = Channel::new(master).unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let actual = tcp.local_addr().unwrap();
        send_hello(&master);
        let wrong = format!("127.0.0.1:{}", actual.port() ^ 1);
        send_listener(&master, &wrong, &[tcp.as_fd()]);
        let channel = Arc::new(Channel::new(worker).unwrap());
        let error = handshake(&channel).await.unwrap_err();
        let Error::ListenerMismatch { name, found, .. } = &error else {
            panic!("{error:?}");
        };
        assert_eq!(name, "http");
        assert_eq!(found, &actual.to_string());
    }
}
