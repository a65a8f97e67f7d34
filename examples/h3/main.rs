//! `h3-app`: `hello` over HTTP/3 (quinn and h3), for `quic = true`
//! listeners. Answers `GREETING from generation N` on `/`, and on
//! `/ticks/COUNT` sends `generation N tick I` lines, one every 100 ms: a
//! stream that stays open across reloads.
//!
//! Beside it, on a TCP listener `http` (the same port number, as
//! `examples/h3/baton.toml` sets it up), it answers the same over HTTP/1.1
//! and HTTP/2 with `Alt-Svc: h3=":PORT"`, which tells browsers and other
//! clients that HTTP/3 is there.
//!
//! ```text
//! h3-app --generate --cert cert.pem --key key.pem   # a self-signed pair (rcgen)
//! h3-app --cert cert.pem --key key.pem [--listen udp:ADDR] [--listen-tcp ADDR] [--greeting WORD]
//! ```
//!
//! Under baton it serves the master's UDP listener `h3`, its connection IDs
//! naming this worker's socket ([`baton_worker::quic`]): a reload sends new
//! connections to the new generation while every datagram of this one's
//! keeps reaching it. Told to drain, it accepts no new connection, sends
//! each of its connections an HTTP/3 GOAWAY, answers the requests each had
//! taken, and exits once their clients have closed them (or at the drain
//! deadline): [`baton_worker::quic::accept`] and
//! [`baton_worker::quic::drain`].

use baton_worker::Worker;
use bytes::Bytes;
use clap::Parser;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser)]
struct Args {
    /// Write a self-signed certificate and key to `--cert` and `--key`, and exit.
    #[arg(long)]
    generate: bool,
    /// The certificate chain, PEM.
    #[arg(long)]
    cert: PathBuf,
    /// The private key, PEM.
    #[arg(long)]
    key: PathBuf,
    /// Where to listen standalone (under baton, the master's `h3` listener).
    #[arg(long, default_value = "udp:127.0.0.1:8443")]
    listen: String,
    /// Where to serve HTTP/1.1 and HTTP/2 standalone (under baton, the
    /// master's `http` listener, if it has one).
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen_tcp: String,
    /// The first word of each answer.
    #[arg(long, default_value = "hello")]
    greeting: String,
}

/// Writes a self-signed certificate for `localhost` and 127.0.0.1.
fn generate(args: &Args) -> Result<(), Error> {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let pair = rcgen::generate_simple_self_signed(names)?;
    std::fs::write(&args.cert, pair.cert.pem())?;
    std::fs::write(&args.key, pair.key_pair.serialize_pem())?;
    Ok(())
}

