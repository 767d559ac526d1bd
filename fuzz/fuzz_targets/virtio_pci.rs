//! The PCI root and virtio-pci transport with real devices behind it: see
//! `kickvm_fuzz::vpci`.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: kickvm_fuzz::vpci::PciInput| {
    kickvm_fuzz::vpci::run(&input);
});
