use baton_tests::harness::{hello_config, Baton, Binaries, TempDir};
use nix::sys::signal::Signal;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// The next datagram the "systemd" side receives.
fn next(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn systemd_hears_ready_reloading_the_new_main_pid_and_stopping() {
    let dir = TempDir::new();
    let path = dir.path().join("notify.sock");
    let systemd = UnixDatagram::bind(&path).unwrap();
    systemd
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    std::fs::write(dir.path().join("baton.toml"), hello_config(1)).unwrap();
    let mut baton = Baton::start_with_env(
        &Binaries::baton(),
        dir,
        &["run"],
        &[("NOTIFY_SOCKET", path.as_os_str())],
    );
    assert_eq!(next(&systemd), "READY=1");
    baton.signal(Signal::SIGHUP);
    assert_eq!(next(&systemd), "RELOADING=1");
    assert_eq!(next(&systemd), "READY=1");
    // An upgrade: the old master, still the main pid, names the new one; the
    // new master says nothing of its own before that.
    baton.signal(Signal::SIGUSR2);
    let handover = next(&systemd);
    let new_pid = baton.wait_new_master(baton.pid(), Duration::from_secs(20));
    assert_eq!(handover, format!("MAINPID={new_pid}\nREADY=1"));
    nix::sys::signal::kill(new_pid, Signal::SIGQUIT).unwrap();
    assert_eq!(next(&systemd), "STOPPING=1");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while baton_tests::harness::alive(new_pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "new master did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Nothing more: the old master's exit and the new one's were the only
    // other events, and neither is systemd's business beyond STOPPING=1.
    systemd
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(
        systemd.recv(&mut buf).is_err(),
        "unexpected extra notification"
    );
    let _ = baton.wait_exit(Duration::from_secs(1));
}
