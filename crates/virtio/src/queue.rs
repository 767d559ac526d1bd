//! The queue thread's view of its virtqueue: pop a chain, return it on the
//! used ring, and raise the interrupt only when the guest wants it and the
//! thread is about to sleep.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::chain::{self, Chain};
use crate::counters::{DeviceState, QueueCounters};
use crate::memory::{GuestIovecs, GuestMemory};
use crate::poll::{Poll, Window};

/// Under sustained load, a queue thread that never runs out of work still
/// interrupts the guest after this many used buffers, so the guest's
/// latency stays bounded even though the thread does not sleep.
pub const NOTIFY_BATCH: u32 = 64;

/// Bytes [`QueueCtx::io_all`] hands to one system call at most. A request
/// may be as large as a chain (4 GiB); in slices this size a reset waits
/// for one slice. Linux's block requests are far smaller (`max_sectors_kb`
/// defaults to 1280), so they take one call.
pub const MAX_IO_BYTES: u64 = 16 << 20;

const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// One queue the driver made ready: its ring state and its two eventfds.
pub struct QueueSetup {
    pub index: u16,
    pub queue: Queue,
    /// Signalled by the guest's notification (a KVM ioeventfd).
    pub kick: EventFd,
    /// Written to raise the queue's interrupt (a KVM irqfd).
    pub call: EventFd,
}

/// Where a device reports that it needs a reset.
pub struct DeviceEvents {
    pub counters: Arc<DeviceState>,
    /// Written when the device wants a configuration-change interrupt.
    pub config_call: Option<EventFd>,
}

impl DeviceEvents {
    /// Marks the device DEVICE_NEEDS_RESET and tells the driver.
    pub fn set_needs_reset(&self) {
        self.counters.needs_reset.store(true, std::sync::atomic::Ordering::SeqCst);
        self.config_changed();
    }

    /// Raises the configuration-change interrupt: the driver re-reads the
    /// device's configuration space (virtio-net: the link `status`).
    pub fn config_changed(&self) {
        if let Some(call) = &self.config_call {
            let _ = call.write(1);
        }
    }
}

/// True if `queue`'s three rings lie in guest memory, aligned as the spec
/// asks, and the queue is ready: what virtio-queue's `is_valid` checks,
/// without the `error!` line it logs for every failure (a guest may set
/// DRIVER_OK with bad rings as often as it likes; the caller counts it and
/// logs through a throttle).
pub fn rings_fit(queue: &Queue, mem: &GuestMemory) -> bool {
    use vm_memory::GuestMemoryBackend;
    let size = u64::from(queue.size());
    let fits = |addr: u64, len: u64, align: u64| {
        addr.is_multiple_of(align) && usize::try_from(len).is_ok_and(|len| mem.check_range(vm_memory::GuestAddress(addr), len))
    };
    queue.ready()
        && size > 0
        && fits(queue.desc_table(), 16 * size, 16)
        && fits(queue.avail_ring(), 6 + 2 * size, 2)
        && fits(queue.used_ring(), 6 + 8 * size, 4)
}

/// Where a stopped queue is in its rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueState {
    pub index: u16,
    /// The next avail ring entry the device would have taken.
    pub next_avail: u16,
    /// The next used ring entry the device would have written.
    pub next_used: u16,
}

/// The queue thread was asked to stop (device reset or shutdown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

/// One virtqueue, owned by the thread that serves it.
pub struct QueueCtx {
    pub index: u16,
    /// `<device>-q<N>`, for logs.
    name: String,
    queue: Queue,
    mem: Arc<GuestMemory>,
    /// VIRTIO_F_INDIRECT_DESC was negotiated.
    indirect: bool,
    kick: EventFd,
    call: EventFd,
    pub counters: Arc<QueueCounters>,
    events: Arc<DeviceEvents>,
    /// Set when the thread serving this queue must stop.
    stop: Arc<AtomicBool>,
    /// The queue has a thread of its own (see [`QueueCtx::blocking`]).
    blocking: bool,
    /// Used entries added since the last interrupt decision.
    unsignalled: u32,
    /// The rings are corrupt: serve nothing until the device is reset.
    broken: bool,
    /// The kick eventfd is non-blocking: [`QueueCtx::wait_kick`] sleeps in
    /// `poll` first.
    kick_polls: bool,
    /// How long [`QueueCtx::wait_kick`] watches the avail ring before it
    /// sleeps (see [`crate::poll`]).
    poll: Window,
}

