//! GSIs and KVM's interrupt routing table: how a write to a queue's *call*
//! eventfd becomes an MSI in the guest without any launcher thread.
//!
//! A queue thread writes its call eventfd; KVM, which holds that eventfd as
//! an irqfd bound to a GSI, looks the GSI up in its routing table and
//! injects the MSI message (address/data) the guest programmed into the
//! MSI-X table. This module owns that table.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so [`GsiRouter`] keeps
//! every route, including KVM's default ones for the legacy interrupt
//! controllers: GSI 0..23 → IOAPIC pin 0..23, and GSI 0..15 also → the two
//! 8259 PICs. The serial port's irqfd on GSI 4 keeps working that way.
//! MSI routes get GSIs from [`layout::FIRST_MSI_GSI`] upward.
//!
//! [`MsiRouting`] is the seam between the PCI code and KVM, so the MSI-X
//! logic can be tested without a VM.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_IRQ_ROUTES,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::layout;

#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    #[error("no free GSI left for an MSI route (KVM allows {0} routes)")]
    NoFreeGsi(usize),
    #[error("GSI {0} was not allocated as an MSI route")]
    NotAllocated(u32),
    #[error("KVM refused the interrupt routing table: {0}")]
    SetRouting(#[source] kvm_ioctls::Error),
    #[error("cannot build the interrupt routing table: {0:?}")]
    Table(vmm_sys_util::fam::Error),
    #[error("cannot attach irqfd to GSI {gsi}: {err}")]
    Irqfd { gsi: u32, err: kvm_ioctls::Error },
}

/// An MSI message as programmed into an MSI-X table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// What the MSI-X code needs from the hypervisor: GSIs, MSI routes, and
/// binding an eventfd to a GSI (irqfd).
pub trait MsiRouting: Send + Sync {
    /// Reserves a GSI for one MSI vector.
    fn allocate_gsi(&self) -> Result<u32, IrqError>;
    /// Routes `gsi` to the MSI `msg`.
    fn route_msi(&self, gsi: u32, msg: MsiMessage) -> Result<(), IrqError>;
    /// From now on a write to `fd` injects `gsi`. If `fd` already has a
    /// count, KVM injects once right away (this is how a pending, masked
    /// vector fires when it is unmasked).
    fn attach_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), IrqError>;
    /// Writes to `fd` no longer inject anything; they accumulate in the
    /// eventfd's counter.
    fn detach_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), IrqError>;
}

#[derive(Default)]
struct Table {
    next_gsi: Option<u32>,
    /// GSI → its MSI message (None until the guest programs one).
    msi: BTreeMap<u32, Option<MsiMessage>>,
}

/// The VM's GSI allocator and routing table. Create it after
/// `VmFd::create_irq_chip` and share it (in an `Arc`) with every device
/// that needs MSI routes.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    table: Mutex<Table>,
}

impl GsiRouter {
    pub fn new(vm: Arc<VmFd>) -> Self {
        GsiRouter { vm, table: Mutex::default() }
    }

    /// Re-installs the full table: default IOAPIC/PIC routes plus every
    /// programmed MSI route.
    fn commit(&self, table: &Table) -> Result<(), IrqError> {
        let mut entries = default_irqchip_routes();
        for (&gsi, msg) in &table.msi {
            if let Some(msg) = msg {
                entries.push(msi_route(gsi, *msg));
            }
        }
        let routing = KvmIrqRouting::from_entries(&entries).map_err(IrqError::Table)?;
        self.vm.set_gsi_routing(&routing).map_err(IrqError::SetRouting)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Installs the default routes alone (what KVM starts with). Useful to
    /// check early that the irqchip exists and KVM accepts routing tables.
    pub fn install(&self) -> Result<(), IrqError> {
        let table = self.lock();
        self.commit(&table)
    }
}

impl MsiRouting for GsiRouter {
    fn allocate_gsi(&self) -> Result<u32, IrqError> {
        let mut table = self.lock();
        let gsi = table.next_gsi.unwrap_or(layout::FIRST_MSI_GSI);
        // The default routes take 40 entries of the table.
        let used = 40 + table.msi.len();
        if gsi as usize >= KVM_MAX_IRQ_ROUTES || used >= KVM_MAX_IRQ_ROUTES {
            return Err(IrqError::NoFreeGsi(KVM_MAX_IRQ_ROUTES));
        }
        table.next_gsi = Some(gsi + 1);
        table.msi.insert(gsi, None);
        Ok(gsi)
    }

    fn route_msi(&self, gsi: u32, msg: MsiMessage) -> Result<(), IrqError> {
        let mut table = self.lock();
        let Some(slot) = table.msi.get_mut(&gsi) else {
            return Err(IrqError::NotAllocated(gsi));
        };
        if *slot == Some(msg) {
            return Ok(());
        }
        let old = slot.replace(msg);
        let r = self.commit(&table);
        if r.is_err() {
            // Keep our copy equal to what KVM has.
            table.msi.insert(gsi, old);
        }
        r
    }

    fn attach_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), IrqError> {
        self.vm.register_irqfd(fd, gsi).map_err(|err| IrqError::Irqfd { gsi, err })
    }

    fn detach_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), IrqError> {
        self.vm.unregister_irqfd(fd, gsi).map_err(|err| IrqError::Irqfd { gsi, err })
    }
}

/// KVM's default routing (`kvm_setup_default_irq_routing`): every IOAPIC
/// pin is its own GSI, and GSI 0..15 also reach the master/slave PIC.
pub fn default_irqchip_routes() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::with_capacity(40);
    for pin in 0..layout::IOAPIC_PINS {
        v.push(irqchip_route(pin, KVM_IRQCHIP_IOAPIC, pin));
        if pin < 16 {
            let chip = if pin < 8 { KVM_IRQCHIP_PIC_MASTER } else { KVM_IRQCHIP_PIC_SLAVE };
            v.push(irqchip_route(pin, chip, pin % 8));
        }
    }
    v
}

fn irqchip_route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_IRQCHIP, ..Default::default() };
    e.u.irqchip.irqchip = irqchip;
    e.u.irqchip.pin = pin;
    e
}

fn msi_route(gsi: u32, msg: MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_MSI, ..Default::default() };
    e.u.msi.address_lo = msg.address as u32;
    e.u.msi.address_hi = (msg.address >> 32) as u32;
    e.u.msi.data = msg.data;
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_match_kvm() {
        let r = default_irqchip_routes();
        assert_eq!(r.len(), 40);
        // GSI 4 (the serial port) reaches IOAPIC pin 4 and master PIC pin 4.
        let four: Vec<_> = r.iter().filter(|e| e.gsi == 4).collect();
        assert_eq!(four.len(), 2);
        // SAFETY: these entries were built as irqchip routes.
        let chips: Vec<_> = four.iter().map(|e| unsafe { (e.u.irqchip.irqchip, e.u.irqchip.pin) }).collect();
        assert!(chips.contains(&(KVM_IRQCHIP_IOAPIC, 4)));
        assert!(chips.contains(&(KVM_IRQCHIP_PIC_MASTER, 4)));
        // SAFETY: as above.
        let slave = r.iter().find(|e| e.gsi == 10 && unsafe { e.u.irqchip.irqchip } == KVM_IRQCHIP_PIC_SLAVE);
        // SAFETY: as above.
        assert_eq!(slave.map(|e| unsafe { e.u.irqchip.pin }), Some(2));
        assert!(r.iter().all(|e| e.gsi < layout::FIRST_MSI_GSI));
    }
}
