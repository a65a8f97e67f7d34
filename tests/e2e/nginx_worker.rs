//! Unmodified nginx as a baton worker, from `examples/nginx/`: its socket
//! comes in `NGINX="{fd:http};"`, and reloads fail no request.

use baton_tests::harness::{event_name, steady_load, Baton, TempDir};
use baton_tests::load::Mode;
use baton_tests::tools;

#[test]
fn nginx_from_the_example_reloads_under_new_connection_load_fail_nothing() {
    const RELOADS: u64 = 10;
    let Some(nginx) = tools::require("nginx", "apt-get install nginx") else {
        return;
    };
    let example = tools::repository().join("examples/nginx");
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // The example's files, on a free port, with the harness's JSON log and
    // a shorter readiness delay; nginx found where this machine has it.
    let dir = TempDir::new();
    let read = |name: &str| std::fs::read_to_string(example.join(name)).unwrap();
    std::fs::write(
        dir.path().join("nginx.conf"),
        read("nginx.conf").replace("127.0.0.1:8081", &addr.to_string()),
    )
    .unwrap();
    let config = read("baton.toml")
        .replace("127.0.0.1:8081", &addr.to_string())
        .replace(
            "[\"nginx\",",
            &format!("[{:?},", nginx.display().to_string()),
        )
        .replace("delay:1s", "delay:600ms")
        .replace("[supervisor]\n", "[supervisor]\nlog_format = \"json\"\n");
    std::fs::write(dir.path().join("baton.toml"), config).unwrap();
    let mut baton = Baton::start_in(dir, &["run"]);
    baton.wait_committed(1);
    let load = steady_load(addr, Mode::NewConnection);
    for _ in 0..RELOADS {
        let outcome = baton.reload();
        assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    }
    let report = load.stop();
    eprintln!(
        "nginx across {RELOADS} reloads: {} ok, {} failed",
        report.ok(),
        report.failed()
    );
    assert!(report.ok() > 100, "too little traffic: {}", report.ok());
    assert_eq!(report.failed(), 0, "{}", report.failures_summary());
    // Each generation ran an nginx of its own, with its own pid file.
    assert!(baton
        .dir()
        .join(format!("nginx-{}.pid", RELOADS + 1))
        .exists());
}