impl QueueCtx {
    /// `blocking`: the queue will have a thread of its own (per-queue
    /// mode), in which its worker may block in its backend.
    pub(crate) fn new(
        s: QueueSetup,
        name: String,
        mem: Arc<GuestMemory>,
        features: u64,
        counters: Arc<QueueCounters>,
        events: Arc<DeviceEvents>,
        blocking: bool,
    ) -> Self {
        QueueCtx {
            index: s.index,
            name,
            queue: s.queue,
            mem,
            indirect: features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC) != 0,
            kick: s.kick,
            call: s.call,
            counters,
            events,
            stop: Arc::new(AtomicBool::new(false)),
            blocking,
            unsignalled: 0,
            broken: false,
            kick_polls: false,
            poll: Window::new(Poll::Off),
        }
    }

    /// Polls the avail ring as `poll` says before each sleep on the kick.
    pub(crate) fn set_poll(&mut self, poll: Poll) {
        self.poll = Window::new(poll);
    }

    /// Guest memory, for devices that read or write structures in it.
    pub fn mem(&self) -> &GuestMemory {
        &self.mem
    }

    /// `<device>-q<N>`: the queue's thread name in per-queue mode.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// True when this queue has a thread of its own and may block in its
    /// backend (per-queue mode).
    pub fn blocking(&self) -> bool {
        self.blocking
    }

    /// Where the queue is in its rings.
    pub(crate) fn state(&self) -> QueueState {
        QueueState { index: self.index, next_avail: self.queue.next_avail(), next_used: self.queue.next_used() }
    }

    /// The flag the queue's thread is stopped with.
    pub(crate) fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// A stopped queue that moves to a new thread (the `single` mode
    /// restarts its thread when a device comes or goes) serves again.
    pub(crate) fn resume(&mut self) {
        self.stop.store(false, Ordering::Release);
    }

    /// Returns `Err(Stopped)` once the thread has been asked to stop.
    pub fn check_stop(&self) -> Result<(), Stopped> {
        if self.stop.load(Ordering::Acquire) {
            Err(Stopped)
        } else {
            Ok(())
        }
    }

    /// For a backend call that failed with `err`: `Ok(true)` means retry
    /// it (it was only interrupted), `Ok(false)` means the error is real,
    /// `Err(Stopped)` means the thread must stop.
    pub fn retry_after(&self, err: &io::Error) -> Result<bool, Stopped> {
        if err.kind() == io::ErrorKind::Interrupted {
            self.check_stop()?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Moves all of `iov` through `op`, a read or write that may take only
    /// part of it (short reads and writes happen): `op` gets the buffers
    /// still to go and how many bytes are done. At most [`MAX_IO_BYTES`]
    /// go to one call, so a stop waits for one slice, not a whole 4 GiB
    /// request; interrupted calls are retried unless the thread must stop;
    /// a backend that would block is waited for a millisecond at a time.
    /// Returns the bytes moved, or the backend's error.
    pub fn io_all(
        &self,
        iov: &GuestIovecs,
        mut op: impl FnMut(&GuestIovecs, u64) -> io::Result<usize>,
    ) -> Result<io::Result<u64>, Stopped> {
        let total = iov.len();
        let mut done = 0u64;
        let mut rest = iov.clone();
        while done < total {
            let mut slice;
            let chunk = if rest.len() > MAX_IO_BYTES {
                self.check_stop()?;
                slice = rest.clone();
                slice.truncate(MAX_IO_BYTES);
                &slice
            } else {
                &rest
            };
            match op(chunk, done) {
                Ok(0) => return Ok(Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the backend ended early"))),
                Ok(n) => {
                    done += n as u64;
                    rest = rest.skip(n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    crate::sys::pause(std::time::Duration::from_millis(1));
                    self.check_stop()?;
                }
                Err(e) if self.retry_after(&e)? => {}
                Err(e) => return Ok(Err(e)),
            }
        }
        Ok(Ok(done))
    }

    /// Takes the next available chain, validated. Malformed chains are
    /// counted, returned to the guest with length 0, and skipped; a corrupt
    /// avail ring marks the device NEEDS_RESET and stops this queue.
    ///
    /// Returns `None` once the thread has been asked to stop, even if the
    /// guest keeps the ring full: a reset or shutdown never waits for the
    /// guest to run out of requests.
    pub fn pop(&mut self) -> Option<Chain> {
        loop {
            if self.broken || self.stop.load(Ordering::Relaxed) {
                return None;
            }
            let head = match self.queue.iter(&*self.mem) {
                Ok(mut avail) => avail.next()?.head_index(),
                Err(e) => {
                    self.ring_broken(&e.to_string());
                    return None;
                }
            };
            let rules = chain::Rules {
                queue_size: self.queue.size(),
                max_descriptors: self.queue.max_size(),
                indirect: self.indirect,
            };
            match chain::walk(&self.mem, self.desc_table(), head, rules) {
                Ok(c) => return Some(c),
                // There is no such chain to return: the avail ring is corrupt.
                Err(e @ chain::ChainError::HeadOutOfTable(_)) => {
                    self.ring_broken(&e.to_string());
                    return None;
                }
                Err(e) => {
                    self.fail_chain(head, &e.to_string());
                }
            }
        }
    }

    /// Puts the last popped chain back: it will be popped again.
    pub fn unpop(&mut self) {
        self.queue.go_to_previous_position();
    }

    /// Counts an error on a chain and returns it to the guest unused.
    pub fn fail_chain(&mut self, head: u16, why: &str) {
        self.count_error(why);
        self.add_used(head, 0);
    }

    /// Counts a guest or backend error and logs it (rate-limited by count).
    pub fn count_error(&self, why: &str) {
        let n = self.counters.errors.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if crate::ratelimit::should_log(n) {
            log::warn!("{}: {} (error #{n})", self.name, why);
        }
    }

    /// The queue's worker panicked: a device bug, contained to its device.
    /// The queue serves nothing more, and the driver is told the device
    /// needs a reset; other devices go on.
    pub(crate) fn worker_panicked(&mut self, why: &str) {
        QueueCounters::add(&self.counters.errors, 1);
        log::error!("{}: the device's queue worker panicked ({why}); the device needs a reset", self.name);
        self.broken = true;
        self.events.set_needs_reset();
    }

    fn ring_broken(&mut self, why: &str) {
        self.count_error(&format!("ring is corrupt, device needs reset: {why}"));
        self.broken = true;
        self.events.set_needs_reset();
    }

    fn desc_table(&self) -> vm_memory::GuestAddress {
        vm_memory::GuestAddress(self.queue.desc_table())
    }

    /// Returns a chain on the used ring with `len` bytes written into it.
    /// Does not interrupt the guest, unless a long batch has built up.
    pub fn add_used(&mut self, head: u16, len: u32) {
        if self.broken {
            return;
        }
        if let Err(e) = self.queue.add_used(&*self.mem, head, len) {
            self.ring_broken(&e.to_string());
            return;
        }
        QueueCounters::add(&self.counters.chains, 1);
        self.unsignalled += 1;
        if self.unsignalled >= NOTIFY_BATCH {
            self.notify();
        }
    }

    /// Counts bytes moved for this queue.
    pub fn add_bytes(&self, n: u64) {
        QueueCounters::add(&self.counters.bytes, n);
    }

    /// True when used entries are waiting for an interrupt decision.
    pub fn has_unsignalled(&self) -> bool {
        self.unsignalled > 0
    }

    /// Raises the queue's interrupt if used entries were added since the
    /// last time and the guest asked to hear about them. Call it when about
    /// to sleep.
    pub fn notify(&mut self) {
        if self.unsignalled == 0 || self.broken {
            return;
        }
        self.unsignalled = 0;
        match self.guest_wants_interrupt() {
            Ok(true) => {
                QueueCounters::add(&self.counters.interrupts, 1);
                if let Err(e) = self.call.write(1) {
                    self.count_error(&format!("cannot signal the call eventfd: {e}"));
                }
            }
            Ok(false) => QueueCounters::add(&self.counters.suppressed, 1),
            Err(e) => self.ring_broken(&e.to_string()),
        }
    }

    /// EVENT_IDX: virtio-queue's `needs_notification` (wrap-safe). Without
    /// it, the avail ring's VIRTQ_AVAIL_F_NO_INTERRUPT flag, which
    /// virtio-queue does not look at.
    fn guest_wants_interrupt(&mut self) -> Result<bool, virtio_queue::Error> {
        if self.queue.event_idx_enabled() {
            return self.queue.needs_notification(&*self.mem);
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        let flags: u16 = vm_memory::Bytes::read_obj(&*self.mem, vm_memory::GuestAddress(self.queue.avail_ring()))
            .map_err(virtio_queue::Error::GuestMemory)?;
        Ok(u16::from_le(flags) & VIRTQ_AVAIL_F_NO_INTERRUPT == 0)
    }

    /// Re-enables guest notifications before sleeping. Returns false if
    /// more chains arrived meanwhile: the thread must serve them and not
    /// sleep, or a kick sent before notifications were re-enabled would be
    /// lost.
    pub(crate) fn may_sleep(&mut self) -> bool {
        if self.broken {
            return true;
        }
        match self.queue.enable_notification(&*self.mem) {
            Ok(more) => !more,
            Err(e) => {
                self.ring_broken(&e.to_string());
                true
            }
        }
    }

    /// After a wake-up: with EVENT_IDX this is free; without it, ask the
    /// guest not to kick while we are busy.
    pub(crate) fn woke(&mut self) {
        if !self.broken {
            let _ = self.queue.disable_notification(&*self.mem);
        }
    }

    /// Blocks until the guest kicks (or until more work is already there).
    /// With polling on, first raises the interrupt the finished requests
    /// are owed (the thread is about to idle, and the guest's next request
    /// may wait on it) and watches the avail ring for the window; only if
    /// nothing comes does it re-enable notifications and sleep.
    pub fn wait_kick(&mut self) -> Result<(), Stopped> {
        let window = self.poll.get();
        let started = (self.poll.adaptive() || !window.is_zero()).then(std::time::Instant::now);
        if !window.is_zero() {
            self.notify();
            if self.poll_ring(window)? {
                QueueCounters::add(&self.counters.polled, 1);
                return Ok(());
            }
        }
        let r = self.sleep_on_kick();
        if let Some(t) = started {
            self.poll.waited(t.elapsed());
        }
        r
    }

    /// Blocks until the guest kicks or `d` has passed
    /// ([`crate::Wait::Later`]). Notifications are turned on (the guest's
    /// next request kicks), but unlike [`QueueCtx::wait_kick`] it does not
    /// return early for work already on the ring: the worker left it there
    /// on purpose (receive buffers it cannot fill while its backend is
    /// broken), and returning would spin.
    pub(crate) fn wait_kick_for(&mut self, d: std::time::Duration) -> Result<(), Stopped> {
        self.check_stop()?;
        let _ = self.may_sleep();
        self.notify();
        let ms = i32::try_from(d.as_millis()).unwrap_or(i32::MAX);
        let mut p = libc::pollfd { fd: self.kick_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, for the duration of the call.
        if unsafe { libc::poll(&mut p, 1, ms) } > 0 {
            self.take_kick();
            self.woke();
        }
        self.check_stop()
    }

    /// Raises the device's configuration-change interrupt (see
    /// [`DeviceEvents::config_changed`]).
    pub fn config_changed(&self) {
        self.events.config_changed();
    }

    /// Spins on the avail ring index for up to `window`; true if a request
    /// came. Notifications stay off meanwhile (as the thread left them when
    /// it woke), so a guest that posts now does not kick.
    fn poll_ring(&mut self, window: std::time::Duration) -> Result<bool, Stopped> {
        // The clock is read once every few spins: in some VMs it is a
        // system call.
        const SPINS_PER_CLOCK: u32 = 32;
        let deadline = std::time::Instant::now() + window;
        let mut spins = 0u32;
        loop {
            if self.ring_has_work() {
                return Ok(true);
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(SPINS_PER_CLOCK) {
                self.check_stop()?;
                if std::time::Instant::now() >= deadline {
                    return Ok(false);
                }
            }
            std::hint::spin_loop();
        }
    }

    /// True if the guest has made buffers available that the thread has
    /// not taken (or the ring cannot be read: [`QueueCtx::pop`] says why).
    fn ring_has_work(&self) -> bool {
        if self.broken {
            return false;
        }
        match self.queue.avail_idx(&*self.mem, Ordering::Acquire) {
            Ok(idx) => idx.0 != self.queue.next_avail(),
            Err(_) => true,
        }
    }

    /// Re-enables notifications and sleeps on the kick eventfd, unless
    /// more work is already there.
    fn sleep_on_kick(&mut self) -> Result<(), Stopped> {
        loop {
            self.check_stop()?;
            if !self.may_sleep() {
                self.woke();
                return Ok(());
            }
            self.notify();
            if self.kick_polls {
                let mut p = libc::pollfd { fd: self.kick_fd(), events: libc::POLLIN, revents: 0 };
                // SAFETY: one valid pollfd, for the duration of the call.
                if unsafe { libc::poll(&mut p, 1, -1) } < 0 {
                    self.retry_after(&io::Error::last_os_error())?;
                    continue;
                }
            }
            match crate::sys::eventfd_read(self.kick_fd()) {
                Ok(n) => {
                    QueueCounters::add(&self.counters.kicks, n);
                    self.woke();
                    return Ok(());
                }
                // A kick eventfd from a vhost-user frontend may be
                // non-blocking (QEMU makes them so, and the flag belongs to
                // the file it shares with us): from now on sleep in poll
                // before the read.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.kick_polls = true,
                Err(e) => {
                    if !self.retry_after(&e)? {
                        self.count_error(&format!("cannot read the kick eventfd: {e}"));
                        crate::sys::pause(std::time::Duration::from_millis(100));
                    }
                }
            }
        }
    }

    /// Consumes a pending kick without blocking (poll modes, after poll
    /// reported the eventfd readable).
    pub(crate) fn take_kick(&mut self) {
        if let Ok(n) = crate::sys::eventfd_read(self.kick_fd()) {
            QueueCounters::add(&self.counters.kicks, n);
        }
    }

    pub(crate) fn kick_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.kick.as_raw_fd()
    }
}
