//! `grpc-app`: a tonic gRPC server on an SDK listener, here the standard
//! health service (`grpc.health.v1.Health`, from tonic-health: no `protoc`
//! at build time). tonic's `Routes` is a tower service, so
//! [`Worker::serve`] serves it like any other: HTTP/2, drained with the
//! graceful GOAWAY pattern so that RPCs in flight finish and clients move to
//! the next generation.
//!
//! ```text
//! grpc-app [--listen ADDR]
//! ```
//!
//! Every response carries the `x-baton-generation` header (gRPC metadata).
//! Under baton it serves the master's listener `grpc`; standalone it binds
//! `--listen` (default 127.0.0.1:50051).

use baton_worker::Worker;
use http::HeaderValue;
use std::process::ExitCode;
use tonic::service::Routes;
use tonic_health::ServingStatus;
use tower::util::MapResponse;

/// A tonic gRPC server under baton.
#[derive(clap::Parser)]
struct Args {
    /// The address to bind when run without baton.
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: String,
}

async fn run(listen: String) -> Result<(), baton_worker::Error> {
    let mut worker = Worker::builder().listener("grpc", listen).start().await?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    let generation = HeaderValue::from(worker.generation());
    let tag = move |mut response: http::Response<tonic::body::Body>| {
        response
            .headers_mut()
            .insert("x-baton-generation", generation.clone());
        response
    };
    let routes = MapResponse::new(Routes::new(health), tag);
    worker.serve("grpc", routes).await
}

#[tokio::main]
async fn main() -> ExitCode {
    let listen = <Args as clap::Parser>::parse().listen;
    match run(listen).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("grpc-app: {error}");
            ExitCode::FAILURE
        }
    }
}
