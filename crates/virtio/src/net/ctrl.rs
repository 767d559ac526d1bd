//! The control queue: the driver's commands, each a chain of
//! `{class, command, data…}` followed by a one-byte ack the device writes.
//!
//! Handled: `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` (how many queue pairs the
//! guest uses: the other TAP queues are detached so the kernel stops
//! steering packets to them) and the receive-mode commands (promiscuous,
//! all-multicast, … — a TAP delivers everything anyway, so they are
//! acknowledged). Anything else is answered `VIRTIO_NET_ERR`.

use std::sync::{Arc, Mutex};

use super::features::*;
use super::has;
use super::backend::{Tap, TapError};
use crate::chain::Chain;
use crate::threads::{QueueWorker, Wait};
use crate::queue::{QueueCtx, Stopped};

/// Longest command read from guest memory. The largest command of the
/// classes handled here is 3 bytes; anything longer is refused unread.
const MAX_COMMAND_LEN: usize = 64;

/// Which TAP queues the kernel may steer packets to.
pub struct QueuePairs {
    taps: Arc<Vec<Arc<Tap>>>,
    attached: Mutex<Vec<bool>>,
}

impl QueuePairs {
    /// All queues start attached (as `TUNSETIFF` leaves them).
    pub fn new(taps: Arc<Vec<Arc<Tap>>>) -> Arc<QueuePairs> {
        let n = taps.len();
        Arc::new(QueuePairs { taps, attached: Mutex::new(vec![true; n]) })
    }

    /// Attaches the first `n` TAP queues and detaches the rest.
    pub fn set_active(&self, n: usize) -> Result<(), TapError> {
        if self.taps.len() < 2 {
            return Ok(());
        }
        let mut attached = self.attached.lock().unwrap_or_else(|e| e.into_inner());
        for (i, tap) in self.taps.iter().enumerate() {
            let want = i < n;
            if attached[i] != want {
                tap.set_queue_enabled(want)?;
                attached[i] = want;
            }
        }
        Ok(())
    }

    pub fn max(&self) -> usize {
        self.taps.len()
    }
}

/// Serves the control queue.
pub struct CtrlWorker {
    pairs: Arc<QueuePairs>,
    mq: bool,
}

impl CtrlWorker {
    pub fn new(pairs: Arc<QueuePairs>, features: u64) -> CtrlWorker {
        CtrlWorker { pairs, mq: has(features, VIRTIO_NET_F_MQ) }
    }

    /// Runs one command; returns the ack byte.
    fn execute(&mut self, q: &mut QueueCtx, class: u8, command: u8, data: &[u8]) -> u8 {
        let ok = VIRTIO_NET_OK as u8;
        let err = VIRTIO_NET_ERR as u8;
        match (u32::from(class), u32::from(command)) {
            (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) if self.mq => {
                let Some(n) = data.get(..2).map(|b| usize::from(u16::from_le_bytes([b[0], b[1]]))) else {
                    return err;
                };
                if n == 0 || n > self.pairs.max() {
                    q.count_error(&format!("driver asked for {n} queue pairs, the device has {}", self.pairs.max()));
                    return err;
                }
                match self.pairs.set_active(n) {
                    Ok(()) => ok,
                    Err(e) => {
                        q.count_error(&e.to_string());
                        err
                    }
                }
            }
            // PROMISC, ALLMULTI, ALLUNI, NOMULTI, NOUNI, NOBCAST: one byte
            // on/off each.
            (VIRTIO_NET_CTRL_RX, 0..=5) if data.len() == 1 => ok,
            _ => err,
        }
    }

    fn handle(&mut self, q: &mut QueueCtx, c: Chain) {
        if c.writable.is_empty() {
            q.fail_chain(c.head, "control command has no room for the ack");
            return;
        }
        let len = usize::try_from(c.readable.len()).unwrap_or(usize::MAX);
        let ack = if !(2..=MAX_COMMAND_LEN).contains(&len) {
            q.count_error(&format!("control command of {len} bytes"));
            VIRTIO_NET_ERR as u8
        } else {
            let mut cmd = [0u8; MAX_COMMAND_LEN];
            let got = c.readable.read_at(0, &mut cmd[..len]);
            let [class, command, ..] = cmd;
            self.execute(q, class, command, cmd.get(2..got).unwrap_or_default())
        };
        c.writable.write_at(0, &[ack]);
        q.add_used(c.head, 1);
    }
}

impl QueueWorker for CtrlWorker {
    fn serve(&mut self, q: &mut QueueCtx) -> Result<Wait, Stopped> {
        while let Some(c) = q.pop() {
            self.handle(q, c);
        }
        Ok(Wait::Kick)
    }
}
