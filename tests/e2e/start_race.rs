//! Two `baton run` on the same control socket at the same moment: exactly
//! one wins, and it keeps its control socket and pid file.

use baton_tests::harness::{read_pid, Baton, TempDir};
use std::time::{Duration, Instant};

const TRIALS: usize = 20;

/// A config whose control socket and pid file are in `shared`, with a
/// listener on port 0, so only the control socket can decide who wins.
fn config(shared: &std::path::Path) -> String {
    format!(
        "[supervisor]\ncontrol_socket = \"{}/baton.sock\"\npid_file = \"{}/baton.pid\"\nlog_format = \"json\"\n\n\
         [[listener]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\n\n[worker]\ncommand = [{:?}]\nready_timeout = \"10s\"\n",
        shared.display(),
        shared.display(),
        baton_tests::harness::Binaries::hello().display().to_string()
    )
}

fn start(shared: &std::path::Path) -> Baton {
    let dir = TempDir::new();
    std::fs::write(dir.path().join("baton.toml"), config(shared)).unwrap();
    Baton::start_in(dir, &["run"])
}

#[test]
fn two_masters_started_at_once_leave_exactly_one_reachable() {
    for trial in 0..TRIALS {
        let shared = TempDir::new();
        let mut masters = [start(shared.path()), start(shared.path())];
        // Exactly one exits, with an error.
        let deadline = Instant::now() + Duration::from_secs(10);
        let loser = loop {
            if let Some(i) = masters.iter_mut().position(|b| b.try_exit().is_some()) {
                break i;
            }
            assert!(
                Instant::now() < deadline,
                "trial {trial}: both masters still run"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let winner = &mut masters[1 - loser];
        let status = winner.cli(&["status", "--json"]);
        assert!(status.status.success(), "trial {trial}: {status:?}");
        let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        assert_eq!(
            status["master"]["pid"],
            winner.pid().as_raw(),
            "trial {trial}: the control socket is the winner's"
        );
        assert_eq!(
            read_pid(&shared.path().join("baton.pid")),
            Some(winner.pid()),
            "trial {trial}: the pid file is the winner's"
        );
        assert!(
            winner.try_exit().is_none(),
            "trial {trial}: the winner runs"
        );
    }
}
