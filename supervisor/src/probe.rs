//! Readiness probes that reach the generation they probe: `ready = "tcp"`,
//! `"http:/PATH"` and `"exec:COMMAND"`, tried every `probe_interval` while a
//! new generation starts, and during its probation.
//!
//! A TCP or HTTP probe connects to the generation's socket on the first TCP
//! listener. That socket shares the port with the generation that serves,
//! and new connections are steered to the serving one; so the probe socket
//! is bound first, and the port's steering program sends connections from
//! exactly that source address and port to the probed generation's socket
//! (see [`crate::steering`]) until the attempt is over. The old generation
//! never sees a probe.
//!
//! - `tcp` passes once a worker of the generation has accepted the probe's
//!   connection (the socket's accept queue is empty again).
//! - `http:/PATH` passes on a `2xx` answer to `GET PATH`.
//! - `exec:COMMAND` passes when the command exits 0. It runs in the config
//!   file's directory with `BATON_GENERATION`, `BATON_PROBE_ADDRESS` (the
//!   first TCP listener's address) and `BATON_WORKER_PIDS`; which server it
//!   reaches is its own business. The master reaps it like any child.
//!
//! Attempts start every `probe_interval`, counted from the start of the one
//! before, whatever it took; each has `probe_interval` to finish (so at
//! most one runs at a time: one that hangs fails when the next is due, and
//! the next starts then). Its result comes back to the event loop as
//! [`crate::master::Event::Probe`], or as the exit of an exec probe.
//!
//! An exec probe's stdout and stderr are read by the master and logged,
//! bounded (see [`crate::output::capture_probe`]).

use crate::children::{Children, Owner};
use crate::config::ReadyMode;
use crate::fleet::Generation;
use crate::listener::Shared;
use crate::master::{Event, Events};
use baton_wire::protocol::ListenerKind;
use nix::unistd::Pid;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// The generation being probed, and how its probes went.
#[derive(Debug)]
pub struct Probing {
    /// The generation.
    pub generation: u64,
    /// When the next attempt starts.
    pub next_at: Instant,
    /// The attempt under way.
    pub in_flight: Option<InFlight>,
    /// Failed attempts in a row.
    pub failures: u32,
    /// Why the last attempt failed.
    pub last_failure: Option<String>,
    /// Passed at least once.
    pub passed: bool,
}

