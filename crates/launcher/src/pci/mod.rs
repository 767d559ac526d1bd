//! PCI: one root bus with a host bridge, and virtio devices behind the
//! modern virtio-pci transport with MSI-X.
//!
//! Written by hand: no published crate provides PCI config space, MSI-X or
//! virtio-pci (Cloud Hypervisor's and crosvm's are in-tree only; the crates.io
//! names `pci` and `virtio-devices` are unrelated).
//!
//! - [`config`]: a function's 256-byte configuration header, capabilities, BARs.
//! - [`root`]: bus 0, the host bridge at 00:00.0, ports 0xCF8/0xCFC and ECAM.
//! - [`msix`]: the MSI-X table and PBA, each vector an irqfd on its own GSI.
//! - [`common_cfg`]: the virtio common configuration state machine.
//! - [`guest_errors`]: the guest mistakes each device counts, and the
//!   throttles that keep them from flooding the log.
//! - [`virtio_pci`]: a virtio device as a PCI function: BAR0, ioeventfds,
//!   activation and reset of the queue threads.
//! - [`hotplug`]: the registers ACPI's PCI hotplug methods read and write
//!   when a device is added to, or removed from, the running VM.
//!
//! # Setting it up (VM set-up code)
//!
//! ```ignore
//! vm.create_irq_chip()?;                       // before any routing
//! let vm = Arc::new(vm);
//! let msi = Arc::new(irq::GsiRouter::new(vm.clone()));
//! let mut pci = pci::PciHost::new(&pio_bus, &mmio_bus, vm.clone(), msi.clone())?;
//! let rng = pci.add_virtio(Box::new(rng_device), &mem, &runtime)?;   // 00:01.0
//! ```
//!
//! vCPU exits: `KVM_EXIT_IO` → `pio_bus.read/write(port, data)`,
//! `KVM_EXIT_MMIO` → `mmio_bus.read/write(addr, data)`. That is all.
//!
//! # What the ACPI tables (and E820) must describe
//!
//! - **DSDT**: a host bridge device `\_SB.PCI0` with `_HID` `PNP0A08`,
//!   `_CID` `PNP0A03`, `_SEG` 0, `_BBN` 0, `_UID` 0, and a `_CRS` with:
//!   a bus-number range 0..0; I/O `0x0000-0x0CF7` and `0x0D00-0xFFFF`
//!   (the window Linux may give to devices; our devices have no I/O BARs),
//!   the config ports `0x0CF8-0x0CFF` as an I/O resource that is *not* a
//!   window (or leave them to Linux, which claims them itself); and the
//!   32-bit memory window [`crate::layout::PCI_MMIO_START`] ..
//!   `+ PCI_MMIO_SIZE` (`DWordMemory`, non-cacheable, read-write).
//!   No `_PRT` is needed: no device uses INTx.
//! - **MCFG**: one allocation: base [`crate::layout::PCI_ECAM_START`],
//!   segment 0, start bus 0, end bus 0.
//! - The ECAM range must be *reserved* where Linux checks (otherwise it
//!   prints "MMCONFIG ... not reserved" and ignores MCFG): an E820
//!   `Reserved` entry for `PCI_ECAM_START .. +1 MiB` (bus 0) and/or a
//!   `PNP0C02` motherboard-resource device whose `_CRS` covers it.
//! - Do **not** mark the PCI MMIO window reserved in E820: Linux 6.1 clips
//!   host-bridge windows that overlap E820 reserved regions.
//! - **FADT**: leave `IAPC_BOOT_ARCH` bit 3 ("MSI not supported") clear, or
//!   Linux disables MSI and no virtio device gets an interrupt.
//!
//! Interrupts are MSI-X only: no INTx pin, so a guest without MSI support
//! sees the devices but gets no interrupts from them.
//!
//! Tear-down: drop the [`PciHost`] after the vCPU threads and before guest
//! RAM; that stops every queue thread.
//!
//! BARs are pre-assigned from `PCI_MMIO_START` upward (0x8000 each); Linux
//! keeps them when they lie in the `_CRS` window, and may move them: the
//! transport follows (MMIO bus range and ioeventfds move with the BAR).

