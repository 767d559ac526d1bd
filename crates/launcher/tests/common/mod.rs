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

/// True when this host has a KVM device (tiny guests run even on kvm_pvm).
pub fn have_kvm() -> bool {
    Path::new("/dev/kvm").exists()
}

/// 64-bit code: prints `msg` on COM1, then spins forever with interrupts
/// off (a guest that never exits again).
pub fn serial_then_spin(msg: &[u8]) -> Vec<u8> {
    let mut code = serial_then_out(msg, 0x80, 0);
    let spin = code.len() - msg.len() - 3; // the `hlt; jmp` tail
    code[spin..spin + 3].copy_from_slice(&[0xfa, 0xeb, 0xfe]); // cli; 1: jmp 1b
    code
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
    print_out_halt(&mut c, msg.len(), port, value);
    let disp = (c.len() - lea_end) as u32;
    c[disp_at..disp_at + 4].copy_from_slice(&disp.to_le_bytes());
    c.extend_from_slice(msg);
    c
}

/// The tail both 32- and 64-bit test guests share (the same encoding in
/// either mode, `dx`/`si` set up before): print `len` bytes from `[rsi]`
/// on COM1, write `value` to `port`, halt forever.
fn print_out_halt(c: &mut Vec<u8>, len: usize, port: u16, value: u8) {
    c.push(0xb9); // mov ecx, imm32
    c.extend_from_slice(&(len as u32).to_le_bytes());
    c.extend_from_slice(&[0xf3, 0x6e]); // rep outsb
    c.extend_from_slice(&[0x66, 0xba]); // mov dx, port
    c.extend_from_slice(&port.to_le_bytes());
    c.extend_from_slice(&[0xb0, value]); // mov al, value
    c.push(0xee); // out dx, al
    c.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // 1: hlt; jmp 1b
}

/// Writes a file and returns its path.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Where [`fake_vmlinux`] loads its code, and its PVH entry point.
pub const VMLINUX_LOAD: u32 = 0x100_0000;

/// Wraps 32-bit `code` in a minimal ELF vmlinux: one loadable segment at
/// [`VMLINUX_LOAD`] that starts with `code`, and a note segment whose
/// `XEN_ELFNOTE_PHYS32_ENTRY` note points at it. The launcher loads it like
/// any vmlinux, so this exercises the PVH path: segments, start info, GDT,
/// 32-bit protected-mode entry.
pub fn fake_vmlinux(code: &[u8]) -> Vec<u8> {
    let u16le = |v: u16| v.to_le_bytes();
    let u32le = |v: u32| v.to_le_bytes();
    let u64le = |v: u64| v.to_le_bytes();
    let mut note = Vec::new();
    note.extend_from_slice(&u32le(4)); // n_namesz
    note.extend_from_slice(&u32le(4)); // n_descsz
    note.extend_from_slice(&u32le(18)); // n_type: XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&u32le(VMLINUX_LOAD));
    let (code_at, note_at) = (0x1000u64, 0x1000 + code.len() as u64);

    let mut f = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]; // 64-bit, LE
    f.extend_from_slice(&u16le(2)); // e_type: ET_EXEC
    f.extend_from_slice(&u16le(62)); // e_machine: x86-64
    f.extend_from_slice(&u32le(1));
    f.extend_from_slice(&u64le(u64::from(VMLINUX_LOAD))); // e_entry
    f.extend_from_slice(&u64le(64)); // e_phoff
    f.extend_from_slice(&u64le(0)); // e_shoff
    f.extend_from_slice(&u32le(0));
    for v in [64u16, 56, 2, 64, 0, 0] {
        f.extend_from_slice(&u16le(v)); // ehsize, phentsize, phnum, shentsize, shnum, shstrndx
    }
    // (type, offset, paddr, filesz, memsz)
    for (kind, offset, paddr, filesz, memsz) in [
        (1u32, code_at, u64::from(VMLINUX_LOAD), code.len() as u64, code.len() as u64 + 0x1000),
        (4, note_at, 0, note.len() as u64, 0),
    ] {
        f.extend_from_slice(&u32le(kind));
        f.extend_from_slice(&u32le(5)); // p_flags: R+X
        for v in [offset, paddr, paddr, filesz, memsz, 4] {
            f.extend_from_slice(&u64le(v));
        }
    }
    f.resize(code_at as usize, 0);
    f.extend_from_slice(code);
    f.extend_from_slice(&note);
    f
}

/// 32-bit code for [`fake_vmlinux`]: if `%ebx` points at an
/// `hvm_start_info` (its magic), writes `msg` to COM1 with `rep outsb`;
/// then writes `value` to `port` and halts forever.
pub fn pvh_serial_then_out(msg: &[u8], port: u16, value: u8) -> Vec<u8> {
    let mut c = Vec::new();
    c.extend_from_slice(&[0x81, 0x3b]); // cmp dword [ebx], imm32
    c.extend_from_slice(&0x336e_c578u32.to_le_bytes());
    c.extend_from_slice(&[0x75, 12]); // jne over the print (12 bytes)
    c.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    c.push(0xbe); // mov esi, imm32 (the message's address)
    let msg_at = c.len();
    c.extend_from_slice(&[0; 4]);
    print_out_halt(&mut c, msg.len(), port, value);
    let addr = VMLINUX_LOAD + c.len() as u32;
    c[msg_at..msg_at + 4].copy_from_slice(&addr.to_le_bytes());
    c.extend_from_slice(msg);
    c
}

/// Kills process `pid` (our child) if it still runs `timeout` from now;
/// the thread ends as soon as the process is gone.
pub fn kill_after(pid: u32, timeout: std::time::Duration) -> std::thread::JoinHandle<()> {
    let pid = pid as i32;
    std::thread::spawn(move || {
        let end = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(200));
            // SAFETY: signal 0 only checks that the process exists.
            if unsafe { libc::kill(pid, 0) } != 0 {
                return;
            }
        }
        // SAFETY: kills our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    })
}

/// Reads `pipe` to its end on a thread of its own (a child's stderr, while
/// this thread reads its stdout).
pub fn read_all(mut pipe: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = pipe.read_to_string(&mut s);
        s
    })
}
