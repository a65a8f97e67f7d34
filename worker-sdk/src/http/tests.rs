use super::*;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::HeaderValue;
use std::convert::Infallible;
use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Every test's bound on waiting for the server.
const PATIENCE: Duration = Duration::from_secs(2);

/// Answers with its name; `/gated` waits for `gate`, `/hang` never answers.
/// `started` is notified whenever a request reaches the handler.
#[derive(Clone)]
struct TestService {
    name: &'static str,
    gate: Arc<Notify>,
    started: Arc<Notify>,
}

impl TestService {
    fn new(name: &'static str) -> TestService {
        TestService {
            name,
            gate: Arc::new(Notify::new()),
            started: Arc::new(Notify::new()),
        }
    }
}

impl Service<Request<Incoming>> for TestService {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let path = request.uri().path().to_string();
        let (name, gate) = (self.name, self.gate.clone());
        self.started.notify_one();
        Box::pin(async move {
            match path.as_str() {
                "/gated" => gate.notified().await,
                "/hang" => std::future::pending().await,
                _ => {}
            }
            Ok(Response::new(Full::new(Bytes::from_static(
                name.as_bytes(),
            ))))
        })
    }
}

fn bind() -> std::net::TcpListener {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    listener
}

/// Options that tell every connection to go as soon as the drain starts
/// (the default spread waits 100 ms for sibling workers first).
fn at_once() -> ServeOptions {
    ServeOptions {
        close_spread: Some(Duration::ZERO),
        ..Default::default()
    }
}

fn spawn_serve(
    listener: std::net::TcpListener,
    service: TestService,
    options: ServeOptions,
) -> (Drain, JoinHandle<io::Result<()>>) {
    let drain = Drain::new();
    let listener = TcpListener::from_std(listener).unwrap();
    let task = tokio::spawn(serve(listener, service, drain.clone(), options));
    (drain, task)
}

async fn finished(task: JoinHandle<io::Result<()>>) {
    tokio::time::timeout(PATIENCE, task)
        .await
        .expect("serve returns")
        .expect("serve does not panic")
        .expect("serve succeeds");
}

/// A client connection speaking raw HTTP/1.1, so nothing hides what the
/// server does with the connection.
struct Client<S = std::net::TcpStream>(BufReader<S>);

#[derive(Debug)]
struct Reply {
    status: u16,
    close: bool,
    body: String,
}

impl Client {
    fn connect(addr: SocketAddr) -> io::Result<Client> {
        let stream = std::net::TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(PATIENCE))?;
        Ok(Client(BufReader::new(stream)))
    }
}

impl<S: Read + Write> Client<S> {
    fn send(&mut self, path: &str) -> io::Result<()> {
        let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n");
        self.0.get_mut().write_all(request.as_bytes())
    }

    fn get(&mut self, path: &str) -> io::Result<Reply> {
        self.send(path)?;
        self.reply()
    }

    fn reply(&mut self) -> io::Result<Reply> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        let mut line = String::new();
        if self.0.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(&line))?;
        let (mut length, mut close) = (0, false);
        loop {
            line.clear();
            if self.0.read_line(&mut line)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let Some((name, value)) = line.trim_end().split_once(':') else {
                break;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse().map_err(|_| bad(value))?;
            } else if name.eq_ignore_ascii_case("connection") {
                close |= value.eq_ignore_ascii_case("close");
            }
        }
        let mut body = vec![0; length];
        self.0.read_exact(&mut body)?;
        let body = String::from_utf8(body).map_err(|_| bad("body"))?;
        Ok(Reply {
            status,
            close,
            body,
        })
    }

    /// Whether the server closed the connection (read sees end of file).
    fn closed_by_server(&mut self) -> bool {
        matches!(self.0.read(&mut [0]), Ok(0))
    }
}

