//! MSI-X: the vector table and pending-bit array the guest programs, and
//! the KVM wiring that makes each vector's eventfd an interrupt.
//!
//! Every vector owns a GSI and a *call* eventfd for the life of the device.
//! The queue threads (and the device's config-change path) write that
//! eventfd; nothing else in the launcher ever sees the interrupt.
//!
//! Masking, the one part that needs the launcher: a vector is *live* when
//! MSI-X is enabled, the function is not masked and the entry is not
//! masked. A live vector has its MSI route installed and its eventfd
//! attached to KVM as an irqfd, so a write injects the MSI in the kernel.
//! When the vector stops being live the irqfd is detached; writes then just
//! accumulate in the eventfd's counter, which *is* the pending bit: the PBA
//! reads it with a zero-timeout `poll` (without consuming it). On unmask
//! the irqfd is attached again and KVM, seeing the eventfd already
//! readable, injects the pending interrupt once — as the PCI spec asks.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::irq::{IrqError, MsiMessage, MsiRouting};
use crate::throttles::MSIX_ROUTING;

pub const CAP_ID_MSIX: u8 = 0x11;
/// Size of an MSI-X capability.
pub const CAP_LEN: usize = 12;
/// Offset of Message Control inside the capability.
pub const CAP_CONTROL: usize = 2;
/// Bits of Message Control the guest may write: Enable and Function Mask.
pub const CONTROL_ENABLE: u16 = 1 << 15;
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
pub const CONTROL_WRITABLE: u16 = CONTROL_ENABLE | CONTROL_FUNCTION_MASK;

pub const ENTRY_SIZE: usize = 16;
const ENTRY_VECTOR_CTRL: usize = 12;
const VECTOR_CTRL_MASKED: u32 = 1;

/// "No vector" as the virtio common configuration spells it.
pub const NO_VECTOR: u16 = 0xffff;

struct Vector {
    gsi: u32,
    call: EventFd,
    /// The table entry as the guest programmed it.
    msg: MsiMessage,
    masked: bool,
    /// What KVM currently has.
    routed: Option<MsiMessage>,
    attached: bool,
}

/// The MSI-X state of one function.
pub struct Msix {
    vectors: Vec<Vector>,
    enabled: bool,
    function_masked: bool,
    routing: Arc<dyn MsiRouting>,
}

#[derive(Debug, thiserror::Error)]
pub enum MsixError {
    #[error("cannot allocate an MSI-X vector: {0}")]
    Gsi(#[from] IrqError),
    #[error("cannot create an interrupt eventfd: {0}")]
    EventFd(std::io::Error),
}

impl Msix {
    /// `count` vectors, all masked, MSI-X disabled (the reset state).
    pub fn new(count: u16, routing: Arc<dyn MsiRouting>) -> Result<Self, MsixError> {
        let mut vectors = Vec::with_capacity(count.into());
        for _ in 0..count {
            vectors.push(Vector {
                gsi: routing.allocate_gsi()?,
                call: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(MsixError::EventFd)?,
                msg: MsiMessage::default(),
                masked: true,
                routed: None,
                attached: false,
            });
        }
        Ok(Msix { vectors, enabled: false, function_masked: false, routing })
    }

    /// The capability body for [`super::config::PciConfig::add_capability`]:
    /// table and PBA in BAR `bir` at the given offsets.
    pub fn capability(&self, bir: u8, table_offset: u32, pba_offset: u32) -> [u8; CAP_LEN] {
        let mut c = [0u8; CAP_LEN];
        c[0] = CAP_ID_MSIX;
        let size = (self.vectors.len() as u16).saturating_sub(1) & 0x7ff;
        c[2..4].copy_from_slice(&size.to_le_bytes());
        c[4..8].copy_from_slice(&(table_offset | u32::from(bir)).to_le_bytes());
        c[8..12].copy_from_slice(&(pba_offset | u32::from(bir)).to_le_bytes());
        c
    }

    /// Number of vectors (the table size).
    pub fn vectors(&self) -> usize {
        self.vectors.len()
    }

    /// Bytes of table and PBA.
    pub fn table_len(&self) -> usize {
        self.vectors.len() * ENTRY_SIZE
    }