/// A quinn server config: TLS 1.3 with `h3` by ALPN.
fn server_config(args: &Args) -> Result<quinn::ServerConfig, Error> {
    let context = |path: &PathBuf, e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let certs = CertificateDer::pem_file_iter(&args.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| context(&args.cert, &e))?;
    let key = PrivateKeyDer::from_pem_file(&args.key).map_err(|e| context(&args.key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(crypto)))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let result = match args.generate {
        true => generate(&args),
        false => serve(args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("h3-app: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(args: Args) -> Result<(), Error> {
    let server = server_config(&args)?;
    let mut worker = Worker::builder()
        .listener("h3", &args.listen)
        .listener("http", &args.listen_tcp)
        .start()
        .await?;
    let endpoint = baton_worker::quic::endpoint(&mut worker, "h3", server)?;
    // A config without a TCP `http` listener serves HTTP/3 alone.
    let tcp = worker.tcp_listener("http").ok();
    if !worker.is_supervised() {
        eprintln!("h3-app: serving on {}", endpoint.local_addr()?);
    }
    let greeting = Arc::new(format!(
        "{} from generation {}\n",
        args.greeting,
        worker.generation()
    ));
    let generation = worker.generation();
    let tcp_server = tcp.map(|listener| {
        let alt_svc = format!("h3=\":{}\"", endpoint.local_addr().map_or(0, |a| a.port()));
        let service = tcp_service(greeting.clone(), generation, alt_svc);
        let serving =
            baton_worker::http::serve(listener, service, worker.drain(), worker.serve_options());
        tokio::spawn(serving)
    });
    worker.ready().await?;
    let drain = worker.drain();
    while let Some(incoming) = baton_worker::quic::accept(&endpoint, &drain).await {
        let (greeting, drain) = (greeting.clone(), drain.clone());
        tokio::spawn(async move {
            if let Err(e) = connection(incoming, generation, greeting, drain).await {
                eprintln!("h3-app: connection: {e}");
            }
        });
    }
    // No new connections; the open ones are told to go away and end when
    // their clients close them, or at the deadline.
    let no_error = quinn::VarInt::from_u32(0x100);
    baton_worker::quic::drain(&endpoint, &drain, no_error, b"drain deadline").await;
    if let Some(server) = tcp_server {
        server.await??;
    }
    Ok(())
}

/// The TCP side: the same greeting over HTTP/1.1 and HTTP/2, pointing at
/// HTTP/3 with `Alt-Svc`.
fn tcp_service(
    greeting: Arc<String>,
    generation: u64,
    alt_svc: String,
) -> impl baton_worker::http::HyperService<http_body_util::Full<Bytes>> {
    hyper::service::service_fn(move |_request| {
        let mut response = http::Response::new(http_body_util::Full::new(Bytes::from(
            greeting.as_bytes().to_vec(),
        )));
        let headers = response.headers_mut();
        headers.insert("x-baton-generation", generation.into());
        if let Ok(value) = alt_svc.parse() {
            headers.insert(http::header::ALT_SVC, value);
        }
        std::future::ready(Ok::<_, std::convert::Infallible>(response))
    })
}

/// Serves one connection's requests until it ends. On drain, sends
/// GOAWAY: h3 then refuses the requests past it (`H3_REQUEST_REJECTED`, for
/// the client to send again elsewhere) and answers those before it.
async fn connection(
    incoming: quinn::Incoming,
    generation: u64,
    greeting: Arc<String>,
    drain: baton_worker::Drain,
) -> Result<(), Error> {
    let quic = incoming.await?;
    let mut h3: h3::server::Connection<h3_quinn::Connection, Bytes> =
        h3::server::Connection::new(h3_quinn::Connection::new(quic.clone())).await?;
    let mut requests = tokio::task::JoinSet::new();
    let mut going_away = false;
    let outcome = loop {
        tokio::select! {
            _ = drain.wait(), if !going_away => {
                going_away = true;
                if let Err(e) = h3.shutdown(1).await {
                    break Err(e);
                }
            }
            // Reaps the finished ones as it goes.
            Some(_) = requests.join_next(), if !requests.is_empty() => {}
            accepted = h3.accept() => match accepted {
                Ok(Some(resolver)) => {
                    let greeting = greeting.clone();
                    requests.spawn(async move {
                        match request(resolver, generation, greeting).await {
                            Err(e) if !e.is_h3_no_error() => eprintln!("h3-app: request: {e}"),
                            _ => {}
                        }
                    });
                }
                // No request is coming any more (a GOAWAY either way).
                Ok(None) => break Ok(()),
                // The client closed the connection, as it may.
                Err(e) if e.is_h3_no_error() => break Ok(()),
                Err(e) => break Err(e),
            },
        }
    };
    // The requests taken are answered; the client closes the connection
    // once it has read the answers (dropping `h3` closes it at once, which
    // would throw away what the client has not acknowledged yet). The
    // endpoint's drain closes it at the deadline if the client does not.
    while requests.join_next().await.is_some() {}
    if outcome.is_ok() {
        quic.closed().await;
    }
    outcome.map_err(Into::into)
}

async fn request(
    resolver: h3::server::RequestResolver<h3_quinn::Connection, Bytes>,
    generation: u64,
    greeting: Arc<String>,
) -> Result<(), h3::error::StreamError> {
    let (request, mut stream) = resolver.resolve_request().await?;
    let ticks = request
        .uri()
        .path()
        .strip_prefix("/ticks/")
        .map(str::parse::<u32>)
        .transpose();
    let status = match ticks {
        Ok(_) => http::StatusCode::OK,
        Err(_) => http::StatusCode::BAD_REQUEST,
    };
    let mut response = http::Response::new(());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("x-baton-generation", generation.into());
    stream.send_response(response).await?;
    match ticks {
        Ok(Some(count)) => {
            for i in 0..count {
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let line = format!("generation {generation} tick {i}\n");
                stream.send_data(Bytes::from(line)).await?;
            }
        }
        Ok(None) => stream.send_data(Bytes::from(greeting.to_string())).await?,
        Err(e) => {
            stream
                .send_data(Bytes::from(format!("bad tick count: {e}\n")))
                .await?
        }
    }
    stream.finish().await?;
    Ok(())
}
