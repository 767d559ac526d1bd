//! A guest driver for tests and benchmarks: it plays the guest's side of a
//! split virtqueue in real (anonymous) guest memory.
//!
//! It allocates guest memory, lays out the rings, negotiates features,
//! posts descriptor chains, kicks, waits on the call eventfd and reads the
//! used ring — the same steps Linux's virtio_ring does. It can also write
//! raw, malformed descriptors and avail indexes, to test that devices
//! survive what a buggy or hostile guest writes.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{activate, ActivateError, ActiveDevice, VirtioDevice};
use crate::queue::QueueSetup;
use crate::memory::GuestMemory;
use crate::threads::{Runtime, ThreadingMode};

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// avail ring flag: "don't interrupt me" (without EVENT_IDX).
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Guest RAM with a bump allocator.
pub struct Guest {
    mem: GuestMemory,
    next: u64,
    size: u64,
}

impl Guest {
    /// `size` bytes of guest RAM at guest address 0 (anonymous memory,
    /// populated on first touch).
    pub fn new(size: usize) -> Guest {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), size)])
            .unwrap_or_else(|e| panic!("cannot map {size} bytes of test guest memory: {e}"));
        // Leave page 0 unused so address 0 is never a valid buffer.
        Guest { mem, next: 0x1000, size: size as u64 }
    }

    /// Guest RAM over `mem` (e.g. a memfd that a vhost-user back-end maps
    /// too), whose first `size` bytes from guest address 0 are RAM.
    pub fn with_memory(mem: GuestMemory, size: usize) -> Guest {
        Guest { mem, next: 0x1000, size: size as u64 }
    }

    pub fn mem(&self) -> &GuestMemory {
        &self.mem
    }

    /// Allocates `len` bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, len: u64, align: u64) -> GuestAddress {
        let at = (self.next + align - 1) & !(align - 1);
        assert!(at + len <= self.size, "test guest memory exhausted");
        self.next = at + len;
        GuestAddress(at)
    }

    /// Allocates a buffer holding `data`.
    pub fn alloc_bytes(&mut self, data: &[u8]) -> GuestAddress {
        let a = self.alloc(data.len().max(1) as u64, 16);
        self.write(a, data);
        a
    }

    pub fn write(&self, addr: GuestAddress, data: &[u8]) {
        self.mem.write_slice(data, addr).expect("test write inside guest memory");
    }

    pub fn read(&self, addr: GuestAddress, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, addr).expect("test read inside guest memory");
        v
    }
}

/// One buffer of a chain: guest address, length, device-writable or not.
#[derive(Debug, Clone, Copy)]
pub struct Buf {
    pub addr: GuestAddress,
    pub len: u32,
    pub write: bool,
}

impl Buf {
    pub fn out(addr: GuestAddress, len: u32) -> Buf {
        Buf { addr, len, write: false }
    }
    pub fn inb(addr: GuestAddress, len: u32) -> Buf {
        Buf { addr, len, write: true }
    }
}

/// The driver's side of one split virtqueue.
pub struct DriverQueue {
    pub index: u16,
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    mem: GuestMemory,
    free: Vec<u16>,
    in_flight: HashMap<u16, Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
    kick: EventFd,
    call: EventFd,
    /// Interrupts received so far.
    calls: std::cell::Cell<u64>,
    event_idx: bool,
}

impl DriverQueue {
    /// Lays out a queue of `size` entries in `guest`'s memory.
    pub fn new(guest: &mut Guest, index: u16, size: u16) -> DriverQueue {
        let n = u64::from(size);
        let desc = guest.alloc(16 * n, 16);
        let avail = guest.alloc(6 + 2 * n, 2);
        let used = guest.alloc(6 + 8 * n, 4);
        DriverQueue {
            index,
            size,
            desc,
            avail,
            used,
            mem: guest.mem().clone(),
            free: (0..size).rev().collect(),
            in_flight: HashMap::new(),
            avail_idx: 0,
            last_used: 0,
            // The device blocks in read() on the kick: it must not be
            // O_NONBLOCK (the flag is shared with the device's clone).
            kick: EventFd::new(0).expect("eventfd"),
            call: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            calls: std::cell::Cell::new(0),
            event_idx: false,
        }
    }

