//! The device's side of its back-end connection, shared by the vCPUs
//! (DRIVER_OK, reset, configuration writes) and the `<name>-vhost` thread,
//! which sleeps until the back-end hangs up and then connects again.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kickvm_virtio::ratelimit::Throttle;
use kickvm_virtio::seccomp::SeccompMode;
use kickvm_virtio::DeviceState;
use vmm_sys_util::eventfd::EventFd;

use super::session::{Rings, Session};
use super::VhostUserSpec;

/// Reconnection attempts: the first after this long, then twice as long
/// each time up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// The `<name>-vhost` thread's own calls: sleep on the socket and its stop
/// eventfd, connect again, and talk to the back-end.
pub(crate) const MONITOR_SYSCALLS: &[i64] = &[
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_read,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_setsockopt,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_dup,
];

/// The device's side of the connection, shared by the vCPUs (DRIVER_OK,
/// reset, configuration writes) and the `<name>-vhost` thread.
pub(crate) struct Link {
    pub(crate) name: String,
    pub(crate) spec: VhostUserSpec,
    pub(crate) vrings: usize,
    /// Written to end the `<name>-vhost` thread.
    pub(crate) stop: EventFd,
    pub(crate) state: Arc<DeviceState>,
    pub(crate) inner: Mutex<Inner>,
    /// Log lines about the back-end coming and going, and about a driver
    /// starting the device while it is away: a back-end that crashes in a
    /// loop, or a guest that resets in a loop, must not flood the log.
    pub(crate) gone: Throttle,
    pub(crate) back: Throttle,
    pub(crate) refused: Throttle,
    pub(crate) waiting: Throttle,
}

pub(crate) struct Inner {
    /// `None` while the back-end is away.
    pub(crate) session: Option<Session>,
    /// The driver's rings while the device is live.
    pub(crate) rings: Option<Rings>,
}

impl Link {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn start(&self, rings: Rings) {
        let mut inner = self.lock();
        let Inner { session, rings: live } = &mut *inner;
        let rings = live.insert(rings);
        match session {
            Some(s) => {
                if let Err(e) = s.hand_over(rings, false) {
                    kickvm_virtio::warn_limited!(self.refused, "{}: back-end refused the rings: {e}; connecting again", self.name);
                    s.hang_up();
                }
            }
            None => kickvm_virtio::warn_limited!(self.waiting, "{}: the back-end is away; the device starts when it is back", self.name),
        }
    }

    pub(crate) fn reset(&self) {
        let mut inner = self.lock();
        let Inner { session, rings } = &mut *inner;
        if let (Some(s), Some(r)) = (session.as_mut(), rings.take()) {
            if let Err(e) = s.stop(&r) {
                kickvm_virtio::warn_limited!(self.refused, "{}: back-end refused to stop the rings: {e}; connecting again", self.name);
                s.hang_up();
            }
        }
    }

    /// The back-end hung up: forget the session, tell the driver, and
    /// leave the rings to the next back-end.
    pub(crate) fn lost(&self) {
        let mut inner = self.lock();
        inner.session = None;
        let live = inner.rings.as_ref();
        kickvm_virtio::warn_limited!(
            self.gone,
            "{}: vhost-user back-end on {} hung up{}; connecting again",
            self.name,
            self.spec.socket.display(),
            if live.is_some() { "; its queues wait, DEVICE_NEEDS_RESET set" } else { "" }
        );
        if let Some(r) = live {
            self.state.needs_reset.store(true, Ordering::SeqCst);
            if let Some(c) = &r.config_call {
                let _ = c.write(1);
            }
        }
    }

    /// A back-end accepted again: give it the live rings, if any.
    pub(crate) fn back(&self, mut s: Session) -> bool {
        let mut inner = self.lock();
        if let Some(r) = &inner.rings {
            if let Err(e) = s.hand_over(r, true) {
                kickvm_virtio::warn_limited!(self.refused, "{}: new back-end refused the rings: {e}", self.name);
                return false;
            }
            self.state.needs_reset.store(false, Ordering::SeqCst);
        }
        let what = inner.rings.as_ref().map_or(String::new(), |r| format!("; {} rings restored", r.queues.len()));
        kickvm_virtio::warn_limited!(self.back, "{}: vhost-user back-end on {} is back{what}", self.name, self.spec.socket.display());
        inner.session = Some(s);
        true
    }

    /// The socket while connected.
    pub(crate) fn socket_fd(&self) -> Option<RawFd> {
        self.lock().session.as_ref().map(|s| s.fe.as_raw_fd())
    }
}

/// What `<name>-vhost` woke up for.
enum Woken {
    Stop,
    HungUp,
    Timeout,
}

/// Sleeps until `stop` is written, `socket` (if any) hangs up, or
/// `timeout` passes.
fn sleep_on(stop: &EventFd, socket: Option<RawFd>, timeout: Option<Duration>) -> Woken {
    let mut fds = vec![libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
    if let Some(fd) = socket {
        // Not POLLIN: replies to a vCPU's requests are not ours to see.
        fds.push(libc::pollfd { fd, events: libc::POLLRDHUP, revents: 0 });
    }
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n <= 0 {
        return Woken::Timeout; // also EINTR: look again
    }
    if fds[0].revents != 0 {
        Woken::Stop
    } else if fds.get(1).is_some_and(|f| f.revents != 0) {
        Woken::HungUp
    } else {
        Woken::Timeout
    }
}

/// The `<name>-vhost` thread: asleep while the back-end is there,
/// reconnecting while it is not.
pub(crate) fn watch(link: Arc<Link>, seccomp: SeccompMode) {
    if let Err(e) = kickvm_virtio::seccomp::apply("vhost-user", &[MONITOR_SYSCALLS], seccomp) {
        log::error!("{}: {e}", link.name);
        return;
    }
    let mut retry = RETRY_MIN;
    // Failed attempts since the back-end went away: the hang-up was said
    // once; its absence is said again after 16, 32, 64, ... attempts.
    let mut attempts = 0u64;
    loop {
        match link.socket_fd() {
            Some(fd) => match sleep_on(&link.stop, Some(fd), None) {
                Woken::Stop => return,
                Woken::HungUp => link.lost(),
                Woken::Timeout => {}
            },
            None => {
                if let Woken::Stop = sleep_on(&link.stop, None, Some(retry)) {
                    return;
                }
                let ok = match Session::open(&link.spec.socket, link.vrings) {
                    Ok(s) => link.back(s),
                    Err(e) => {
                        attempts += 1;
                        if attempts >= 16 && attempts.is_power_of_two() {
                            log::warn!("{}: back-end still away after {attempts} attempts: {e}", link.name);
                        }
                        false
                    }
                };
                if ok {
                    attempts = 0;
                }
                retry = if ok { RETRY_MIN } else { (retry * 2).min(RETRY_MAX) };
            }
        }
    }
}

