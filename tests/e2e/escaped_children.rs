//! Processes a worker starts that leave its process group (`setsid`) and
//! keep the listening socket they inherited: steering must stay right
//! whatever they hold, and they must not outlive `baton stop`.

use baton_tests::harness::{alive, config_with_worker, get, Baton, Binaries};
use nix::unistd::Pid;
use std::time::{Duration, Instant};

/// A `systemd` worker whose shell starts `sleep 600` in a session of its own
/// (it keeps fds 3.., the generation's socket) before it execs the server,
/// and records the sleeper's pid in `escaped.pids`.
fn escaping_config(dir: &std::path::Path) -> String {
    let pids = dir.join("escaped.pids");
    let script = format!(
        "setsid sleep 600 & echo $! >> {}; exec {} --notify ready",
        pids.display(),
        Binaries::wrapped().display()
    );
    config_with_worker(&format!(
        "command = [\"/bin/sh\", \"-c\", {script:?}]\nprotocol = \"systemd\"\nready = \"notify\"\n\
         ready_timeout = \"10s\"\ndrain_timeout = \"5s\"\n"
    ))
}

fn escaped(dir: &std::path::Path) -> Vec<Pid> {
    std::fs::read_to_string(dir.join("escaped.pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .map(Pid::from_raw)
        .collect()
}

/// Every one of `n` new connections is answered by `generation`.
fn all_answered_by(addr: std::net::SocketAddr, generation: u64, n: usize) {
    for i in 0..n {
        match get(addr) {
            Ok((200, Some(g), _)) if g == generation => {}
            other => panic!("request {i} after reload to {generation}: {other:?}"),
        }
    }
}

#[test]
fn escaped_children_holding_old_sockets_never_black_hole_new_connections() {
    let dir = baton_tests::harness::TempDir::new();
    let config = escaping_config(dir.path());
    std::fs::write(dir.path().join("baton.toml"), config).unwrap();
    let mut baton = Baton::start_in(dir, &["run"]);
    baton.wait_committed(1);
    let addr = baton.address("http");
    all_answered_by(addr, 1, 16);
    for generation in 2..=4 {
        let outcome = baton.reload();
        assert_eq!(
            baton_tests::harness::event_name(&outcome),
            "reload.committed"
        );
        baton.wait_generation_finished(generation - 1);
        all_answered_by(addr, generation, 32);
    }
    let sleepers = escaped(baton.dir());
    assert_eq!(sleepers.len(), 4, "one escaped sleeper per generation");
    assert!(sleepers.iter().all(|p| alive(*p)), "they escaped the drain");
    let out = baton.cli(&["stop"]);
    assert!(out.status.success(), "{out:?}");
    baton.wait_exit(Duration::from_secs(15));
    let deadline = Instant::now() + Duration::from_secs(5);
    while sleepers.iter().any(|p| alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "escaped processes outlived baton stop: {:?}",
            sleepers.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Nothing holds the port any more: a new master could bind it.
    std::net::TcpListener::bind(addr).expect("the port is free after baton stop");
}
