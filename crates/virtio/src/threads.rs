//! Who runs the queue workers: the threading model.
//!
//! - [`ThreadingMode::PerQueue`] (the default: lguest's and vhost's design): one OS
//!   thread per virtqueue, named `<device>-q<N>`. It serves its queue, then
//!   re-enables notifications, re-checks the ring, raises the interrupt if
//!   the guest wants one, and blocks in `read` on its kick eventfd — or, for
//!   a receive queue, in `readv` on its backend.
//! - [`ThreadingMode::PerDevice`]: one thread per device, `poll`ing all its
//!   queues' kicks and backends.
//! - [`ThreadingMode::Single`]: one thread, `kickvm-io`, for every device —
//!   the "before" model (lguest's old Launcher loop), kept so the difference can be
//!   measured.
//!
//! Stopping: the thread's stop flag is set and the thread is sent the wake
//! signal ([`crate::sys::wake_signal`]) until it has exited, so a thread
//! blocked in `read`/`readv`/`poll` returns with `EINTR` and sees the flag.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::queue::{QueueCtx, Stopped};
use crate::seccomp::{self, SeccompMode};
use crate::sys;

/// What a queue thread waits for once its worker has no more work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// The guest must make more buffers available (a kick).
    Kick,
    /// The backend must become readable (net receive, console input). Only
    /// returned by a worker that may not block (shared-thread modes).
    Backend,
    /// A kick, or this long, whichever comes first: the backend is broken
    /// (a TAP that was deleted or set down) and the worker looks at it
    /// again then. Unlike a pause inside `serve`, this never holds up the
    /// other queues a shared thread serves.
    Later(std::time::Duration),
}

/// Serves one virtqueue. Called by that queue's thread whenever the queue
/// may have work; it returns when there is none left.
pub trait QueueWorker: Send {
    /// Pop chains, do their I/O in guest memory and return them on the used
    /// ring until nothing more can be done right now.
    ///
    /// When `q.blocking()` is true the worker owns its thread and may block
    /// in its backend (e.g. a `readv` on the TAP that waits for a packet),
    /// calling `q.notify()` first since it is about to sleep. Otherwise it
    /// must not block and returns [`Wait::Backend`] instead.
    fn serve(&mut self, q: &mut QueueCtx) -> Result<Wait, Stopped>;

    /// The backend fd polled for [`Wait::Backend`].
    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

/// How queue workers are mapped onto threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ThreadingMode {
    #[default]
    PerQueue,
    PerDevice,
    Single,
}

impl std::str::FromStr for ThreadingMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "per-queue" => Ok(Self::PerQueue),
            "per-device" => Ok(Self::PerDevice),
            "single" => Ok(Self::Single),
            _ => Err(format!("unknown threading mode `{s}`: use per-queue, per-device or single")),
        }
    }
}

impl std::fmt::Display for ThreadingMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::PerQueue => "per-queue",
            Self::PerDevice => "per-device",
            Self::Single => "single",
        })
    }
}

/// One queue and the worker that serves it.
pub(crate) struct Job {
    /// The device's name (`net0`): per-device mode names its thread so.
    device: String,
    pub ctx: QueueCtx,
    pub worker: Box<dyn QueueWorker>,
    /// The device the job belongs to, in `single` mode.
    owner: u64,
    /// The worker panicked: it is never called again (until a reset
    /// builds a new one).
    failed: bool,
    /// The device's system calls (its thread's seccomp filter).
    syscalls: &'static [i64],
}

impl Job {
    pub(crate) fn new(device: &str, ctx: QueueCtx, worker: Box<dyn QueueWorker>, syscalls: &'static [i64]) -> Job {
        Job { device: device.to_string(), ctx, worker, owner: 0, failed: false, syscalls }
    }

    /// [`Job::serve`], then the interrupt decision a thread makes before
    /// it sleeps (see [`crate::inline`]).
    pub(crate) fn serve_inline(&mut self) -> Result<Wait, crate::Stopped> {
        let r = self.serve();
        if !self.ctx.may_sleep() {
            self.ctx.woke();
        }
        self.ctx.notify();
        r
    }

    /// Runs the worker until it has no more work. A panic inside it is
    /// contained here (as Cloud Hypervisor's thread helper does): the
    /// device is marked NEEDS_RESET with a configuration interrupt, one
    /// line is logged, and the thread goes on serving its other queues or
    /// waiting to be stopped.
    fn serve(&mut self) -> Result<Wait, crate::Stopped> {
        if self.failed {
            return Ok(Wait::Kick);
        }
        let (worker, ctx) = (&mut self.worker, &mut self.ctx);
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.serve(ctx))) {
            Ok(r) => r,
            Err(payload) => {
                self.failed = true;
                self.ctx.worker_panicked(&panic_message(payload.as_ref()));
                Ok(Wait::Kick)
            }
        }
    }
}

struct Thread {
    handle: JoinHandle<Vec<Job>>,
    /// The stop flags of the queues it serves.
    stops: Vec<Arc<AtomicBool>>,
}

