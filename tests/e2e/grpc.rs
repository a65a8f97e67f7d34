//! `examples/grpc` under baton: a tonic client making unary calls across
//! reloads sees no failed call.
//!
//! tonic's channel has one known gap at a GOAWAY (hyperium/tonic#2185): a
//! call issued after the GOAWAY arrived but before the channel noticed is
//! failed without reaching the server, cancelled by hyper ("connection
//! closed") or refused by h2 (`GoAway`, NO_ERROR). Such a call is safe to
//! retry, which the caller here does, as gRPC clients that retry CANCELLED
//! and UNAVAILABLE do; every other error counts.

use crate::clients::{across_reloads, not_processed, Tally};
use baton_tests::harness::{config_with_listener, Baton, Binaries};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Unary health checks one after another on one tonic channel until `stop`.
async fn caller(endpoint: String, stop: Arc<AtomicBool>) -> Tally {
    let mut tally = Tally::default();
    let channel = tonic::transport::Endpoint::from_shared(endpoint)
        .unwrap()
        .connect()
        .await
        .expect("connect");
    let mut client = HealthClient::new(channel);
    while !stop.load(Ordering::Relaxed) {
        let request = HealthCheckRequest {
            service: String::new(),
        };
        match client.check(request).await {
            Ok(response) => {
                let generation = response
                    .metadata()
                    .get("x-baton-generation")
                    .and_then(|g| g.to_str().ok()?.parse().ok());
                if response.get_ref().status() != ServingStatus::Serving {
                    tally.failures.push(format!("{response:?}"));
                    continue;
                }
                tally.answered(generation);
            }
            Err(status) if std::error::Error::source(&status).is_some_and(not_processed) => {
                tally.retried += 1
            }
            Err(status) => tally.failures.push(format!("{status:?}")),
        }
    }
    tally
}

#[test]
fn grpc_unary_calls_fail_none_across_reloads() {
    const RELOADS: u64 = 10;
    let worker = format!(
        "command = [{:?}]\nprocesses = 2\nready_timeout = \"10s\"\ndrain_timeout = \"5s\"\n",
        Binaries::example("grpc-app").display().to_string()
    );
    let mut baton = Baton::start(&config_with_listener("grpc", &worker));
    baton.wait_committed(1);
    let endpoint = format!("http://{}", baton.address("grpc"));
    across_reloads(&mut baton, RELOADS, |stop| {
        (0..4)
            .map(|_| caller(endpoint.clone(), stop.clone()))
            .collect()
    });
}
