//! What a device is to a transport, and how it is started and stopped.

use std::sync::Arc;

use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use crate::counters::DeviceState;
use crate::memory::GuestMemory;
use crate::queue::{DeviceEvents, QueueCtx, QueueSetup, QueueState};
use crate::threads::{Job, QueueWorker, Runtime, ThreadSet};

/// Feature bits every device here offers: virtio 1.x, indirect descriptors
/// and EVENT_IDX (the guest tells us when it wants interrupts).
pub const COMMON_FEATURES: u64 = (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1)
    | (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX);

/// A device configuration structure the driver reads byte by byte.
///
/// # Safety
/// Implementors are plain old data with no padding (so every byte of a
/// value is initialized): the `repr(C, packed)` structures of
/// `virtio_bindings`, whose fields are integers and arrays of them.
pub unsafe trait ConfigSpace: Copy {
    /// The structure's bytes, as the driver sees them.
    fn bytes(&self) -> Vec<u8> {
        // SAFETY: `Self` is plain old data without padding (the trait's
        // contract): all `size_of::<Self>()` bytes are initialized.
        unsafe { std::slice::from_raw_parts((self as *const Self).cast::<u8>(), std::mem::size_of::<Self>()) }
            .to_vec()
    }
}

// SAFETY: repr(C, packed), integers and arrays of integers only.
unsafe impl ConfigSpace for virtio_bindings::virtio_blk::virtio_blk_config {}
// SAFETY: repr(C, packed), integers and arrays of integers only.
unsafe impl ConfigSpace for virtio_bindings::virtio_net::virtio_net_config {}

/// A virtio device as its transport sees it.
pub trait VirtioDevice: Send {
    /// Short name for threads and logs, e.g. `net0`, `blk1`.
    fn name(&self) -> &str;
    /// Virtio device ID (`virtio_bindings::virtio_ids`).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Features offered to the driver.
    fn features(&self) -> u64;
    /// The device-specific configuration space, as bytes (most devices:
    /// a `virtio_bindings` structure through [`ConfigSpace::bytes`]).
    /// Empty by default.
    fn config_space(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Reads the device-specific configuration space; bytes past its end
    /// read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let space = self.config_space();
        let from = usize::try_from(offset).ok();
        for (i, b) in data.iter_mut().enumerate() {
            *b = from.and_then(|o| o.checked_add(i)).and_then(|o| space.get(o)).copied().unwrap_or(0);
        }
    }
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK with `features`: build one worker per queue
    /// (index = queue index). Opens or configures the backend as needed.
    fn activate(&mut self, features: u64) -> Result<Vec<Box<dyn QueueWorker>>, ActivateError>;
    /// The device was reset and its queue threads have stopped.
    fn reset(&mut self) {}
    /// System calls the device's workers make beyond a queue thread's own
    /// (`seccomp::QUEUE_THREAD`): its queue threads' seccomp filter.
    fn syscalls(&self) -> &'static [i64] {
        &[]
    }
    /// The device's counters and status bit, shared with its queue threads.
    fn state(&self) -> Arc<DeviceState>;
    /// A device whose queues are served outside this process (a vhost-user
    /// back-end, the kernel's vhost-net) returns itself here: [`activate`]
    /// then hands it the rings, kicks and calls instead of starting queue
    /// threads, and [`VirtioDevice::reset`] must stop the rings.
    fn external(&mut self) -> Option<&mut dyn ExternalQueues> {
        None
    }
}