impl Thread {
    /// Starts a thread serving `jobs`: blocking in its one queue's kick or
    /// backend if that queue was made for a thread of its own, else
    /// polling them all.
    /// Its first act is to install its seccomp filter: a queue thread's
    /// own calls and its devices' (`mode` off: none).
    fn spawn(name: String, jobs: Vec<Job>, mode: SeccompMode) -> io::Result<Thread> {
        sys::install_wake_handler();
        let stops = jobs.iter().map(|j| j.ctx.stop_flag()).collect();
        let blocking = matches!(jobs.as_slice(), [j] if j.ctx.blocking());
        let mut lists: Vec<&'static [i64]> = vec![seccomp::QUEUE_THREAD];
        lists.extend(jobs.iter().map(|j| j.syscalls));
        let handle = std::thread::Builder::new().name(name.clone()).spawn(move || {
            if let Err(e) = seccomp::apply(&name, &lists, mode) {
                // Serving unfiltered would be a silent downgrade.
                log::error!("{e}; the thread serves nothing");
                return jobs;
            }
            if blocking {
                serve_blocking(jobs)
            } else {
                serve_polling(jobs)
            }
        })?;
        Ok(Thread { handle, stops })
    }

    /// Asks the thread to stop, knocks it out of any blocking call, and
    /// waits for it. Returns its jobs so they can move to another thread
    /// (none if the thread itself died, which `Job::serve` prevents).
    fn stop(self) -> Vec<Job> {
        for s in &self.stops {
            s.store(true, Ordering::Release);
        }
        match sys::wake_until_finished(self.handle) {
            Ok(jobs) => jobs,
            Err(_) => {
                log::error!("a queue thread died; its queues are no longer served");
                Vec::new()
            }
        }
    }
}

/// The queue threads of one active device.
pub(crate) struct ThreadSet {
    threads: Vec<Thread>,
    single: Option<(Arc<Runtime>, u64)>,
}

impl ThreadSet {
    /// Stops the threads; returns the device's queues (as their threads
    /// left them).
    pub(crate) fn stop(self) -> Vec<Job> {
        let mut jobs: Vec<Job> = self.threads.into_iter().flat_map(Thread::stop).collect();
        if let Some((rt, id)) = self.single {
            jobs.extend(rt.single_remove(id));
        }
        jobs
    }
}

#[derive(Default)]
struct SingleState {
    thread: Option<Thread>,
    next_id: u64,
}

/// Starts queue threads in one threading mode. Shared by all devices of a
/// VM (the `single` mode needs to know all of them).
pub struct Runtime {
    mode: ThreadingMode,
    seccomp: SeccompMode,
    single: Mutex<SingleState>,
}

impl Runtime {
    /// Queue threads in `mode`, each under its seccomp filter.
    pub fn new(mode: ThreadingMode) -> Arc<Runtime> {
        Self::with_seccomp(mode, SeccompMode::On)
    }

    /// Queue threads in `mode`, with `seccomp` filters.
    pub fn with_seccomp(mode: ThreadingMode, seccomp: SeccompMode) -> Arc<Runtime> {
        Arc::new(Runtime { mode, seccomp, single: Mutex::default() })
    }

    pub fn mode(&self) -> ThreadingMode {
        self.mode
    }

    pub(crate) fn start(self: &Arc<Self>, jobs: Vec<Job>) -> io::Result<ThreadSet> {
        match self.mode {
            ThreadingMode::PerQueue => {
                let mut threads = Vec::new();
                for job in jobs {
                    let name = thread_name(job.ctx.name());
                    threads.push(Thread::spawn(name, vec![job], self.seccomp)?);
                }
                Ok(ThreadSet { threads, single: None })
            }
            ThreadingMode::PerDevice => {
                let threads = match jobs.first() {
                    None => Vec::new(),
                    Some(j) => vec![Thread::spawn(thread_name(&j.device), jobs, self.seccomp)?],
                };
                Ok(ThreadSet { threads, single: None })
            }
            ThreadingMode::Single => {
                let id = self.single_add(jobs)?;
                Ok(ThreadSet { threads: Vec::new(), single: Some((self.clone(), id)) })
            }
        }
    }

    /// Restarts the single I/O thread with `jobs` added.
    fn single_add(&self, mut jobs: Vec<Job>) -> io::Result<u64> {
        let mut s = self.single.lock().unwrap_or_else(|e| e.into_inner());
        let id = s.next_id;
        s.next_id += 1;
        let mut all = s.thread.take().map(Thread::stop).unwrap_or_default();
        for j in &mut all {
            j.ctx.resume();
        }
        for j in &mut jobs {
            j.owner = id;
        }
        all.extend(jobs);
        s.thread = Some(Thread::spawn("kickvm-io".into(), all, self.seccomp)?);
        Ok(id)
    }

