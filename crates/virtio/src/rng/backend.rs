//! The rate limit on the entropy the guest may take (`--rng` rate).

use std::time::{Duration, Instant};

/// A token bucket: `rate` bytes per second, bursts up to one second's worth.
pub struct TokenBucket {
    rate: u64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u64) -> Self {
        let rate = rate.max(1);
        TokenBucket { rate, tokens: rate as f64, last: Instant::now() }
    }

    /// Takes up to `want` tokens; if none are left, says how long to wait.
    pub fn take(&mut self, want: u64) -> Result<u64, Duration> {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate as f64).min(self.rate as f64);
        if self.tokens >= 1.0 {
            let n = want.min(self.tokens as u64);
            self.tokens -= n as f64;
            Ok(n)
        } else {
            Err(Duration::from_secs_f64(((1.0 - self.tokens) / self.rate as f64).max(0.0005)))
        }
    }
}