    /// What the transport hands to the device for this queue.
    pub fn setup(&self) -> QueueSetup {
        let mut q = Queue::new(self.size).expect("valid queue size");
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc.0 as u32), Some((self.desc.0 >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail.0 as u32), Some((self.avail.0 >> 32) as u32));
        q.set_used_ring_address(Some(self.used.0 as u32), Some((self.used.0 >> 32) as u32));
        q.set_ready(true);
        QueueSetup {
            index: self.index,
            queue: q,
            kick: self.kick.try_clone().expect("eventfd clone"),
            call: self.call.try_clone().expect("eventfd clone"),
        }
    }

    /// Writes descriptor `i` raw (no checks: for malformed-chain tests).
    pub fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        Self::write_indirect_desc(&self.mem, self.desc, i, addr, len, flags, next);
    }

    /// Writes entry `i` of the descriptor table at `table` (the queue's
    /// own, or an indirect one: same layout).
    pub fn write_indirect_desc(mem: &GuestMemory, table: GuestAddress, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, table.unchecked_add(16 * u64::from(i))).expect("indirect write");
    }

    /// Free descriptors left.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Chains posted and not yet returned.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Builds a chain from `bufs` in free descriptors; returns its head
    /// (not yet visible to the device: see [`Self::publish`]).
    pub fn add(&mut self, bufs: &[Buf]) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > self.free.len() {
            return None;
        }
        let ids: Vec<u16> = (0..bufs.len()).filter_map(|_| self.free.pop()).collect();
        for (k, b) in bufs.iter().enumerate() {
            let last = k + 1 == bufs.len();
            let mut flags = if b.write { VIRTQ_DESC_F_WRITE } else { 0 };
            let next = if last { 0 } else { flags |= VIRTQ_DESC_F_NEXT; ids[k + 1] };
            self.write_desc(ids[k], b.addr.0, b.len, flags, next);
        }
        let head = ids[0];
        self.in_flight.insert(head, ids);
        Some(head)
    }

    /// Builds a chain of one indirect descriptor pointing at a table (in
    /// `guest`'s memory) that holds `bufs`.
    pub fn add_indirect(&mut self, guest: &mut Guest, bufs: &[Buf]) -> Option<u16> {
        let table = guest.alloc(16 * bufs.len() as u64, 16);
        for (k, b) in bufs.iter().enumerate() {
            let last = k + 1 == bufs.len();
            let mut flags = if b.write { VIRTQ_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            Self::write_indirect_desc(&self.mem, table, k as u16, b.addr.0, b.len, flags, (k + 1) as u16);
        }
        let head = self.free.pop()?;
        self.write_desc(head, table.0, 16 * bufs.len() as u32, VIRTQ_DESC_F_INDIRECT, 0);
        self.in_flight.insert(head, vec![head]);
        Some(head)
    }

    /// Takes a descriptor out of the free list for a hand-written chain.
    pub fn take_descriptor(&mut self) -> Option<u16> {
        let d = self.free.pop()?;
        self.in_flight.insert(d, vec![d]);
        Some(d)
    }

    /// Makes `head` available: writes the avail ring entry, then (after a
    /// release fence, as the spec requires) the new avail index.
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head.to_le(), self.avail.unchecked_add(4 + 2 * slot))
            .expect("avail write");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        fence(Ordering::SeqCst);
        self.set_avail_idx(self.avail_idx);
    }

    /// Writes the avail index raw (malformed-ring tests use wild values).
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem.write_obj(idx.to_le(), self.avail.unchecked_add(2)).expect("avail idx write");
        fence(Ordering::SeqCst);
    }

    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// `add` + `publish`.
    pub fn post(&mut self, bufs: &[Buf]) -> Option<u16> {
        let h = self.add(bufs)?;
        self.publish(h);
        Some(h)
    }

    /// Notifies the device unconditionally.
    pub fn kick(&self) {
        self.kick.write(1).expect("kick write");
    }

    /// With EVENT_IDX, the device's avail_event says whether it wants a
    /// kick for the entries published since `old_avail`; without it, the
    /// used ring's NO_NOTIFY flag does. Kicks only if wanted; returns
    /// whether it did.
    pub fn kick_if_needed(&self, old_avail: u16) -> bool {
        fence(Ordering::SeqCst);
        let want = if self.event_idx {
            let ev: u16 = self
                .mem
                .read_obj(self.used.unchecked_add(4 + 8 * u64::from(self.size)))
                .unwrap_or(0);
            self.avail_idx.wrapping_sub(ev).wrapping_sub(1) < self.avail_idx.wrapping_sub(old_avail)
        } else {
            let flags: u16 = self.mem.read_obj(self.used).unwrap_or(0);
            flags & 1 == 0
        };
        if want {
            self.kick();
        }
        want
    }

    /// Tells the queue that EVENT_IDX was negotiated (so `kick_if_needed`
    /// and `set_used_event` use the event fields).
    pub fn set_event_idx(&mut self, on: bool) {
        self.event_idx = on;
    }

    /// EVENT_IDX: ask for an interrupt when the used index passes `idx`.
    pub fn set_used_event(&self, idx: u16) {
        self.mem
            .write_obj(idx.to_le(), self.avail.unchecked_add(4 + 2 * u64::from(self.size)))
            .expect("used_event write");
        fence(Ordering::SeqCst);
    }

    /// Without EVENT_IDX: set or clear VIRTQ_AVAIL_F_NO_INTERRUPT.
    pub fn set_no_interrupt(&self, on: bool) {
        let flags: u16 = if on { VIRTQ_AVAIL_F_NO_INTERRUPT } else { 0 };
        self.mem.write_obj(flags.to_le(), self.avail).expect("avail flags write");
        fence(Ordering::SeqCst);
    }

    /// Asks for an interrupt on the next used entry (EVENT_IDX: used_event
    /// = the index we will read next).
    pub fn enable_interrupts(&self) {
        self.set_used_event(self.last_used);
        self.set_no_interrupt(false);
    }

    /// The used ring's index as the device last wrote it.
    pub fn used_idx(&self) -> u16 {
        fence(Ordering::SeqCst);
        self.mem.read_obj::<u16>(self.used.unchecked_add(2)).map(u16::from_le).unwrap_or(0)
    }

    /// The next used index the driver will read.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// Takes the next used entry, if any: (head, bytes written by device).
    /// Its descriptors return to the free list.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        if self.used_idx() == self.last_used {
            return None;
        }
        let slot = u64::from(self.last_used % self.size);
        let at = self.used.unchecked_add(4 + 8 * slot);
        let id: u32 = self.mem.read_obj(at).ok()?;
        let len: u32 = self.mem.read_obj(at.unchecked_add(4)).ok()?;
        self.last_used = self.last_used.wrapping_add(1);
        let head = u32::from_le(id) as u16;
        if let Some(ids) = self.in_flight.remove(&head) {
            self.free.extend(ids);
        }
        Some((head, u32::from_le(len)))
    }

    /// Waits up to `timeout` for the next used entry, sleeping on the call
    /// eventfd between looks (so a missing interrupt shows as a timeout
    /// only if the entry never comes; see [`Self::wait_call`]).
    pub fn wait_used(&mut self, timeout: Duration) -> Option<(u16, u32)> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(u) = self.pop_used() {
                return Some(u);
            }
            let left = end.checked_duration_since(Instant::now())?;
            self.wait_call(left.min(Duration::from_millis(20)));
        }
    }

    /// Waits up to `timeout` for an interrupt; returns how many were
    /// signalled (0 on timeout).
    pub fn wait_call(&self, timeout: Duration) -> u64 {
        let mut p = libc::pollfd { fd: self.call.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
        if r > 0 {
            self.take_calls()
        } else {
            0
        }
    }

    /// Interrupts signalled and not yet consumed (non-blocking).
    pub fn take_calls(&self) -> u64 {
        let n = self.call.read().unwrap_or(0);
        self.calls.set(self.calls.get() + n);
        n
    }

    /// Interrupts received since the queue was created (including those
    /// consumed while waiting in [`Self::wait_used`]).
    pub fn calls(&self) -> u64 {
        self.take_calls();
        self.calls.get()
    }

    /// Waits up to `timeout` until at least `n` interrupts were received.
    pub fn wait_calls(&self, n: u64, timeout: Duration) -> u64 {
        let end = Instant::now() + timeout;
        while self.calls() < n {
            let Some(left) = end.checked_duration_since(Instant::now()) else { break };
            self.wait_call(left.min(Duration::from_millis(20)));
        }
        self.calls()
    }

    /// The call eventfd (for benchmarks that block on it directly).
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }
}