    /// Restarts the single I/O thread without the jobs of device `id`.
    /// Returns the jobs of device `id`.
    fn single_remove(&self, id: u64) -> Vec<Job> {
        let mut s = self.single.lock().unwrap_or_else(|e| e.into_inner());
        let all = s.thread.take().map(Thread::stop).unwrap_or_default();
        let (gone, mut keep): (Vec<Job>, Vec<Job>) = all.into_iter().partition(|j| j.owner == id);
        for j in &mut keep {
            j.ctx.resume();
        }
        if !keep.is_empty() {
            match Thread::spawn("kickvm-io".into(), keep, self.seccomp) {
                Ok(t) => s.thread = Some(t),
                Err(e) => log::error!("cannot restart the I/O thread: {e}"),
            }
        }
        gone
    }
}

/// The message a caught panic carried.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

/// Linux thread names are at most 15 bytes.
fn thread_name(name: &str) -> String {
    name.chars().take(15).collect()
}

/// Per-queue mode: lguest's loop. Serve; when idle, sleep on the kick.
fn serve_blocking(mut jobs: Vec<Job>) -> Vec<Job> {
    if let Some(job) = jobs.first_mut() {
        loop {
            let r = match job.serve() {
                Ok(Wait::Kick) => job.ctx.wait_kick(),
                Ok(Wait::Backend) => poll_one(job),
                Ok(Wait::Later(d)) => job.ctx.wait_kick_for(d),
                Err(stopped) => Err(stopped),
            };
            if r.is_err() {
                break;
            }
        }
    }
    jobs
}

/// A worker that cannot block in its backend: wait for the backend or a
/// kick, whichever comes first.
fn poll_one(job: &mut Job) -> Result<(), crate::Stopped> {
    job.ctx.notify();
    let mut fds = vec![libc::pollfd { fd: job.ctx.kick_fd(), events: libc::POLLIN, revents: 0 }];
    if let Some(fd) = job.worker.backend_fd() {
        fds.push(libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
    }
    loop {
        job.ctx.check_stop()?;
        // SAFETY: `fds` is a valid array of pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n >= 0 {
            break;
        }
    }
    if fds[0].revents != 0 {
        job.ctx.take_kick();
    }
    job.ctx.check_stop()
}

/// Per-device and single modes: one thread polls every queue it serves.
fn serve_polling(mut jobs: Vec<Job>) -> Vec<Job> {
    let n = jobs.len();
    let mut runnable = vec![true; n];
    let mut waits = vec![Wait::Kick; n];
    let mut fds: Vec<libc::pollfd> = Vec::with_capacity(2 * n);
    let mut owners: Vec<(usize, bool)> = Vec::with_capacity(2 * n);
    loop {
        // A guest that keeps its rings full never lets this thread reach
        // `poll`: look at the stop flag on every round.
        if jobs.first().is_some_and(|j| j.ctx.check_stop().is_err()) {
            return jobs;
        }
        // Serve every queue that may have work.
        for i in 0..n {
            if runnable[i] {
                runnable[i] = false;
                let job = &mut jobs[i];
                match job.serve() {
                    Ok(w) => waits[i] = w,
                    Err(_) => return jobs,
                }
            }
        }
        // About to sleep: re-enable notifications and re-check each ring.
        let mut again = false;
        for i in 0..n {
            if waits[i] == Wait::Kick && !jobs[i].ctx.may_sleep() {
                jobs[i].ctx.woke();
                runnable[i] = true;
                again = true;
            }
        }
        if again {
            continue;
        }
        for job in jobs.iter_mut() {
            job.ctx.notify();
        }
        fds.clear();
        owners.clear();
        // The soonest a worker that waits for a broken backend wants to
        // look again (-1: none does; sleep until a kick or a backend).
        let timeout = waits
            .iter()
            .filter_map(|w| match w {
                Wait::Later(d) => Some(i32::try_from(d.as_millis()).unwrap_or(i32::MAX)),
                _ => None,
            })
            .min()
            .unwrap_or(-1);
        for (i, job) in jobs.iter().enumerate() {
            fds.push(libc::pollfd { fd: job.ctx.kick_fd(), events: libc::POLLIN, revents: 0 });
            owners.push((i, true));
            if waits[i] == Wait::Backend {
                if let Some(fd) = job.worker.backend_fd() {
                    fds.push(libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
                    owners.push((i, false));
                }
            }
        }
        // SAFETY: `fds` is a valid array of pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if jobs.first().is_some_and(|j| j.ctx.check_stop().is_err()) {
            return jobs;
        }
        for (i, w) in waits.iter().enumerate() {
            if matches!(w, Wait::Later(_)) {
                runnable[i] = true;
            }
        }
        if r <= 0 {
            continue;
        }
        for (p, &(i, is_kick)) in fds.iter().zip(owners.iter()) {
            if p.revents == 0 {
                continue;
            }
            if is_kick {
                jobs[i].ctx.take_kick();
                jobs[i].ctx.woke();
            }
            runnable[i] = true;
        }
    }
}
