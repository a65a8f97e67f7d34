//! `tls-app`: HTTPS through the SDK with the TLS stack the user picks, here
//! `tokio-rustls`: HTTP/2 and HTTP/1.1 offered by ALPN on one listener.
//!
//! ```text
//! tls-app --generate --cert cert.pem --key key.pem   # a self-signed pair (rcgen)
//! tls-app --cert cert.pem --key key.pem [--listen ADDR]
//! ```
//!
//! Under baton it serves the master's listener `https`; standalone it binds
//! `--listen` (default 127.0.0.1:8443). Every generation loads the same
//! certificate files, so a reload changes nothing a client can see.

use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use baton_worker::http::{serve_tower, with_acceptor};
use baton_worker::Worker;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

type Error = Box<dyn std::error::Error>;

/// HTTPS under baton with tokio-rustls.
#[derive(clap::Parser)]
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
    /// The address to bind when run without baton.
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: String,
}

/// Writes a self-signed certificate for `localhost` and 127.0.0.1.
fn generate(args: &Args) -> Result<(), Error> {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let pair = rcgen::generate_simple_self_signed(names)?;
    std::fs::write(&args.cert, pair.cert.pem())?;
    std::fs::write(&args.key, pair.key_pair.serialize_pem())?;
    Ok(())
}

/// A rustls server config offering HTTP/2 and HTTP/1.1 by ALPN.
fn tls_config(args: &Args) -> Result<rustls::ServerConfig, Error> {
    let context = |path: &PathBuf, e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let certs = CertificateDer::pem_file_iter(&args.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| context(&args.cert, &e))?;
    let key = PrivateKeyDer::from_pem_file(&args.key).map_err(|e| context(&args.key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

async fn serve(args: Args) -> Result<(), Error> {
    let tls = TlsAcceptor::from(Arc::new(tls_config(&args)?));
    let mut worker = Worker::builder()
        .listener("https", &args.listen)
        .start()
        .await?;
    let generation = worker.generation();
    let app = Router::new().route(
        "/",
        get(move |request: axum::extract::Request| async move {
            let version = format!("{:?}", request.version());
            (
                [("x-baton-generation", generation.to_string())],
                format!("hello over {version} from generation {generation}\n"),
            )
                .into_response()
        }),
    );
    let listener = with_acceptor(worker.tcp_listener("https")?, move |stream| {
        tls.accept(stream)
    });
    worker.ready().await?;
    serve_tower(listener, app, worker.drain(), worker.serve_options()).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = <Args as clap::Parser>::parse();
    let result = if args.generate {
        generate(&args)
    } else {
        serve(args).await
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tls-app: {error}");
            ExitCode::FAILURE
        }
    }
}
