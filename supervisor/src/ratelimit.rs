//! Fixed-window rate limits, so that nothing a worker does can flood the
//! master's log or its event loop: a worker's captured output lines, and
//! the messages on its control channel.

use tokio::time::{Duration, Instant};

/// At most `limit` events per `period`, counted in fixed windows.
#[derive(Debug)]
pub struct Window {
    limit: u64,
    period: Duration,
    start: Instant,
    used: u64,
    /// Refused in the current window.
    refused: u64,
}

impl Window {
    /// A limit of `limit` events per `period`, its first window starting at
    /// `now`.
    pub fn new(limit: u64, period: Duration, now: Instant) -> Window {
        Window {
            limit,
            period,
            start: now,
            used: 0,
            refused: 0,
        }
    }

    /// Starts a new window if the current one is over; returns how many
    /// events the window that ended refused.
    pub fn roll(&mut self, now: Instant) -> u64 {
        if now < self.start + self.period {
            return 0;
        }
        self.start = now;
        self.used = 0;
        std::mem::take(&mut self.refused)
    }

    /// Counts one event: whether it is within the limit.
    pub fn allow(&mut self, now: Instant) -> bool {
        self.roll_silently(now);
        if self.used < self.limit {
            self.used += 1;
            true
        } else {
            self.refused += 1;
            false
        }
    }

    /// Counts `n` units (bytes, say) against the limit and returns when the
    /// caller may go on: now while within it, else the end of the window.
    pub fn spend(&mut self, n: u64, now: Instant) -> Instant {
        self.roll_silently(now);
        self.used = self.used.saturating_add(n);
        if self.used <= self.limit {
            now
        } else {
            self.start + self.period
        }
    }

    /// How many events the current window refused so far, reset to 0.
    pub fn take_refused(&mut self) -> u64 {
        std::mem::take(&mut self.refused)
    }

    fn roll_silently(&mut self, now: Instant) {
        if now >= self.start + self.period {
            self.start = now;
            self.used = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_allows_its_limit_then_refuses_and_counts_until_it_rolls() {
        let start = Instant::now();
        let mut window = Window::new(3, Duration::from_secs(1), start);
        let allowed = (0..10).filter(|_| window.allow(start)).count();
        assert_eq!(allowed, 3);
        assert_eq!(window.roll(start + Duration::from_millis(500)), 0);
        assert_eq!(window.roll(start + Duration::from_secs(1)), 7);
        assert!(window.allow(start + Duration::from_secs(1)));
    }

    #[test]
    fn spending_past_the_limit_waits_for_the_next_window() {
        let start = Instant::now();
        let mut window = Window::new(100, Duration::from_secs(1), start);
        assert_eq!(window.spend(60, start), start);
        let later = start + Duration::from_millis(10);
        assert_eq!(window.spend(60, later), start + Duration::from_secs(1));
        let next = start + Duration::from_secs(1);
        assert_eq!(window.spend(60, next), next);
    }
}
