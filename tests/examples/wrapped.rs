//! A server that does not link the SDK, for the end-to-end tests of the
//! `systemd` and `args` protocols, `ready = "notify"` and process settings.
//! Plain std and libc: no runtime, so its fd table holds only what it
//! inherited.
//!
//! `wrapped [OPTIONS]`:
//! - `--dump DIR`: writes what it was given (pid, ids, argv, environment,
//!   cwd, rlimit, fds and which are non-blocking) to
//!   `DIR/wrapped-GEN-INDEX.json`.
//! - `--fd N`: serves on fd N (default 3): HTTP on a stream socket, an echo
//!   on a datagram socket.
//! - `--notify ready|from-child|never`: sends `STATUS=` and `READY=1` to
//!   `NOTIFY_SOCKET` itself (default), from a child process, or only
//!   `STATUS=` (never ready).
//! - `--ignore-term`: keeps serving through SIGTERM.
//! - `--reset-on-stop`: after SIGTERM, for 100 ms accepts every connection
//!   and closes it unread (the client sees a reset), as uvicorn does with
//!   the ones it accepted but had not read when it stops.
//! - `--child`: starts a child process that sleeps until killed, even after
//!   this process has exited.
//! - `--reopened DIR`: appends a line to `DIR/reopened-GEN-INDEX` per SIGUSR1.
//! - `--exit-after SECS`: exits with status 1 that long after it started,
//!   between two requests (a release that crashes); with `--exit-worker N`
//!   only worker N does.
//! - `--health-status CODE`: answers `GET /healthz` with CODE (default 200).
//! - `--requests DIR`: appends each request's path to
//!   `DIR/requests-GEN-INDEX`.
//! - `--send TEXT` (internal): sends TEXT to `NOTIFY_SOCKET`, then waits for
//!   its parent to exit.
//! - `--sleep` (internal): sleeps until killed.
//!
//! It prints `wrapped started` on stdout and stderr, and answers every
//! request until SIGTERM, after which it finishes the one in hand and exits.
//! Each answer says in `x-tcp-nodelay` whether the connection it came on
//! has `TCP_NODELAY` set (which it never sets itself: what it has, it
//! inherited from the listening socket).

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

static STOP: AtomicBool = AtomicBool::new(false);
static REOPEN: AtomicU32 = AtomicU32::new(0);

