//! Rust clients of the example servers (TLS, gRPC) running across reloads:
//! each keeps a tally, and none may see a failure.

use baton_tests::harness::Baton;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
