//! The link the driver sees: VIRTIO_NET_S_LINK_UP in the configuration
//! space's `status`, kept in step with the TAP.
//!
//! A TAP can go away under a running guest: deleted (`ip link del`: reads
//! and writes fail with `EBADFD` for good) or set down (writes fail with
//! `EIO` until it is set up again). The spec's answer is the link status:
//! the device clears VIRTIO_NET_S_LINK_UP and raises the configuration
//! interrupt, the driver reads `status` and turns the carrier off (Linux:
//! `/sys/class/net/eth0/carrier` reads 0 and the stack stops sending), and
//! the reverse when the TAP works again. One line is logged per change;
//! the packets lost meanwhile are only counted.
//!
//! Any queue worker that meets a TAP error asks [`Link::check`], which
//! looks at the TAP (see [`Tap::state`]) without sending anything. While
//! the link is down the workers look again every [`PROBE_INTERVAL`] — the
//! guest, its carrier off, sends nothing that would tell them — except
//! for a deleted TAP, which cannot come back (a new TAP of the same name
//! is another interface: it needs another device).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::backend::{Tap, TapState};
use crate::queue::QueueCtx;
use crate::threads::Wait;

/// How often a worker looks at a TAP that is down.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// After a TAP error the link does not explain (the TAP is up), wait this
/// long before reading again, so a broken backend costs a counter per
/// 10 ms and not a spinning thread.
pub const RETRY_PAUSE: Duration = Duration::from_millis(10);

/// The link state of one net device, shared by its queue workers and its
/// configuration space.
#[derive(Debug)]
pub struct Link {
    /// The device's name, for the log line.
    device: String,
    /// The first TAP queue: always attached, so its state is the
    /// interface's (none: a device without a TAP, never up).
    tap: Option<Arc<Tap>>,
    /// The last [`TapState`] seen, as `u8`.
    state: AtomicU8,
}

fn encode(s: TapState) -> u8 {
    match s {
        TapState::Up => 0,
        TapState::Down => 1,
        TapState::Gone => 2,
    }
}

fn decode(v: u8) -> TapState {
    match v {
        0 => TapState::Up,
        1 => TapState::Down,
        _ => TapState::Gone,
    }
}

impl Link {
    /// A link assumed up until a worker looks (the first thing each does
    /// after the driver starts the device).
    pub fn new(device: &str, tap: Option<Arc<Tap>>) -> Arc<Link> {
        Arc::new(Link { device: device.to_string(), tap, state: AtomicU8::new(encode(TapState::Up)) })
    }

    /// What the driver reads in `status`.
    pub fn is_up(&self) -> bool {
        self.state() == TapState::Up
    }

    fn state(&self) -> TapState {
        decode(self.state.load(Ordering::SeqCst))
    }

    /// Looks at the TAP; if the link changed, logs one line and raises the
    /// configuration interrupt through `q`'s device. True if it is up.
    pub fn check(&self, q: &QueueCtx) -> bool {
        let now = self.tap.as_ref().map_or(TapState::Gone, |t| t.state());
        let before = decode(self.state.swap(encode(now), Ordering::SeqCst));
        if before != now {
            let (dev, tap) = (&self.device, self.tap.as_ref().map_or("", |t| t.name()));
            match now {
                TapState::Up => log::info!("{dev}: TAP `{tap}` works again: link up for the guest"),
                TapState::Down => log::warn!(
                    "{dev}: TAP `{tap}` is down (writes fail with EIO): link down for the guest until it is up \
                     again; packets meanwhile are counted, not logged"
                ),
                TapState::Gone => log::warn!(
                    "{dev}: TAP `{tap}` was deleted: link down for the guest for good (give it a new network \
                     card); packets meanwhile are counted, not logged"
                ),
            }
            q.config_changed();
        }
        now == TapState::Up
    }

    /// What a worker that cannot use the TAP waits for: a look again
    /// soon (a TAP that is up but failed, or one that is down), or only
    /// the guest's next kick (a deleted TAP never comes back). Never
    /// [`Wait::Kick`]: a receive worker leaves buffers on the ring that it
    /// cannot fill, and a thread that waits for a kick does not sleep
    /// while the ring holds any.
    pub fn wait(&self) -> Wait {
        match self.state() {
            TapState::Up => Wait::Later(RETRY_PAUSE),
            TapState::Down => Wait::Later(PROBE_INTERVAL),
            TapState::Gone => Wait::Later(Duration::MAX),
        }
    }
}
