//! `protocol = "args"`: listeners at fds 3, 4, ... with their numbers
//! substituted into the command as `{fd:NAME}`.

use baton_tests::harness::{event_name, get, wait_json, Baton, Binaries, TempDir};
use std::process::Command;
use std::time::Duration;

fn args_config(dump: &TempDir, http_template: &str) -> String {
    format!(
        "[supervisor]\nlog_format = \"json\"\n\n\
         [[listener]]\nname = \"dns\"\naddress = \"udp:127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\n\n\
         [worker]\ncommand = [{:?}, \"--dump\", {:?}, \"--fd\", {http_template:?}, \"--also=fd{{fd:dns}}\"]\n\
         protocol = \"args\"\nready = \"delay:200ms\"\nready_timeout = \"10s\"\ndrain_timeout = \"5s\"\n",
        Binaries::wrapped().display().to_string(),
        dump.path().display().to_string(),
    )
}

/// What the first worker of generation 1 dumped.
fn first_dump(dump: &TempDir) -> serde_json::Value {
    wait_json(
        &dump.path().join("wrapped-1-0.json"),
        Duration::from_secs(10),
    )
}

/// A dumped array of strings.
fn strings(value: &serde_json::Value) -> Vec<&str> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect()
}

#[test]
fn args_workers_get_fd_numbers_in_their_command() {
    let dump = TempDir::new();
    let mut baton = Baton::start(&args_config(&dump, "{fd:http}"));
    baton.wait_committed(1);
    let seen = first_dump(&dump);
    let argv = strings(&seen["argv"]);
    assert_eq!(&argv[3..], ["--fd", "4", "--also=fd3"], "{seen}");
    assert_eq!(seen["LISTEN_FDS"], serde_json::Value::Null, "{seen}");
    assert_eq!(seen["LISTEN_PID"], serde_json::Value::Null, "{seen}");
    let fds = strings(&seen["fds"]);
    assert!(fds.contains(&"3") && fds.contains(&"4"), "{seen}");
    let addr = baton.address("http");
    let (status, generation, _) = get(addr).unwrap();
    assert_eq!((status, generation), (200, Some(1)));
    let outcome = baton.reload();
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while get(addr).unwrap().1 != Some(2) {
        assert!(
            std::time::Instant::now() < deadline,
            "generation 2 never answered"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn unknown_listener_in_a_fd_template_is_a_config_error_with_its_location() {
    let dump = TempDir::new();
    let config = args_config(&dump, "{fd:htp}");
    check_fails_at(&config, "baton.toml:13:", "no listener named \"htp\"");
}

/// `baton check` of `config` fails with an error at `location` that says
/// `what`.
fn check_fails_at(config: &str, location: &str, what: &str) {
    let dir = TempDir::new();
    std::fs::write(dir.path().join("baton.toml"), config).unwrap();
    let out = Command::new(Binaries::baton())
        .args(["check", "-c"])
        .arg(dir.path().join("baton.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(location) && stderr.contains(what),
        "{stderr}"
    );
}

/// `nonblocking = true` hands the listeners over with `O_NONBLOCK` set, as
/// servers that inherit sockets the way nginx does (`NGINX="3;"`) assume;
/// without it they come as the kernel made them, blocking, as systemd
/// passes them by default.
#[test]
fn nonblocking_listeners_reach_the_worker_with_o_nonblock_set() {
    for (setting, expected) in [("", false), ("nonblocking = true\n", true)] {
        let dump = TempDir::new();
        let config = args_config(&dump, "{fd:http}").replace(
            "protocol = \"args\"\n",
            &format!("protocol = \"args\"\n{setting}"),
        );
        let baton = Baton::start(&config);
        baton.wait_committed(1);
        let seen = first_dump(&dump);
        let nonblocking = strings(&seen["nonblocking_fds"]);
        for fd in ["3", "4"] {
            assert_eq!(
                nonblocking.contains(&fd),
                expected,
                "fd {fd} with {setting:?}: {seen}"
            );
        }
        // The worker serves on it either way.
        let (status, _, _) = get(baton.address("http")).unwrap();
        assert_eq!(status, 200);
    }
}

#[test]
fn nonblocking_for_an_sdk_worker_is_a_config_error_with_its_location() {
    check_fails_at(
        "[[listener]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\n\n\
         [worker]\ncommand = [\"hello\"]\nnonblocking = true\n",
        "baton.toml:7:",
        "nonblocking = true needs protocol",
    );
}
