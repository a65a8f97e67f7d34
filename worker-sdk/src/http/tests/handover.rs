//! Idle HTTP/1.1 connections moving from a draining server to another one
//! through a stand-in for the master.

use super::*;
use crate::handover::Handover;
use baton_wire::channel::{pair, Channel};
use baton_wire::protocol::{MasterMessage, WorkerMessage};
use std::os::fd::{AsFd, BorrowedFd};

/// What the stand-in master does with each handover.
#[derive(Clone, Copy, PartialEq)]
enum Master {
    /// Passes it to the other worker.
    Relays,
    /// Refuses it.
    Refuses,
}

/// A worker's hub, with the SDK's reader of its channel, and the master's
/// end of the channel.
fn hub() -> (Handover, Channel) {
    let (master, worker) = pair().unwrap();
    let worker = Arc::new(Channel::new(worker).unwrap());
    let handover = Handover::new(worker.clone(), true);
    let (reopen, _) = crate::reopen::Reopen::channel();
    crate::control::spawn_reader(
        worker,
        Drain::new(),
        PATIENCE,
        reopen,
        Default::default(),
        handover.clone(),
    );
    (handover, Channel::new(master).unwrap())
}

/// Relays every handover of `old` to `new` (or refuses it), and refuses
/// the handovers of `new` (no generation is newer), as the master does;
/// returns once `old` is gone.
async fn master(old: Channel, new: Channel, how: Master) {
    let refuse = |channel: &Channel, id| {
        let reason = "refused by the test".into();
        let _ = channel.try_send(&MasterMessage::HandoverRefused { id, reason }, &[]);
    };
    loop {
        // Both reads are cancel-safe: a message is read whole or not at all.
        tokio::select! {
            from_old = old.recv::<WorkerMessage>() => {
                let Ok(Some(received)) = from_old else { return };
                let WorkerMessage::Handover { id, address, connections } = received.message else {
                    continue;
                };
                if how == Master::Refuses {
                    refuse(&old, id);
                    continue;
                }
                let fds: Vec<BorrowedFd<'_>> = received.fds.iter().map(|fd| fd.as_fd()).collect();
                let adopt = MasterMessage::Adopt { id, address, connections, origin: None };
                new.try_send(&adopt, &fds).unwrap();
            }
            from_new = new.recv::<WorkerMessage>() => {
                let Ok(Some(received)) = from_new else { return };
                let answer = match received.message {
                    WorkerMessage::Adopted { id, .. } => MasterMessage::HandedOver { id },
                    WorkerMessage::AdoptRefused { id, reason, .. } => {
                        MasterMessage::HandoverRefused { id, reason }
                    }
                    WorkerMessage::Handover { id, .. } => {
                        refuse(&new, id);
                        continue;
                    }
                    _ => continue,
                };
                let _ = old.try_send(&answer, &[]);
            }
        }
    }
}

/// Two servers on one listener, `old` serving and `new` started only
/// once `client` is connected to `old`, and a master between them.
struct Pair {
    old: (Drain, JoinHandle<io::Result<()>>),
    new: (Drain, JoinHandle<io::Result<()>>),
    client: Client,
}

async fn pair_of_servers(how: Master) -> Pair {
    servers_with(how, TestService::new("old"), ServeOptions::default()).await
}

/// [`pair_of_servers`], the old one serving `service`, both with `options`
/// (and a hub each).
async fn servers_with(how: Master, service: TestService, options: ServeOptions) -> Pair {
    let listener = bind();
    let addr = listener.local_addr().unwrap();
    let second = listener.try_clone().unwrap();
    let (old_hub, old_master) = hub();
    let (new_hub, new_master) = hub();
    let options = |handover| ServeOptions {
        handover: Some(handover),
        ..options.clone()
    };
    let old = spawn_serve(listener, service, options(old_hub));
    let mut client = Client::connect(addr).unwrap();
    assert_eq!(client.get("/").unwrap().body, "old");
    let new = spawn_serve(second, TestService::new("new"), options(new_hub));
    // The new server's announcement first, so that the master's relay
    // reads the handovers' answers.
    let announced = new_master.recv::<WorkerMessage>().await.unwrap().unwrap();
    assert!(matches!(announced.message, WorkerMessage::Adopts { .. }));
    tokio::spawn(master(old_master, new_master, how));
    Pair { old, new, client }
}

