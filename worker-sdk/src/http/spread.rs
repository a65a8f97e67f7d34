//! Spreading the goodbyes: a draining server tells its connections to go one
//! after another over a window, like HAProxy's `close-spread-time`, so that
//! thousands of clients do not reconnect in the same millisecond.

use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

/// The default window is this fraction of the time left until the drain
/// deadline...
const DEFAULT_FRACTION: u32 = 10;

/// ...but never more than this.
const DEFAULT_CAP: Duration = Duration::from_secs(5);

/// The window when none is configured: a tenth of the time left until the
/// deadline, at most 5 s.
pub(super) fn default_window(left: Duration) -> Duration {
    (left / DEFAULT_FRACTION).min(DEFAULT_CAP)
}

/// The notices still to fire, each at its time.
pub(super) struct Spread {
    due: VecDeque<(Instant, CancellationToken)>,
}

impl Spread {
    /// Spreads `notices` evenly over `window` from `start`: the first fires
    /// at once, the last just before the window ends.
    pub(super) fn new(notices: Vec<CancellationToken>, start: Instant, window: Duration) -> Spread {
        let n = notices.len().max(1) as u32;
        let due = notices
            .into_iter()
            .enumerate()
            .map(|(i, notice)| (start + window * i as u32 / n, notice))
            .collect();
        Spread { due }
    }

    /// Fires every notice whose time has come.
    pub(super) fn fire_due(&mut self) {
        let now = Instant::now();
        while let Some((at, notice)) = self.due.front() {
            if *at > now {
                break;
            }
            notice.cancel();
            self.due.pop_front();
        }
    }

    /// Completes when the next notice is due.
    pub(super) async fn next_due(&self) {
        match self.due.front() {
            Some((at, _)) => sleep_until(*at).await,
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_window_is_a_tenth_of_the_time_left_capped() {
        assert_eq!(
            default_window(Duration::from_secs(5)),
            Duration::from_millis(500)
        );
        assert_eq!(default_window(Duration::from_secs(600)), DEFAULT_CAP);
    }

    #[tokio::test(start_paused = true)]
    async fn notices_fire_evenly_over_the_window() {
        let notices: Vec<_> = (0..4).map(|_| CancellationToken::new()).collect();
        let start = Instant::now();
        let mut spread = Spread::new(notices.clone(), start, Duration::from_secs(4));
        let mut fired_at = Vec::new();
        loop {
            spread.fire_due();
            let fired = notices.iter().filter(|n| n.is_cancelled()).count();
            while fired_at.len() < fired {
                fired_at.push(start.elapsed().as_secs());
            }
            if fired == notices.len() {
                break;
            }
            spread.next_due().await;
        }
        assert_eq!(fired_at, [0, 1, 2, 3]);
    }
}
