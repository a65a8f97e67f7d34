//! The one harness every end-to-end test uses: runs the real `baton` binary
//! in a per-test temp dir, reads its JSON log, and on drop kills the master
//! and every process it started, even when the test failed.

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Paths of the built binaries, found next to the running test binary
/// (`target/<profile>/deps/..`).
pub struct Binaries;

impl Binaries {
    fn profile_dir() -> PathBuf {
        let exe = std::env::current_exe().expect("current_exe");
        let deps = exe.parent().expect("test binary has a parent");
        deps.parent().expect("deps has a parent").to_path_buf()
    }

    fn find(relative: &str) -> PathBuf {
        let path = Self::profile_dir().join(relative);
        assert!(
            path.exists(),
            "{} is missing: run the tests with `cargo nextest run --workspace` (or `cargo test --workspace`), which builds it",
            path.display()
        );
        path
    }

    /// The `baton` binary.
    pub fn baton() -> PathBuf {
        Self::find("baton")
    }

    /// The bundled `hello` example worker.
    pub fn hello() -> PathBuf {
        Self::find("examples/hello")
    }

    /// The example program `name` (`axum-app`, `grpc-app`, ...).
    pub fn example(name: &str) -> PathBuf {
        Self::find(&format!("examples/{name}"))
    }

    /// The misbehaving test worker.
    pub fn testworker() -> PathBuf {
        Self::find("examples/testworker")
    }

    /// The test server that does not link the SDK.
    pub fn wrapped() -> PathBuf {
        Self::find("examples/wrapped")
    }
}