    pub fn pba_len(&self) -> usize {
        self.vectors.len().div_ceil(64) * 8
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The eventfd that raises `vector`: what a queue thread gets as its
    /// `call`.
    pub fn call(&self, vector: u16) -> Option<&EventFd> {
        self.vectors.get(usize::from(vector)).map(|v| &v.call)
    }

    /// The GSI behind `vector`.
    pub fn gsi(&self, vector: u16) -> Option<u32> {
        self.vectors.get(usize::from(vector)).map(|v| v.gsi)
    }

    /// The guest wrote Message Control.
    pub fn set_control(&mut self, control: u16) {
        let enabled = control & CONTROL_ENABLE != 0;
        let fmask = control & CONTROL_FUNCTION_MASK != 0;
        if (enabled, fmask) == (self.enabled, self.function_masked) {
            return;
        }
        self.enabled = enabled;
        self.function_masked = fmask;
        for i in 0..self.vectors.len() {
            self.sync(i);
        }
    }

    /// A guest read of the vector table.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.table_byte(offset as usize + i);
        }
    }

    fn table_byte(&self, at: usize) -> u8 {
        let Some(v) = self.vectors.get(at / ENTRY_SIZE) else { return 0 };
        entry_bytes(v)[at % ENTRY_SIZE]
    }

    /// A guest write to the vector table; the entries it touched are
    /// re-routed, masked or unmasked at once.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let Ok(start) = usize::try_from(offset) else { return };
        let mut touched = None;
        for (i, &b) in data.iter().enumerate() {
            let at = start.saturating_add(i);
            let idx = at / ENTRY_SIZE;
            let Some(v) = self.vectors.get_mut(idx) else { break };
            let mut e = entry_bytes(v);
            e[at % ENTRY_SIZE] = b;
            set_entry(v, &e);
            if touched != Some(idx) {
                if let Some(prev) = touched {
                    self.sync(prev);
                }
                touched = Some(idx);
            }
        }
        if let Some(idx) = touched {
            self.sync(idx);
        }
    }

    /// A guest read of the pending-bit array.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let byte = offset as usize + i;
            let mut bits = 0u8;
            for bit in 0..8 {
                if self.vectors.get(byte * 8 + bit).is_some_and(pending) {
                    bits |= 1 << bit;
                }
            }
            *b = bits;
        }
    }

    /// Brings KVM in line with the guest's view of vector `i`. KVM refusing
    /// a route the guest programmed is the guest's doing as far as the
    /// host can tell, so it is counted and logged through a throttle.
    fn sync(&mut self, i: usize) {
        let live = self.enabled && !self.function_masked;
        let Some(v) = self.vectors.get_mut(i) else { return };
        let failed = |e: IrqError| kickvm_virtio::warn_limited!(MSIX_ROUTING, "MSI-X vector {i}: {e}");
        if live && !v.masked {
            if v.routed != Some(v.msg) {
                match self.routing.route_msi(v.gsi, v.msg) {
                    Ok(()) => v.routed = Some(v.msg),
                    Err(e) => failed(e),
                }
            }
            if !v.attached && v.routed == Some(v.msg) {
                match self.routing.attach_irqfd(&v.call, v.gsi) {
                    Ok(()) => v.attached = true,
                    Err(e) => failed(e),
                }
            }
        } else if v.attached {
            match self.routing.detach_irqfd(&v.call, v.gsi) {
                Ok(()) => v.attached = false,
                Err(e) => failed(e),
            }
        }
    }
}

impl Drop for Msix {
    fn drop(&mut self) {
        for v in &self.vectors {
            if v.attached {
                let _ = self.routing.detach_irqfd(&v.call, v.gsi);
            }
        }
    }
}

fn entry_bytes(v: &Vector) -> [u8; ENTRY_SIZE] {
    let mut e = [0u8; ENTRY_SIZE];
    e[0..8].copy_from_slice(&v.msg.address.to_le_bytes());
    e[8..12].copy_from_slice(&v.msg.data.to_le_bytes());
    let ctrl = if v.masked { VECTOR_CTRL_MASKED } else { 0 };
    e[ENTRY_VECTOR_CTRL..].copy_from_slice(&ctrl.to_le_bytes());
    e
}

fn set_entry(v: &mut Vector, e: &[u8; ENTRY_SIZE]) {
    let mut addr = [0u8; 8];
    addr.copy_from_slice(&e[0..8]);
    let mut data = [0u8; 4];
    data.copy_from_slice(&e[8..12]);
    v.msg = MsiMessage { address: u64::from_le_bytes(addr), data: u32::from_le_bytes(data) };
    // Only the mask bit of Vector Control is implemented; the rest is
    // reserved and reads zero.
    v.masked = e[ENTRY_VECTOR_CTRL] & VECTOR_CTRL_MASKED as u8 != 0;
}

