//! What the PCI transport asks of KVM, faked for fuzzing: GSIs, MSI routes,
//! irqfds ([`kickvm::irq::MsiRouting`]) and ioeventfds
//! ([`kickvm::pci::Ioeventfds`]).
//!
//! The fakes keep KVM's rules and panic when the transport breaks them
//! (routing a GSI it never allocated, attaching the same irqfd or notify
//! address twice, detaching what is not attached): KVM would refuse such a
//! call, the transport would log it and go on with a device whose
//! interrupts or kicks silently do not work. [`Faults`] makes calls fail
//! the way KVM can, to exercise the error paths.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsRawFd;
use std::sync::Mutex;

use kickvm::irq::{IrqError, MsiMessage, MsiRouting};
use kickvm::pci::Ioeventfds;
use vmm_sys_util::eventfd::EventFd;

/// Which KVM calls fail (bit set in the input's `faults` byte).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults(pub u8);

impl Faults {
    pub const IOEVENTFD_ATTACH: u8 = 1;
    pub const ROUTE_MSI: u8 = 2;
    pub const IRQFD_ATTACH: u8 = 4;
    pub const ALLOCATE_GSI: u8 = 8;
    fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }
}

#[derive(Default)]
struct RoutingState {
    next_gsi: u32,
    /// GSI → route (None: allocated, not routed yet).
    routes: BTreeMap<u32, Option<MsiMessage>>,
    /// (eventfd, GSI) pairs attached as irqfds.
    irqfds: BTreeSet<(i32, u32)>,
}

/// GSIs, MSI routes and irqfds, by KVM's rules.
pub struct FakeRouting {
    state: Mutex<RoutingState>,
    faults: Faults,
}

impl FakeRouting {
    pub fn new(faults: Faults) -> Self {
        FakeRouting { state: Mutex::new(RoutingState { next_gsi: 24, ..Default::default() }), faults }
    }

    /// Irqfds still attached (should be none once every device is gone).
    pub fn attached(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).irqfds.len()
    }
}

impl MsiRouting for FakeRouting {
    fn allocate_gsi(&self) -> Result<u32, IrqError> {
        if self.faults.has(Faults::ALLOCATE_GSI) {
            return Err(IrqError::NoFreeGsi(4096));
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let gsi = s.next_gsi;
        s.next_gsi += 1;
        s.routes.insert(gsi, None);
        Ok(gsi)
    }

    fn route_msi(&self, gsi: u32, msg: MsiMessage) -> Result<(), IrqError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(r) = s.routes.get_mut(&gsi) else {
            panic!("fake KVM: route_msi on GSI {gsi}, which was never allocated");
        };
        if self.faults.has(Faults::ROUTE_MSI) {
            return Err(IrqError::NotAllocated(gsi));
        }
        *r = Some(msg);
        Ok(())
    }

    fn attach_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), IrqError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !s.routes.contains_key(&gsi) {
            panic!("fake KVM: irqfd on GSI {gsi}, which was never allocated");
        }
        if self.faults.has(Faults::IRQFD_ATTACH) {
            return Err(IrqError::NotAllocated(gsi));
        }
        if !s.irqfds.insert((fd.as_raw_fd(), gsi)) {
            panic!("fake KVM: irqfd {} attached to GSI {gsi} twice (KVM: EBUSY)", fd.as_raw_fd());
        }
        Ok(())
    }

    fn detach_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), IrqError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !s.irqfds.remove(&(fd.as_raw_fd(), gsi)) {
            panic!("fake KVM: detaching irqfd {} from GSI {gsi}, which is not attached", fd.as_raw_fd());
        }
        Ok(())
    }
}

/// Ioeventfds by notify address, by KVM's rules.
pub struct FakeIoeventfds {
    attached: Mutex<BTreeMap<u64, i32>>,
    faults: Faults,
}

impl FakeIoeventfds {
    pub fn new(faults: Faults) -> Self {
        FakeIoeventfds { attached: Mutex::new(BTreeMap::new()), faults }
    }

    /// Ioeventfds still registered.
    pub fn attached(&self) -> usize {
        self.attached.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Ioeventfds for FakeIoeventfds {
    fn attach_ioeventfd(&self, fd: &EventFd, addr: u64) -> Result<(), kvm_ioctls::Error> {
        if self.faults.has(Faults::IOEVENTFD_ATTACH) {
            return Err(kvm_ioctls::Error::new(libc::ENOSPC));
        }
        let mut a = self.attached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(other) = a.insert(addr, fd.as_raw_fd()) {
            panic!(
                "fake KVM: ioeventfd {} at {addr:#x}, where ioeventfd {other} already is (KVM: EEXIST)",
                fd.as_raw_fd()
            );
        }
        Ok(())
    }

    fn detach_ioeventfd(&self, fd: &EventFd, addr: u64) -> Result<(), kvm_ioctls::Error> {
        let mut a = self.attached.lock().unwrap_or_else(|e| e.into_inner());
        match a.remove(&addr) {
            Some(f) if f == fd.as_raw_fd() => Ok(()),
            other => panic!(
                "fake KVM: detaching ioeventfd {} at {addr:#x}, but {other:?} is registered there (KVM: ENOENT)",
                fd.as_raw_fd()
            ),
        }
    }
}
