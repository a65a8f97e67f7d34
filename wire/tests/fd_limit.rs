//! A message whose fds do not fit under the receiver's fd limit arrives all
//! the same, saying so, so that the receiver can answer it. Its own process
//! (an integration test of its own): it lowers the process's fd limit.

use baton_wire::channel::{pair, Channel};
use baton_wire::protocol::{HandedConnection, WorkerMessage};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

#[tokio::test]
async fn fds_past_the_limit_are_dropped_and_the_message_says_so() {
    let (a, b) = pair().unwrap();
    let (a, b) = (Channel::new(a).unwrap(), Channel::new(b).unwrap());
    let files: Vec<OwnedFd> = (0..8)
        .map(|_| std::fs::File::open("/dev/null").unwrap().into())
        .collect();
    let connections = vec![
        HandedConnection {
            pending: vec![],
            session: None,
        };
        files.len()
    ];
    let borrowed: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
    let message = WorkerMessage::Handover {
        id: 1,
        address: "127.0.0.1:1".into(),
        connections,
    };
    a.try_send(&message, &borrowed).unwrap();
    // Room for 3 of the 8 fds: the limit bounds fd numbers, and new fds take
    // the lowest free ones, so every free number below it is filled first.
    let highest = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .max()
        .unwrap();
    let mut filler: Vec<OwnedFd> = Vec::new();
    loop {
        let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let number = std::os::fd::AsRawFd::as_raw_fd(&fd);
        filler.push(fd);
        if number > highest {
            break;
        }
    }
    let last = std::os::fd::AsRawFd::as_raw_fd(filler.last().unwrap()) as u64;
    let limit = last + 1 + 3;
    let open = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let before = open();
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, limit, hard).unwrap();
    let got = b.recv::<WorkerMessage>().await;
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    let got = got.unwrap().unwrap();
    assert_eq!(got.message, message);
    assert!(got.fds_truncated);
    assert!(got.fds.is_empty(), "those that arrived are closed");
    // None of the fds that did arrive is left open.
    assert_eq!(open(), before);
    drop(filler);
}
