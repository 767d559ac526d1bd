//! Guest-triggerable log lines, counted and rate-limited.
//!
//! A guest can repeat a bad access as fast as it can run (a refused
//! FEATURES_OK, a BAR placed over another device, a ring that does not fit
//! in memory): one log line per attempt would let it fill the host's disk
//! and bury every other message. So each such message has a [`Throttle`]:
//! every occurrence is counted (the count stays readable), the first
//! [`ALWAYS_LOGGED`] are logged, and after that only the 16th, 32nd, 64th,
//! … — 10 000 attempts produce 20 lines, 10⁹ produce 36.

use std::sync::atomic::{AtomicU64, Ordering};

/// Occurrences logged before the rate limit starts.
pub const ALWAYS_LOGGED: u64 = 10;

/// True for the occurrence numbers (1-based) that are logged.
pub fn should_log(n: u64) -> bool {
    n <= ALWAYS_LOGGED || n.is_power_of_two()
}

/// Counts one kind of guest-triggerable event and says which ones to log.
#[derive(Debug, Default)]
pub struct Throttle(AtomicU64);

impl Throttle {
    pub const fn new() -> Self {
        Throttle(AtomicU64::new(0))
    }

    /// Counts one occurrence; returns its number (1-based) when it should
    /// be logged.
    pub fn hit(&self) -> Option<u64> {
        let n = self.0.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        should_log(n).then_some(n)
    }

    /// How many occurrences there have been.
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// `log::warn!` through a [`Throttle`]: the line carries the occurrence
/// number, so a reader knows how many were not printed.
#[macro_export]
macro_rules! warn_limited {
    ($throttle:expr, $($arg:tt)+) => {
        if let Some(n) = $throttle.hit() {
            log::warn!("{} (#{n}{})", format_args!($($arg)+),
                if n == $crate::ratelimit::ALWAYS_LOGGED { "; further ones are counted and logged rarely" } else { "" });
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_thousand_events_make_a_few_lines() {
        let t = Throttle::new();
        let logged = (0..10_000).filter(|_| t.hit().is_some()).count();
        assert_eq!(t.count(), 10_000);
        // 1..=10, then 16, 32, …, 8192.
        assert_eq!(logged, 10 + 10);
    }
}
