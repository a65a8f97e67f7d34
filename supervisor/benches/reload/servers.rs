//! The systems under test, started the same way every time: baton with
//! `hello`, `hello` alone, nginx and HAProxy serving a fixed 200. Each
//! runs in a temp dir of its own, on 127.0.0.1, with one worker per CPU.

use crate::baton_log::{field, message, BatonLog};
use crate::procs::{self, Guard, TempDir};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a server may take to start serving.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a naively restarted `hello` may take to drain after SIGTERM
/// before it is killed.
const RESTART_GRACE: Duration = Duration::from_secs(5);

/// The binaries the bench runs.
pub struct Binaries {
    /// `baton`, built by cargo for this bench.
    pub baton: PathBuf,
    /// The `hello` example of `baton-worker`.
    pub hello: PathBuf,
    /// The `axum-app` example, for the WebSocket scenario, when built.
    pub axum: Option<PathBuf>,
    /// The `h3-app` example, for the HTTP/3 scenario, when built.
    pub h3: Option<PathBuf>,
    /// `h2load`, for the HTTP/2 scenarios, when installed.
    pub h2load: Option<PathBuf>,
    /// `nginx`, when installed.
    pub nginx: Option<PathBuf>,
    /// `haproxy`, when installed.
    pub haproxy: Option<PathBuf>,
}

/// Which server a scenario runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `baton run` with `hello` workers.
    Baton,
    /// `baton run` with `hello` workers and `[worker] handover = false`:
    /// idle keep-alive connections are closed at a reload, as before
    /// handovers.
    BatonWithoutHandover,
    /// `baton run` with `axum-app` workers.
    BatonAxum,
    /// `baton run` with `h3-app` workers on a `quic = true` UDP listener.
    BatonH3,
    /// `hello` on its own.
    Hello,
    /// nginx, master and workers.
    Nginx,
    /// nginx with `listen ... http2` (HTTP/2 with prior knowledge).
    NginxHttp2,
    /// HAProxy in master-worker mode.
    Haproxy,
}

/// A running server. Dropping it kills every process it started.
pub struct Server {
    /// Where it serves.
    pub addr: SocketAddr,
    /// The process the bench signals and measures: the master, or `hello`
    /// itself when it runs alone.
    pub master: Pid,
    /// The pid file the master writes (baton, nginx, HAProxy).
    pub pid_file: Option<PathBuf>,
    /// baton's JSON log.
    pub log: Option<BatonLog>,
    /// The `hello` binary, to restart a standalone `hello`.
    hello: Option<PathBuf>,
    /// The command that started an external server (nginx, HAProxy):
    /// program, then arguments, to start it again.
    argv: Vec<OsString>,
    // Dropped in this order: the processes, then their directory.
    guard: Guard,
    dir: TempDir,
}

impl Server {
    /// Starts a server of `kind`, ready to serve.
    pub fn start(kind: Kind, bins: &Binaries) -> Result<Server, String> {
        let dir = TempDir::new(&format!("{kind:?}").to_lowercase())
            .map_err(|e| format!("cannot create a temp dir: {e}"))?;
        match kind {
            Kind::Baton => start_baton(dir, &bins.baton, &bins.hello, ""),
            Kind::BatonWithoutHandover => {
                start_baton(dir, &bins.baton, &bins.hello, "handover = false\n")
            }
            Kind::BatonAxum => start_baton(
                dir,
                &bins.baton,
                bins.axum.as_deref().ok_or("not built")?,
                "",
            ),
            Kind::BatonH3 => {
                start_baton_h3(dir, &bins.baton, bins.h3.as_deref().ok_or("not built")?)
            }
            Kind::Hello => start_hello(dir, &bins.hello, "127.0.0.1:0"),
            Kind::Nginx => start_nginx(dir, bins.nginx.as_deref().ok_or("not installed")?, ""),
            Kind::NginxHttp2 => {
                start_nginx(dir, bins.nginx.as_deref().ok_or("not installed")?, " http2")
            }
            Kind::Haproxy => start_haproxy(dir, bins.haproxy.as_deref().ok_or("not installed")?),
        }
    }