/// A temp dir removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh, empty directory.
    pub fn new() -> TempDir {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("baton-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Default for TempDir {
    fn default() -> Self {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Default)]
struct Log {
    events: Vec<Value>,
    /// Bytes the master wrote to its stderr (its log) so far.
    bytes: u64,
    closed: bool,
}

/// A running `baton run` master.
pub struct Baton {
    child: Option<Child>,
    pid: Pid,
    log: Arc<(Mutex<Log>, Condvar)>,
    /// Where the log was read up to by [`Baton::next_event`].
    cursor: usize,
    /// Every process ever seen below the master, with its start time, so
    /// that drop kills it only if the pid was not reused since.
    seen: Mutex<Vec<(Pid, String)>>,
    /// Masters seen in the pid file (upgrades).
    seen_masters: Mutex<Vec<Pid>>,
    dir: TempDir,
}

/// The default config of a test master: `hello` on port 0, short timeouts.
pub fn hello_config(processes: u32) -> String {
    example_config(&Binaries::hello(), processes)
}

/// A test master config running the SDK worker `binary` as `processes`
/// processes, with a 5 s drain timeout.
pub fn example_config(binary: &Path, processes: u32) -> String {
    config_with_worker(&format!(
        "command = [{:?}]\nprocesses = {processes}\nready_timeout = \"10s\"\ndrain_timeout = \"5s\"\n",
        binary.display().to_string()
    ))
}

/// A `[worker]` body running the `wrapped` test server (no SDK) with
/// `args`, through `protocol = "systemd"` and `ready = "notify"`, then `rest`.
pub fn wrapped_worker(args: &[&str], rest: &str) -> String {
    let mut command = vec![Binaries::wrapped().display().to_string()];
    command.extend(args.iter().map(|a| a.to_string()));
    format!("command = {command:?}\nprotocol = \"systemd\"\nready = \"notify\"\nready_timeout = \"10s\"\n{rest}")
}

/// A master config whose 2 workers do not link the SDK and, once told to
/// stop, accept for a while more and reset what they accepted unread, as
/// uvicorn does: only a master that signals them once nothing is queued for
/// them loses no request.
pub fn resetting_config() -> String {
    config_with_worker(&wrapped_worker(
        &["--reset-on-stop"],
        "processes = 2\ndrain_timeout = \"5s\"\n",
    ))
}

/// A test master config with one `http` listener on port 0 and this `[worker]` body.
pub fn config_with_worker(worker: &str) -> String {
    config_with_listener("http", worker)
}

/// A test master config with one listener `name` on port 0 and this
/// `[worker]` body.
pub fn config_with_listener(name: &str, worker: &str) -> String {
    format!(
        "[supervisor]\npid_file = \"baton.pid\"\nlog_format = \"json\"\nlog_filter = \"info\"\n\n\
         [[listener]]\nname = \"{name}\"\naddress = \"127.0.0.1:0\"\n\n[worker]\n{worker}"
    )
}

impl Baton {
    /// Writes `config` to `baton.toml` in a new temp dir and starts `baton run`.
    pub fn start(config: &str) -> Baton {
        let dir = TempDir::new();
        std::fs::write(dir.path().join("baton.toml"), config).expect("write config");
        Self::start_in(dir, &["run"])
    }

    /// Starts `baton ARGS -c baton.toml` in `dir`.
    pub fn start_in(dir: TempDir, args: &[&str]) -> Baton {
        Self::start_binary(&Binaries::baton(), dir, args)
    }

    /// Starts `BINARY ARGS -c baton.toml` in `dir` (upgrade tests run a
    /// copy of baton they can replace).
    pub fn start_binary(binary: &Path, dir: TempDir, args: &[&str]) -> Baton {
        Self::start_with_env(binary, dir, args, &[])
    }

    /// Like [`Baton::start_binary`], with extra environment variables.
    pub fn start_with_env(
        binary: &Path,
        dir: TempDir,
        args: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Baton {
        let mut command = Command::new(binary);
        command.envs(env.iter().copied());
        command
            .args(args)
            .arg("-c")
            .arg(dir.path().join("baton.toml"))
            .current_dir(dir.path());
        Self::start_command(dir, command)
    }

    /// Starts `command`, a `baton run` as the caller wrote it (its own
    /// program path, arguments and working directory: the README's
    /// walkthrough), owning `dir` for the test's lifetime.
    pub fn start_command(dir: TempDir, mut command: Command) -> Baton {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn().expect("spawn baton");
        let pid = Pid::from_raw(child.id() as i32);
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new((Mutex::new(Log::default()), Condvar::new()));
        let writer = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                // A line past 64 KiB is not a log event: shown cut.
                let mut end = line.len().min(64 * 1024);
                while !line.is_char_boundary(end) {
                    end -= 1;
                }
                let shown = &line[..end];
                eprintln!("[baton {pid}] {shown}");
                let bytes = line.len() as u64 + 1;
                let event = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "raw": shown }));
                let mut log = writer.0.lock().unwrap();
                log.events.push(event);
                log.bytes += bytes;
                drop(log);
                writer.1.notify_all();
            }
            writer.0.lock().unwrap().closed = true;
            writer.1.notify_all();
        });
        Baton {
            child: Some(child),
            pid,
            log,
            cursor: 0,
            seen: Mutex::new(Vec::new()),
            seen_masters: Mutex::new(Vec::new()),
            dir,
        }
    }

    /// The first master's pid (the process this harness started).
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The pid in the pid file: the master serving now, after upgrades.
    pub fn master_pid(&self) -> Option<Pid> {
        read_pid(&self.dir().join("baton.pid"))
    }

    /// The test's temp dir (holds `baton.toml`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Replaces `baton.toml`.
    pub fn write_config(&self, config: &str) {
        std::fs::write(self.dir().join("baton.toml"), config).expect("write config");
    }

    /// Runs `baton ARGS -c baton.toml` (a CLI command against this master).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let out = Command::new(Binaries::baton())
            .args(args)
            .arg("-c")
            .arg(self.dir().join("baton.toml"))
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("run the baton CLI");
        eprintln!(
            "[baton {}] exit {:?}\n--- stdout\n{}--- stderr\n{}",
            args.join(" "),
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `baton status --json`, parsed.
    pub fn status(&self) -> Value {
        let out = self.cli(&["status", "--json"]);
        assert!(out.status.success(), "baton status failed");
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// The control socket of the test config.
    pub fn control_socket(&self) -> PathBuf {
        self.dir().join("baton.sock")
    }

    /// Sends `signal` to the master.
    pub fn signal(&self, signal: Signal) {
        kill(self.pid, signal).expect("signal the master");
    }

    /// Sends `signal` to the master serving now (the pid file's: after a
    /// master died, the one its keeper started).
    pub fn signal_current(&self, signal: Signal) {
        let master = self.master_pid().unwrap_or(self.pid);
        kill(master, signal).expect("signal the master");
    }

    /// A reload of the master serving now, with SIGHUP: its outcome event.
    pub fn reload_current(&mut self) -> Value {
        self.skip_log();
        self.signal_current(Signal::SIGHUP);
        self.next_event(Duration::from_secs(30), |e| {
            let name = event_name(e);
            name == "reload.committed" || name == "reload.failed"
        })
    }

    /// Waits for the first log event, from the start of the log, matching `pred`.
    pub fn wait_event(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_from(0, timeout, &pred)
            .map(|(_, e)| e)
            .unwrap_or_else(|| panic!("no matching log event within {timeout:?}"))
    }

    /// Waits for the next event after the cursor matching `pred`, and moves the cursor past it.
    pub fn next_event(&mut self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let (index, event) = self
            .wait_from(self.cursor, timeout, &pred)
            .unwrap_or_else(|| panic!("no matching log event within {timeout:?}"));
        self.cursor = index + 1;
        event
    }

    /// Moves the cursor to the end of what was logged so far.
    pub fn skip_log(&mut self) {
        self.cursor = self.log.0.lock().unwrap().events.len();
    }

    /// The events so far that match `pred`.
    pub fn events(&self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let log = self.log.0.lock().unwrap();
        log.events.iter().filter(|e| pred(e)).cloned().collect()
    }

    /// Bytes the master wrote to its log (stderr) so far.
    pub fn log_bytes(&self) -> u64 {
        self.log.0.lock().unwrap().bytes
    }

    /// How many events so far match `pred`.
    pub fn count_events(&self, pred: impl Fn(&Value) -> bool) -> usize {
        self.log
            .0
            .lock()
            .unwrap()
            .events
            .iter()
            .filter(|e| pred(e))
            .count()
    }

    fn wait_from(
        &self,
        from: usize,
        timeout: Duration,
        pred: &dyn Fn(&Value) -> bool,
    ) -> Option<(usize, Value)> {
        let deadline = Instant::now() + timeout;
        let (lock, cond) = &*self.log;
        let mut log = lock.lock().unwrap();
        loop {
            if let Some(i) = (from..log.events.len()).find(|&i| pred(&log.events[i])) {
                return Some((i, log.events[i].clone()));
            }
            let now = Instant::now();
            if now >= deadline || log.closed {
                return None;
            }
            log = cond.wait_timeout(log, deadline - now).unwrap().0;
        }
    }

    /// The address listener `name` was bound to (from the log).
    pub fn address(&self, name: &str) -> SocketAddr {
        let event = self.wait_event(Duration::from_secs(10), |e| {
            event_name(e) == "listener.bound" && field(e, "listener") == name
        });
        field(&event, "address").parse().expect("bound address")
    }

    /// Waits until generation `n` is committed and returns the event.
    pub fn wait_committed(&self, generation: u64) -> Value {
        self.wait_event(Duration::from_secs(20), |e| {
            event_name(e) == "reload.committed" && span_generation(e) == Some(generation)
        })
    }

    /// Waits until the master has written its pid file, which it does once its
    /// signal handlers are installed.
    pub fn wait_pid_file(&self) {
        let path = self.dir().join("baton.pid");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&path).map_or(true, |s| s.trim() != self.pid.to_string()) {
            assert!(
                Instant::now() < deadline,
                "no pid file at {}",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until every worker of generation `n` has exited and been reaped.
    pub fn wait_generation_finished(&self, generation: u64) -> Value {
        self.wait_event(Duration::from_secs(20), |e| {
            event_name(e) == "generation.finished"
                && field(e, "generation") == generation.to_string()
        })
    }

    /// Sends SIGHUP and waits for that reload's outcome event.
    pub fn reload(&mut self) -> Value {
        self.skip_log();
        self.signal(Signal::SIGHUP);
        self.next_event(Duration::from_secs(30), |e| {
            let name = event_name(e);
            name == "reload.committed" || name == "reload.failed"
        })
    }

    /// Reloads `times` times with SIGHUP, `pause` apart, asserting each
    /// reload committed.
    pub fn reload_times(&mut self, times: u64, pause: Duration) {
        for _ in 0..times {
            let outcome = self.reload();
            assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
            std::thread::sleep(pause);
        }
    }

    /// Waits until the pid file names a master other than `old`, and `old`
    /// has exited; returns the new master.
    pub fn wait_new_master(&self, old: Pid, timeout: Duration) -> Pid {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pid) = self.master_pid().filter(|p| *p != old) {
                self.seen_masters.lock().unwrap().push(pid);
                if !alive(old) {
                    return pid;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no new master replaced {old} within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The live children of the current master (its workers), but its
    /// keeper.
    pub fn master_workers(&self) -> Vec<Pid> {
        let master = self.master_pid().unwrap_or(self.pid);
        children_of(master)
            .into_iter()
            .filter(|p| alive(*p) && !is_keeper(*p))
            .collect()
    }

    /// The master's keeper (`baton __keeper`), if it runs.
    pub fn keeper(&self) -> Option<Pid> {
        let master = self.master_pid().unwrap_or(self.pid);
        children_of(master)
            .into_iter()
            .find(|p| alive(*p) && is_keeper(*p))
    }

    /// The master's live child processes (its workers), but its keeper.
    pub fn workers(&self) -> Vec<Pid> {
        let children: Vec<Pid> = children_of(self.pid)
            .into_iter()
            .filter(|p| alive(*p) && !is_keeper(*p))
            .collect();
        let mut seen = self.seen.lock().unwrap();
        for pid in &children {
            if let Some(started) = start_time(*pid) {
                if !seen.contains(&(*pid, started.clone())) {
                    seen.push((*pid, started));
                }
            }
        }
        children
    }

    /// Waits until the master's children are exactly `expected` in number and
    /// none of `gone` is still alive; returns the children.
    pub fn wait_workers(&self, expected: usize, gone: &[Pid], timeout: Duration) -> Vec<Pid> {
        let deadline = Instant::now() + timeout;
        loop {
            let workers = self.workers();
            if workers.len() == expected && gone.iter().all(|p| !alive(*p)) {
                return workers;
            }
            assert!(
                Instant::now() < deadline,
                "expected {expected} workers and {gone:?} gone, have {workers:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The master's exit status if it has exited, without waiting.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("master still owned");
        child.try_wait().expect("try_wait")
    }

    /// Waits for the master to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        self.workers();
        let child = self.child.as_mut().expect("master still owned");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "master did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Baton {
    fn drop(&mut self) {
        // Masters started by upgrades are not this process's children.
        let mut masters = vec![self.pid];
        for file in ["baton.pid", "baton.pid.oldbin"] {
            masters.extend(read_pid(&self.dir().join(file)));
        }
        masters.extend(self.seen_masters.lock().unwrap().iter().copied());
        // A master that exited long ago may have had its pid reused by
        // another test's process: only a process running in this test's
        // directory is one of ours.
        let dir = std::fs::canonicalize(self.dir()).ok();
        let ours = |pid: &Pid| {
            *pid == self.pid || std::fs::read_link(format!("/proc/{pid}/cwd")).ok() == dir
        };
        masters.retain(|m| ours(m));
        let mut pids: Vec<Pid> = masters.iter().flat_map(|m| descendants(*m)).collect();
        pids.extend(masters[1..].iter().filter(|m| alive(**m)));
        // Workers orphaned by a killed master are no longer descendants.
        for (pid, started) in self.seen.lock().unwrap().iter() {
            if start_time(*pid).as_ref() == Some(started) {
                pids.push(*pid);
            }
        }
        // Workers adopted by a master the keeper started are nobody's
        // descendants here: every process still running in this test's
        // directory (a worker's cwd) is one of ours.
        if let Some(dir) = &dir {
            if let Ok(entries) = std::fs::read_dir("/proc") {
                for entry in entries.flatten() {
                    let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
                        continue;
                    };
                    if std::fs::read_link(format!("/proc/{pid}/cwd")).ok().as_ref() == Some(dir) {
                        pids.push(Pid::from_raw(pid));
                    }
                }
            }
        }
        let _ = killpg(self.pid, Signal::SIGKILL);
        for pid in &pids {
            // Each worker leads its own process group.
            let _ = killpg(*pid, Signal::SIGKILL);
            let _ = kill(*pid, Signal::SIGKILL);
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }
}

/// Whether `pid` is a master's keeper: `baton __keeper`.
pub fn is_keeper(pid: Pid) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|b| *b == 0).nth(1) == Some(b"__keeper"))
}

/// The pid in a pid file.
pub fn read_pid(path: &Path) -> Option<Pid> {
    let text = std::fs::read_to_string(path).ok()?;
    text.trim().parse().ok().map(Pid::from_raw)
}

/// The `message` of a JSON log event.
pub fn message(event: &Value) -> &str {
    event["fields"]["message"].as_str().unwrap_or("")
}

/// The stable name of a JSON log event (its `event` field, such as
/// `reload.committed`): what tests match, not the message's prose.
pub fn event_name(event: &Value) -> &str {
    event["fields"]["event"].as_str().unwrap_or("")
}

/// A field of a JSON log event, as text.
pub fn field(event: &Value, name: &str) -> String {
    match &event["fields"][name] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The `generation` of the reload span around an event.
pub fn span_generation(event: &Value) -> Option<u64> {
    event["span"]["generation"].as_u64()
}

/// Whether `pid` is a live process (not a zombie).
pub fn alive(pid: Pid) -> bool {
    proc_field(pid, 0).is_some_and(|state| state != "Z")
}

/// When `pid` started (field 22 of /proc/PID/stat), to tell a process from a
/// later one that reused its pid.
fn start_time(pid: Pid) -> Option<String> {
    proc_field(pid, 19)
}

/// Field `n` after the `(comm)` of a /proc/PID/stat text: 0 = state,
/// 1 = ppid, 3 = session.
pub fn stat_field(stat: &str, n: usize) -> Option<&str> {
    stat.get(stat.rfind(')')? + 2..)?.split(' ').nth(n)
}

/// A CPU time counted in clock ticks, as /proc/PID/stat counts it
/// (`utime`, `stime`, ...), as a duration.
pub fn ticks_to_duration(ticks: u64) -> Duration {
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)
        .map_or(100, |t| t as u64);
    Duration::from_nanos(ticks.saturating_mul(1_000_000_000) / per_second)
}

/// Field `n` of `pid`'s /proc/PID/stat.
fn proc_field(pid: Pid, n: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_field(&stat, n).map(str::to_string)
}

/// Direct children of `parent`, zombies included.
pub fn children_of(parent: Pid) -> Vec<Pid> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if stat_field(&stat, 1).and_then(|p| p.parse::<i32>().ok()) == Some(parent.as_raw()) {
            out.push(Pid::from_raw(pid));
        }
    }
    out.sort();
    out
}

/// Zombie children of `parent`.
pub fn zombies_of(parent: Pid) -> Vec<Pid> {
    children_of(parent)
        .into_iter()
        .filter(|p| proc_field(*p, 0).as_deref() == Some("Z"))
        .collect()
}

/// Every process below `root`, but a master's keeper (which is in the
/// master's process group and goes with it).
pub fn descendants(root: Pid) -> Vec<Pid> {
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        for child in children_of(p).into_iter().filter(|c| !is_keeper(*c)) {
            out.push(child);
            stack.push(child);
        }
    }
    out
}

/// The open fds of `pid`, as `fd -> link target`.
pub fn open_fds(pid: Pid) -> Vec<(i32, String)> {
    let mut out: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| {
                    let fd = e.file_name().to_str()?.parse().ok()?;
                    let target = std::fs::read_link(e.path()).ok()?;
                    Some((fd, target.display().to_string()))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// One HTTP/1.1 GET / on a new connection: `(status, x-baton-generation, body)`.
pub fn get(addr: SocketAddr) -> std::io::Result<(u16, Option<u64>, String)> {
    get_path(addr, "/")
}

/// One HTTP/1.1 GET of `path` on a new connection, as [`get`].
pub fn get_path(addr: SocketAddr, path: &str) -> std::io::Result<(u16, Option<u64>, String)> {
    let stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let (status, head, body) = exchange(stream, path)?;
    let generation = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("x-baton-generation")
            .then(|| v.trim().parse().ok())?
    });
    Ok((status, generation, body))
}

/// `GET path` with `Connection: close` on `stream`, read to its end:
/// `(status, head, body)`.
pub fn exchange(
    mut stream: impl std::io::Read + std::io::Write,
    path: &str,
) -> std::io::Result<(u16, String, String)> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("malformed response {response:?}")))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    Ok((status, head.to_string(), body.to_string()))
}

