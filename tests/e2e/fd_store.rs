//! Under systemd with `FileDescriptorStoreMax=`: a stand-in for systemd
//! (systemd does not run as PID 1 here) speaks its fd-store protocol
//! (`FDSTORE=1`, `FDNAME=`, `FDSTOREREMOVE=1` on `$NOTIFY_SOCKET`) and
//! starts the master again with the stored fds at 3, 4, ... and
//! `LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`, as `systemctl restart` or
//! `Restart=on-failure` does.

use baton_tests::harness::{
    alive, assert_no_request_failed, children_of, current_worker_pids, event_name, hello_config,
    message, resetting_config, steady_load, wait_for_generation, wait_gone, Baton, Binaries,
    TempDir,
};
use baton_tests::load::Mode;
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use nix::unistd::Pid;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// `FileDescriptorStoreMax=` of the stand-in.
const STORE_MAX: usize = 64;

/// How long no master runs in a restart.
const GAP: Duration = Duration::from_millis(500);

/// An fd received with SCM_RIGHTS, closed on drop (this crate forbids
/// the `unsafe` an `OwnedFd` from a raw fd takes).
struct Held(RawFd);

impl Drop for Held {
    fn drop(&mut self) {
        let _ = nix::unistd::close(self.0);
    }
}

#[derive(Default)]
struct Stored {
    /// The store, in the order fds came (systemd's order at the next start).
    fds: Vec<(String, Held)>,
    /// Every notification that was not about the store (`READY=1`, ...).
    states: Vec<String>,
}

/// systemd's notify socket and fd store for one service.
struct StandIn {
    dir: TempDir,
    socket_path: std::path::PathBuf,
    stored: Arc<(Mutex<Stored>, Condvar)>,
    /// The masters started, each in a temp dir of its own (the harness's
    /// unit), all on the one config.
    masters: Vec<Baton>,
}

/// The (device, inode) of an fd: systemd stores one fd per open file.
fn identity(fd: RawFd) -> (u64, u64) {
    let stat = nix::sys::stat::fstat(fd).expect("fstat a stored fd");
    (stat.st_dev, stat.st_ino)
}