    /// Also kills `pid` (a master started by an upgrade) when dropped.
    pub fn adopt(&mut self, pid: Pid) {
        self.guard.adopt(pid);
    }

    /// The pid in the pid file, if it holds one.
    pub fn pid_file_pid(&self) -> Option<Pid> {
        let text = std::fs::read_to_string(self.pid_file.as_ref()?).ok()?;
        text.trim().parse().ok().map(Pid::from_raw)
    }

    /// The directory the server runs in (its config, pid file and logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGKILL to the master. A master the bench started is reaped at
    /// once, as an init system would reap it: its pid is then gone, not a
    /// zombie that still takes signals. Its process group and what runs
    /// below it are still killed on drop.
    pub fn kill_master(&mut self) -> Result<(), String> {
        let master = self.master;
        if self.guard.child_mut(master).is_some() {
            self.guard
                .stop_child(master, Signal::SIGKILL, RESTART_GRACE)
                .map_err(|e| format!("killing the master {master}: {e}"))?;
            self.guard.adopt(master);
            return Ok(());
        }
        nix::sys::signal::kill(master, Signal::SIGKILL)
            .map_err(|e| format!("killing the master {master}: {e}"))
    }

    /// Starts an external server (nginx, HAProxy) again with the command
    /// that first started it, its output in `log` (in the server's
    /// directory). Returns at once with its pid; it becomes
    /// [`Server::master`].
    pub fn start_again(&mut self, log: &str) -> Result<Pid, String> {
        let (program, args) = self
            .argv
            .split_first()
            .ok_or("only nginx and HAProxy are started again")?;
        let output = std::fs::File::create(self.dir.path().join(log))
            .and_then(|f| Ok((f.try_clone()?, f)))
            .map_err(|e| format!("creating {log}: {e}"))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(output.0)
            .stderr(output.1);
        let pid = self
            .guard
            .spawn(&mut command)
            .map_err(|e| format!("cannot start {program:?} again: {e}"))?;
        self.master = pid;
        Ok(pid)
    }

    /// The command that started an external server, with `extra`
    /// arguments (`-s reload`), run to its end: its exit status and
    /// output.
    pub fn run_again_with(&self, extra: &[&str]) -> Result<(ExitStatus, String), String> {
        let (program, args) = self
            .argv
            .split_first()
            .ok_or("only nginx and HAProxy run again")?;
        let output = Command::new(program)
            .args(args)
            .args(extra)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {program:?}: {e}"))?;
        let text =
            String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
        Ok((output.status, text.trim().to_string()))
    }

    /// `pid`'s exit status once it has exited, when it is a process the
    /// bench started (then reaped and no longer killed on drop).
    pub fn exited(&mut self, pid: Pid) -> Option<ExitStatus> {
        let status = self.guard.child_mut(pid)?.try_wait().ok().flatten()?;
        self.guard.forget(pid);
        Some(status)
    }

    /// The naive restart of a standalone `hello`: SIGTERM, wait until it
    /// has exited, start it again on the same address and wait until it
    /// serves. Returns when the old one was found gone.
    pub fn restart(&mut self) -> Result<Instant, String> {
        let hello = self
            .hello
            .clone()
            .ok_or("only a standalone hello restarts")?;
        self.guard
            .stop_child(self.master, Signal::SIGTERM, RESTART_GRACE)
            .map_err(|e| format!("stopping hello: {e}"))?;
        let gone = Instant::now();
        let (pid, serving) = spawn_hello(&mut self.guard, self.dir.path(), &hello, self.addr)?;
        self.master = pid;
        wait_serving(&serving, &mut self.guard)?;
        Ok(gone)
    }
}

/// What a standalone `hello` says once it serves: `hello: serving on ADDR`.
type Serving = mpsc::Receiver<SocketAddr>;

