//! The ACPI tables a stock kernel needs to find the machine: RSDP → XSDT →
//! FADT (→ DSDT), MADT, MCFG. Built with the `acpi_tables` crate; the MADT
//! entries it does not offer (interrupt source override, LAPIC NMI) are
//! packed here.
//!
//! The platform is ACPI "hardware-reduced" (like Cloud Hypervisor's): no
//! PM1 blocks, no SCI, no legacy PM timer. Power-off and reset go through
//! the FADT's sleep control and reset registers, one byte-wide I/O port at
//! [`layout::ACPI_SLEEP_PORT`]: `poweroff` makes Linux evaluate `\_S5_`
//! and write `SLP_TYP << 2 | SLP_EN` there.
//!
//! Events reach the guest through a Generic Event Device (`ACPI0013`,
//! Linux's `evged`), as on Cloud Hypervisor: its interrupt
//! ([`layout::GED_GSI`]) makes Linux run `\_SB.GED_._EVT`, which reads the
//! event register ([`crate::platform::Ged`]) and either notifies the power
//! button `\_SB.PWRB` (`PNP0C0C`, 0x80: Linux's `button` module reports
//! KEY_POWER) or runs `\_SB.PCI0.PCNT`, which notifies the PCI slots a
//! device arrived in (Device Check) or should leave (Eject Request); the
//! slots (`_ADR`, `_SUN`, `_EJ0`) are what Linux's built-in `acpiphp`
//! handles ([`crate::pci::hotplug`]). The slots and `PCNT` are there only
//! when something can hotplug ([`AcpiConfig::pci_hotplug`]).

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};

use crate::layout;
use crate::pci::root::SLOTS;
use crate::platform::ged_event;

const OEM_ID: [u8; 6] = *b"KICKVM";
const OEM_TABLE_ID: [u8; 8] = *b"KICKVM  ";
const OEM_REVISION: u32 = 1;

/// The `_S5_` sleep type; the launcher powers off when it is written.
pub const S5_SLEEP_TYPE: u8 = 5;
/// Sleep control register bits (ACPI 6.x §4.8.3.7).
pub const SLP_EN: u8 = 1 << 5;
pub const SLP_TYP_SHIFT: u8 = 2;
pub const SLP_TYP_MASK: u8 = 0x7 << SLP_TYP_SHIFT;

/// FADT IAPC_BOOT_ARCH: no VGA, no CMOS RTC. The 8042 bit stays clear so
/// Linux does not probe a keyboard controller (`reboot=k` still resets
/// through port 0x64).
const IAPC_NO_VGA: u16 = 1 << 2;
const IAPC_NO_CMOS_RTC: u16 = 1 << 5;

/// MADT flag: the machine also has dual 8259 PICs (KVM's in-kernel irqchip
/// emulates them).
const MADT_PCAT_COMPAT: u32 = 1;

/// What the tables describe.
pub struct AcpiConfig {
    pub cpus: u8,
    /// Bus 0's free slots as hotplug slots, and the GED's PCI hotplug
    /// event. Without, the DSDT is the bare host bridge: no slot devices
    /// for ACPICA to parse and Linux to register.
    pub pci_hotplug: bool,
    /// Extra AML placed inside `\_SB.PCI0` (e.g. from the PCI code).
    pub pci_aml: Vec<u8>,
}

/// Raw AML bytes as an [`Aml`] object.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// A placed table: its guest-physical address and bytes.
pub type Placed = (u64, Vec<u8>);

/// Every table with its address: RSDP at [`layout::RSDP_START`], the others
/// packed from [`layout::ACPI_TABLES_START`].
pub fn build(cfg: &AcpiConfig) -> Vec<Placed> {
    let mut out = Vec::new();
    let mut next = layout::ACPI_TABLES_START;
    let mut place = |bytes: Vec<u8>, out: &mut Vec<Placed>| {
        let addr = next;
        next = (next + bytes.len() as u64 + 7) & !7;
        out.push((addr, bytes));
        addr
    };

    let dsdt = place(dsdt(cfg), &mut out);
    let fadt = place(fadt(dsdt), &mut out);
    let madt = place(madt(cfg.cpus), &mut out);
    let mcfg = place(to_bytes(&mcfg()), &mut out);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for t in [fadt, madt, mcfg] {
        xsdt.add_entry(t);
    }
    let xsdt = place(to_bytes(&xsdt), &mut out);
    out.push((layout::RSDP_START, to_bytes(&Rsdp::new(OEM_ID, xsdt))));
    out
}

