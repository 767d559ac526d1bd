//! A device served on the caller's thread: each queue's worker runs once,
//! without blocking, when the caller says so. No thread, no signal, no
//! timing: what a fuzzer needs to replay a guest's inputs exactly (the
//! `fuzz/` targets), and the same device code the queue threads run.

use vmm_sys_util::eventfd::EventFd;

use crate::device::{jobs, ActivateError, VirtioDevice};
use crate::queue::QueueSetup;
use crate::memory::GuestMemory;
use crate::threads::Job;

/// An activated device whose queues are served only by [`Inline::serve`].
pub struct Inline {
    jobs: Vec<Job>,
}

impl Inline {
    /// As [`crate::activate`], with no thread started.
    pub fn activate(
        device: &mut dyn VirtioDevice,
        features: u64,
        mem: &GuestMemory,
        queues: Vec<QueueSetup>,
        config_call: Option<EventFd>,
    ) -> Result<Inline, ActivateError> {
        Ok(Inline { jobs: jobs(device, features, mem, queues, config_call, false)? })
    }

    /// Serves every queue until its worker has nothing more to do right
    /// now (it never waits for the guest or the backend), then raises the
    /// interrupts the guest asked for, as a queue thread does before it
    /// sleeps.
    pub fn serve(&mut self) {
        for j in &mut self.jobs {
            let _ = j.serve_inline();
        }
    }
}