impl StandIn {
    /// A notify socket, and a thread that keeps the store as systemd does:
    /// an fd already held (the same open socket) is not added again,
    /// `FDSTOREREMOVE=1` removes every fd of its name.
    fn new(config: &str) -> StandIn {
        let dir = TempDir::new();
        // Absolute paths: every master's harness dir reads the one control
        // socket and pid file.
        let config = config.replace(
            "pid_file = \"baton.pid\"",
            &format!(
                "pid_file = {:?}\ncontrol_socket = {:?}",
                dir.path().join("baton.pid").display().to_string(),
                dir.path().join("baton.sock").display().to_string()
            ),
        );
        std::fs::write(dir.path().join("baton.toml"), &config).unwrap();
        let socket_path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&socket_path).unwrap();
        let stored: Arc<(Mutex<Stored>, Condvar)> = Arc::default();
        let keeper = stored.clone();
        std::thread::spawn(move || loop {
            let mut buf = [0u8; 4096];
            let mut cmsg = nix::cmsg_space!([RawFd; 16]);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let Ok(received) = recvmsg::<()>(
                socket.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) else {
                return;
            };
            let mut fds: Vec<Held> = Vec::new();
            for c in received.cmsgs().unwrap() {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    fds.extend(raw.into_iter().map(Held));
                }
            }
            let n = received.bytes;
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let lines: Vec<&str> = text.lines().collect();
            let name = lines
                .iter()
                .find_map(|l| l.strip_prefix("FDNAME="))
                .unwrap_or("stored")
                .to_string();
            let mut state = keeper.0.lock().unwrap();
            if lines.contains(&"FDSTOREREMOVE=1") {
                state.fds.retain(|(n, _)| *n != name);
            } else if lines.contains(&"FDSTORE=1") {
                for fd in fds {
                    let id = identity(fd.0);
                    let held = state.fds.iter().any(|(_, f)| identity(f.0) == id);
                    if !held && state.fds.len() < STORE_MAX {
                        state.fds.push((name.clone(), fd));
                    }
                }
            } else {
                state.states.push(text);
            }
            drop(state);
            keeper.1.notify_all();
        });
        StandIn {
            dir,
            socket_path,
            stored,
            masters: Vec::new(),
        }
    }

    /// The names in the store, sorted.
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .stored
            .0
            .lock()
            .unwrap()
            .fds
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        names.sort();
        names
    }

    /// Waits until `pred` holds of the store's names.
    fn wait_names(&self, what: &str, pred: impl Fn(&[String]) -> bool) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let names = self.names();
            if pred(&names) {
                return names;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: the store holds {names:?}"
            );
            let state = self.stored.0.lock().unwrap();
            let _ = self
                .stored
                .1
                .wait_timeout(state, Duration::from_millis(50))
                .unwrap();
        }
    }

    /// Closes every stored fd, as systemd does when the unit stops or
    /// fails for good.
    fn flush(&self) {
        self.stored.0.lock().unwrap().fds.clear();
    }

    /// How many `READY=1` came.
    fn readies(&self) -> usize {
        let state = self.stored.0.lock().unwrap();
        state
            .states
            .iter()
            .filter(|s| s.lines().any(|l| l == "READY=1"))
            .count()
    }

    /// Starts `baton run` as systemd starts the unit's main process: the
    /// store's fds at 3, 4, ..., named in `LISTEN_FDNAMES`, `LISTEN_PID`
    /// its pid; `NOTIFY_SOCKET` and `FDSTORE` set.
    fn start(&mut self) -> &mut Baton {
        let state = self.stored.0.lock().unwrap();
        // Inheritable copies out of the way of 3, 4, ...: the shell moves
        // them there, closes them, and runs baton with its own pid.
        let sources: Vec<Held> = state
            .fds
            .iter()
            .map(|(_, f)| Held(nix::fcntl::fcntl(f.0, nix::fcntl::FcntlArg::F_DUPFD(200)).unwrap()))
            .collect();
        let names: Vec<String> = state.fds.iter().map(|(n, _)| n.clone()).collect();
        drop(state);
        let mut script = String::new();
        for (i, fd) in sources.iter().enumerate() {
            script.push_str(&format!("exec {}<&{} {}<&-; ", 3 + i, fd.0, fd.0));
        }
        script.push_str("LISTEN_PID=$$ exec \"$0\" \"$@\"");
        let dir = TempDir::new();
        std::fs::copy(
            self.dir.path().join("baton.toml"),
            dir.path().join("baton.toml"),
        )
        .unwrap();
        let mut command = Command::new("/bin/bash");
        command
            .args(["-c", &script])
            .arg(Binaries::baton())
            .args(["run", "-c"])
            .arg(self.dir.path().join("baton.toml"))
            .current_dir(dir.path())
            .env("NOTIFY_SOCKET", &self.socket_path)
            .env("FDSTORE", STORE_MAX.to_string())
            .env_remove("LISTEN_PID");
        if sources.is_empty() {
            command
                .env_remove("LISTEN_FDS")
                .env_remove("LISTEN_FDNAMES");
        } else {
            command
                .env("LISTEN_FDS", sources.len().to_string())
                .env("LISTEN_FDNAMES", names.join(":"));
        }
        let baton = Baton::start_command(dir, command);
        drop(sources);
        self.masters.push(baton);
        self.masters.last_mut().unwrap()
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        // The last master first: its harness kills what it sees running
        // (the pid file names it), then the earlier ones' leftovers.
        while let Some(baton) = self.masters.pop() {
            drop(baton);
        }
    }
}

/// `baton __keeper` among `pid`'s children.
fn keeper_of(pid: Pid) -> Option<Pid> {
    children_of(pid)
        .into_iter()
        .find(|p| baton_tests::harness::is_keeper(*p))
}