/// A device, started with a driver on each of its queues.
pub struct Harness {
    pub guest: Guest,
    pub queues: Vec<DriverQueue>,
    pub device: Box<dyn VirtioDevice>,
    pub features: u64,
    pub active: Option<ActiveDevice>,
    pub runtime: Arc<Runtime>,
    pub config_call: EventFd,
}

/// Options for [`Harness::start`].
#[derive(Clone)]
pub struct HarnessOpts {
    pub mode: ThreadingMode,
    pub queue_size: u16,
    /// Features the driver accepts (ANDed with what the device offers).
    pub driver_features: u64,
    pub guest_mem: usize,
}

impl Default for HarnessOpts {
    fn default() -> Self {
        HarnessOpts { mode: ThreadingMode::PerQueue, queue_size: 256, driver_features: !0, guest_mem: 64 << 20 }
    }
}

impl Harness {
    /// Negotiates features, lays out every queue and activates the device.
    pub fn start(device: Box<dyn VirtioDevice>, opts: HarnessOpts) -> Result<Harness, ActivateError> {
        let runtime = Runtime::new(opts.mode);
        Self::start_with_runtime(device, opts, runtime)
    }

    /// As [`Self::start`], sharing a runtime with other devices (needed for
    /// the `single` threading mode to serve several devices).
    pub fn start_with_runtime(
        device: Box<dyn VirtioDevice>,
        opts: HarnessOpts,
        runtime: Arc<Runtime>,
    ) -> Result<Harness, ActivateError> {
        let features = device.features() & opts.driver_features;
        let sizes = device.queue_max_sizes().iter().map(|&max| opts.queue_size.min(max)).collect();
        let mut h = Harness {
            guest: Guest::new(opts.guest_mem),
            queues: Vec::new(),
            device,
            features,
            active: None,
            runtime,
            config_call: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        };
        h.activate(sizes)?;
        Ok(h)
    }