/// Queues served by someone else: the transport's kick (ioeventfd) and call
/// (irqfd) eventfds go straight to the server, so no thread of this process
/// is in the data path.
pub trait ExternalQueues {
    /// The driver set DRIVER_OK with `features`: start serving `queues`
    /// (rings already checked to lie in `mem`). `config_call` raises the
    /// configuration-change interrupt.
    fn start(
        &mut self,
        features: u64,
        mem: &GuestMemory,
        queues: Vec<QueueSetup>,
        config_call: Option<EventFd>,
    ) -> Result<(), ActivateError>;
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("{0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("queue {0} does not exist on this device")]
    NoSuchQueue(u16),
    #[error("queue {0} is not valid (addresses outside guest memory or bad size)")]
    InvalidQueue(u16),
    #[error("cannot start a queue thread: {0}")]
    Spawn(std::io::Error),
}

/// A device whose queue threads are running. Dropping it stops them.
pub struct ActiveDevice {
    threads: Option<ThreadSet>,
}

impl ActiveDevice {
    /// Stops every queue thread of the device and waits for them. No thread
    /// touches guest memory for this device once this returns. Returns
    /// where each queue stopped in its rings (what a vhost-user back-end
    /// answers to GET_VRING_BASE), in queue order; empty if already stopped.
    pub fn stop(&mut self) -> Vec<QueueState> {
        let Some(t) = self.threads.take() else { return Vec::new() };
        let mut states: Vec<QueueState> = t.stop().iter().map(|j| j.ctx.state()).collect();
        states.sort_by_key(|s| s.index);
        states
    }
}

impl Drop for ActiveDevice {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Starts serving `queues` of `device` with the negotiated `features`, in the
/// threading mode of `runtime`.
pub fn activate(
    device: &mut dyn VirtioDevice,
    features: u64,
    mem: &GuestMemory,
    queues: Vec<QueueSetup>,
    runtime: &Arc<Runtime>,
    config_call: Option<EventFd>,
) -> Result<ActiveDevice, ActivateError> {
    if let Some(ext) = device.external() {
        if let Some(s) = queues.iter().find(|s| !crate::queue::rings_fit(&s.queue, mem)) {
            return Err(ActivateError::InvalidQueue(s.index));
        }
        ext.start(features, mem, queues, config_call)?;
        return Ok(ActiveDevice { threads: None });
    }
    let blocking = runtime.mode() == crate::ThreadingMode::PerQueue;
    let jobs = jobs(device, features, mem, queues, config_call, blocking)?;
    let threads = runtime.start(jobs).map_err(ActivateError::Spawn)?;
    Ok(ActiveDevice { threads: Some(threads) })
}

/// Checks the queues and builds one job (queue + worker) per queue;
/// `blocking`: each queue will have a thread of its own.
pub(crate) fn jobs(
    device: &mut dyn VirtioDevice,
    features: u64,
    mem: &GuestMemory,
    queues: Vec<QueueSetup>,
    config_call: Option<EventFd>,
    blocking: bool,
) -> Result<Vec<Job>, ActivateError> {
    let counters = device.state();
    counters.needs_reset.store(false, std::sync::atomic::Ordering::SeqCst);
    let events = Arc::new(DeviceEvents { counters: counters.clone(), config_call });
    let max = device.queue_max_sizes();
    for s in &queues {
        if usize::from(s.index) >= max.len() {
            return Err(ActivateError::NoSuchQueue(s.index));
        }
        if !crate::queue::rings_fit(&s.queue, mem) {
            return Err(ActivateError::InvalidQueue(s.index));
        }
    }
    let mut workers: Vec<Option<Box<dyn QueueWorker>>> =
        device.activate(features)?.into_iter().map(Some).collect();
    let event_idx = features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0;
    // One handle on guest memory for all the device's queues; every chain
    // they pop keeps it mapped.
    let mem = Arc::new(mem.clone());
    let mut jobs = Vec::new();
    for mut s in queues {
        let Some(worker) = workers.get_mut(usize::from(s.index)).and_then(Option::take) else {
            return Err(ActivateError::NoSuchQueue(s.index));
        };
        s.queue.set_event_idx(event_idx);
        let Some(qc) = counters.queues.get(usize::from(s.index)).cloned() else {
            return Err(ActivateError::NoSuchQueue(s.index));
        };
        let name = format!("{}-q{}", device.name(), s.index);
        let mut ctx = QueueCtx::new(s, name, mem.clone(), features, qc, events.clone(), blocking);
        ctx.set_poll(counters.poll());
        jobs.push(Job::new(device.name(), ctx, worker, device.syscalls()));
    }
    Ok(jobs)
}
