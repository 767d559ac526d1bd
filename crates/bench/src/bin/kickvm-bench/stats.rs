//! Latency percentiles and formatting.

use std::time::Duration;

pub struct Latencies(pub Vec<Duration>);

impl Latencies {
    pub fn percentile(&mut self, p: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        self.0.sort_unstable();
        let i = ((self.0.len() as f64 - 1.0) * p).round() as usize;
        self.0[i]
    }
}

pub fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

pub fn per(n: Option<u64>, d: u64) -> String {
    match n {
        Some(n) if d > 0 => format!("{:.2}", n as f64 / d as f64),
        _ => "n/a".into(),
    }
}