pub mod common_cfg;
pub mod config;
pub mod guest_errors;
pub mod hotplug;
pub mod msix;
pub mod root;
pub mod virtio_pci;

#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};

use kickvm_virtio::{GuestMemory, Runtime, VirtioDevice};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::Bus;
use crate::irq::MsiRouting;
use crate::layout;
pub use root::PciRoot;
pub use guest_errors::GuestErrorCounts;
pub use virtio_pci::{VirtioPciDevice, VirtioPciParams};

/// A PCI function as the root bus sees it. Offsets are within the
/// function's 4 KiB configuration space; accesses are 1, 2 or 4 bytes.
pub trait PciDevice: Send {
    fn read_config(&mut self, offset: usize, data: &mut [u8]);
    fn write_config(&mut self, offset: usize, data: &[u8]);
    /// The function left its slot (the guest ejected it): stop whatever
    /// it runs and take it off the buses.
    fn unplug(&mut self) {}
}

/// Binding a queue's kick eventfd to its notify address (KVM ioeventfd):
/// a guest write there signals the eventfd in the kernel, no exit.
pub trait Ioeventfds: Send + Sync {
    fn attach_ioeventfd(&self, fd: &EventFd, mmio_addr: u64) -> Result<(), kvm_ioctls::Error>;
    fn detach_ioeventfd(&self, fd: &EventFd, mmio_addr: u64) -> Result<(), kvm_ioctls::Error>;
}

impl Ioeventfds for VmFd {
    /// Any write width matches (no datamatch, length 0), so Linux's 16-bit
    /// notify writes take KVM's fast MMIO path.
    fn attach_ioeventfd(&self, fd: &EventFd, mmio_addr: u64) -> Result<(), kvm_ioctls::Error> {
        self.register_ioevent(fd, &IoEventAddress::Mmio(mmio_addr), NoDatamatch)
    }

    fn detach_ioeventfd(&self, fd: &EventFd, mmio_addr: u64) -> Result<(), kvm_ioctls::Error> {
        self.unregister_ioevent(fd, &IoEventAddress::Mmio(mmio_addr), NoDatamatch)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error(transparent)]
    Root(#[from] root::RootError),
    #[error("{name}: {queues} queues is more than virtio-pci's MSI-X table here can serve")]
    TooManyQueues { name: String, queues: usize },
    #[error("{name}: queue size {size} is not a power of two up to 32768")]
    BadQueueSize { name: String, size: u16 },
    #[error("{name}: virtio device type {device_type} has no PCI device ID")]
    BadDeviceType { name: String, device_type: u32 },
    #[error("{name}: {err}")]
    Msix { name: String, err: msix::MsixError },
    #[error("{name}: cannot create a kick eventfd: {err}")]
    EventFd { name: String, err: std::io::Error },
    #[error("PCI configuration space has no room for the virtio capabilities")]
    ConfigSpaceFull,
    #[error("the PCI MMIO window is full: no room for another {0:#x}-byte BAR")]
    MmioWindowFull(u64),
}

/// The VM's PCI: root bus, BAR address allocator, and what virtio-pci
/// devices need from KVM.
pub struct PciHost {
    root: Arc<PciRoot>,
    mmio_bus: Bus,
    ioeventfds: Arc<dyn Ioeventfds>,
    msi: Arc<dyn MsiRouting>,
    next_bar: u64,
    devices: Vec<Arc<Mutex<VirtioPciDevice>>>,
    hotplug: Arc<hotplug::HotplugSlots>,
}

impl PciHost {
    /// Creates bus 0 with its host bridge and puts the configuration
    /// mechanisms on the buses (0xCF8..0xCFF on `pio_bus`, ECAM on
    /// `mmio_bus`), and the hotplug registers on `pio_bus`.
    pub fn new(
        pio_bus: &Bus,
        mmio_bus: &Bus,
        ioeventfds: Arc<dyn Ioeventfds>,
        msi: Arc<dyn MsiRouting>,
    ) -> Result<Self, PciError> {
        let root = PciRoot::new();
        root.register(pio_bus, mmio_bus)?;
        let r = root.clone();
        let hotplug = hotplug::HotplugSlots::new(Box::new(move |slot| r.eject(slot)));
        let regs = Arc::new(Mutex::new(hotplug::HotplugRegisters(hotplug.clone())));
        pio_bus
            .insert(regs, layout::PCI_HOTPLUG_PORT, layout::PCI_HOTPLUG_LEN)
            .map_err(root::RootError::Bus)?;
        Ok(PciHost {
            root,
            mmio_bus: mmio_bus.clone(),
            ioeventfds,
            msi,
            next_bar: layout::PCI_MMIO_START,
            devices: Vec::new(),
            hotplug,
        })
    }

