//! HTTP/2 drains with the graceful GOAWAY pattern, checked frame by frame
//! with a client that speaks raw HTTP/2, so nothing hides what the server
//! sends.

use super::*;
use http_body_util::Full;
use hyper::body::Bytes;
use std::convert::Infallible;
use std::io::{Read, Write};
use tokio::net::TcpListener;
use tokio::sync::Notify;

const PATIENCE: Duration = Duration::from_secs(2);

const HEADERS: u8 = 1;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

struct RawClient(std::net::TcpStream);

impl RawClient {
    fn connect(addr: std::net::SocketAddr) -> RawClient {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .unwrap();
        let mut client = RawClient(stream);
        client.send(SETTINGS, 0, 0, &[]);
        client
    }

    fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = payload.len() as u32;
        let mut frame = len.to_be_bytes()[1..].to_vec();
        frame.extend([kind, flags]);
        frame.extend(stream.to_be_bytes());
        frame.extend(payload);
        self.0.write_all(&frame).unwrap();
    }

    /// A GET for `path` on `stream`, HPACK-encoded without the dynamic table:
    /// `:method GET`, `:scheme http` indexed, `:path` a literal.
    fn get(&mut self, stream: u32, path: &str) {
        let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
        block.extend(path.as_bytes());
        self.send(HEADERS, END_STREAM | END_HEADERS, stream, &block);
    }

    /// The next frame, answering SETTINGS on the way.
    fn next(&mut self) -> Frame {
        loop {
            let mut head = [0; 9];
            self.0
                .read_exact(&mut head)
                .expect("a frame before the timeout");
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0; len];
            self.0.read_exact(&mut payload).unwrap();
            let frame = Frame {
                kind: head[3],
                flags: head[4],
                stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
                payload,
            };
            if frame.kind == SETTINGS {
                if frame.flags & ACK == 0 {
                    self.send(SETTINGS, ACK, 0, &[]);
                }
                continue;
            }
            return frame;
        }
    }

    /// Frames until one of `kind`, with the others skipped over.
    fn until(&mut self, kind: u8) -> Frame {
        loop {
            let frame = self.next();
            if frame.kind == kind {
                return frame;
            }
        }
    }
}

fn last_stream_id(goaway: &Frame) -> u32 {
    let p = &goaway.payload;
    u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_drain_sends_goaway_twice_and_serves_streams_sent_before_the_second() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let gate = Arc::new(Notify::new());
    let started = Arc::new(Notify::new());
    let (handler_gate, handler_started) = (gate.clone(), started.clone());
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let (gate, started) = (handler_gate.clone(), handler_started.clone());
        async move {
            if request.uri().path() == "/gated" {
                started.notify_one();
                gate.notified().await;
            }
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        }
    });
    let drain = Drain::new();
    let options = ServeOptions {
        close_spread: Some(Duration::ZERO),
        ..Default::default()
    };
    let task = tokio::spawn(serve(
        TcpListener::from_std(listener).unwrap(),
        service,
        drain.clone(),
        options,
    ));

    let client = tokio::task::spawn_blocking(move || {
        let mut client = RawClient::connect(addr);
        client.get(1, "/gated");
        client
    })
    .await
    .unwrap();
    tokio::time::timeout(PATIENCE, started.notified())
        .await
        .unwrap();
    drain.start(PATIENCE * 5);

    let frames = tokio::task::spawn_blocking(move || {
        let mut client = client;
        let first = client.until(GOAWAY);
        // The client had sent stream 3 before it read the first GOAWAY.
        client.get(3, "/");
        let ping = client.until(PING);
        client.send(PING, ACK, 0, &ping.payload);
        let mut seen = vec![(first.kind, last_stream_id(&first))];
        loop {
            let frame = client.next();
            match frame.kind {
                GOAWAY => seen.push((GOAWAY, last_stream_id(&frame))),
                HEADERS => seen.push((HEADERS, frame.stream)),
                _ => {}
            }
            if seen.len() == 3 {
                return (client, seen);
            }
        }
    });
    // Stream 3 is answered while stream 1 still waits.
    let (client, seen) = frames.await.unwrap();
    assert_eq!(seen[0], (GOAWAY, 0x7fff_ffff), "{seen:?}");
    assert!(seen[1..].contains(&(GOAWAY, 3)), "{seen:?}");
    assert!(seen[1..].contains(&(HEADERS, 3)), "{seen:?}");
    gate.notify_one();
    let rest = tokio::task::spawn_blocking(move || {
        let mut client = client;
        client.until(HEADERS).stream
    });
    assert_eq!(rest.await.unwrap(), 1, "the stream in flight finishes");
    tokio::time::timeout(PATIENCE, task)
        .await
        .expect("serve returns once the last stream ended")
        .unwrap()
        .unwrap();
}