extern "C" fn on_term(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

extern "C" fn on_usr1(_: libc::c_int) {
    REOPEN.fetch_add(1, Ordering::SeqCst);
}

// The children it starts are meant to outlive it (or to notice it is gone):
// nobody waits for them here.
#[allow(clippy::zombie_processes)]
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let option = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let flag = |name: &str| args.iter().any(|a| a == name);
    if let Some(text) = option("--send") {
        return send_and_linger(&text);
    }
    if flag("--sleep") {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    let generation = std::env::var("BATON_GENERATION").unwrap_or_default();
    let index = std::env::var("BATON_WORKER").unwrap_or_default();
    println!("wrapped started");
    eprintln!("wrapped started");
    if let Some(dir) = option("--dump") {
        dump(&format!("{dir}/wrapped-{generation}-{index}.json"), &args);
    }
    handle(libc::SIGTERM, on_term, flag("--ignore-term"));
    handle(libc::SIGUSR1, on_usr1, false);
    if flag("--child") {
        let me = std::env::current_exe().expect("current_exe");
        std::process::Command::new(me)
            .arg("--sleep")
            .spawn()
            .expect("spawn child");
    }
    match option("--notify").as_deref().unwrap_or("ready") {
        "ready" => notify("STATUS=serving generation\nREADY=1"),
        "never" => notify("STATUS=never ready"),
        "from-child" => {
            notify("STATUS=child says ready");
            let me = std::env::current_exe().expect("current_exe");
            std::process::Command::new(me)
                .args(["--send", "READY=1"])
                .spawn()
                .expect("spawn child");
        }
        other => panic!("unknown --notify {other}"),
    }
    let fd: RawFd = option("--fd").map_or(3, |n| n.parse().expect("--fd N"));
    let reopened = option("--reopened").map(|dir| format!("{dir}/reopened-{generation}-{index}"));
    let exits = option("--exit-worker").is_none_or(|n| n == index);
    let behaviour = Behaviour {
        generation: generation.clone(),
        exit_at: option("--exit-after").filter(|_| exits).map(|s| {
            std::time::Instant::now()
                + Duration::from_secs_f64(s.parse().expect("--exit-after SECS"))
        }),
        health: option("--health-status").map_or(200, |c| c.parse().expect("--health-status CODE")),
        requests: option("--requests").map(|dir| format!("{dir}/requests-{generation}-{index}")),
    };
    serve(fd, &behaviour, reopened.as_deref(), flag("--reset-on-stop"));
}

/// How it answers.
struct Behaviour {
    generation: String,
    exit_at: Option<std::time::Instant>,
    health: u16,
    requests: Option<String>,
}

/// Installs `handler` for `signal` without SA_RESTART, so that a blocking
/// accept or recv returns EINTR and the loop sees the flag; or ignores it.
fn handle(signal: libc::c_int, handler: extern "C" fn(libc::c_int), ignore: bool) {
    let action = if ignore {
        nix::sys::signal::SigHandler::SigIgn
    } else {
        nix::sys::signal::SigHandler::Handler(handler)
    };
    let action = nix::sys::signal::SigAction::new(
        action,
        nix::sys::signal::SaFlags::empty(),
        nix::sys::signal::SigSet::empty(),
    );
    let signal = nix::sys::signal::Signal::try_from(signal).expect("signal");
    // SAFETY: the handlers only store to atomics, which is async-signal-safe.
    unsafe { nix::sys::signal::sigaction(signal, &action) }.expect("sigaction");
}

fn notify(text: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let socket = std::os::unix::net::UnixDatagram::unbound().expect("socket");
    socket
        .send_to(text.as_bytes(), path)
        .expect("send to NOTIFY_SOCKET");
}

/// A child: notifies (if asked), then lives until its parent is gone.
fn send_and_linger(text: &str) {
    let parent = std::os::unix::process::parent_id();
    notify(text);
    while std::os::unix::process::parent_id() == parent {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn dump(path: &str, args: &[String]) {
    let env = |name: &str| std::env::var(name).ok();
    let fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    let nonblocking: Vec<&String> = fds
        .iter()
        .filter(|fd| {
            fd.parse::<RawFd>().is_ok_and(|fd| {
                // SAFETY: F_GETFL on an fd number; a closed one returns -1.
                let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
                flags >= 0 && flags & libc::O_NONBLOCK != 0
            })
        })
        .collect();
    let (soft, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit");
    let value = serde_json::json!({
        "pid": std::process::id(),
        "uid": nix::unistd::getuid().as_raw(),
        "gid": nix::unistd::getgid().as_raw(),
        "groups": nix::unistd::getgroups().map(|g| g.iter().map(|g| g.as_raw()).collect::<Vec<_>>()).unwrap_or_default(),
        "argv": args,
        "cwd": std::env::current_dir().map(|p| p.display().to_string()).unwrap_or_default(),
        "rlimit_nofile": [soft, hard],
        "fds": fds,
        "nonblocking_fds": nonblocking,
        "env_names": std::env::vars().map(|(k, _)| k).collect::<Vec<_>>(),
        "LISTEN_PID": env("LISTEN_PID"),
        "LISTEN_FDS": env("LISTEN_FDS"),
        "LISTEN_FDNAMES": env("LISTEN_FDNAMES"),
        "NOTIFY_SOCKET": env("NOTIFY_SOCKET"),
        "BATON_CONTROL_FD": env("BATON_CONTROL_FD"),
        "BATON_GENERATION": env("BATON_GENERATION"),
        "BATON_WORKER": env("BATON_WORKER"),
        "WRAPPED_GREETING": env("WRAPPED_GREETING"),
    });
    let tmp = format!("{path}.tmp");
    std::fs::write(&tmp, value.to_string()).expect("write dump");
    std::fs::rename(&tmp, path).expect("rename dump");
}

fn serve(fd: RawFd, behaviour: &Behaviour, reopened: Option<&str>, reset_on_stop: bool) {
    let generation = behaviour.generation.as_str();
    // SAFETY: the fd is borrowed only for this call.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let kind = nix::sys::socket::getsockopt(&borrowed, nix::sys::socket::sockopt::SockType);
    match kind {
        Ok(nix::sys::socket::SockType::Stream) => {
            // SAFETY: the master handed this fd to this process, which owns
            // it from here on.
            let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
            listener.set_nonblocking(true).expect("nonblocking");
            while wait_readable(fd, reopened) {
                if behaviour
                    .exit_at
                    .is_some_and(|at| std::time::Instant::now() >= at)
                {
                    eprintln!("wrapped: exiting with status 1 as asked");
                    std::process::exit(1);
                }
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).expect("blocking");
                        answer_http(stream, behaviour);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("accept: {e}"),
                }
            }
            if reset_on_stop {
                let until = std::time::Instant::now() + Duration::from_millis(100);
                while std::time::Instant::now() < until {
                    match listener.accept() {
                        // Dropped unread: the kernel answers with a reset.
                        Ok(_) => eprintln!("wrapped: reset a connection while stopping"),
                        Err(_) => std::thread::sleep(Duration::from_millis(1)),
                    }
                }
            }
        }
        Ok(nix::sys::socket::SockType::Datagram) => {
            // SAFETY: as above.
            let socket = unsafe { std::net::UdpSocket::from_raw_fd(fd) };
            socket.set_nonblocking(true).expect("nonblocking");
            let mut buffer = [0u8; 2048];
            while wait_readable(fd, reopened) {
                match socket.recv_from(&mut buffer) {
                    Ok((n, peer)) => {
                        let mut reply = format!("gen {generation}: ").into_bytes();
                        reply.extend_from_slice(&buffer[..n]);
                        let _ = socket.send_to(&reply, peer);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("recv: {e}"),
                }
            }
        }
        _ => while wait_readable(-1, reopened) {},
    }
}

/// Waits until `fd` is readable (or a signal or 100 ms passed), noting
/// reopen requests; false once told to stop. std's blocking accept retries
/// on EINTR, so the loop polls instead.
fn wait_readable(fd: RawFd, reopened: Option<&str>) -> bool {
    note_reopen(reopened);
    if STOP.load(Ordering::SeqCst) {
        return false;
    }
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one pollfd on the stack; a negative fd is ignored.
    unsafe { libc::poll(&mut poll, 1, 100) };
    !STOP.load(Ordering::SeqCst)
}

fn note_reopen(path: Option<&str>) {
    let (Some(path), n) = (path, REOPEN.swap(0, Ordering::SeqCst)) else {
        return;
    };
    for _ in 0..n {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open reopened file");
        file.write_all(b"reopen\n").expect("write");
    }
}

fn answer_http(mut stream: std::net::TcpStream, behaviour: &Behaviour) {
    let generation = behaviour.generation.as_str();
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut request = Vec::new();
    let mut buffer = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buffer) {
            // SIGTERM (installed without SA_RESTART) interrupts the read:
            // the request in hand is still answered.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buffer[..n]),
        }
    }
    let head = String::from_utf8_lossy(&request);
    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
    if let Some(file) = &behaviour.requests {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)
            .expect("open requests file");
        let _ = writeln!(file, "{path}");
    }
    let status = if path == "/healthz" {
        behaviour.health
    } else {
        200
    };
    let body = format!(
        "wrapped generation {generation} pid {} uid {}\n",
        std::process::id(),
        nix::unistd::getuid()
    );
    let nodelay = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::TcpNoDelay)
        .expect("getsockopt TCP_NODELAY");
    let response = format!(
        "HTTP/1.1 {status} X\r\nx-baton-generation: {generation}\r\nx-tcp-nodelay: {nodelay}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
}
