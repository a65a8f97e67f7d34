use baton_tests::harness::{hello_config, Binaries, TempDir};
use std::process::Command;

fn check(config: &str) -> std::process::Output {
    let dir = TempDir::new();
    std::fs::write(dir.path().join("baton.toml"), config).unwrap();
    Command::new(Binaries::baton())
        .args(["check", "-c"])
        .arg(dir.path().join("baton.toml"))
        .output()
        .unwrap()
}

#[test]
fn check_accepts_a_good_config_with_a_one_line_summary() {
    let out = check(&hello_config(2));
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.contains("ok") && stdout.contains("http=127.0.0.1:0"),
        "{stdout}"
    );
}

#[test]
fn check_rejects_a_bad_config_naming_line_and_column() {
    let out = check("[worker]\ncommand = [\"x\"]\nprocesses = \"two\"\n");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("baton.toml:3:13: "), "{stderr}");
}

#[test]
fn bad_command_line_is_a_usage_error() {
    let out = Command::new(Binaries::baton())
        .arg("frobnicate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("frobnicate"));
}
