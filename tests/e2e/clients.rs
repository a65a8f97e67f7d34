//! Rust clients of the example servers (TLS, gRPC) running across reloads:
//! each keeps a tally, and none may see a failure.

use baton_tests::harness::Baton;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Whether the server never saw the request that failed with `error`:
/// hyper cancelled it unsent, or HTTP/2 refused it locally or by GOAWAY (a
/// stream above the GOAWAY's last stream id was not processed and may be
/// retried, RFC 9113 section 6.8).
pub fn not_processed(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(hyper) = error.downcast_ref::<hyper::Error>() {
            if hyper.is_canceled() {
                return true;
            }
        }
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR);
        }
        next = error.source();
    }
    false
}

/// What one client saw.
#[derive(Debug, Default)]
pub struct Tally {
    pub ok: u64,
    /// Requests the server never saw (the connection was closing), sent again.
    pub retried: u64,
    pub connections: u64,
    /// The generations that answered, in the order they first did.
    pub generations: Vec<u64>,
    pub failures: Vec<String>,
}

impl Tally {
    /// Counts an answer from `generation`.
    pub fn answered(&mut self, generation: Option<u64>) {
        self.ok += 1;
        if let Some(g) = generation {
            if self.generations.last() != Some(&g) {
                self.generations.push(g);
            }
        }
    }
}

/// Runs the clients `start` makes (each until the flag it gets is set) while
/// `baton` reloads `reloads` times, then asserts that every one saw no
/// failure, plenty of answers, and generations 1 to the last.
pub fn across_reloads<Fut>(
    baton: &mut Baton,
    reloads: u64,
    start: impl FnOnce(Arc<AtomicBool>) -> Vec<Fut>,
) -> Vec<Tally>
where
    Fut: Future<Output = Tally> + Send + 'static,
{
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = {
        let _entered = runtime.enter();
        start(stop.clone()).into_iter().map(tokio::spawn).collect()
    };
    std::thread::sleep(Duration::from_millis(300));
    baton.reload_times(reloads, Duration::from_millis(250));
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let tallies: Vec<Tally> = runtime.block_on(async {
        let mut tallies = Vec::new();
        for client in clients {
            let tally = tokio::time::timeout(Duration::from_secs(10), client);
            tallies.push(tally.await.expect("the client stops").unwrap());
        }
        tallies
    });
    eprintln!("{tallies:#?}");
    for tally in &tallies {
        assert_eq!(tally.failures, Vec::<String>::new(), "{tally:?}");
        assert!(tally.ok > 50, "{tally:?}");
        assert_eq!(tally.generations.first(), Some(&1), "{tally:?}");
        assert_eq!(tally.generations.last(), Some(&(reloads + 1)), "{tally:?}");
    }
    tallies
}