/// `systemctl restart`: SIGTERM stops the master (its workers drain), the
/// store keeps the listening socket, and the master started next serves on
/// it: connections made meanwhile wait in its queue, none is refused.
#[test]
fn a_restart_through_the_fd_store_refuses_no_connection() {
    restart_through_the_store(&hello_config(2));
}

/// Workers without the SDK, which get sockets of their own on the port:
/// the stop steers the port back to the stored socket, the old generation
/// accepts what was queued on its own, and the next master's first
/// generation serves on the stored socket, queue included.
#[test]
fn a_restart_through_the_fd_store_with_workers_without_the_sdk_refuses_no_connection() {
    restart_through_the_store(&resetting_config());
}

fn restart_through_the_store(config: &str) {
    let mut systemd = StandIn::new(config);
    let first = systemd.start();
    first.wait_committed(1);
    let addr = first.address("http");
    let first_pid = first.pid();
    let keeper = keeper_of(first_pid).expect("the first master's keeper");
    systemd.wait_names("the first snapshot", |names| {
        names.iter().any(|n| n.starts_with("baton-snapshot-"))
            && names.iter().any(|n| n.starts_with("baton-keeper-"))
            && names.iter().filter(|n| n.starts_with("baton-fd-")).count() >= 2
    });
    let load = steady_load(addr, Mode::NewConnection);

    kill(first_pid, Signal::SIGTERM).unwrap();
    systemd
        .masters
        .last_mut()
        .unwrap()
        .wait_exit(Duration::from_secs(20));
    // Only the listening socket stays, under its listener's name.
    assert_eq!(systemd.names(), ["baton-listener-http"]);
    // The store let go of the keeper's channel: it ends too.
    wait_gone(keeper, "the stopped master's keeper");
    // No process listens for a while (systemd's restart takes some time
    // too): connections wait in the stored socket's queue.
    std::thread::sleep(GAP);

    let second = systemd.start();
    second.wait_committed(1);
    let adopted = second.wait_event(Duration::from_secs(5), |e| {
        message(e) == "listener adopted from socket activation"
    });
    assert_eq!(adopted["fields"]["matched_by"], "name", "{adopted}");
    assert_eq!(
        second.count_events(|e| event_name(e) == "listener.bound"),
        0,
        "the second master bound the port again"
    );
    // Served by the new master's workers, then some more.
    let served = load.ok_so_far();
    assert!(load.wait_for_ok(served + 500, Duration::from_secs(10)));
    let report = load.stop();
    eprintln!(
        "new connections across a stop and start: {} ok, {} failed",
        report.ok(),
        report.failed()
    );
    assert!(report.ok() > 500, "too little traffic: {}", report.ok());
    assert_eq!(report.failed(), 0, "{}", report.failures_summary());
    // Some waited through the gap, queued: the load did not just pause.
    let slowest = report.latency_quantile(1.0).expect("latencies");
    assert!(
        slowest >= GAP,
        "no request waited through the gap: {slowest:?}"
    );
    // The second master stores what it needs again, under new names.
    systemd.wait_names("the second master's snapshot", |names| {
        !names.iter().any(|n| n.starts_with("baton-listener"))
            && names.iter().any(|n| n.starts_with("baton-snapshot-"))
    });
}

