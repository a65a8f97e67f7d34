//! What is at the config path is not trusted: a FIFO or a huge file there
//! gets a clear error, the master keeps answering, and nothing running
//! changes.

use baton_tests::harness::{generation_in, hello_config, Baton, Binaries};
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn worker_pids(status: &Value, generation: u64) -> Vec<i64> {
    generation_in(status, generation).expect("generation in status")["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| w["pid"].as_i64().expect("pid"))
        .collect()
}

/// `baton reload`, through the control socket alone: the CLI does not read
/// the config for it, so that only the master's reading is tested.
fn reload(baton: &Baton) -> std::process::Output {
    let socket = baton.control_socket().display().to_string();
    baton.cli(&["reload", "--timeout", "10s", "--socket", &socket])
}

#[test]
fn reload_from_a_fifo_fails_clearly_and_the_master_keeps_answering() {
    let baton = Baton::start(&hello_config(1));
    baton.wait_committed(1);
    let before = worker_pids(&baton.status(), 1);
    let path = baton.dir().join("baton.toml");
    std::fs::remove_file(&path).expect("remove the config");
    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");

    let out = reload(&baton);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let error = stderr(&out);
    assert!(error.contains("phase validate"), "{error}");
    assert!(error.contains(&path.display().to_string()), "{error}");
    assert!(error.contains("a FIFO, not a regular file"), "{error}");

    // The CLI finds the control socket through the config too: the FIFO
    // must not hang it either.
    let mut status = Command::new(Binaries::baton())
        .args(["status", "--json", "-c"])
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run baton status");
    let deadline = Instant::now() + Duration::from_secs(10);
    while status.try_wait().expect("wait for baton status").is_none() {
        if Instant::now() >= deadline {
            let _ = status.kill();
            let _ = status.wait();
            panic!("`baton status -c FIFO` did not answer within 10s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = status.wait_with_output().expect("baton status output");
    assert!(output.status.success(), "baton status failed");
    let status: Value = serde_json::from_slice(&output.stdout).expect("status JSON");
    assert_eq!(status["master"]["current_generation"], 1);
    assert_eq!(status["last_reload"]["outcome"], "failed");
    assert_eq!(worker_pids(&status, 1), before, "workers untouched");
}

#[test]
fn an_oversized_config_is_refused_and_changes_nothing() {
    let baton = Baton::start(&hello_config(1));
    baton.wait_committed(1);
    let before = worker_pids(&baton.status(), 1);
    // Valid TOML, a real change (two workers), and 5 MiB of comment.
    let mut config = hello_config(2);
    let filler = format!("# {}\n", "x".repeat(1022));
    for _ in 0..5 * 1024 {
        config.push_str(&filler);
    }
    baton.write_config(&config);
    let path = baton.dir().join("baton.toml").display().to_string();

    let check = baton.cli(&["check"]);
    assert!(!check.status.success(), "baton check accepted it");
    assert!(stderr(&check).contains("4 MiB"), "{}", stderr(&check));

    let out = reload(&baton);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let error = stderr(&out);
    assert!(error.contains("phase validate"), "{error}");
    assert!(error.contains(&path), "{error}");
    assert!(
        error.contains("larger than the 4 MiB a configuration may have"),
        "{error}"
    );
    let status = baton.status();
    assert_eq!(status["master"]["current_generation"], 1);
    assert_eq!(worker_pids(&status, 1), before, "workers untouched");
}
