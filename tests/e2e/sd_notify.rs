//! The master as a `Type=notify-reload` service with a watchdog: a datagram
//! socket stands in for systemd and checks the whole sequence.

use baton_tests::harness::{alive, hello_config, Baton, Binaries, TempDir};
use nix::sys::signal::Signal;
use nix::time::{clock_gettime, ClockId};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

/// The `NOTIFY_SOCKET` end: hands out state changes in order, and keeps
/// the watchdog pings apart with their arrival times.
struct FakeSystemd {
    socket: UnixDatagram,
    pings: Vec<Instant>,
}

impl FakeSystemd {
    fn bind(path: &std::path::Path) -> FakeSystemd {
        let socket = UnixDatagram::bind(path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        FakeSystemd {
            socket,
            pings: Vec::new(),
        }
    }

    /// The next notification; a watchdog ping is noted and `None`.
    fn recv(&mut self) -> Option<String> {
        let mut buf = [0u8; 4096];
        let n = self
            .socket
            .recv(&mut buf)
            .expect("a notification within the timeout");
        if &buf[..n] == b"WATCHDOG=1" {
            self.pings.push(Instant::now());
            return None;
        }
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// The next notification that is not a watchdog ping.
    fn next(&mut self) -> String {
        loop {
            if let Some(text) = self.recv() {
                return text;
            }
        }
    }

    /// Waits for `count` more watchdog pings, and nothing else.
    fn pings(&mut self, count: usize) -> &[Instant] {
        let start = self.pings.len();
        while self.pings.len() < start + count {
            if let Some(text) = self.recv() {
                panic!("expected only watchdog pings, got {text:?}");
            }
        }
        &self.pings[start..]
    }
}

fn monotonic_usec() -> u64 {
    Duration::from(clock_gettime(ClockId::CLOCK_MONOTONIC).unwrap()).as_micros() as u64
}

/// `RELOADING=1` with a `MONOTONIC_USEC=` taken after `before`.
fn assert_reloading(message: &str, generation: u64, before: u64) {
    let lines: Vec<&str> = message.lines().collect();
    assert_eq!(
        lines[..2],
        [
            "RELOADING=1",
            &format!("STATUS=reloading to generation {generation}")
        ]
    );
    let usec: u64 = lines[2]
        .strip_prefix("MONOTONIC_USEC=")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {message:?}"));
    assert!(
        usec >= before && usec <= monotonic_usec(),
        "{usec} vs {before}"
    );
}

#[test]
fn systemd_hears_every_reload_outcome_the_new_main_pid_stopping_and_the_watchdog() {
    let dir = TempDir::new();
    let path = dir.path().join("notify.sock");
    let mut systemd = FakeSystemd::bind(&path);
    std::fs::write(dir.path().join("baton.toml"), hello_config(1)).unwrap();
    let mut baton = Baton::start_with_env(
        &Binaries::baton(),
        dir,
        &["run"],
        &[
            ("NOTIFY_SOCKET", path.as_os_str()),
            ("WATCHDOG_USEC", "1000000".as_ref()),
        ],
    );
    assert_eq!(
        systemd.next(),
        "READY=1\nSTATUS=generation 1 serving; last reload (start) committed"
    );
    // The watchdog is petted every WATCHDOG_USEC/2: two pings never more
    // than WATCHDOG_USEC apart.
    let pings = systemd.pings(3).to_vec();
    for pair in pings.windows(2) {
        assert!(pair[1] - pair[0] < Duration::from_secs(1), "{pings:?}");
    }

    let before = monotonic_usec();
    baton.signal(Signal::SIGHUP);
    assert_reloading(&systemd.next(), 2, before);
    assert_eq!(
        systemd.next(),
        "READY=1\nSTATUS=generation 2 serving; last reload (signal) committed"
    );

    // A failed reload still ends with READY=1, and says why.
    let good = std::fs::read_to_string(baton.dir().join("baton.toml")).unwrap();
    baton.write_config(&good.replace("processes = 1", "processes = \"two\""));
    let before = monotonic_usec();
    baton.signal(Signal::SIGHUP);
    assert_reloading(&systemd.next(), 3, before);
    let failed = systemd.next();
    assert!(
        failed.starts_with(
            "READY=1\nSTATUS=generation 2 serving; reload to generation 3 (signal) failed in phase validate: "
        ) && failed.contains("baton.toml:"),
        "{failed:?}"
    );
    baton.write_config(&good);

    // An upgrade: the old master, still the main pid, names the new one; the
    // new master says nothing of its own before that, then pets the watchdog.
    baton.signal(Signal::SIGUSR2);
    let handover = systemd.next();
    let new_pid = baton.wait_new_master(baton.pid(), Duration::from_secs(20));
    assert_eq!(handover, format!("MAINPID={new_pid}\nREADY=1"));
    systemd.pings(2);

    nix::sys::signal::kill(new_pid, Signal::SIGTERM).unwrap();
    assert_eq!(systemd.next(), "STOPPING=1");
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(new_pid) {
        assert!(Instant::now() < deadline, "new master did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Nothing more but pings: the old master's exit and the new one's are
    // not systemd's business beyond STOPPING=1.
    systemd
        .socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 64];
    while let Ok(n) = systemd.socket.recv(&mut buf) {
        assert_eq!(&buf[..n], b"WATCHDOG=1", "unexpected extra notification");
    }
    let _ = baton.wait_exit(Duration::from_secs(1));
}

#[test]
fn a_reload_signal_refused_during_an_upgrade_still_ends_with_ready() {
    let dir = TempDir::new();
    let path = dir.path().join("notify.sock");
    let mut systemd = FakeSystemd::bind(&path);
    // Workers ready only after 1 s: the upgrade is under way for that long.
    let config = baton_tests::harness::config_with_worker(&baton_tests::harness::wrapped_worker(
        &[],
        "ready = \"delay:1s\"\n",
    ))
    .replace("ready = \"notify\"\n", "");
    std::fs::write(dir.path().join("baton.toml"), config).unwrap();
    let baton = Baton::start_with_env(
        &Binaries::baton(),
        dir,
        &["run"],
        &[("NOTIFY_SOCKET", path.as_os_str())],
    );
    assert!(systemd.next().starts_with("READY=1\n"));
    baton.signal(Signal::SIGUSR2);
    baton.wait_event(Duration::from_secs(10), |e| {
        baton_tests::harness::event_name(e) == "upgrade.started"
    });
    baton.signal(Signal::SIGHUP);
    let reloading = systemd.next();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading:?}"
    );
    assert_eq!(
        systemd.next(),
        "READY=1\nSTATUS=generation 1 serving; reload refused: a binary upgrade is in progress"
    );
    let handover = systemd.next();
    assert!(handover.starts_with("MAINPID="), "{handover:?}");
}
