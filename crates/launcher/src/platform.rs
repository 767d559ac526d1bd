//! The small platform devices that end a VM's life, and how the rest of the
//! launcher learns that it should end.
//!
//! - i8042 at 0x60/0x64: only its "pulse reset line" command (0xfe), which
//!   a `reboot=k` kernel uses to reset the machine.
//! - the ACPI sleep/reset register (see [`crate::acpi`]): `poweroff`.
//! - the ACPI Generic Event Device's event register ([`Ged`]): how the
//!   launcher tells the guest that its power button was pressed or that a
//!   PCI device arrived.
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
    /// The guest reset the machine (i8042, ACPI reset): a reboot it asked
    /// for, or its kernel's reboot after a panic (`panic=1`).
    Reset,
    /// A vCPU triple-faulted: a PC resets, but the guest did not ask to.
    TripleFault,
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

/// The events the Generic Event Device signals: bits of its event
/// register, which the DSDT's `_EVT` method tests (see [`crate::acpi`]).
pub mod ged_event {
    /// A PCI device arrived or is asked to leave: `_EVT` runs the PCI
    /// hotplug method, which notifies the slots ([`crate::pci::hotplug`]).
    pub const PCI_HOTPLUG: u8 = 1 << 0;
    /// The power button was pressed: `_EVT` notifies `\_SB.PWRB` (0x80),
    /// Linux's ACPI button driver reports KEY_POWER.
    pub const POWER_BUTTON: u8 = 1 << 1;
    /// Every bit the launcher may set.
    pub const ALL: u8 = PCI_HOTPLUG | POWER_BUTTON;
}

/// The ACPI Generic Event Device (`ACPI0013`) of a hardware-reduced
/// platform: the launcher sets event bits and raises the GED's interrupt
/// line ([`crate::layout::GED_GSI`], level-triggered); Linux's GED driver
/// runs `_EVT`, which reads the event register at
/// [`crate::layout::GED_EVENT_PORT`]. A read returns the pending bits,
/// clears them and lowers the line. Level, not edge: an event raised
/// before the guest's GED driver unmasked the pin (early in boot) stays
/// asserted and is taken as soon as it does, and one read can carry
/// several events.
pub struct Ged {
    /// Pending events; the line is high exactly while this is non-zero
    /// (both change under this lock).
    pending: Mutex<u8>,
    line: IrqLine,
}

/// Sets the level of the GED's interrupt line (`KVM_IRQ_LINE`).
pub type IrqLine = Box<dyn Fn(bool) -> std::io::Result<()> + Send + Sync>;

impl Ged {
    pub fn new(line: IrqLine) -> Arc<Ged> {
        Arc::new(Ged { pending: Mutex::new(0), line })
    }

    /// Posts `events` ([`ged_event`] bits) and raises the line.
    pub fn raise(&self, events: u8) -> std::io::Result<()> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        *pending |= events & ged_event::ALL;
        (self.line)(*pending != 0)
    }

    /// The guest's read: what is pending, now cleared, the line low. A
    /// read with nothing pending touches nothing (a guest polling the
    /// register costs no system call).
    fn take(&self) -> u8 {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let v = std::mem::take(&mut *pending);
        if v != 0 {
            if let Err(e) = (self.line)(false) {
                log::warn!("cannot lower the GED interrupt line: {e}");
            }
        }
        v
    }
}

/// The GED's event register on the I/O bus: one byte wide. Whatever the
/// guest reads there (any width) carries the pending events in its first
/// byte and zeroes in the rest; writes change nothing.
pub struct GedRegister(pub Arc<Ged>);

impl BusDevice for GedRegister {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            if let Some(b) = data.first_mut() {
                *b = self.0.take();
            }
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
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

    /// Events accumulate until the guest reads them; a read clears them
    /// and lowers the line; whatever the guest writes or however wide it
    /// reads, it learns only the pending bits and changes nothing.
    #[test]
    fn ged_events_accumulate_and_a_read_clears_them() {
        let level = Arc::new(Mutex::new(Vec::new()));
        let l = level.clone();
        let ged = Ged::new(Box::new(move |up| {
            l.lock().unwrap().push(up);
            Ok(())
        }));
        let mut reg = GedRegister(ged.clone());
        let mut b = [0xaau8; 4];
        reg.read(0, &mut b);
        assert_eq!(b, [0; 4], "nothing pending");
        ged.raise(ged_event::PCI_HOTPLUG).unwrap();
        ged.raise(ged_event::POWER_BUTTON | 0x80).unwrap();
        ged.raise(0x80).unwrap();
        reg.write(0, &[0xff, 0xff, 0xff, 0xff]);
        reg.read(1, &mut b[..1]);
        assert_eq!(b[0], 0, "only offset 0 carries events");
        reg.read(0, &mut b);
        assert_eq!(b, [ged_event::ALL, 0, 0, 0], "both events, no unknown bit");
        reg.read(0, &mut b[..1]);
        assert_eq!(b[0], 0, "the read cleared them");
        assert_eq!(*level.lock().unwrap(), vec![true, true, true, false], "raised 3 times, lowered once");
    }
}