fn spawn_hello(
    guard: &mut Guard,
    dir: &Path,
    hello: &Path,
    listen: impl std::fmt::Display,
) -> Result<(Pid, Serving), String> {
    let mut command = Command::new(hello);
    command
        .arg("--listen")
        .arg(listen.to_string())
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let pid = guard
        .spawn(&mut command)
        .map_err(|e| format!("cannot start {}: {e}", hello.display()))?;
    let stderr = guard
        .child_mut(pid)
        .and_then(|c| c.stderr.take())
        .ok_or("hello has no stderr")?;
    let (tx, rx) = mpsc::channel();
    // Reads until hello exits, so it never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(addr) = line.strip_prefix("hello: serving on ") {
                if let Ok(addr) = addr.trim().parse() {
                    let _ = tx.send(addr);
                }
            }
        }
    });
    Ok((pid, rx))
}

fn wait_serving(serving: &Serving, guard: &mut Guard) -> Result<SocketAddr, String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        match serving.recv_timeout(Duration::from_millis(10)) {
            Ok(addr) => return Ok(addr),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err("hello exited before serving".into())
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if let Some(status) = guard.exited() {
            return Err(format!("hello exited before serving ({status})"));
        }
        if Instant::now() >= deadline {
            return Err(format!("hello did not serve within {START_TIMEOUT:?}"));
        }
    }
}

fn start_hello(dir: TempDir, hello: &Path, listen: &str) -> Result<Server, String> {
    let mut guard = Guard::default();
    let (pid, serving) = spawn_hello(&mut guard, dir.path(), hello, listen)?;
    let addr = wait_serving(&serving, &mut guard)?;
    Ok(Server {
        addr,
        master: pid,
        pid_file: None,
        log: None,
        hello: Some(hello.to_path_buf()),
        argv: Vec::new(),
        guard,
        dir,
    })
}

/// `baton run` with `worker` (an SDK example) as its workers, and
/// `worker_options` (lines) added to the `[worker]` table.
fn start_baton(
    dir: TempDir,
    baton: &Path,
    worker: &Path,
    worker_options: &str,
) -> Result<Server, String> {
    let listener = "name = \"http\"\naddress = \"127.0.0.1:0\"\n";
    let command = format!("[{:?}]", worker.display().to_string());
    start_baton_configured(dir, baton, ("http", listener), &command, worker_options)
}

/// baton with `h3-app` workers serving HTTP/3 on a QUIC listener, with a
/// self-signed certificate made in `dir` (`cert.pem`, `key.pem`).
fn start_baton_h3(dir: TempDir, baton: &Path, h3: &Path) -> Result<Server, String> {
    let generated = Command::new(h3)
        .args(["--generate", "--cert", "cert.pem", "--key", "key.pem"])
        .current_dir(dir.path())
        .status()
        .map_err(|e| format!("cannot run {}: {e}", h3.display()))?;
    if !generated.success() {
        return Err("h3-app --generate failed".into());
    }
    let listener = "name = \"h3\"\naddress = \"udp:127.0.0.1:0\"\nquic = true\n";
    let command = format!(
        "[{:?}, \"--cert\", \"cert.pem\", \"--key\", \"key.pem\"]",
        h3.display().to_string()
    );
    start_baton_with(dir, baton, ("h3", listener), &command)
}

/// baton with one listener (its name, and its table's lines) and
/// `command` (a TOML array) as the workers.
fn start_baton_with(
    dir: TempDir,
    baton: &Path,
    listener: (&str, &str),
    worker: &str,
) -> Result<Server, String> {
    start_baton_configured(dir, baton, listener, worker, "")
}

