//! Helpers shared by the launcher's integration tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The built `kickvm` binary.
pub fn kickvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kickvm"))
}

/// `kickvm run` of a guest image's kernel and initramfs with `cmdline`
/// appended to the kernel's command line (add devices, then spawn).
pub fn run_image(img: &kickvm_rig::image::GuestImage, cmdline: &str) -> Command {
    let mut c = kickvm();
    c.arg("run").arg("--kernel").arg(&img.kernel).arg("--initrd").arg(&img.initrd).args(["--cmdline", cmdline]);
    c
}

/// Runs `kickvm` with `args`, stdin closed, and returns its output.
pub fn run(args: &[&str]) -> Output {
    kickvm().args(args).stdin(std::process::Stdio::null()).output().expect("cannot run kickvm")
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kickvm-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Wraps 64-bit `code` in a minimal bzImage: a setup header that says
/// "boot protocol 2.12, loads high, has a 64-bit entry point", and a
/// protected-mode part whose offset 0x200 (the 64-bit entry) is `code`.
/// The launcher loads it like any kernel, so this exercises the real boot
/// path: loader, zero page, GDT, page tables, long-mode entry.
pub fn fake_bzimage(code: &[u8]) -> Vec<u8> {
    let mut img = vec![0u8; 1024];
    let put = |img: &mut Vec<u8>, off: usize, bytes: &[u8]| img[off..off + bytes.len()].copy_from_slice(bytes);
    put(&mut img, 0x1f1, &[1]); // setup_sects: one sector after the boot sector
    put(&mut img, 0x1fe, &0xaa55u16.to_le_bytes());
    put(&mut img, 0x202, b"HdrS");
    put(&mut img, 0x206, &0x020cu16.to_le_bytes());
    put(&mut img, 0x211, &[1]); // loadflags: LOADED_HIGH
    put(&mut img, 0x214, &0x10_0000u32.to_le_bytes()); // code32_start
    put(&mut img, 0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    put(&mut img, 0x236, &1u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    put(&mut img, 0x238, &2047u32.to_le_bytes()); // cmdline_size
    put(&mut img, 0x258, &0x10_0000u64.to_le_bytes()); // pref_address
    put(&mut img, 0x260, &0x10_0000u32.to_le_bytes()); // init_size
    let mut payload = vec![0x90u8; 0x200];
    payload.extend_from_slice(code);
    img.extend_from_slice(&payload);
    img
}

/// 64-bit code: writes `msg` to COM1 with `rep outsb`, then `port_value`
/// to `port` (e.g. ACPI S5 to the sleep register, or 0xfe to the i8042),
/// then halts forever.
pub fn serial_then_out(msg: &[u8], port: u16, value: u8) -> Vec<u8> {
    let mut c = Vec::new();
    c.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    c.extend_from_slice(&[0x48, 0x8d, 0x35]); // lea rsi, [rip + disp32]
    let lea_end = c.len() + 4;
    let disp_at = c.len();
    c.extend_from_slice(&[0; 4]);
    c.push(0xb9); // mov ecx, imm32
    c.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    c.extend_from_slice(&[0xf3, 0x6e]); // rep outsb
    c.extend_from_slice(&[0x66, 0xba]); // mov dx, port
    c.extend_from_slice(&port.to_le_bytes());
    c.extend_from_slice(&[0xb0, value]); // mov al, value
    c.push(0xee); // out dx, al
    c.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // 1: hlt; jmp 1b
    let disp = (c.len() - lea_end) as u32;
    c[disp_at..disp_at + 4].copy_from_slice(&disp.to_le_bytes());
    c.extend_from_slice(msg);
    c
}

/// Writes a file and returns its path.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}