fn to_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The DSDT: the PCI host bridge and the S5 sleep state.
pub fn dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let mmio_end = layout::PCI_MMIO_START + layout::PCI_MMIO_SIZE - 1;
    // Each resource and object is serialised as soon as it is built: the
    // crate's containers only borrow their children.
    let mut resources = Vec::new();
    resources.extend(to_bytes(&aml::AddressSpace::new_bus_number(0u16, 0u16)));
    let cfg_port = layout::PCI_CONFIG_PORT as u16;
    resources.extend(to_bytes(&aml::IO::new(cfg_port, cfg_port, 1, 8)));
    resources.extend(to_bytes(&aml::AddressSpace::new_io(0u16, cfg_port - 1, None)));
    resources.extend(to_bytes(&aml::AddressSpace::new_io(cfg_port + 8, 0xffff, None)));
    resources.extend(to_bytes(&aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        layout::PCI_MMIO_START as u32,
        mmio_end as u32,
        None,
    )));
    let resources = RawAml(resources);
    let crs = aml::ResourceTemplate::new(vec![&resources]);
    let mut body = Vec::new();
    body.extend(to_bytes(&aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08"))));
    body.extend(to_bytes(&aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03"))));
    for name in ["_ADR", "_SEG", "_UID", "_BBN"] {
        body.extend(to_bytes(&aml::Name::new(name.into(), &aml::ZERO)));
    }
    body.extend(to_bytes(&aml::Name::new("_CRS".into(), &crs)));
    if cfg.pci_hotplug {
        body.extend(pci_hotplug());
    }
    body.extend_from_slice(&cfg.pci_aml);
    let body = RawAml(body);
    let pci0 = aml::Device::new("PCI0".into(), vec![&body]);
    let com1 = com1();
    let mbrs = motherboard_resources();
    let pwrb = power_button();
    let ged = generic_event_device(cfg.pci_hotplug);
    let sb = aml::Scope::new("\\_SB_".into(), vec![&pci0, &com1, &mbrs, &pwrb, &ged]);
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLEEP_TYPE, &aml::ZERO, &aml::ZERO, &aml::ZERO]),
    );
    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sb.to_aml_bytes(&mut t);
    s5.to_aml_bytes(&mut t);
    t.update_checksum();
    t.as_slice().to_vec()
}

/// COM1 (`PNP0501`). Linux would find the port by legacy probing, but on
/// a hardware-reduced ACPI platform it sets up no identity ISA IRQ
/// mappings, so IRQ 4 only reaches the IOAPIC if a device claims it here.
fn com1() -> RawAml {
    let port = layout::SERIAL_PORT as u16;
    let mut res = to_bytes(&aml::IO::new(port, port, 1, 8));
    res.extend(to_bytes(&aml::Interrupt::new(true, true, false, false, layout::SERIAL_IRQ)));
    let res = RawAml(res);
    let crs = aml::ResourceTemplate::new(vec![&res]);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let dev = aml::Device::new("COM1".into(), vec![&hid, &uid, &crs]);
    RawAml(to_bytes(&dev))
}

/// Bus 0's hotplug slots and `PCNT`, inside `\_SB.PCI0`: the hotplug
/// registers as fields, one device per slot 1..31 (`_ADR` slot << 16,
/// function 0; `_SUN` the slot; `_EJ0` writes the slot's bit to `B0EJ`),
/// and `PCNT`, which reads the arrival and removal bitmaps once (reading
/// clears them) and notifies each slot whose bit is set.
fn pci_hotplug() -> Vec<u8> {
    let mut out = Vec::new();
    let port = layout::PCI_HOTPLUG_PORT as u32;
    let len = layout::PCI_HOTPLUG_LEN as u32;
    out.extend(to_bytes(&aml::OpRegion::new("PCST".into(), aml::OpRegionSpace::SystemIO, &port, &len)));
    out.extend(to_bytes(&aml::Field::new(
        "PCST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![
            aml::FieldEntry::Named(*b"PCIU", 32),
            aml::FieldEntry::Named(*b"PCID", 32),
            aml::FieldEntry::Named(*b"B0EJ", 32),
        ],
    )));
    let (arrived, leaving) = (aml::Local(0), aml::Local(1));
    let mut notifies = Vec::new();
    for slot in 1..SLOTS as u8 {
        let name = slot_name(slot);
        let bit = 1u32 << slot;
        let adr = u32::from(slot) << 16;
        let sun = u32::from(slot);
        let b0ej = aml::Path::new("B0EJ");
        let store = aml::Store::new(&b0ej, &bit);
        let ej0 = aml::Method::new("_EJ0".into(), 1, false, vec![&store]);
        let (adr, sun) = (aml::Name::new("_ADR".into(), &adr), aml::Name::new("_SUN".into(), &sun));
        let dev = aml::Device::new(name.as_str().into(), vec![&adr, &sun, &ej0]);
        out.extend(to_bytes(&dev));
        let path = aml::Path::new(&name);
        let (check, eject) = (1u8, 3u8);
        let arrived_here = aml::And::new(&aml::ZERO, &arrived, &bit);
        let notify_check = aml::Notify::new(&path, &check);
        notifies.extend(to_bytes(&aml::If::new(&arrived_here, vec![&notify_check])));
        let leaving_here = aml::And::new(&aml::ZERO, &leaving, &bit);
        let notify_eject = aml::Notify::new(&path, &eject);
        notifies.extend(to_bytes(&aml::If::new(&leaving_here, vec![&notify_eject])));
    }
    let (pciu, pcid) = (aml::Path::new("PCIU"), aml::Path::new("PCID"));
    let read_up = aml::Store::new(&arrived, &pciu);
    let read_down = aml::Store::new(&leaving, &pcid);
    let notifies = RawAml(notifies);
    out.extend(to_bytes(&aml::Method::new("PCNT".into(), 0, true, vec![&read_up, &read_down, &notifies])));
    out
}