/// [`start_baton_with`], with `worker_options` (lines) added to the
/// `[worker]` table.
fn start_baton_configured(
    dir: TempDir,
    baton: &Path,
    (name, listener): (&str, &str),
    worker: &str,
    worker_options: &str,
) -> Result<Server, String> {
    let config = format!(
        "[supervisor]\ncontrol_socket = \"baton.sock\"\npid_file = \"baton.pid\"\n\
         log_format = \"json\"\nlog_filter = \"info\"\n\n\
         [[listener]]\n{listener}\n\
         [worker]\ncommand = {worker}\nprocesses = {}\nready_timeout = \"10s\"\ndrain_timeout = \"10s\"\n\
         {worker_options}",
        cpus(),
    );
    let mut command = baton_run(baton, dir.path(), &config)?;
    command.stderr(Stdio::piped());
    let mut guard = Guard::default();
    let master = guard
        .spawn(&mut command)
        .map_err(|e| format!("cannot start {}: {e}", baton.display()))?;
    let stderr = guard
        .child_mut(master)
        .and_then(|c| c.stderr.take())
        .ok_or("baton has no stderr")?;
    let log = BatonLog::start(stderr);
    let failed = |what: &str| format!("{what}; the master's last log lines: {}", log.tail(5));
    log.wait_for(0, START_TIMEOUT, |e| {
        message(e) == "reload committed" && e["span"]["generation"].as_u64() == Some(1)
    })
    .ok_or_else(|| failed("generation 1 was not committed"))?;
    let bound = log
        .wait_for(0, START_TIMEOUT, |e| {
            message(e) == "listener bound" && field(e, "listener") == name
        })
        .ok_or_else(|| failed("no `listener bound` event"))?;
    let address = field(&bound, "address");
    let addr = address
        .strip_prefix("udp:")
        .unwrap_or(&address)
        .parse()
        .map_err(|e| failed(&format!("bad listener address: {e}")))?;
    let server = Server {
        addr,
        master,
        pid_file: Some(dir.path().join("baton.pid")),
        log: Some(log),
        hello: None,
        argv: Vec::new(),
        guard,
        dir,
    };
    let deadline = Instant::now() + START_TIMEOUT;
    while server.pid_file_pid() != Some(master) {
        if Instant::now() >= deadline {
            return Err("the master wrote no pid file".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(server)
}

/// `baton run` on `config`, written to `baton.toml` in `dir`.
pub fn baton_run(baton: &Path, dir: &Path, config: &str) -> Result<Command, String> {
    let config_path = dir.join("baton.toml");
    std::fs::write(&config_path, config).map_err(|e| format!("writing baton.toml: {e}"))?;
    let mut command = Command::new(baton);
    command
        .arg("run")
        .arg("-c")
        .arg(&config_path)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    Ok(command)
}

/// Starts `baton run` on `config` in `dir`, its log discarded, in a guard
/// that kills it on drop.
pub fn spawn_baton(baton: &Path, dir: &Path, config: &str) -> Result<crate::procs::Guard, String> {
    let mut command = baton_run(baton, dir, config)?;
    command.stderr(Stdio::null());
    let mut guard = crate::procs::Guard::default();
    guard
        .spawn(&mut command)
        .map_err(|e| format!("cannot start {}: {e}", baton.display()))?;
    Ok(guard)
}

/// Starts an external server (nginx, HAProxy) with its output in
/// `output.log` and waits until it accepts connections on `addr`.
fn start_external(
    dir: TempDir,
    mut command: Command,
    addr: SocketAddr,
    pid_file: PathBuf,
    logs: &[&str],
) -> Result<Server, String> {
    let argv = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(OsString::from)
        .collect();
    let output = std::fs::File::create(dir.path().join("output.log"))
        .and_then(|f| Ok((f.try_clone()?, f)))
        .map_err(|e| format!("creating output.log: {e}"))?;
    command
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(output.0)
        .stderr(output.1);
    let mut guard = Guard::default();
    let master = guard
        .spawn(&mut command)
        .map_err(|e| format!("cannot start {:?}: {e}", command.get_program()))?;
    if let Err(e) = procs::wait_listening(addr, &mut guard, START_TIMEOUT) {
        let mut text = String::new();
        for log in ["output.log"].iter().chain(logs) {
            if let Ok(mut f) = std::fs::File::open(dir.path().join(log)) {
                let _ = f.read_to_string(&mut text);
            }
        }
        return Err(format!("{e}; its log: {}", text.trim()));
    }
    Ok(Server {
        addr,
        master,
        pid_file: Some(pid_file),
        log: None,
        hello: None,
        argv,
        guard,
        dir,
    })
}

/// nginx serving a fixed 200; `listen_options` goes after the address
/// (` http2` for HTTP/2 with prior knowledge).
fn start_nginx(dir: TempDir, nginx: &Path, listen_options: &str) -> Result<Server, String> {
    let addr = procs::free_port().map_err(|e| format!("no free port: {e}"))?;
    let prefix = dir.path().display().to_string();
    // The worker pid in the generation header lets the bench tell which
    // workers answered: those alive before a reload, or new ones.
    let config = format!(
        "daemon off;\nmaster_process on;\nworker_processes {cpus};\n\
         pid {prefix}/nginx.pid;\nerror_log {prefix}/error.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n    access_log off;\n    keepalive_requests 1000000;\n    keepalive_timeout 75s;\n\
         \x20   client_body_temp_path {prefix}/body;\n    proxy_temp_path {prefix}/proxy;\n\
         \x20   fastcgi_temp_path {prefix}/fastcgi;\n    uwsgi_temp_path {prefix}/uwsgi;\n\
         \x20   scgi_temp_path {prefix}/scgi;\n\
         \x20   server {{\n        listen {addr}{listen_options};\n        location / {{\n\
         \x20           add_header x-baton-generation $pid;\n            return 200 \"ok\\n\";\n\
         \x20       }}\n    }}\n}}\n",
        cpus = cpus(),
    );
    let conf = dir.path().join("nginx.conf");
    std::fs::write(&conf, config).map_err(|e| format!("writing nginx.conf: {e}"))?;
    let mut command = Command::new(nginx);
    command
        .arg("-e")
        .arg(dir.path().join("error.log"))
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(format!("{prefix}/"));
    let pid_file = dir.path().join("nginx.pid");
    start_external(dir, command, addr, pid_file, &["error.log"])
}

fn start_haproxy(dir: TempDir, haproxy: &Path) -> Result<Server, String> {
    let addr = procs::free_port().map_err(|e| format!("no free port: {e}"))?;
    let pid_file = dir.path().join("haproxy.pid");
    // `%pid` in the generation header: as for nginx, the worker's pid.
    let config = format!(
        "global\n    pidfile {pid_file}\n    nbthread {cpus}\n\n\
         defaults\n    mode http\n    timeout client 75s\n    timeout connect 5s\n    timeout server 75s\n\n\
         frontend bench\n    bind {addr}\n\
         \x20   http-request return status 200 content-type text/plain string \"ok\" hdr x-baton-generation \"%pid\"\n",
        pid_file = pid_file.display(),
        cpus = cpus(),
    );
    let conf = dir.path().join("haproxy.cfg");
    std::fs::write(&conf, config).map_err(|e| format!("writing haproxy.cfg: {e}"))?;
    let mut command = Command::new(haproxy);
    command.arg("-W").arg("-f").arg(&conf);
    start_external(dir, command, addr, pid_file, &[])
}

/// CPUs available to the bench: every server gets one worker per CPU.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// How a row names the system of `kind`: nginx and HAProxy with their
/// version (HAProxy in master-worker mode, `-W`), any other as `default`.
pub fn label(kind: Kind, bins: &Binaries, default: &str) -> String {
    match kind {
        Kind::Nginx => bins.nginx.as_deref().and_then(version),
        Kind::Haproxy => bins
            .haproxy
            .as_deref()
            .and_then(version)
            .map(|v| format!("{v} -W")),
        _ => None,
    }
    .unwrap_or_else(|| default.to_string())
}

/// `nginx -v` / `haproxy -v`, shortened to e.g. `nginx 1.22.1`.
pub fn version(program: &Path) -> Option<String> {
    let output = Command::new(program)
        .arg("-v")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
    let line = text.lines().next()?;
    if let Some(v) = line.strip_prefix("nginx version: nginx/") {
        return Some(format!("nginx {}", v.trim()));
    }
    let v = line
        .strip_prefix("HAProxy version ")?
        .split([' ', '-'])
        .next()?;
    Some(format!("HAProxy {v}"))
}