    /// Adds `device` in the next free slot with a pre-assigned BAR. Its
    /// queue threads start when the guest driver sets DRIVER_OK.
    pub fn add_virtio(
        &mut self,
        device: Box<dyn VirtioDevice>,
        mem: &GuestMemory,
        runtime: &Arc<Runtime>,
    ) -> Result<Arc<Mutex<VirtioPciDevice>>, PciError> {
        self.place_virtio(device, mem, runtime).map(|(dev, _)| dev)
    }

    /// Adds `device` to the running VM: in the first free slot, which the
    /// guest learns of at the next PCI hotplug event (the caller raises
    /// it). Linux then assigns its BAR, binds its driver, and the queue
    /// threads start at DRIVER_OK as for any other device.
    pub fn hotplug_virtio(
        &mut self,
        device: Box<dyn VirtioDevice>,
        mem: &GuestMemory,
        runtime: &Arc<Runtime>,
    ) -> Result<(Arc<Mutex<VirtioPciDevice>>, u8), PciError> {
        let (dev, slot) = self.place_virtio(device, mem, runtime)?;
        self.hotplug.device_arrived(slot);
        Ok((dev, slot))
    }

    /// The hotplug state of the slots (removal requests).
    pub fn hotplug(&self) -> &Arc<hotplug::HotplugSlots> {
        &self.hotplug
    }

    /// Lets go of the devices the guest ejected, so that their backends
    /// (image files, TAP fds) close now rather than with the VM.
    pub fn forget_unplugged(&mut self) {
        self.devices.retain(|d| !d.lock().unwrap_or_else(|e| e.into_inner()).is_unplugged());
    }

    fn place_virtio(
        &mut self,
        device: Box<dyn VirtioDevice>,
        mem: &GuestMemory,
        runtime: &Arc<Runtime>,
    ) -> Result<(Arc<Mutex<VirtioPciDevice>>, u8), PciError> {
        let size = virtio_pci::BAR_SIZE;
        let bar = self.next_bar.next_multiple_of(size);
        if bar + size > layout::PCI_MMIO_START + layout::PCI_MMIO_SIZE {
            return Err(PciError::MmioWindowFull(size));
        }
        let dev = VirtioPciDevice::new(
            device,
            VirtioPciParams {
                mem: mem.clone(),
                runtime: runtime.clone(),
                msi: self.msi.clone(),
                ioeventfds: self.ioeventfds.clone(),
                mmio_bus: self.mmio_bus.clone(),
                bar_address: bar,
            },
        )?;
        let slot = self.root.add(dev.clone())?;
        self.next_bar = bar + size;
        self.devices.push(dev.clone());
        Ok((dev, slot))
    }

    pub fn root(&self) -> &Arc<PciRoot> {
        &self.root
    }
}

/// Dropping the PCI host tears the devices down: their queue threads stop
/// (so none touches guest memory afterwards), their BARs leave the MMIO
/// bus and the slots are emptied. Drop it after the vCPUs, before RAM.
impl Drop for PciHost {
    fn drop(&mut self) {
        for d in &self.devices {
            d.lock().unwrap_or_else(|e| e.into_inner()).shutdown();
        }
        self.root.clear();
    }
}