/// The ACPI name of bus 0's slot `slot`: `S01_` .. `S1F_`.
fn slot_name(slot: u8) -> String {
    format!("S{slot:02X}_")
}

/// The power button (`PNP0C0C`), a control-method button: the GED
/// notifies it.
fn power_button() -> RawAml {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    RawAml(to_bytes(&aml::Device::new("PWRB".into(), vec![&hid, &uid])))
}

/// The Generic Event Device: its interrupt, its event register, and
/// `_EVT`, which Linux runs at each interrupt: read the register once
/// (that clears it) and act on every bit set (the PCI hotplug bit only
/// when `pci_hotplug`: without, there is no `PCNT` to call).
fn generic_event_device(pci_hotplug: bool) -> RawAml {
    let hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let irq = aml::Interrupt::new(true, false, false, false, layout::GED_GSI);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&irq]));
    let port = layout::GED_EVENT_PORT as u32;
    let region = aml::OpRegion::new("GDST".into(), aml::OpRegionSpace::SystemIO, &port, &1u8);
    let field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", 8)],
    );
    let events = aml::Local(0);
    let gdat = aml::Path::new("GDAT");
    let read = aml::Store::new(&events, &gdat);
    let hotplug = aml::And::new(&aml::ZERO, &events, &ged_event::PCI_HOTPLUG);
    let scan = aml::MethodCall::new("\\_SB_.PCI0.PCNT".into(), vec![]);
    let if_hotplug = aml::If::new(&hotplug, vec![&scan]);
    let button = aml::And::new(&aml::ZERO, &events, &ged_event::POWER_BUTTON);
    let pressed = 0x80u8;
    let pwrb = aml::Path::new("\\_SB_.PWRB");
    let notify = aml::Notify::new(&pwrb, &pressed);
    let if_button = aml::If::new(&button, vec![&notify]);
    let mut body: Vec<&dyn Aml> = vec![&read];
    if pci_hotplug {
        body.push(&if_hotplug);
    }
    body.push(&if_button);
    let evt = aml::Method::new("_EVT".into(), 1, true, body);
    RawAml(to_bytes(&aml::Device::new("GED_".into(), vec![&hid, &uid, &crs, &region, &field, &evt])))
}

/// Motherboard resources (`PNP0C02`): the PCI ECAM window. Linux uses
/// MMCONFIG only when the firmware reserved it here.
fn motherboard_resources() -> RawAml {
    let ecam = aml::Memory32Fixed::new(false, layout::PCI_ECAM_START as u32, layout::PCI_ECAM_SIZE as u32);
    let crs = aml::ResourceTemplate::new(vec![&ecam]);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let dev = aml::Device::new("MBRS".into(), vec![&hid, &uid, &crs]);
    RawAml(to_bytes(&dev))
}

/// The FADT: hardware-reduced, sleep/reset registers on one I/O port.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let port = GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, layout::ACPI_SLEEP_PORT);
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    b.sleep_control_reg = port;
    b.sleep_status_reg = port;
    b.reset_reg = port;
    b.reset_value = layout::ACPI_RESET_VALUE;
    b.iapc_boot_arch = (IAPC_NO_VGA | IAPC_NO_CMOS_RTC).into();
    b.hypervisor_vendor_identity = u64::from_le_bytes(*b"KICKVM\0\0").into();
    to_bytes(&b.finalize())
}

