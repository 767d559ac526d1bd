//! kickvm: boot a stock Linux kernel on KVM, with virtio devices over PCI
//! whose queues are served by their own threads (`kickvm-virtio`).
//!
//! What happens on `kickvm run`, in order: [`cli`] parses the options into
//! a [`config::VmConfig`]; [`vm::open_kvm`] checks the host; [`vm::run`]
//! creates the VM — [`memory`] (private, or a memfd when shared), the in-kernel irqchip, the
//! kernel and initramfs ([`boot`]), the [`acpi`] tables, the [`serial`]
//! port and [`platform`] devices on the port I/O [`bus`], [`pci`] with the
//! virtio [`devices`] behind it, and one [`vcpu`] thread per vCPU — and
//! waits until the guest powers off or resets. [`api`] is the other way
//! in: `kickvm --api-socket`, Cloud Hypervisor's REST API.

pub mod acpi;
pub mod api;
pub mod boot;
pub mod bus;
pub mod cli;
pub mod config;
pub mod cpuid;
pub mod devices;
pub mod hostfile;
pub mod irq;
pub mod layout;
pub mod memory;
pub mod pci;
pub mod platform;
pub mod sandbox;
pub mod serial;
#[cfg(test)]
pub(crate) mod testlog;
pub mod throttles;
pub mod vcpu;
pub mod vcpu_dump;
pub mod vm;