/// The master SIGKILLed (`Restart=on-failure`): the keeper starts no master
/// of its own, the one systemd starts adopts the same workers from the
/// store and attaches to the same keeper; no request fails, and a HUP
/// after commits. A stop for good then ends the keeper.
#[test]
fn a_killed_master_is_started_again_from_the_fd_store_and_adopts_its_workers() {
    let mut systemd = StandIn::new(&hello_config(2));
    let first = systemd.start();
    first.wait_committed(1);
    let addr = first.address("http");
    let first_pid = first.pid();
    let status = first.status();
    let workers = current_worker_pids(&status);
    assert_eq!(workers.len(), 2, "{status}");
    let keeper = keeper_of(first_pid).expect("the first master's keeper");
    let keepalive = steady_load(addr, Mode::KeepAlive);
    let fresh = steady_load(addr, Mode::NewConnection);
    systemd.wait_names("a snapshot naming both workers' channels", |names| {
        names.iter().any(|n| n.starts_with("baton-snapshot-"))
            && names.iter().filter(|n| n.starts_with("baton-fd-")).count() >= 4
    });
    let readies = systemd.readies();
    assert!(readies >= 1, "no READY=1 from the first master");

    kill(first_pid, Signal::SIGKILL).unwrap();
    wait_gone(first_pid, "the killed master");
    // systemd would take a moment to restart it: the keeper, which does
    // not see the master's end (the store holds it), starts nothing.
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        alive(keeper),
        "the keeper gave up while the store holds its channel"
    );
    assert_eq!(
        children_of(keeper),
        Vec::<Pid>::new(),
        "the keeper started a master of its own"
    );

    let second = systemd.start();
    let second_pid = second.pid();
    let adopted = second.wait_event(Duration::from_secs(10), |e| {
        event_name(e) == "master.adopted"
    });
    assert_eq!(
        adopted["fields"]["previous_pid"],
        first_pid.as_raw(),
        "{adopted}"
    );
    let status = second.status();
    assert_eq!(status["master"]["pid"], second_pid.as_raw(), "{status}");
    assert_eq!(current_worker_pids(&status), workers, "{status}");
    assert_eq!(
        status["master"]["adopted"]["previous_pid"],
        first_pid.as_raw()
    );
    // Attached to the same keeper: none started.
    assert_eq!(
        keeper_of(second_pid),
        None,
        "the new master started a keeper"
    );
    assert!(alive(keeper));
    // systemd waits for READY=1 from the master it started.
    let deadline = Instant::now() + Duration::from_secs(5);
    while systemd.readies() == readies {
        assert!(
            Instant::now() < deadline,
            "no READY=1 from the adopting master"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let second = &systemd.masters[1];
    second.signal(Signal::SIGHUP);
    second.wait_committed(2);
    wait_for_generation(&keepalive, 2);
    wait_for_generation(&fresh, 2);
    std::thread::sleep(Duration::from_millis(200));
    assert_no_request_failed(&keepalive.stop(), "keep-alive across a master kill", 2);
    assert_no_request_failed(&fresh.stop(), "new connections across a master kill", 2);

    // Stopped for good: the store lets go of the keeper's channel, and the
    // keeper exits (the workers drained with the master).
    kill(second_pid, Signal::SIGTERM).unwrap();
    wait_gone(second_pid, "the second master");
    assert_eq!(systemd.names(), ["baton-listener-http"]);
    wait_gone(keeper, "the keeper after the stop");
    for pid in workers {
        wait_gone(Pid::from_raw(pid as i32), "a worker after the stop");
    }
}

/// The master killed, and systemd not starting another (its start limit
/// hit): once the store lets go of the master's end of the keeper's
/// channel, the keeper stops the workers and exits.
#[test]
fn a_store_let_go_of_makes_the_keeper_stop_the_workers() {
    let mut systemd = StandIn::new(&hello_config(2));
    let first = systemd.start();
    first.wait_committed(1);
    let first_pid = first.pid();
    let status = first.status();
    let workers = current_worker_pids(&status);
    assert_eq!(workers.len(), 2, "{status}");
    let keeper = keeper_of(first_pid).expect("the master's keeper");
    systemd.wait_names("a snapshot", |names| {
        names.iter().any(|n| n.starts_with("baton-snapshot-"))
    });
    kill(first_pid, Signal::SIGKILL).unwrap();
    wait_gone(first_pid, "the killed master");
    std::thread::sleep(Duration::from_millis(300));
    for pid in &workers {
        assert!(alive(Pid::from_raw(*pid as i32)), "worker {pid} stopped");
    }
    systemd.flush();
    wait_gone(keeper, "the keeper once the store let go");
    for pid in workers {
        wait_gone(Pid::from_raw(pid as i32), "a worker once the store let go");
    }
    systemd.masters[0].wait_event(Duration::from_secs(5), |e| {
        e["raw"]
            .as_str()
            .is_some_and(|l| l.contains("systemd's fd store let go of the master's channel"))
    });
}
