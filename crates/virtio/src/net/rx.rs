//! Receive, inverted: hold the guest's buffers first, then read the TAP
//! straight into them.
//!
//! The queue thread pops receive buffers, and only then reads a packet —
//! into those buffers, with one `readv` on the TAP queue fd. No packet is
//! ever queued or copied on the host. In per-queue mode the thread sleeps
//! in that `readv`; before it does, it interrupts the guest for the packets
//! it delivered (lguest's `will_block`, done with a `RWF_NOWAIT` read that
//! doubles as the next read when a packet is already waiting):
//!
//! ```text
//! readv(tap)          -> packet, into held guest buffers; add_used
//! preadv2(NOWAIT)     -> EAGAIN: about to sleep
//! write(call)         -> interrupt, if the guest wants one
//! readv(tap)          ... sleeps until the next packet
//! ```
//!
//! Under load the `RWF_NOWAIT` read finds a packet every time: one system
//! call per packet, and an interrupt only every `NOTIFY_BATCH` packets or
//! when the TAP runs dry.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use super::backend::Tap;
use super::link::Link;
use super::{MAX_IOVECS, NET_HDR_LEN, NUM_BUFFERS_OFFSET};
use crate::backend_fault::BackendFault;
use crate::chain::Chain;
use crate::counters::QueueCounters;
use crate::threads::{QueueWorker, Wait};
use crate::memory::GuestIovecs;
use crate::queue::{QueueCtx, Stopped};
use crate::sys;

/// Serves one receive queue.
pub struct RxWorker {
    tap: Arc<Tap>,
    hdr_len: usize,
    /// VIRTIO_NET_F_MRG_RXBUF: one packet may span several chains.
    mergeable: bool,
    /// Guest buffer bytes that cover the largest packet the TAP may send.
    frame_max: usize,
    /// Bytes that cover a packet of MTU size without GSO.
    min_frame: usize,
    /// Popped chains waiting for a packet, in ring order. They stay popped
    /// across `serve` calls (and are dropped on reset): putting them back
    /// would make the ring look non-empty to the "may I sleep?" check and
    /// spin the thread while it waits for more buffers.
    held: VecDeque<Chain>,
    held_bytes: usize,
    held_iovecs: usize,
    /// Scratch iovec list for the next read.
    iov: GuestIovecs,
    /// The kernel supports `RWF_NOWAIT` reads on the TAP.
    nowait: bool,
    /// The last blocking read slept: packets come one at a time (request
    /// and response), so after this packet the next read will almost
    /// surely sleep too. See [`RxWorker::net_input`].
    idle: bool,
    /// The device's link status, checked on every TAP failure.
    link: Arc<Link>,
    /// The link has not been looked at since the device started.
    fresh: bool,
    /// The TAP's own failures that the link does not explain.
    fault: BackendFault,
}

/// What one read of the TAP gave.
enum Input {
    /// A packet of this many bytes (header included) in the held buffers.
    Packet(usize),
    /// Nothing waiting (shared-thread modes only).
    Empty,
    /// The TAP failed (counted): wait as the link says.
    Failed,
}

/// A blocking read that took longer than this (in TSC cycles, ~7 µs at
/// 3 GHz: more than a wake-up costs) slept waiting for a packet; one that
/// found a packet waiting returns in a few hundred nanoseconds (a few µs
/// for a 64 KiB GSO packet — mistaking that for a sleep only skips a probe).
const SLEPT_CYCLES: u64 = 20_000;

/// A cycle counter that costs no system call (unlike a clock read in some
/// VMs, where the vDSO clock is unavailable).
fn cycles() -> u64 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: rdtsc has no memory effects and exists on every x86-64 CPU.
    unsafe {
        core::arch::x86_64::_rdtsc()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        use std::sync::OnceLock;
        static T0: OnceLock<std::time::Instant> = OnceLock::new();
        T0.get_or_init(std::time::Instant::now).elapsed().as_nanos() as u64 * 3
    }
}

impl RxWorker {
    pub fn new(
        tap: Arc<Tap>,
        link: Arc<Link>,
        hdr_len: usize,
        mergeable: bool,
        frame_max: usize,
        min_frame: usize,
    ) -> RxWorker {
        RxWorker {
            tap,
            link,
            fresh: true,
            hdr_len,
            mergeable,
            frame_max,
            min_frame,
            held: VecDeque::new(),
            held_bytes: 0,
            held_iovecs: 0,
            iov: GuestIovecs::default(),
            nowait: true,
            idle: false,
            fault: BackendFault::default(),
        }
    }

    fn enough_held(&self) -> bool {
        if self.mergeable {
            self.held_bytes >= self.frame_max || self.held_iovecs >= MAX_IOVECS
        } else {
            !self.held.is_empty()
        }
    }

    /// Pops receive buffers until a packet of any size fits. Returns false
    /// when the guest has not given enough (wait for its kick).
    fn hold_buffers(&mut self, q: &mut QueueCtx) -> bool {
        while !self.enough_held() {
            let Some(c) = q.pop() else {
                // Out of buffers. With mergeable buffers, go on with less
                // than a 64 KiB GSO packet needs as long as an MTU-sized
                // one fits: a guest whose ring is smaller than 64 KiB of
                // buffers would otherwise never receive.
                return self.mergeable && self.held_bytes >= self.min_frame;
            };
            if !c.readable.is_empty() {
                q.fail_chain(c.head, "receive chain has device-readable descriptors");
                continue;
            }
            if c.writable.len() < self.hdr_len as u64 {
                let why = format!("receive buffer of {} bytes cannot hold the virtio-net header", c.writable.len());
                q.fail_chain(c.head, &why);
                continue;
            }
            self.held_bytes = self.held_bytes.saturating_add(buf_len(&c));
            self.held_iovecs += c.writable.segments();
            self.held.push_back(c);
        }
        true
    }

