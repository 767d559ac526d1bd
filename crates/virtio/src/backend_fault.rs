//! A back-end that fails (a host disk that is full, a TAP that was
//! deleted, a console reader that broke) fails every request until it is
//! repaired: hundreds of errors a second, all with the same cause. Each is
//! counted, but only the *start* of a failing spell is logged — one line
//! saying what broke — and, so that a guest cannot turn alternating
//! success and failure (say, rewriting allocated blocks between new ones on
//! a full disk) into a flood, those lines go through a [`Throttle`].

use crate::counters::QueueCounters;
use crate::queue::QueueCtx;
use crate::ratelimit::Throttle;

/// One queue's view of its back-end's health.
#[derive(Debug, Default)]
pub struct BackendFault {
    /// Errors since the last success; 0 while the back-end works.
    failing: u64,
    spells: Throttle,
}

impl BackendFault {
    /// Counts a back-end error on `q`; logs `why` (one line) if this starts
    /// a failing spell and the throttle allows.
    pub fn failed(&mut self, q: &QueueCtx, why: &str) {
        QueueCounters::add(&q.counters.errors, 1);
        self.failing += 1;
        if self.failing == 1 {
            if let Some(n) = self.spells.hit() {
                log::warn!(
                    "{}: {why} (failure spell #{n}; further errors are counted, not logged, until it works again)",
                    q.name()
                );
            }
        }
    }

    /// The back-end worked: ends a failing spell (logged at info level).
    pub fn worked(&mut self, q: &QueueCtx) {
        if self.failing > 0 {
            log::info!("{}: the back-end works again after {} failed requests", q.name(), self.failing);
            self.failing = 0;
        }
    }
}