/// A vector whose irqfd is detached is pending when its eventfd has a
/// count. `poll` looks without consuming it.
fn pending(v: &Vector) -> bool {
    if v.attached {
        return false;
    }
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd { fd: v.call.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1 && p.revents & libc::POLLIN != 0
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    /// Records what KVM would hold.
    #[derive(Default)]
    pub(crate) struct FakeRouting {
        pub next: Mutex<u32>,
        pub routes: Mutex<BTreeMap<u32, MsiMessage>>,
        pub attached: Mutex<BTreeMap<u32, bool>>,
    }

    impl MsiRouting for FakeRouting {
        fn allocate_gsi(&self) -> Result<u32, IrqError> {
            let mut n = self.next.lock().unwrap();
            *n += 1;
            Ok(100 + *n)
        }
        fn route_msi(&self, gsi: u32, msg: MsiMessage) -> Result<(), IrqError> {
            self.routes.lock().unwrap().insert(gsi, msg);
            Ok(())
        }
        fn attach_irqfd(&self, _fd: &EventFd, gsi: u32) -> Result<(), IrqError> {
            self.attached.lock().unwrap().insert(gsi, true);
            Ok(())
        }
        fn detach_irqfd(&self, _fd: &EventFd, gsi: u32) -> Result<(), IrqError> {
            self.attached.lock().unwrap().insert(gsi, false);
            Ok(())
        }
    }

    impl FakeRouting {
        pub fn is_attached(&self, gsi: u32) -> bool {
            self.attached.lock().unwrap().get(&gsi).copied().unwrap_or(false)
        }
    }

    fn program(m: &mut Msix, v: usize, addr: u64, data: u32) {
        let base = (v * ENTRY_SIZE) as u64;
        m.write_table(base, &(addr as u32).to_le_bytes());
        m.write_table(base + 4, &((addr >> 32) as u32).to_le_bytes());
        m.write_table(base + 8, &data.to_le_bytes());
    }

    #[test]
    fn table_reads_back_and_starts_masked() {
        let r = Arc::new(FakeRouting::default());
        let mut m = Msix::new(3, r.clone()).unwrap();
        let cap = m.capability(0, 0x4000, 0x6000);
        assert_eq!(cap[0], CAP_ID_MSIX);
        assert_eq!(u16::from_le_bytes([cap[2], cap[3]]), 2, "table size is N-1");
        let mut d = [0u8; 4];
        m.read_table(2 * 16 + 12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1, "vectors start masked");
        program(&mut m, 1, 0xfee0_0000, 0x4041);
        let mut q = [0u8; 8];
        m.read_table(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_0000);
        m.read_table(16 + 8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x4041);
        // Out of the table: reads zero, writes ignored.
        m.write_table(0x1000, &[1, 2, 3, 4]);
        m.read_table(0x1000, &mut d);
        assert_eq!(d, [0; 4]);
        assert!(r.routes.lock().unwrap().is_empty(), "nothing routed while disabled and masked");
    }

    #[test]
    fn unmask_routes_and_attaches_mask_detaches_and_pends() {
        let r = Arc::new(FakeRouting::default());
        let mut m = Msix::new(2, r.clone()).unwrap();
        let gsi = m.gsi(1).unwrap();
        program(&mut m, 1, 0xfee0_1000, 0x31);
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        m.write_table(16 + 12, &0u32.to_le_bytes());
        assert!(!r.is_attached(gsi), "function mask holds every vector");
        m.set_control(CONTROL_ENABLE);
        assert!(r.is_attached(gsi));
        assert_eq!(r.routes.lock().unwrap()[&gsi], MsiMessage { address: 0xfee0_1000, data: 0x31 });

        // Masked again: the call eventfd's count is the pending bit.
        m.write_table(16 + 12, &1u32.to_le_bytes());
        assert!(!r.is_attached(gsi));
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        m.call(1).unwrap().write(1).unwrap();
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10, "reading the PBA does not consume the interrupt");

        // A new address while masked is routed on unmask.
        program(&mut m, 1, 0xfee0_2000, 0x32);
        m.write_table(16 + 12, &0u32.to_le_bytes());
        assert!(r.is_attached(gsi));
        assert_eq!(r.routes.lock().unwrap()[&gsi].address, 0xfee0_2000);
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0, "a live vector is never pending here: KVM delivers it");

        m.set_control(0);
        assert!(!r.is_attached(gsi), "disabling MSI-X detaches");
    }
}