/// Drains `server` and waits for it to finish.
async fn stop(server: (Drain, JoinHandle<io::Result<()>>)) {
    server.0.start(PATIENCE);
    finished(server.1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_moves_to_the_other_server_without_a_close() {
    let Pair {
        old,
        new,
        mut client,
    } = pair_of_servers(Master::Relays).await;
    old.0.start(PATIENCE);
    // The draining server lets go of it between two requests.
    finished(old.1).await;
    for _ in 0..3 {
        let reply = client.get("/").unwrap();
        assert_eq!(
            (reply.status, reply.close, reply.body.as_str()),
            (200, false, "new")
        );
    }
    drop(client);
    stop(new).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_begun_before_the_handover_is_finished_after_it_once() {
    let Pair {
        old,
        new,
        mut client,
    } = pair_of_servers(Master::Relays).await;
    // The first bytes reach the old server, which reads them...
    client
        .0
        .get_mut()
        .write_all(b"GET /split HTTP/1.1\r\nho")
        .unwrap();
    sleep(Duration::from_millis(50)).await;
    stop(old).await;
    // ...the rest reaches the new one, which serves the whole request.
    client.0.get_mut().write_all(b"st: test\r\n\r\n").unwrap();
    let reply = client.reply().unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, "new"));
    let reply = client.get("/").unwrap();
    assert_eq!((reply.close, reply.body.as_str()), (false, "new"));
    drop(client);
    stop(new).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_connection_moves_after_its_response() {
    let service = TestService::new("old");
    let (gate, started) = (service.gate.clone(), service.started.clone());
    let Pair {
        old,
        new,
        mut client,
    } = servers_with(Master::Relays, service, ServeOptions::default()).await;
    // The permit the first request (`/`, answered) left.
    started.notified().await;
    client.send("/gated").unwrap();
    tokio::time::timeout(PATIENCE, started.notified())
        .await
        .unwrap();
    old.0.start(PATIENCE);
    sleep(Duration::from_millis(150)).await;
    gate.notify_one();
    // Answered in full, without `Connection: close`, then moved.
    let reply = client.reply().unwrap();
    assert_eq!((reply.close, reply.body.as_str()), (false, "old"));
    finished(old.1).await;
    let reply = client.get("/").unwrap();
    assert_eq!((reply.close, reply.body.as_str()), (false, "new"));
    drop(client);
    stop(new).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_closed_between_requests_as_without_a_handover() {
    let Pair {
        old,
        new,
        mut client,
    } = pair_of_servers(Master::Refuses).await;
    old.0.start(PATIENCE);
    sleep(Duration::from_millis(150)).await;
    // Still the old server's, told to go: the answer says so, then it closes.
    let reply = client.get("/").unwrap();
    assert_eq!(
        (reply.status, reply.close, reply.body.as_str()),
        (200, true, "old")
    );
    assert!(client.closed_by_server());
    finished(old.1).await;
    stop(new).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_travel_together() {
    let listener = bind();
    let addr = listener.local_addr().unwrap();
    let (old_hub, old_master) = hub();
    let options = ServeOptions {
        handover: Some(old_hub),
        ..Default::default()
    };
    let old = spawn_serve(listener, TestService::new("old"), options);
    let mut clients: Vec<Client> = (0..20).map(|_| Client::connect(addr).unwrap()).collect();
    for client in &mut clients {
        assert_eq!(client.get("/").unwrap().body, "old");
    }
    old.0.start(PATIENCE);
    let connections = loop {
        let got = old_master.recv::<WorkerMessage>().await.unwrap().unwrap();
        if let WorkerMessage::Handover { connections, .. } = got.message {
            break connections;
        }
    };
    assert_eq!(connections.len(), 20);
}

/// Requests written ahead of their answers: whichever server answers, each
/// is answered once, in order, and the connection stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_across_the_handover() {
    let options = ServeOptions {
        idle_grace: Duration::from_millis(100),
        ..Default::default()
    };
    let Pair {
        old,
        new,
        mut client,
    } = servers_with(Master::Relays, TestService::new("old"), options).await;
    // Numbered requests, written without waiting for the answers.
    const REQUESTS: usize = 3000;
    let mut writer = client.0.get_ref().try_clone().unwrap();
    let pipeline = std::thread::spawn(move || {
        for i in 0..REQUESTS {
            let request = format!("GET /{i} HTTP/1.1\r\nhost: test\r\n\r\n");
            writer.write_all(request.as_bytes()).unwrap();
        }
    });
    let mut answered = Vec::new();
    for i in 0..REQUESTS {
        if i == 10 {
            old.0.start(PATIENCE);
        }
        let reply = client.reply().unwrap();
        assert_eq!((reply.status, reply.close), (200, false), "request {i}");
        answered.push(reply.body);
    }
    pipeline.join().unwrap();
    // Nothing more: no request was answered twice.
    assert!(client.0.buffer().is_empty());
    let stream = client.0.get_ref();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!((&*stream).read(&mut [0]).is_err(), "an answer too many");
    // The old server's answers, then the new one's: none lost, none twice.
    let moved = answered.iter().position(|b| b == "new").expect("it moved");
    assert!(answered[..moved].iter().all(|b| b == "old"));
    assert!(answered[moved..].iter().all(|b| b == "new"));
    finished(old.1).await;
    drop(client);
    stop(new).await;
}
