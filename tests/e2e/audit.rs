//! Who asked: a reload records its requester — the control socket's peer
//! (pid, uid, command) or a signal's sender — in the log and in
//! `last_reload`.

use baton_tests::harness::{field, hello_config, message, Baton};
use std::process::Command;
use std::time::Duration;

#[test]
fn a_cli_reload_records_the_peers_pid_uid_and_command() {
    let baton = Baton::start(&hello_config(1));
    baton.wait_committed(1);
    assert!(baton.cli(&["reload"]).status.success());
    let by = baton.status()["last_reload"]["requested_by"].clone();
    assert_eq!(by["via"], "control", "{by}");
    assert_eq!(by["uid"], nix::unistd::geteuid().as_raw(), "{by}");
    assert!(by["pid"].as_i64().is_some_and(|p| p > 0), "{by}");
    let command = by["command"].as_str().unwrap_or_default();
    assert!(command.contains("baton reload -c"), "{by}");
    let logged = baton.wait_event(Duration::from_secs(5), |e| {
        message(e) == "control request" && field(e, "request").contains("Reload")
    });
    let requested_by = field(&logged, "requested_by");
    assert!(
        requested_by.contains(&format!("pid {}", by["pid"]))
            && requested_by.contains("baton reload"),
        "{logged}"
    );
}

#[test]
fn a_signal_reload_records_the_senders_pid() {
    let baton = Baton::start(&hello_config(1));
    baton.wait_committed(1);
    let mut kill = Command::new("kill")
        .args(["-HUP", &baton.pid().to_string()])
        .spawn()
        .unwrap();
    let sender = kill.id() as i64;
    assert!(kill.wait().unwrap().success());
    baton.wait_committed(2);
    let by = baton.status()["last_reload"]["requested_by"].clone();
    assert_eq!(by["via"], "signal", "{by}");
    assert_eq!(by["signal"], "SIGHUP", "{by}");
    assert_eq!(by["pid"], sender, "{by}");
    assert_eq!(by["uid"], nix::unistd::geteuid().as_raw(), "{by}");
    let logged = baton.wait_event(Duration::from_secs(5), |e| message(e) == "signal received");
    assert!(
        field(&logged, "requested_by").contains(&format!("SIGHUP from pid {sender}")),
        "{logged}"
    );
}
