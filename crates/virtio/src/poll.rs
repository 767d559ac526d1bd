//! Polling the avail ring for a short while before a queue thread sleeps.
//!
//! At queue depth 1 every request costs two thread wake-ups (the queue
//! thread's on the kick, the guest's on the interrupt), and on an idle CPU
//! a wake-up takes tens of microseconds. A queue thread that has just
//! answered a request and raised the interrupt can instead watch its avail
//! ring for a few microseconds: if the guest's next request arrives in that
//! window, the thread takes it without sleeping, and the guest does not
//! kick at all (notifications stay off while the thread polls). This is
//! QEMU's `poll-max-ns` for iothreads and vhost-net's `busyloop_timeout`.
//!
//! The window is per queue and, in [`Poll::Adaptive`], follows QEMU's rule
//! (`util/aio-posix.c`): a wait that polling did not cover but that ended
//! within the maximum grows the window (4 µs, then doubling); a wait
//! longer than the maximum resets it to zero. A queue that is idle for
//! longer than the window therefore polls once per idle period at most,
//! and not at all once the window has shrunk: no CPU is spent on idle
//! queues.

use std::time::Duration;

/// How a device's queue threads poll before sleeping (`poll=` of
/// `--disk` / `--net`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Poll {
    /// Sleep on the kick at once.
    #[default]
    Off,
    /// Poll for this long every time.
    Fixed(Duration),
    /// Poll for a window between 0 and this that adapts to the guest.
    Adaptive(Duration),
}

/// [`Poll::Adaptive`]'s maximum when none is given: QEMU's iothread default
/// (`poll-max-ns` 32768).
pub const DEFAULT_MAX: Duration = Duration::from_micros(32);
/// A window longer than this keeps a CPU busy for nothing: past a
/// millisecond a wake-up is cheap in comparison.
pub const MAX_WINDOW: Duration = Duration::from_millis(1);
/// The first window adaptive polling tries (QEMU's).
const GROW_FROM: Duration = Duration::from_micros(4);

impl Poll {
    /// `off`, `adaptive`, `adaptive:<µs>` (the maximum), or `<µs>` (fixed).
    pub fn parse(s: &str) -> Result<Poll, String> {
        let micros = |v: &str| -> Result<Duration, String> {
            match v.parse::<u64>() {
                Ok(n) if n > 0 && Duration::from_micros(n) <= MAX_WINDOW => Ok(Duration::from_micros(n)),
                _ => Err(format!(
                    "poll={s}: use off, adaptive, adaptive:<µs> or a window in µs from 1 to {}",
                    MAX_WINDOW.as_micros()
                )),
            }
        };
        match s {
            "off" | "0" => Ok(Poll::Off),
            "adaptive" => Ok(Poll::Adaptive(DEFAULT_MAX)),
            _ => match s.strip_prefix("adaptive:") {
                Some(max) => micros(max).map(Poll::Adaptive),
                None => micros(s).map(Poll::Fixed),
            },
        }
    }
}

impl std::fmt::Display for Poll {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Poll::Off => f.write_str("off"),
            Poll::Fixed(d) => write!(f, "{}", d.as_micros()),
            Poll::Adaptive(d) => write!(f, "adaptive:{}", d.as_micros()),
        }
    }
}

/// One queue's current window.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    poll: Poll,
    now: Duration,
}

impl Window {
    pub fn new(poll: Poll) -> Window {
        let now = match poll {
            Poll::Fixed(d) => d,
            Poll::Off | Poll::Adaptive(_) => Duration::ZERO,
        };
        Window { poll, now }
    }

    /// How long to poll before the next sleep (zero: do not).
    pub fn get(&self) -> Duration {
        self.now
    }

    /// True if the thread should time its waits (to adapt the window).
    pub fn adaptive(&self) -> bool {
        matches!(self.poll, Poll::Adaptive(_))
    }

    /// Polling found no work and the thread then slept: `waited` is the
    /// whole time from the start of the poll to the kick.
    pub fn waited(&mut self, waited: Duration) {
        let Poll::Adaptive(max) = self.poll else { return };
        if waited <= self.now {
            // Covered (a kick that raced the end of the window).
        } else if waited > max {
            self.now = Duration::ZERO;
        } else if self.now < max {
            self.now = if self.now.is_zero() { GROW_FROM } else { self.now * 2 }.min(max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn options_parse_and_print_back() {
        assert_eq!(Poll::parse("off"), Ok(Poll::Off));
        assert_eq!(Poll::parse("adaptive"), Ok(Poll::Adaptive(DEFAULT_MAX)));
        assert_eq!(Poll::parse("adaptive:100"), Ok(Poll::Adaptive(100 * US)));
        assert_eq!(Poll::parse("20"), Ok(Poll::Fixed(20 * US)));
        for p in [Poll::Off, Poll::Fixed(7 * US), Poll::Adaptive(50 * US)] {
            assert_eq!(Poll::parse(&p.to_string()), Ok(p));
        }
        for bad in ["", "-1", "1001", "adaptive:", "adaptive:0", "18446744073709551616", "on", "5us"] {
            let e = Poll::parse(bad).unwrap_err();
            assert!(e.contains("use off, adaptive"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_adaptive_window_grows_when_a_wait_was_short_and_resets_when_long() {
        let mut w = Window::new(Poll::Adaptive(32 * US));
        assert_eq!(w.get(), Duration::ZERO, "starts off");
        // Requests 10 µs apart: 4, 8, 16, then covered.
        for want in [4, 8, 16] {
            w.waited(10 * US);
            assert_eq!(w.get(), want * US);
        }
        w.waited(10 * US);
        assert_eq!(w.get(), 16 * US, "covered: no change");
        // Never past the maximum.
        w.waited(30 * US);
        w.waited(30 * US);
        assert_eq!(w.get(), 32 * US);
        // An idle queue: one long wait and it polls no more.
        w.waited(Duration::from_secs(1));
        assert_eq!(w.get(), Duration::ZERO);
        // Fixed and off do not move.
        let mut f = Window::new(Poll::Fixed(5 * US));
        f.waited(Duration::from_secs(1));
        assert_eq!(f.get(), 5 * US);
        let mut o = Window::new(Poll::Off);
        o.waited(US);
        assert_eq!(o.get(), Duration::ZERO);
    }
}