// The tests' bodies block on std sockets: they run on the test's own
// thread while the server runs on the runtime's workers.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_requests_share_one_connection() {
    let listener = bind();
    let addr = listener.local_addr().unwrap();
    let (drain, task) = spawn_serve(listener, TestService::new("ok"), Default::default());
    let mut client = Client::connect(addr).unwrap();
    for _ in 0..5 {
        let reply = client.get("/").unwrap();
        assert_eq!(
            (reply.status, reply.close, reply.body.as_str()),
            (200, false, "ok")
        );
    }
    drop(client);
    drain.start(PATIENCE);
    finished(task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_after_drain_is_answered_with_connection_close() {
    let listener = bind();
    let addr = listener.local_addr().unwrap();
    let (drain, task) = spawn_serve(listener, TestService::new("ok"), at_once());
    let mut client = Client::connect(addr).unwrap();
    assert!(!client.get("/").unwrap().close);
    drain.start(PATIENCE);
    // The serving task tells the connection to go (no spread: at once) as
    // soon as it sees the drain.
    sleep(Duration::from_millis(100)).await;
    let reply = client.get("/").unwrap();
    assert_eq!(
        (reply.status, reply.close, reply.body.as_str()),
        (200, true, "ok")
    );
    assert!(
        client.closed_by_server(),
        "hyper closes after `Connection: close`"
    );
    finished(task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_in_flight_at_drain_completes_with_connection_close() {
    let listener = bind();
    let addr = listener.local_addr().unwrap();
    let service = TestService::new("ok");
    let (gate, started) = (service.gate.clone(), service.started.clone());
    let (drain, task) = spawn_serve(listener, service, at_once());
    let mut client = Client::connect(addr).unwrap();
    client.send("/gated").unwrap();
    tokio::time::timeout(PATIENCE, started.notified())
        .await
        .unwrap();
    drain.start(PATIENCE);
    sleep(Duration::from_millis(100)).await;
    gate.notify_one();
    let reply = client.reply().unwrap();
    assert_eq!(
        (reply.status, reply.close, reply.body.as_str()),
        (200, true, "ok")
    );
    assert!(client.closed_by_server());
    finished(task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_is_closed_after_grace_once_draining() {
    let listener = bind();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(Mutex::new(Vec::new()));
    let record = counts.clone();
    let options = ServeOptions {
        idle_grace: Duration::from_millis(100),
        on_connections: Some(Arc::new(move |n| record.lock().unwrap().push(n))),
        ..Default::default()
    };
    let (drain, task) = spawn_serve(listener, TestService::new("ok"), options);
    let mut client = Client::connect(addr).unwrap();
    assert!(!client.get("/").unwrap().close);
    // Reports are throttled: wait for the open connection to be reported.
    let reported = Instant::now();
    while !counts.lock().unwrap().contains(&1) {
        assert!(
            reported.elapsed() < PATIENCE,
            "{:?}",
            counts.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let draining = Instant::now();
    drain.start(PATIENCE);
    assert!(client.closed_by_server());
    assert!(draining.elapsed() >= Duration::from_millis(100));
    finished(task).await;
    let counts = counts.lock().unwrap();
    assert_eq!((counts.iter().max(), counts.last()), (Some(&1), Some(&0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_drops_a_request_that_never_finishes() {
    let listener = bind();
    let addr = listener.local_addr().unwrap();
    let service = TestService::new("ok");
    let started = service.started.clone();
    let options = ServeOptions {
        idle_grace: Duration::from_secs(60),
        ..Default::default()
    };
    let (drain, task) = spawn_serve(listener, service, options);
    let mut client = Client::connect(addr).unwrap();
    client.send("/hang").unwrap();
    tokio::time::timeout(PATIENCE, started.notified())
        .await
        .unwrap();
    drain.start(Duration::from_millis(200));
    finished(task).await;
    assert!(
        client.reply().is_err(),
        "the connection was dropped unanswered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_listener_serves_and_drains_the_same_way() {
    let path = std::env::temp_dir().join(format!("baton-http-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let drain = Drain::new();
    let task = tokio::spawn(serve(
        listener,
        TestService::new("ok"),
        drain.clone(),
        at_once(),
    ));
    let stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut client = Client(BufReader::new(stream));
    assert!(!client.get("/").unwrap().close);
    drain.start(PATIENCE);
    sleep(Duration::from_millis(100)).await;
    let reply = client.get("/").unwrap();
    assert_eq!(
        (reply.status, reply.close, reply.body.as_str()),
        (200, true, "ok")
    );
    assert!(client.closed_by_server());
    finished(task).await;
}

#[derive(Debug, Default)]
struct Tally {
    old: u64,
    new: u64,
    closes: u64,
    failures: Vec<String>,
}

/// One closed-loop keep-alive client: a request, its whole reply, the next
/// request; a new connection only when told `Connection: close`.
fn closed_loop(addr: SocketAddr, until: std::time::Instant) -> Tally {
    let mut tally = Tally::default();
    let mut client: Option<Client> = None;
    while std::time::Instant::now() < until {
        let connection = match client.as_mut() {
            Some(connection) => connection,
            None => match Client::connect(addr) {
                Ok(connection) => client.insert(connection),
                Err(error) => {
                    tally.failures.push(format!("connect: {error}"));
                    continue;
                }
            },
        };
        match connection.get("/") {
            Ok(reply) if reply.status == 200 => {
                match reply.body.as_str() {
                    "old" => tally.old += 1,
                    _ => tally.new += 1,
                }
                if reply.close {
                    tally.closes += 1;
                    if !connection.closed_by_server() {
                        tally.failures.push("open after `Connection: close`".into());
                    }
                    client = None;
                }
            }
            Ok(reply) => tally.failures.push(format!("{reply:?}")),
            Err(error) => {
                tally.failures.push(format!("request: {error}"));
                client = None;
            }
        }
    }
    tally
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn closed_loop_clients_lose_no_request_across_a_handover() {
    let old_listener = bind();
    let addr = old_listener.local_addr().unwrap();
    // The same socket, as the next generation receives it from the master.
    let new_listener = old_listener.try_clone().unwrap();
    let (old_drain, old) = spawn_serve(old_listener, TestService::new("old"), Default::default());
    let until = std::time::Instant::now() + Duration::from_secs(1);
    let clients: Vec<_> = (0..4)
        .map(|_| std::thread::spawn(move || closed_loop(addr, until)))
        .collect();
    sleep(Duration::from_millis(300)).await;
    let (new_drain, new) = spawn_serve(new_listener, TestService::new("new"), Default::default());
    sleep(Duration::from_millis(100)).await;
    old_drain.start(PATIENCE);
    finished(old).await;

    let mut total = Tally::default();
    for client in clients {
        let tally = client.join().unwrap();
        total.old += tally.old;
        total.new += tally.new;
        total.closes += tally.closes;
        total.failures.extend(tally.failures);
    }
    new_drain.start(PATIENCE);
    finished(new).await;
    assert_eq!(total.failures, Vec::<String>::new(), "{total:?}");
    assert!(
        total.old > 0 && total.new > 0 && total.closes >= 4,
        "{total:?}"
    );
}

/// Answers an upgrade request with 101 and then holds the connection,
/// reading until its reads fail; reports how the last read ended.
async fn hold_upgraded(
    mut request: Request<Incoming>,
    ended: tokio::sync::mpsc::UnboundedSender<io::ErrorKind>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(&mut request).await else {
            return;
        };
        let mut io = hyper_util::rt::TokioIo::new(upgraded);
        let mut buf = [0; 64];
        let kind = loop {
            match tokio::io::AsyncReadExt::read(&mut io, &mut buf).await {
                Ok(0) => break io::ErrorKind::UnexpectedEof,
                Ok(_) => {}
                Err(error) => break error.kind(),
            }
        };
        let _ = ended.send(kind);
    });
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert("connection", HeaderValue::from_static("upgrade"));
    headers.insert("upgrade", HeaderValue::from_static("test"));
    Ok(response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgraded_connection_is_counted_and_cut_at_the_deadline() {
    let listener = bind();
    let addr = listener.local_addr().unwrap();
    let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
    let service =
        hyper::service::service_fn(move |request| hold_upgraded(request, ended_tx.clone()));
    let counts = Arc::new(Mutex::new(Vec::new()));
    let record = counts.clone();
    let options = ServeOptions {
        on_connections: Some(Arc::new(move |n| record.lock().unwrap().push(n))),
        ..Default::default()
    };
    let drain = Drain::new();
    let task = tokio::spawn(serve(
        TcpListener::from_std(listener).unwrap(),
        service,
        drain.clone(),
        options,
    ));
    let mut client = Client::connect(addr).unwrap();
    client
        .0
        .get_mut()
        .write_all(b"GET / HTTP/1.1\r\nhost: test\r\nconnection: upgrade\r\nupgrade: test\r\n\r\n")
        .unwrap();
    assert_eq!(client.reply().unwrap().status, 101);
    // hyper is done with the connection; the SDK still counts it.
    sleep(Duration::from_millis(250)).await;
    assert_eq!(counts.lock().unwrap().last(), Some(&1));

    let draining = Instant::now();
    drain.start(Duration::from_millis(300));
    finished(task).await;
    assert!(
        draining.elapsed() >= Duration::from_millis(300),
        "serve waits for the upgraded connection until the deadline"
    );
    let kind = tokio::time::timeout(PATIENCE, ended.recv()).await.unwrap();
    assert_eq!(kind, Some(io::ErrorKind::ConnectionAborted));
    assert!(
        client.closed_by_server(),
        "the client sees the connection end"
    );
    assert_eq!(counts.lock().unwrap().last(), Some(&0));
}

/// One keep-alive connection that made a request and now sits idle;
/// returns how long after every connection was served the server closed it.
async fn idle_until_closed(addr: SocketAddr, served: Arc<tokio::sync::Barrier>) -> Duration {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    let mut buf = [0; 1024];
    while !reply.ends_with(b"\r\n\r\nok") {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the reply");
        reply.extend(&buf[..n]);
    }
    served.wait().await;
    let waiting = Instant::now();
    match stream.read(&mut buf).await {
        Ok(0) | Err(_) => waiting.elapsed(),
        Ok(_) => panic!("unexpected bytes on an idle connection"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_spread_over_the_window() {
    const CONNECTIONS: usize = 200;
    const WINDOW: Duration = Duration::from_secs(1);
    let listener = bind();
    let addr = listener.local_addr().unwrap();
    let options = ServeOptions {
        idle_grace: Duration::from_millis(50),
        close_spread: Some(WINDOW),
        ..Default::default()
    };
    let (drain, task) = spawn_serve(listener, TestService::new("ok"), options);
    let served = Arc::new(tokio::sync::Barrier::new(CONNECTIONS + 1));
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|_| tokio::spawn(idle_until_closed(addr, served.clone())))
        .collect();
    served.wait().await;
    drain.start(Duration::from_secs(10));
    let mut closed = Vec::new();
    for client in clients {
        closed.push(
            tokio::time::timeout(PATIENCE, client)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    finished(task).await;
    closed.sort();
    let spread = closed[CONNECTIONS - 1] - closed[0];
    // Evenly spread, a tenth of the window holds a tenth of the closes; all
    // at once, one tenth would hold them all.
    let mut per_tenth = [0; 12];
    for at in &closed {
        let tenth = ((at.as_secs_f64() / WINDOW.as_secs_f64()) * 10.0) as usize;
        per_tenth[tenth.min(11)] += 1;
    }
    assert!(
        spread >= WINDOW / 2,
        "closes within {spread:?}: {per_tenth:?}"
    );
    assert!(
        per_tenth.iter().all(|&n| n <= CONNECTIONS / 3),
        "bunched closes: {per_tenth:?}"
    );
}

mod handover;
