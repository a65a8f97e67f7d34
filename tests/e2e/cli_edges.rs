//! The CLI at its edges: a closed stdout, a stale pid file, no config in
//! the current directory, a master that exits as it is told to stop.

use baton_tests::harness::{
    alive, config_with_worker, hello_config, message, Baton, Binaries, TempDir,
};
use nix::unistd::Pid;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn status_into_a_closed_pipe_exits_quietly() {
    let baton = Baton::start(&hello_config(1));
    baton.wait_committed(1);
    // `baton status --json | true`: the reader is gone before anything is written.
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    let out = Command::new(Binaries::baton())
        .args(["status", "--json", "-c"])
        .arg(baton.dir().join("baton.toml"))
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "{stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}", out.status);
}

/// A process that is not baton, whose pid a stale pid file may hold.
struct Bystander(std::process::Child);

impl Bystander {
    fn start() -> Bystander {
        Bystander(Command::new("sleep").arg("30").spawn().unwrap())
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.0.id() as i32)
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn dash_s_never_signals_a_process_a_stale_pid_file_names() {
    let dir = TempDir::new();
    std::fs::write(dir.path().join("baton.toml"), hello_config(1)).unwrap();
    let bystander = Bystander::start();
    std::fs::write(
        dir.path().join("baton.pid"),
        format!("{}\n", bystander.pid()),
    )
    .unwrap();
    let out = Command::new(Binaries::baton())
        .args(["-s", "stop", "-c"])
        .arg(dir.path().join("baton.toml"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("which is not a running baton master"),
        "{stderr}"
    );
    std::thread::sleep(Duration::from_millis(100));
    assert!(alive(bystander.pid()), "the bystander was signalled");
}

#[test]
fn dash_s_signals_the_master_on_the_control_socket_whatever_the_pid_file_says() {
    let mut baton = Baton::start(&hello_config(1));
    baton.wait_committed(1);
    let bystander = Bystander::start();
    std::fs::write(
        baton.dir().join("baton.pid"),
        format!("{}\n", bystander.pid()),
    )
    .unwrap();
    let out = baton.cli(&["-s", "reload"]);
    assert_eq!(out.status.code(), Some(0));
    baton.wait_committed(2);
    assert!(alive(bystander.pid()), "the bystander was signalled");
    let out = baton.cli(&["-s", "quit"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(baton.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn commands_without_a_config_here_say_how_to_name_one() {
    let dir = TempDir::new();
    for (args, code) in [
        (&["reload"][..], 2),
        (&["status"], 2),
        (&["-s", "reload"], 2),
        (&["run"], 1),
        (&["check"], 1),
    ] {
        let out = Command::new(Binaries::baton())
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(
            stderr.contains("no ./baton.toml here: pass -c FILE"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn stop_during_a_crash_loop_reports_the_master_stopped() {
    // Ready after 100 ms, dead 200 ms later: a crash loop whose respawn
    // delays leave the generation without a worker most of the time.
    let config = config_with_worker(
        "command = [\"/bin/sh\", \"-c\", \"sleep 0.2; exit 1\"]\nprotocol = \"args\"\nready = \"delay:100ms\"\n",
    );
    let mut baton = Baton::start(&config);
    baton.wait_committed(1);
    baton.next_event(Duration::from_secs(20), |e| {
        message(e) == "worker crash loop: respawn delayed"
    });
    let out = baton.cli(&["stop"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout.contains(&format!("master {} stopped", baton.pid())),
        "{stdout}"
    );
    assert!(baton.wait_exit(Duration::from_secs(5)).success());
}
