//! `examples/tls`: HTTPS through the SDK with tokio-rustls, HTTP/2 and
//! HTTP/1.1 chosen by ALPN, across reloads without a failed request.

use crate::clients::{across_reloads, not_processed, Tally};
use baton_tests::harness::{config_with_listener, Baton, Binaries, TempDir};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio_rustls::TlsConnector;

/// A TLS client trusting only the certificate in `cert`, offering `alpn`.
fn connector(cert: &Path, alpn: &[u8]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(cert).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// A sender of requests on one new TLS connection, speaking what ALPN chose.
enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

async fn connect(addr: SocketAddr, tls: &TlsConnector, http2: bool) -> Sender {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let stream = tls.connect(name, tcp).await.expect("TLS handshake");
    let negotiated = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let want: &[u8] = if http2 { b"h2" } else { b"http/1.1" };
    assert_eq!(negotiated.as_deref(), Some(want), "ALPN");
    let io = TokioIo::new(stream);
    if http2 {
        let (sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(connection);
        Sender::Http2(sender)
    } else {
        let (sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(connection);
        Sender::Http1(sender)
    }
}

/// Requests one after another until `stop`, on one connection until the
/// server says it is done (`Connection: close`, or GOAWAY): then on a new
/// one. A request the server never saw because the connection was
/// closing is sent again, as hyper-util's pooled client does; any other
/// error is a failure.
async fn client(addr: SocketAddr, tls: TlsConnector, http2: bool, stop: Arc<AtomicBool>) -> Tally {
    let mut tally = Tally::default();
    let mut sender: Option<Sender> = None;
    while !stop.load(Ordering::Relaxed) {
        let current = match sender.as_mut() {
            Some(current) => current,
            None => {
                tally.connections += 1;
                sender.insert(connect(addr, &tls, http2).await)
            }
        };
        let request = Request::get("/").body(Empty::new()).unwrap();
        let sent = match current {
            Sender::Http1(s) => match s.ready().await {
                Ok(()) => Some(s.send_request(request).await),
                Err(_) => None,
            },
            Sender::Http2(s) => match s.ready().await {
                Ok(()) => Some(s.send_request(request).await),
                Err(_) => None,
            },
        };
        let response = match sent {
            // Closed before this request was sent: open a new connection.
            None => {
                sender = None;
                continue;
            }
            Some(Err(error)) if not_processed(&error) => {
                tally.retried += 1;
                sender = None;
                continue;
            }
            Some(Err(error)) => {
                tally.failures.push(format!("{error:?}"));
                sender = None;
                continue;
            }
            Some(Ok(response)) => response,
        };
        let generation = response
            .headers()
            .get("x-baton-generation")
            .and_then(|g| g.to_str().ok()?.parse().ok());
        let status = response.status();
        match response.into_body().collect().await {
            Ok(_) if status == 200 => tally.answered(generation),
            Ok(_) => tally.failures.push(format!("status {status}")),
            Err(error) => tally.failures.push(format!("body: {error:?}")),
        }
    }
    tally
}

#[test]
fn https_over_http1_and_http2_by_alpn_fails_no_request_across_reloads() {
    const RELOADS: u64 = 10;
    let dir = TempDir::new();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let tls_app = Binaries::example("tls-app");
    let generated = std::process::Command::new(&tls_app)
        .args(["--generate", "--cert"])
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .status()
        .unwrap();
    assert!(generated.success());
    let worker = format!(
        "command = [{:?}, \"--cert\", {:?}, \"--key\", {:?}]\nprocesses = 2\n\
         ready_timeout = \"10s\"\ndrain_timeout = \"5s\"\n",
        tls_app.display().to_string(),
        cert.display().to_string(),
        key.display().to_string()
    );
    std::fs::write(
        dir.path().join("baton.toml"),
        config_with_listener("https", &worker),
    )
    .unwrap();
    let mut baton = Baton::start_in(dir, &["run"]);
    baton.wait_committed(1);
    let addr = baton.address("https");

    let tallies = across_reloads(&mut baton, RELOADS, |stop| {
        [false, true, false, true]
            .into_iter()
            .map(|http2| {
                let tls = connector(&cert, if http2 { b"h2" } else { b"http/1.1" });
                client(addr, tls, http2, stop.clone())
            })
            .collect()
    });
    for tally in &tallies {
        assert!(
            tally.connections > 1,
            "reconnected after each goodbye: {tally:?}"
        );
    }
}