/// The MADT: one local APIC per vCPU (APIC ID = vCPU index), the IOAPIC
/// with GSI base 0, ISA IRQ 0 → GSI 2 (the PIT is on IOAPIC pin 2), and
/// LINT1 = NMI on every CPU.
pub fn madt(cpus: u8) -> Vec<u8> {
    let mut t = Sdt::new(*b"APIC", 44, 4, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.write_u32(36, layout::APIC_START as u32);
    t.write_u32(40, MADT_PCAT_COMPAT);
    for id in 0..cpus {
        t.append_slice(&to_bytes(&ProcessorLocalApic::new(id, id, EnabledStatus::Enabled)));
    }
    t.append_slice(&to_bytes(&IoApic::new(0, layout::IOAPIC_START as u32, 0)));
    t.append_slice(&interrupt_source_override(0, 2, 0));
    t.append_slice(&lapic_nmi(0xff, 1));
    t.as_slice().to_vec()
}

/// MADT type 2: ISA `irq` is connected to `gsi` (flags 0: bus defaults).
fn interrupt_source_override(irq: u8, gsi: u32, flags: u16) -> Vec<u8> {
    let mut v = vec![2, 10, 0, irq];
    v.extend_from_slice(&gsi.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v
}

/// MADT type 4: `lint` of processor `uid` (0xff: all) is an NMI.
fn lapic_nmi(uid: u8, lint: u8) -> Vec<u8> {
    vec![4, 6, uid, 0, 0, lint]
}

/// The MCFG: ECAM for segment 0, bus 0.
fn mcfg() -> MCFG {
    let mut m = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    m.add_ecam(layout::PCI_ECAM_START, 0, 0, 0);
    m
}

/// Decodes a byte written to the sleep control register: `Some(true)` for
/// S5 (power off), `Some(false)` for reset, `None` for anything else.
pub fn decode_sleep_port_write(value: u8) -> Option<bool> {
    if value & SLP_EN != 0 && (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT == S5_SLEEP_TYPE {
        Some(true)
    } else if value == layout::ACPI_RESET_VALUE {
        Some(false)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn tables() -> Vec<Placed> {
        build(&AcpiConfig { cpus: 2, pci_hotplug: true, pci_aml: Vec::new() })
    }

    #[test]
    fn every_table_checksums_and_fits_below_1_mib() {
        for (addr, bytes) in tables() {
            if &bytes[..8] == b"RSD PTR " {
                assert_eq!(sum(&bytes[..20]), 0);
                assert_eq!(sum(&bytes), 0);
            } else {
                assert_eq!(sum(&bytes), 0, "{}", String::from_utf8_lossy(&bytes[..4]));
                let len = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
                assert_eq!(len, bytes.len());
            }
            assert!(addr + bytes.len() as u64 <= layout::HIGH_RAM_START);
            assert!(addr >= layout::RSDP_START);
        }
    }

    #[test]
    fn xsdt_points_at_fadt_madt_mcfg_and_fadt_at_dsdt() {
        let t = tables();
        let at = |addr: u64| t.iter().find(|(a, _)| *a == addr).map(|(_, b)| b.clone()).unwrap();
        let (_, rsdp) = t.iter().find(|(a, _)| *a == layout::RSDP_START).unwrap();
        let xsdt = at(u64::from_le_bytes(rsdp[24..32].try_into().unwrap()));
        assert_eq!(&xsdt[..4], b"XSDT");
        let sigs: Vec<Vec<u8>> = xsdt[36..]
            .chunks(8)
            .map(|c| at(u64::from_le_bytes(c.try_into().unwrap()))[..4].to_vec())
            .collect();
        assert_eq!(sigs, vec![b"FACP".to_vec(), b"APIC".to_vec(), b"MCFG".to_vec()]);
        let fadt = at(u64::from_le_bytes(xsdt[36..44].try_into().unwrap()));
        let x_dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        assert_eq!(&at(x_dsdt)[..4], b"DSDT");
        // HW_REDUCED_ACPI flag.
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0);
    }

    #[test]
    fn madt_lists_each_cpu_and_the_ioapic() {
        let m = madt(3);
        let mut lapics = 0;
        let mut ioapic = false;
        let mut iso = false;
        let mut off = 44;
        while off < m.len() {
            let (kind, len) = (m[off], m[off + 1] as usize);
            match kind {
                0 => {
                    assert_eq!(m[off + 3], lapics);
                    lapics += 1;
                }
                1 => ioapic = u32::from_le_bytes(m[off + 4..off + 8].try_into().unwrap()) == 0xfec0_0000,
                2 => iso = m[off + 3] == 0 && m[off + 4] == 2,
                _ => {}
            }
            off += len;
        }
        assert_eq!((lapics, ioapic, iso), (3, true, true));
    }

    #[test]
    fn dsdt_describes_the_host_bridge_and_s5() {
        let d = dsdt(&AcpiConfig { cpus: 1, pci_hotplug: true, pci_aml: Vec::new() });
        let has = |needle: &[u8]| d.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"PCI0"));
        assert!(has(b"_S5_"));
        assert!(has(b"_CRS"));
        // EISA ID of PNP0A08, as AML encodes it.
        assert!(has(&[0x41, 0xd0, 0x0a, 0x08]));
    }

    /// `cfg`'s DSDT as ACPICA's disassembler (`iasl -d`, the parser Linux
    /// uses) prints it; `None` without `iasl` (Debian: acpica-tools).
    fn disassembled(cfg: &AcpiConfig) -> Option<String> {
        let dir = std::env::temp_dir().join(format!("kickvm-dsdt-{}-{}", std::process::id(), cfg.pci_hotplug));
        std::fs::create_dir_all(&dir).unwrap();
        let aml = dir.join("dsdt.aml");
        std::fs::write(&aml, dsdt(cfg)).unwrap();
        let out = match std::process::Command::new("iasl").arg("-d").arg(&aml).output() {
            Ok(o) => o,
            Err(e) => {
                eprintln!("skipped: cannot run iasl ({e}); install acpica-tools");
                return None;
            }
        };
        let asl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(out.status.success(), "iasl -d: {}", String::from_utf8_lossy(&out.stderr));
        if std::env::var_os("KICKVM_PRINT_DSDT").is_some() {
            eprintln!("{asl}");
        }
        Some(asl)
    }

    /// The GED with its interrupt and `_EVT`, the power button, a slot
    /// device per free slot and `PCNT`.
    #[test]
    fn dsdt_disassembles_with_ged_button_and_slots() {
        let Some(asl) = disassembled(&AcpiConfig { cpus: 1, pci_hotplug: true, pci_aml: Vec::new() }) else {
            return;
        };
        for needle in [
            "Device (GED)",
            "\"ACPI0013\"",
            "Method (_EVT, 1, Serialized)",
            "Notify (\\_SB.PWRB, 0x80)",
            "\\_SB.PCI0.PCNT ()",
            "EisaId (\"PNP0C0C\")",
            "Device (S01)",
            "Device (S1F)",
            "Name (_ADR, 0x001F0000)",
            "Notify (S1F, 0x03)",
            "Notify (S01, One)",
            "B0EJ = 0x80000000",
            "Method (PCNT, 0, Serialized)",
        ] {
            assert!(asl.contains(needle), "no `{needle}` in the DSDT:\n{asl}");
        }
        assert!(asl.contains(&format!("0x{:08X}", layout::GED_GSI)) || asl.contains(&format!("0x{:08X},", layout::GED_GSI)), "{asl}");
        assert!(!asl.contains("Device (S00)"), "slot 0 is the host bridge's");
    }

    /// Without hotplug: the host bridge, the GED (power button only) and
    /// the button, but no slot device, no `PCNT` and no call to it.
    #[test]
    fn dsdt_without_hotplug_has_no_slots() {
        let Some(asl) = disassembled(&AcpiConfig { cpus: 1, pci_hotplug: false, pci_aml: Vec::new() }) else {
            return;
        };
        for needle in ["Device (PCI0)", "Device (GED)", "Method (_EVT, 1, Serialized)", "Notify (\\_SB.PWRB, 0x80)", "_S5_"] {
            assert!(asl.contains(needle), "no `{needle}` in the DSDT:\n{asl}");
        }
        for absent in ["Device (S01)", "PCNT", "B0EJ", "_EJ0", "_SUN"] {
            assert!(!asl.contains(absent), "`{absent}` in the DSDT without hotplug:\n{asl}");
        }
    }

    #[test]
    fn sleep_port_decodes_poweroff_and_reset() {
        assert_eq!(decode_sleep_port_write((5 << 2) | (1 << 5)), Some(true));
        assert_eq!(decode_sleep_port_write(1), Some(false));
        assert_eq!(decode_sleep_port_write(5 << 2), None);
        assert_eq!(decode_sleep_port_write((3 << 2) | (1 << 5)), None);
    }
}
