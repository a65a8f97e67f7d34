use baton_tests::harness::{config_with_worker, field, hello_config, Baton, Binaries, TempDir};
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

/// `baton check` on `config`: exit 1 and a message containing `expected`.
fn assert_check_fails(config: &str, expected: &str) {
    let out = check(config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(expected), "{stderr}");
}

#[test]
fn check_rejects_a_missing_or_non_executable_command() {
    assert_check_fails(
        &config_with_worker("command = [\"/nonexistent/server\"]\n"),
        "worker command \"/nonexistent/server\": No such file or directory",
    );
    assert_check_fails(
        &config_with_worker("command = [\"no-such-server-anywhere\"]\n"),
        "worker command \"no-such-server-anywhere\" not found in PATH",
    );
    let dir = TempDir::new();
    let plain = dir.path().join("server.py");
    std::fs::write(&plain, "print('not executable')\n").unwrap();
    assert_check_fails(
        &config_with_worker(&format!("command = [{:?}]\n", plain.display().to_string())),
        &format!(
            "worker command {:?} is not executable",
            plain.display().to_string()
        ),
    );
}

#[test]
fn check_rejects_a_missing_cwd_naming_the_cwd() {
    let config = format!("{}cwd = \"/nonexistent/dir\"\n", hello_config(1));
    assert_check_fails(
        &config,
        "worker cwd /nonexistent/dir: No such file or directory",
    );
}

#[test]
fn check_rejects_an_unknown_user() {
    let config = format!("{}user = \"no-such-user-here\"\n", hello_config(1));
    // As root the user is looked up; otherwise naming one needs root.
    let expected = if nix::unistd::geteuid().is_root() {
        "unknown user \"no-such-user-here\""
    } else {
        "user = \"no-such-user-here\" needs the master to run as root"
    };
    assert_check_fails(&config, expected);
}

#[test]
fn check_rejects_a_port_another_process_holds_but_not_the_running_masters() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let held = holder.local_addr().unwrap().to_string();
    assert_check_fails(
        &hello_config(1).replace("127.0.0.1:0", &held),
        &format!("binding listener `http` on {held}: EADDRINUSE"),
    );
    drop(holder);
    // The running master's own port is what a reload keeps: not a problem.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let baton = Baton::start(&hello_config(1).replace("127.0.0.1:0", &free));
    baton.wait_committed(1);
    let out = baton.cli(&["check"]);
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn a_reload_with_a_missing_cwd_names_the_cwd() {
    let mut baton = Baton::start(&hello_config(1));
    baton.wait_committed(1);
    baton.write_config(&format!("{}cwd = \"missing-dir\"\n", hello_config(1)));
    let outcome = baton.reload();
    let reason = field(&outcome, "reason");
    assert!(
        reason.contains("worker cwd ") && reason.contains("missing-dir: No such file or directory"),
        "{reason}"
    );
}

#[test]
fn a_config_that_is_not_utf8_is_an_error_with_line_and_column() {
    let dir = TempDir::new();
    let mut bytes = hello_config(1).into_bytes();
    bytes.extend_from_slice(b"# caf\xe9\n");
    std::fs::write(dir.path().join("baton.toml"), &bytes).unwrap();
    let out = Command::new(Binaries::baton())
        .args(["check", "-c"])
        .arg(dir.path().join("baton.toml"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = hello_config(1).lines().count() + 1;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains(&format!("baton.toml:{line}:6: invalid UTF-8")),
        "{stderr}"
    );
}