/// Waits (bounded) until `path` holds a JSON document, and returns it: test
/// workers write what they saw to such files, atomically.
pub fn wait_json(path: &Path, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
        }
        assert!(
            Instant::now() < deadline,
            "{} not written within {timeout:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts the closed-loop load the zero-drop tests use (8 connections,
/// bounded to 2 minutes) and waits until traffic flows.
pub fn steady_load(addr: SocketAddr, mode: crate::load::Mode) -> crate::load::LoadHandle {
    let load = crate::load::LoadHandle::start(crate::load::LoadConfig {
        addr,
        connections: 8,
        mode,
        duration: Duration::from_secs(120),
        max_requests: 20_000_000,
        timeout: Duration::from_secs(10),
        path: "/".into(),
    });
    assert!(
        load.wait_for_ok(200, Duration::from_secs(10)),
        "no traffic flows"
    );
    load
}

/// Waits until the load has seen a response from `generation`.
pub fn wait_for_generation(load: &crate::load::LoadHandle, generation: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while load.latest_generation() != Some(generation) {
        assert!(
            Instant::now() < deadline,
            "generation {generation} never answered"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Generation `number` in a `baton status --json` answer, if listed.
pub fn generation_in(status: &Value, number: u64) -> Option<Value> {
    status["generations"]
        .as_array()?
        .iter()
        .find(|g| g["number"] == number)
        .cloned()
}

/// The workers of the current generation in a `baton status --json`
/// answer (none if there is no current generation).
pub fn current_workers(status: &Value) -> Vec<Value> {
    status["master"]["current_generation"]
        .as_u64()
        .and_then(|n| generation_in(status, n))
        .and_then(|g| g["workers"].as_array().cloned())
        .unwrap_or_default()
}

/// The pids of the current generation's workers in a `baton status
/// --json` answer, sorted.
pub fn current_worker_pids(status: &Value) -> Vec<i64> {
    let mut pids: Vec<i64> = current_workers(status)
        .iter()
        .filter_map(|w| w["pid"].as_i64())
        .collect();
    pids.sort_unstable();
    pids
}

/// Waits (15 s at most) until `pid` has exited; `what` names it in the
/// failure.
pub fn wait_gone(pid: Pid, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while alive(pid) {
        assert!(Instant::now() < deadline, "{what} ({pid}) still runs");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The zero-drop verdict: at least some traffic, not one failed request, and
/// responses that moved through the generations in order from 1 to `last`.
pub fn assert_no_request_failed(report: &crate::load::Report, what: &str, last: u64) {
    eprintln!(
        "{what}: {} ok, {} failed, generations {:?} in {:?}, longest idle on a reused connection {:?}",
        report.ok(),
        report.failed(),
        report.generations(),
        report.elapsed,
        report.longest_idle(),
    );
    assert!(
        report.ok() > 100,
        "too little traffic to mean anything: {}",
        report.ok()
    );
    assert_eq!(
        report.failed(),
        0,
        "failed requests: {}",
        report.failures_summary()
    );
    let generations = report.generations();
    // Per generation: first and last request start, and how many it served.
    let mut timeline = std::collections::BTreeMap::new();
    for s in &report.samples {
        if let Some(g) = s.generation {
            let e = timeline.entry(g).or_insert((s.start, s.start, 0u64));
            e.1 = s.start;
            e.2 += 1;
        }
    }
    assert_eq!(
        generations.first(),
        Some(&1),
        "{generations:?} {timeline:?}"
    );
    assert_eq!(
        generations.last(),
        Some(&last),
        "{generations:?} {timeline:?}"
    );
    assert!(
        generations.windows(2).all(|w| w[0] < w[1]),
        "generations appear in increasing order: {generations:?} {timeline:?}"
    );
}

/// A listening socket of the given address with SO_REUSEPORT, as another
/// process of the same user could open on baton's port, or systemd with
/// `ReusePort=yes`.
pub fn reuseport_listener(addr: std::net::SocketAddr) -> std::os::fd::OwnedFd {
    use nix::sys::socket::{
        bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
        SockaddrIn,
    };
    let std::net::SocketAddr::V4(v4) = addr else {
        panic!("{addr} is not IPv4")
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    setsockopt(&fd, sockopt::ReusePort, &true).unwrap();
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(v4)).unwrap();
    listen(&fd, Backlog::new(16).unwrap()).unwrap();
    fd
}