    /// Resets the device: stops its queue threads.
    pub fn reset(&mut self) {
        if let Some(mut a) = self.active.take() {
            a.stop();
        }
        self.device.reset();
    }

    /// Resets the device and activates it again with the same features, as
    /// a driver does after a reset: every queue gets fresh rings (newly
    /// allocated in guest memory) of the same size.
    pub fn restart(&mut self) -> Result<(), ActivateError> {
        self.reset();
        let sizes = self.queues.iter().map(|q| q.size).collect();
        self.activate(sizes)
    }

    /// Lays out fresh rings of `sizes` and activates the device on them.
    fn activate(&mut self, sizes: Vec<u16>) -> Result<(), ActivateError> {
        let event_idx = self.features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0;
        self.queues = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let mut q = DriverQueue::new(&mut self.guest, i as u16, size);
                q.set_event_idx(event_idx);
                q
            })
            .collect();
        let setups = self.queues.iter().map(DriverQueue::setup).collect();
        let active = activate(
            self.device.as_mut(),
            self.features,
            self.guest.mem(),
            setups,
            &self.runtime,
            Some(self.config_call.try_clone().expect("eventfd clone")),
        )?;
        self.active = Some(active);
        Ok(())
    }

    /// Posts one virtio-blk request on queue `qi` and kicks: a 16-byte
    /// header (`ty`, `sector`), then `write` as device-readable data, or
    /// else `read_len` bytes of device-writable buffer, then the status
    /// byte (0xff until the device writes it). Returns the addresses of the
    /// status byte and of the data buffer (0 when there is none).
    pub fn post_blk_request(
        &mut self,
        qi: usize,
        ty: u32,
        sector: u64,
        write: &[u8],
        read_len: u32,
    ) -> (GuestAddress, GuestAddress) {
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&ty.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        let hdr_a = self.guest.alloc_bytes(&hdr);
        let status = self.guest.alloc_bytes(&[0xff]);
        let mut bufs = vec![Buf::out(hdr_a, 16)];
        let mut data = GuestAddress(0);
        if !write.is_empty() {
            data = self.guest.alloc(write.len() as u64, 4096);
            self.guest.write(data, write);
            bufs.push(Buf::out(data, write.len() as u32));
        } else if read_len > 0 {
            data = self.guest.alloc(u64::from(read_len), 4096);
            bufs.push(Buf::inb(data, read_len));
        }
        bufs.push(Buf::inb(status, 1));
        self.queues[qi].post(&bufs).expect("room in the queue");
        self.queues[qi].kick();
        (status, data)
    }

    /// True once the device has marked itself DEVICE_NEEDS_RESET.
    pub fn needs_reset(&self) -> bool {
        self.device.state().needs_reset.load(Ordering::SeqCst)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.reset();
    }
}