    /// The iovecs of the held buffers, in order (one chain's without
    /// mergeable buffers).
    fn build_iov(&mut self) {
        self.iov.clear();
        let chains = if self.mergeable { self.held.len() } else { 1 };
        for c in self.held.iter().take(chains) {
            if self.iov.segments() + c.writable.segments() > MAX_IOVECS {
                break;
            }
            self.iov.append(&c.writable);
        }
    }

    /// Reads one packet into the held buffers. Returns [`Input::Empty`]
    /// (not blocking mode only) when no packet is waiting.
    ///
    /// The guest gets its interrupt when the thread is about to sleep. To
    /// know that, a read that cannot block comes first (`RWF_NOWAIT`); when
    /// it finds nothing, the interrupt goes out and the blocking read
    /// follows. Under load that first read finds a packet every time (one
    /// system call per packet, interrupts batched). In request/response
    /// traffic — a ping, an RPC — the probe would find nothing every time
    /// and cost a system call per packet, so after a read that slept the
    /// thread predicts it will sleep again: it interrupts at once and goes
    /// straight to the blocking read. A wrong guess costs one early
    /// interrupt at the start of a burst, after which the blocking read
    /// returns without sleeping and the probing resumes.
    fn net_input(&mut self, q: &mut QueueCtx) -> Result<Input, Stopped> {
        let fd = self.tap.as_raw_fd();
        loop {
            let r = if q.blocking() && (self.idle || !q.has_unsignalled()) {
                // Nothing to tell the guest, or about to sleep: sleep
                // right in the read.
                q.notify();
                let t0 = cycles();
                let r = sys::readv(fd, &self.iov);
                self.idle = cycles().wrapping_sub(t0) > SLEPT_CYCLES;
                r
            } else {
                sys::read_nowait(fd, &self.iov, &mut self.nowait)
            };
            let err = match r {
                Ok(n) => {
                    self.fault.worked(q);
                    return Ok(Input::Packet(n));
                }
                Err(e) => e,
            };
            if err.kind() == io::ErrorKind::WouldBlock {
                if !q.blocking() {
                    return Ok(Input::Empty);
                }
                // About to sleep in readv: interrupt the guest now.
                q.notify();
                continue;
            }
            if q.retry_after(&err)? {
                continue;
            }
            match err.raw_os_error() {
                // The packet did not fit the guest's buffer; the kernel has
                // dropped it. The buffer is still ours for the next one.
                // (A read asleep when the TAP is deleted also wakes with
                // EFAULT: the link tells the two apart.)
                Some(libc::EFAULT) | Some(libc::EINVAL) if self.link.check(q) => {
                    q.count_error("a received packet was larger than the guest's buffer and was dropped")
                }
                // EBADFD: the interface was deleted (the link goes down
                // for the guest, with its own log line).
                _ => {
                    if self.link.check(q) {
                        self.fault.failed(q, &format!("cannot read TAP `{}`: {err}", self.tap.name()));
                    } else {
                        QueueCounters::add(&q.counters.errors, 1);
                    }
                    return Ok(Input::Failed);
                }
            }
        }
    }

    /// Returns the buffers a packet of `len` bytes (header included) filled
    /// to the guest, telling it in the header how many there are.
    fn deliver(&mut self, q: &mut QueueCtx, len: usize) {
        let mut count = 0usize;
        if self.mergeable {
            let mut left = len;
            for c in &self.held {
                count += 1;
                left = left.saturating_sub(buf_len(c));
                if left == 0 {
                    break;
                }
            }
        } else {
            count = 1;
        }
        if self.hdr_len == NET_HDR_LEN {
            // The TAP skips num_buffers; it is ours to fill, before the
            // buffers become visible on the used ring.
            if let Some(first) = self.held.front() {
                first.writable.write_at(NUM_BUFFERS_OFFSET, &(count as u16).to_le_bytes());
            }
        }
        let mut left = len;
        for _ in 0..count {
            let Some(c) = self.held.pop_front() else { break };
            let cap = buf_len(&c);
            let n = if self.mergeable { left.min(cap) } else { left };
            left -= n.min(left);
            self.held_bytes = self.held_bytes.saturating_sub(cap);
            self.held_iovecs = self.held_iovecs.saturating_sub(c.writable.segments());
            q.add_used(c.head, u32::try_from(n).unwrap_or(u32::MAX));
        }
        q.add_bytes(len as u64);
    }
}

/// Bytes a held receive chain can take.
fn buf_len(c: &Chain) -> usize {
    usize::try_from(c.writable.len()).unwrap_or(usize::MAX)
}

impl QueueWorker for RxWorker {
    fn serve(&mut self, q: &mut QueueCtx) -> Result<Wait, Stopped> {
        if std::mem::take(&mut self.fresh) {
            self.link.check(q);
        }
        loop {
            // No packet comes through a TAP that is down or gone: the
            // buffers stay held until it is back.
            if !self.link.is_up() && !self.link.check(q) {
                return Ok(self.link.wait());
            }
            if !self.hold_buffers(q) {
                return Ok(Wait::Kick);
            }
            self.build_iov();
            match self.net_input(q)? {
                Input::Packet(len) => self.deliver(q, len),
                Input::Empty => return Ok(Wait::Backend),
                Input::Failed => return Ok(self.link.wait()),
            }
        }
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.tap.as_raw_fd())
    }
}
