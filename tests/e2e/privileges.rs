//! `user`: the master binds privileged ports as root, its workers run as the
//! configured user with supplementary groups dropped.

use baton_tests::harness::{event_name, get, Baton, Binaries};
use std::time::Duration;

/// A port below 1024 that is free now (root can bind it).
fn free_privileged_port() -> Option<u16> {
    (600..1000).find(|port| std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok())
}

/// The `Uid:`, `Gid:` or `Groups:` line of /proc/PID/status.
fn status_line(pid: nix::unistd::Pid, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn worker_runs_as_nobody_on_a_privileged_port_bound_by_the_master() {
    let euid = nix::unistd::geteuid();
    if !euid.is_root() {
        eprintln!("skipped: dropping privileges needs a root master; this runs as uid {euid}");
        return;
    }
    let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") else {
        eprintln!("skipped: this system has no user \"nobody\"");
        return;
    };
    let Some(port) = free_privileged_port() else {
        eprintln!("skipped: no free port below 1024");
        return;
    };
    let config = format!(
        "[supervisor]\nlog_format = \"json\"\n\n\
         [[listener]]\nname = \"http\"\naddress = \"127.0.0.1:{port}\"\n\n\
         [worker]\ncommand = [{:?}]\nprotocol = \"systemd\"\nready = \"notify\"\n\
         user = \"nobody\"\nready_timeout = \"10s\"\ndrain_timeout = \"5s\"\n",
        Binaries::wrapped().display().to_string()
    );
    let mut baton = Baton::start(&config);
    baton.wait_committed(1);
    let (uid, gid) = (nobody.uid.as_raw(), nobody.gid.as_raw());
    for generation in 1..=2 {
        let workers = baton.wait_workers(1, &[], Duration::from_secs(10));
        let worker = workers[0];
        assert_eq!(
            status_line(worker, "Uid:"),
            format!("{uid} {uid} {uid} {uid}")
        );
        assert_eq!(
            status_line(worker, "Gid:"),
            format!("{gid} {gid} {gid} {gid}")
        );
        assert_eq!(status_line(worker, "Groups:"), "");
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let (status, answered_by, body) = get(addr).unwrap();
        assert_eq!((status, answered_by), (200, Some(generation)), "{body}");
        assert!(body.contains(&format!("uid {uid}")), "{body}");
        if generation == 1 {
            // The notify socket of the next generation is theirs too.
            let outcome = baton.reload();
            assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
            baton.wait_generation_finished(1);
        }
    }
}
