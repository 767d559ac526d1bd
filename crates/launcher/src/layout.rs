//! The guest-physical and port address map of a kickvm VM.
//!
//! ```text
//! 0x0000_0000 ..              RAM (boot structures live in the first MiB)
//!             .. 0xC000_0000  RAM below the PCI hole (at most 3 GiB)
//! 0xC000_0000 .. 0xE000_0000  PCI MMIO window: virtio-pci BARs
//! 0xE000_0000 .. 0xF000_0000  PCI ECAM (MMCONFIG), bus 0 uses the first MiB
//! 0xFEC0_0000                 IOAPIC
//! 0xFEE0_0000                 local APICs
//! 0x1_0000_0000 ..            RAM above 4 GiB, if the guest has more than 3 GiB
//! ```

/// Boot structures in low memory.
pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH boot (an ELF vmlinux): the `hvm_start_info` (`%ebx` at entry), its
/// memory map and its module list, in the page below the zero page's.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MEMMAP_START: u64 = 0x6040;
pub const PVH_MODLIST_START: u64 = 0x6400;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// ACPI tables (RSDP must be in the first MiB, in the EBDA/BIOS area).
pub const RSDP_START: u64 = 0xe0000;
pub const ACPI_TABLES_START: u64 = 0xe0100;
pub const EBDA_START: u64 = 0x9fc00;
/// Where the kernel is loaded (bzImage protected-mode part); an ELF
/// vmlinux's segments may not start below it.
pub const HIGH_RAM_START: u64 = 0x10_0000;

/// RAM ends here at the latest below 4 GiB.
pub const MEM_32BIT_GAP_START: u64 = 0xc000_0000;
pub const PCI_MMIO_START: u64 = 0xc000_0000;
pub const PCI_MMIO_SIZE: u64 = 0x2000_0000;
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x1000_0000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
pub const RAM_64BIT_START: u64 = 0x1_0000_0000;

/// Legacy I/O ports.
pub const SERIAL_PORT: u64 = 0x3f8;
pub const SERIAL_IRQ: u32 = 4;
pub const PCI_CONFIG_PORT: u64 = 0xcf8;
/// ACPI fixed hardware (power management) ports, described in the FADT.
pub const ACPI_PM1A_EVT_PORT: u64 = 0x600;
pub const ACPI_PM1A_CNT_PORT: u64 = 0x604;
/// The i8042 keyboard controller's command port (its "pulse reset line"
/// command 0xfe is how a `reboot=k` kernel resets the machine).
pub const I8042_PORT: u64 = 0x64;

/// GSIs: 0..24 are IOAPIC pins; MSI vectors are routed from here up.
pub const IOAPIC_PINS: u32 = 24;
pub const FIRST_MSI_GSI: u32 = 24;

/// ACPI hardware-reduced sleep control/status register (FADT
/// `SLEEP_CONTROL_REG`/`SLEEP_STATUS_REG`) and reset register: the guest
/// writes `SLP_TYP << 2 | SLP_EN` here to power off and 1 to reset.
pub const ACPI_SLEEP_PORT: u64 = 0x3c0;
/// The value the FADT's reset register expects to be written.
pub const ACPI_RESET_VALUE: u8 = 1;
/// The ACPI Generic Event Device (`ACPI0013`): its event register, one
/// byte the guest's `_EVT` method reads (reading clears it; see
/// [`crate::platform::Ged`]), and its interrupt: the last IOAPIC pin,
/// level-triggered, above the ISA range (no 8259 shares it).
pub const GED_EVENT_PORT: u64 = 0x3c4;
pub const GED_GSI: u32 = 23;
/// PCI hotplug registers (see [`crate::pci::hotplug`]): three dwords,
/// slots added, slots to remove, slots the guest ejected.
pub const PCI_HOTPLUG_PORT: u64 = 0x3c8;
pub const PCI_HOTPLUG_LEN: u64 = 12;
/// Guest RAM the launcher accepts at most (1 TiB): beyond that the 4-level
/// paging a 64-bit guest starts with and the KVM slot sizes get unwieldy.
pub const MAX_RAM: u64 = 1 << 40;
