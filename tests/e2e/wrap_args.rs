//! `protocol = "args"`: listeners at fds 3, 4, ... with their numbers
//! substituted into the command as `{fd:NAME}`.

use baton_tests::harness::{get, message, wait_json, Baton, Binaries, TempDir};
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

#[test]
fn args_workers_get_fd_numbers_in_their_command() {
    let dump = TempDir::new();
    let mut baton = Baton::start(&args_config(&dump, "{fd:http}"));
    baton.wait_committed(1);
    let seen = wait_json(
        &dump.path().join("wrapped-1-0.json"),
        Duration::from_secs(10),
    );
    let argv: Vec<&str> = seen["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(&argv[3..], ["--fd", "4", "--also=fd3"], "{seen}");
    assert_eq!(seen["LISTEN_FDS"], serde_json::Value::Null, "{seen}");
    assert_eq!(seen["LISTEN_PID"], serde_json::Value::Null, "{seen}");
    let fds: Vec<&str> = seen["fds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(fds.contains(&"3") && fds.contains(&"4"), "{seen}");
    let addr = baton.address("http");
    let (status, generation, _) = get(addr).unwrap();
    assert_eq!((status, generation), (200, Some(1)));
    let outcome = baton.reload();
    assert_eq!(message(&outcome), "reload committed", "{outcome}");
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
    std::fs::write(
        dump.path().join("baton.toml"),
        args_config(&dump, "{fd:htp}"),
    )
    .unwrap();
    let out = Command::new(Binaries::baton())
        .args(["check", "-c"])
        .arg(dump.path().join("baton.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("baton.toml:13:") && stderr.contains("no listener named \"htp\""),
        "{stderr}"
    );
}
