//! baton's JSON log, read from the master's stderr.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct LogState {
    events: Vec<Value>,
    closed: bool,
}

/// baton's JSON log, read from its stderr by a thread of its own (which
/// also keeps the pipe from filling up).
#[derive(Clone)]
pub struct BatonLog(Arc<(Mutex<LogState>, Condvar)>);

impl BatonLog {
    pub fn start(stderr: impl Read + Send + 'static) -> BatonLog {
        let log = BatonLog(Arc::default());
        let writer = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let event = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "raw": line }));
                writer.0 .0.lock().unwrap().events.push(event);
                writer.0 .1.notify_all();
            }
            writer.0 .0.lock().unwrap().closed = true;
            writer.0 .1.notify_all();
        });
        log
    }

    /// How many events were logged so far.
    pub fn len(&self) -> usize {
        self.0 .0.lock().unwrap().events.len()
    }

    /// The events logged since event number `from`.
    pub fn since(&self, from: usize) -> Vec<Value> {
        let state = self.0 .0.lock().unwrap();
        state.events.get(from..).unwrap_or_default().to_vec()
    }

    /// Waits for the first event from number `from` on matching `pred`.
    pub fn wait_for(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        let (lock, cond) = &*self.0;
        let mut state = lock.lock().unwrap();
        loop {
            if let Some(e) = state.events.get(from..)?.iter().find(|e| pred(e)) {
                return Some(e.clone());
            }
            let now = Instant::now();
            if now >= deadline || state.closed {
                return None;
            }
            state = cond.wait_timeout(state, deadline - now).unwrap().0;
        }
    }

    /// The last `n` events, as text for an error message.
    pub fn tail(&self, n: usize) -> String {
        let state = self.0 .0.lock().unwrap();
        let start = state.events.len().saturating_sub(n);
        let lines: Vec<String> = state.events[start..]
            .iter()
            .map(|e| e.to_string())
            .collect();
        if lines.is_empty() {
            "none".into()
        } else {
            lines.join(" | ")
        }
    }
}

// The test harness reads the same JSON log.
pub use baton_tests::harness::{field, message};
