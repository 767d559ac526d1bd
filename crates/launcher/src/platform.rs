//! The small platform devices that end a VM's life, and how the rest of the
//! launcher learns that it should end.
//!
//! - i8042 at 0x60/0x64: only its "pulse reset line" command (0xfe), which
//!   a `reboot=k` kernel uses to reset the machine.
//! - the ACPI sleep/reset register (see [`crate::acpi`]): `poweroff`.
//!
//! They, the vCPU threads (triple fault, KVM system events, errors) and the
//! launcher's signal handler all post to one [`Control`]; the main thread
//! waits on it and tears the VM down.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::acpi;
use crate::bus::BusDevice;

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest reset the machine (i8042, ACPI reset, triple fault).
    Reset,
    /// The launcher got SIGINT/SIGTERM.
    Signal(i32),
    /// A vCPU stopped on something the launcher cannot continue from.
    Error(String),
}

/// Where stop requests are posted. The first one wins.
pub struct Control {
    evt: EventFd,
    exit: Mutex<Option<Exit>>,
}

/// Stop requests, over the life of the process.
static STOP_REQUESTS: kickvm_virtio::ratelimit::Throttle = kickvm_virtio::ratelimit::Throttle::new();

/// The control eventfd the signal handler writes to, and the signal.
static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);
static SIGNAL_NO: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(sig: libc::c_int) {
    SIGNAL_NO.store(sig, Ordering::SeqCst);
    let fd = SIGNAL_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` is 8 readable bytes.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Routes SIGINT and SIGTERM to the running VM's [`Control`], so they end
/// it cleanly (terminal restored, devices stopped) instead of killing the
/// process.
pub fn install_stop_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is valid; the handler only does
        // async-signal-safe work.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// The signal that arrived before any VM ran (then the launcher must not
/// start one).
pub fn pending_signal() -> Option<i32> {
    match SIGNAL_NO.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

impl Control {
    pub fn new() -> std::io::Result<Arc<Control>> {
        let c = Arc::new(Control { evt: EventFd::new(libc::EFD_CLOEXEC)?, exit: Mutex::new(None) });
        use std::os::fd::AsRawFd;
        SIGNAL_FD.store(c.evt.as_raw_fd(), Ordering::SeqCst);
        Ok(c)
    }

    /// Asks the main thread to stop the VM for `why`.
    pub fn request(&self, why: Exit) {
        let mut exit = self.exit.lock().unwrap_or_else(|e| e.into_inner());
        if exit.is_none() {
            // Once per VM; throttled across the VMs of a rebooting guest.
            if let Some(n) = STOP_REQUESTS.hit() {
                log::debug!("stop requested: {why:?} (#{n})");
            }
            *exit = Some(why);
        }
        let _ = self.evt.write(1);
    }

    /// True once any stop was requested.
    pub fn stopping(&self) -> bool {
        self.exit.lock().unwrap_or_else(|e| e.into_inner()).is_some() || pending_signal().is_some()
    }

    /// Blocks until a stop is requested; returns why.
    pub fn wait(&self) -> Exit {
        loop {
            if let Some(sig) = pending_signal() {
                return Exit::Signal(sig);
            }
            if let Some(e) = self.exit.lock().unwrap_or_else(|e| e.into_inner()).clone() {
                return e;
            }
            let _ = self.evt.read();
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        let _ = SIGNAL_FD.compare_exchange(self.evt.as_raw_fd(), -1, Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// i8042 keyboard controller, ports 0x60..=0x64: just enough for reset.
pub struct I8042 {
    control: Arc<Control>,
}

/// The i8042 command that pulses the CPU reset line.
const I8042_RESET: u8 = 0xfe;
/// Offset of the command/status port from 0x60.
const I8042_COMMAND: u64 = 4;

impl I8042 {
    pub fn new(control: Arc<Control>) -> Self {
        I8042 { control }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty (ready for a
        // command); data port reads 0.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == I8042_COMMAND && data.first() == Some(&I8042_RESET) {
            self.control.request(Exit::Reset);
        }
    }
}

/// The ACPI sleep control / reset register.
pub struct AcpiSleep {
    control: Arc<Control>,
}

impl AcpiSleep {
    pub fn new(control: Arc<Control>) -> Self {
        AcpiSleep { control }
    }
}

impl BusDevice for AcpiSleep {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        match data.first().and_then(|&v| acpi::decode_sleep_port_write(v)) {
            Some(true) => self.control.request(Exit::PowerOff),
            Some(false) => self.control.request(Exit::Reset),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_and_poweroff_reach_control() {
        let c = Control::new().unwrap();
        let mut k = I8042::new(c.clone());
        k.write(0, &[I8042_RESET]); // data port: ignored
        assert!(!c.stopping());
        k.write(4, &[I8042_RESET]);
        assert_eq!(c.wait(), Exit::Reset);

        let c = Control::new().unwrap();
        let mut s = AcpiSleep::new(c.clone());
        s.write(0, &[0x34]);
        s.write(0, &[1]); // first request wins
        assert_eq!(c.wait(), Exit::PowerOff);
    }
}