/// An attempt under way.
#[derive(Debug)]
pub struct InFlight {
    /// The socket whose steering rule sends the probe to the generation.
    steered: Option<Shared>,
    /// An exec probe's process, reaped by the master.
    pub pid: Option<Pid>,
    /// When the attempt counts as failed.
    pub deadline: Instant,
    task: Option<tokio::task::AbortHandle>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
        if let Some(socket) = &self.steered {
            socket.probe_from(None);
        }
        if let Some(pid) = self.pid {
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

impl Probing {
    /// Probes `generation` from now on.
    pub fn new(generation: u64) -> Probing {
        Probing {
            generation,
            next_at: Instant::now(),
            in_flight: None,
            failures: 0,
            last_failure: None,
            passed: false,
        }
    }
}

/// Where a TCP or HTTP probe of `generation` connects: its socket on the
/// first TCP listener, and the address (a wildcard address is probed on
/// loopback).
fn target(generation: &Generation) -> Option<(Shared, SocketAddr)> {
    let socket = generation
        .listeners()
        .iter()
        .find(|l| l.info.kind == ListenerKind::Tcp)?
        .clone();
    let mut address: SocketAddr = socket.info.address.parse().ok()?;
    if address.ip().is_unspecified() {
        address.set_ip(match address {
            SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    Some((socket, address))
}

impl Probing {
    /// `generation`'s probes, if its workers are ready by probe.
    pub fn of(generation: &Generation) -> Option<Probing> {
        generation
            .config()
            .worker
            .ready
            .probes()
            .then(|| Probing::new(generation.number()))
    }

    /// Starts an attempt on `generation` (the one probed) when one is due;
    /// an exec probe's process is registered among `children`. Returns the
    /// result of an attempt that ended here: past its deadline, or unable
    /// to start.
    pub fn tick(
        &mut self,
        now: Instant,
        generation: &Generation,
        events: &Events,
        children: &mut Children,
    ) -> Option<Result<(), String>> {
        if let Some(in_flight) = &self.in_flight {
            // The next attempt is due now: the loop comes back at once.
            return (now >= in_flight.deadline)
                .then(|| Err("no answer within probe_interval".into()));
        }
        if now < self.next_at {
            return None;
        }
        let interval = generation.config().worker.probe_interval.0;
        let started = match &generation.config().worker.ready {
            ReadyMode::Exec(argv) => start_exec(generation, argv, now + interval),
            ReadyMode::Tcp => start_connect(generation, None, interval, events),
            ReadyMode::Http(path) => {
                start_connect(generation, Some(path.clone()), interval, events)
            }
            _ => return None,
        };
        // Counted from this start, not from the end of the attempt.
        self.next_at = now + interval;
        match started {
            Ok(mut in_flight) => {
                in_flight.deadline = now + interval;
                if let Some(pid) = in_flight.pid {
                    children.register(pid, Owner::Probe);
                }
                self.in_flight = Some(in_flight);
                None
            }
            Err(e) => Some(Err(e)),
        }
    }

    /// When it needs the loop next.
    pub fn deadline(&self) -> Instant {
        match &self.in_flight {
            Some(in_flight) => in_flight.deadline,
            None => self.next_at,
        }
    }

    /// Process `pid` exited: if it was the exec probe in flight, the
    /// attempt's result.
    pub fn exited(&mut self, pid: Pid, status: &str, success: bool) -> Option<Result<(), String>> {
        let in_flight = self.in_flight.as_mut().filter(|f| f.pid == Some(pid))?;
        in_flight.pid = None;
        Some(if success {
            Ok(())
        } else {
            Err(format!("probe command exited with {status}"))
        })
    }

    /// An attempt ended with `result`: counted, and its steering rule, task
    /// or process ended. The next attempt stays due `probe_interval` after
    /// this one started. True when it passed.
    pub fn record(&mut self, result: Result<(), String>) -> bool {
        let generation = self.generation;
        self.in_flight = None;
        match result {
            Ok(()) => {
                if !self.passed || self.failures > 0 {
                    tracing::info!(generation, "probe passed");
                }
                self.passed = true;
                self.failures = 0;
                self.last_failure = None;
                true
            }
            Err(reason) => {
                self.failures += 1;
                tracing::warn!(generation, failures = self.failures, %reason, "probe failed");
                self.last_failure = Some(reason);
                false
            }
        }
    }
}

/// Connects to the generation (and asks for `path`, for HTTP).
fn start_connect(
    generation: &Generation,
    path: Option<String>,
    timeout: Duration,
    events: &Events,
) -> Result<InFlight, String> {
    let (socket, address) = target(generation).ok_or("no TCP listener to probe")?;
    let client = match address {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .and_then(|s| {
        s.bind(SocketAddr::new(address.ip(), 0))?;
        Ok(s)
    })
    .map_err(|e| format!("creating the probe socket: {e}"))?;
    let from = client
        .local_addr()
        .map_err(|e| format!("creating the probe socket: {e}"))?;
    // Only a generation's own socket can be told apart from the others.
    let steered = socket.primary().is_some().then(|| socket.clone());
    if let Some(socket) = &steered {
        socket.probe_from(Some(from));
    }
    let queue: Option<OwnedFd> = match path {
        None => Some(
            socket
                .fd()
                .try_clone_to_owned()
                .map_err(|e| format!("probing: {e}"))?,
        ),
        Some(_) => None,
    };
    let number = generation.number();
    let events = events.clone();
    let task = tokio::spawn(async move {
        let result = tokio::time::timeout(timeout, attempt(client, address, path, queue)).await;
        let result = result.unwrap_or_else(|_| Err("no answer within probe_interval".into()));
        let _ = events.send(Event::Probe {
            generation: number,
            result,
        });
    });
    Ok(InFlight {
        steered,
        pid: None,
        deadline: Instant::now() + timeout,
        task: Some(task.abort_handle()),
    })
}

async fn attempt(
    client: tokio::net::TcpSocket,
    address: SocketAddr,
    path: Option<String>,
    queue: Option<OwnedFd>,
) -> Result<(), String> {
    let mut stream = client
        .connect(address)
        .await
        .map_err(|e| format!("connecting to {address}: {e}"))?;
    let Some(path) = path else {
        // tcp: passed once a worker accepted it off the generation's queue.
        let queue = queue.expect("tcp probes watch the queue");
        loop {
            use std::os::fd::AsFd;
            if crate::steering::accept_queue(queue.as_fd()).unwrap_or(0) == 0 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: baton-probe\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("sending GET {path}: {e}"))?;
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 8192 {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading the answer to GET {path}: {e}"))?;
        if n == 0 {
            return Err(format!("GET {path}: connection closed without an answer"));
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or_default().to_string();
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("GET {path}: not an HTTP answer: {line:?}"))?;
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(format!(
            "GET {path} answered {}",
            line.trim_start_matches("HTTP/1.1 ")
                .trim_start_matches("HTTP/1.0 ")
        ))
    }
}

/// Runs an exec probe, due by `deadline`; the master reaps it and reads
/// its output.
fn start_exec(
    generation: &Generation,
    argv: &[String],
    deadline: Instant,
) -> Result<InFlight, String> {
    use std::os::unix::process::CommandExt;
    let dir = generation.config().path.parent().map(|p| p.to_path_buf());
    let mut command = std::process::Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .env("BATON_GENERATION", generation.number().to_string())
        .env(
            "BATON_WORKER_PIDS",
            generation
                .workers()
                .keys()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(" "),
        )
        .process_group(0);
    if let Some((_, address)) = target(generation) {
        command.env("BATON_PROBE_ADDRESS", address.to_string());
    }
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("starting probe command {:?}: {e}", argv[0]))?;
    let pid = Pid::from_raw(child.id() as i32);
    let pipes = [
        (child.stdout.take().map(OwnedFd::from), "stdout"),
        (child.stderr.take().map(OwnedFd::from), "stderr"),
    ];
    // The master reaps its children itself.
    drop(child);
    for (pipe, stream) in pipes {
        let origin = crate::output::ProbeOrigin {
            generation: generation.number(),
            pid: pid.as_raw(),
            stream,
        };
        let captured = pipe.map(|pipe| crate::output::capture_probe(pipe, origin, deadline));
        if let Some(Err(e)) = captured {
            tracing::warn!(generation = generation.number(), pid = pid.as_raw(), error = %e, "cannot read the probe's output");
        }
    }
    Ok(InFlight {
        steered: None,
        pid: Some(pid),
        deadline: Instant::now(),
        task: None,
    })
}
