//! Guest images: a Debian kernel plus an initramfs with busybox, the
//! virtio modules the guest needs and a small `/init`
//! (`crates/rig/guest/init.sh`). Built from Debian packages into the
//! cache and keyed by their versions, so a second build is a lookup and a
//! new package version means a new image.
//!
//! Four variants:
//! - [`Variant::Guest`]: the default test guest (Debian cloud kernel),
//!   with `socat` for vsock tests.
//! - [`Variant::Minimal`]: the guest with busybox and the net and block
//!   modules only, for tiny guests (64 MiB: many VMs at once).
//! - [`Variant::Tools`]: the guest plus `iperf3`, `fio` and `ethtool`.
//! - [`Variant::Rig`]: the rig's L1 (Debian generic kernel with 9p and
//!   kvm-amd; `/init` is `crates/rig/guest/rig-init.sh`).
//!
//! What `/init` does with the kernel command line, and its console
//! markers, are described in `docs/testing.md`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::cpio::{self, Archive};
use crate::debs::{self, Cache, Package};
use crate::elf::Elf;
use crate::error::{Error, Result};
use crate::modules::ModuleTree;
use crate::progress;

/// Printed by `/init` as soon as it starts.
pub const INIT_START_MARKER: &str = "KICKVM-INIT-START";
/// Printed by `/init` right before it runs the test script.
pub const SCRIPT_START_MARKER: &str = "KICKVM-SCRIPT-START";
/// Printed by `/init` after the script, followed by its exit status.
pub const EXIT_STATUS_PREFIX: &str = "KICKVM-EXIT-STATUS=";
/// First bytes of a script disk (see [`write_script_disk`]).
pub const SCRIPT_DISK_MAGIC: &str = "#kickvm-script";

/// Bump when the layout or contents the builder produces change, so cached
/// images built by an older builder are not reused.
const BUILDER_VERSION: u32 = 1;

const GUEST_INIT: &str = include_str!("../guest/init.sh");
const RIG_INIT: &str = include_str!("../guest/rig-init.sh");

/// Modules the test guest loads, in addition to their dependencies.
const GUEST_MODULES: &[&str] = &[
    "virtio",
    "virtio_ring",
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "virtio_console",
    "virtio_rng",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    // The ACPI power button (PNP0C0C) and /dev/input/event* to read its
    // KEY_POWER from (the API's vm.power-button).
    "button",
    "evdev",
];
/// Modules of [`Variant::Minimal`]: a disk and a network card.
const MINIMAL_MODULES: &[&str] = &["virtio", "virtio_ring", "virtio_pci", "virtio_net", "virtio_blk"];
/// Modules the rig's L1 loads: 9p for the host root, kvm-amd for nested
/// KVM, tun/veth/bridge/vhost for tests that build networks inside L1.
const RIG_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "virtio_console",
    "9pnet_virtio",
    "9p",
    "irqbypass",
    "kvm",
    "ccp",
    "kvm_amd",
    "tun",
    "veth",
    "bridge",
    "vhost_net",
    "vhost_vsock",
];
/// Packages of every test guest and the programs taken from them: `socat`
/// speaks `AF_VSOCK` (virtio-vsock tests).
const GUEST_PACKAGES: &[&str] = &["socat"];
const GUEST_PROGRAMS: &[&str] = &["usr/bin/socat"];
/// Tool packages of [`Variant::Tools`] and the programs taken from them.
const TOOL_PACKAGES: &[&str] = &["iperf3", "fio", "ethtool"];
const TOOL_PROGRAMS: &[&str] = &[
    "usr/bin/iperf3",
    "usr/bin/fio",
    "sbin/ethtool",
    "usr/sbin/ethtool",
];

/// Which image to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// The test guest: cloud kernel, busybox, virtio modules.
    Guest,
    /// The test guest plus iperf3, fio, ethtool and their libraries.
    Tools,
    /// The test guest without socat and its libraries (libcrypto alone is
    /// 4.5 MiB) and with only the net and block modules: an initramfs of
    /// about 1 MiB, for guests of 64 MiB.
    Minimal,
    /// The rig's L1: generic kernel, 9p + kvm-amd modules, rig init.
    Rig,
}

impl Variant {
    /// Short name used in cache paths and messages.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Guest => "guest",
            Variant::Tools => "guest-tools",
            Variant::Minimal => "guest-minimal",
            Variant::Rig => "rig-l1",
        }
    }

    fn kernel_meta(self) -> &'static str {
        match self {
            Variant::Rig => "linux-image-amd64",
            _ => "linux-image-cloud-amd64",
        }
    }

    fn modules(self) -> &'static [&'static str] {
        match self {
            Variant::Rig => RIG_MODULES,
            Variant::Minimal => MINIMAL_MODULES,
            _ => GUEST_MODULES,
        }
    }

    /// The packages beyond kernel and busybox, and the programs taken
    /// from them (with their libraries).
    fn extras(self) -> (Vec<&'static str>, Vec<&'static str>) {
        match self {
            Variant::Rig | Variant::Minimal => (Vec::new(), Vec::new()),
            Variant::Guest => (GUEST_PACKAGES.to_vec(), GUEST_PROGRAMS.to_vec()),
            Variant::Tools => (
                [GUEST_PACKAGES, TOOL_PACKAGES].concat(),
                [GUEST_PROGRAMS, TOOL_PROGRAMS].concat(),
            ),
        }
    }

    fn init(self) -> &'static str {
        match self {
            Variant::Rig => RIG_INIT,
            _ => GUEST_INIT,
        }
    }
}

/// A built image: boot `kernel` with `initrd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// The bzImage (`vmlinuz`).
    pub kernel: PathBuf,
    /// The gzip-compressed cpio initramfs.
    pub initrd: PathBuf,
    /// The kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub kernel_version: String,
    /// The image's cache directory (also holds `manifest.txt`).
    pub dir: PathBuf,
}

/// The default test guest, built if missing (cached in [`Cache::from_env`]).
pub fn default_image() -> Result<GuestImage> {
    image(Variant::Guest)
}

/// The guest with benchmark tools (`iperf3`, `fio`, `ethtool`).
pub fn tools_image() -> Result<GuestImage> {
    image(Variant::Tools)
}

/// The smallest test guest (busybox, net and block modules).
pub fn minimal_image() -> Result<GuestImage> {
    image(Variant::Minimal)
}

/// The rig's L1 image.
pub fn rig_image() -> Result<GuestImage> {
    image(Variant::Rig)
}

/// The image of `variant` in the default cache, built if missing.
pub fn image(variant: Variant) -> Result<GuestImage> {
    build(variant, &Cache::from_env()?)
}

/// The kernel command line that makes `/init` run `script`
/// (`kickvm.cmd=<base64>`). The kernel limits the whole command line to
/// 2048 bytes; use [`write_script_disk`] for longer scripts.
pub fn script_cmdline(script: &str) -> String {
    format!("kickvm.cmd={}", crate::base64::encode(script.as_bytes()))
}

/// Writes a disk image holding `script`; attach it as a virtio-blk disk
/// and `/init` runs it. Padded with zeros to a whole 4 KiB.
pub fn write_script_disk(script: &str, path: &Path) -> Result<()> {
    let mut bytes = format!("{SCRIPT_DISK_MAGIC}\n{script}\n").into_bytes();
    bytes.resize(bytes.len().div_ceil(4096) * 4096, 0);
    fs::write(path, bytes).map_err(|e| Error::io("cannot write script disk", path, e))
}

/// The exit status `/init` reported on the console, if it got that far.
pub fn parse_exit_status(console: &str) -> Option<i32> {
    console.lines().find_map(|l| {
        l.trim()
            .strip_prefix(EXIT_STATUS_PREFIX)?
            .trim()
            .parse()
            .ok()
    })
}

/// The pointer file naming the last image built for `variant`; used inside
/// the rig, where apt is not consulted.
fn current_pointer(images: &Path, variant: Variant) -> PathBuf {
    images.join(format!("{}.current", variant.name()))
}

fn image_at(dir: PathBuf) -> Result<GuestImage> {
    let manifest = fs::read_to_string(dir.join("manifest.txt")).unwrap_or_default();
    let kernel_version = manifest
        .lines()
        .find_map(|l| l.strip_prefix("kernel-release "))
        .unwrap_or("")
        .to_owned();
    Ok(GuestImage {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        kernel_version,
        dir,
    })
}

fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0)) {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
    }
    h
}

/// Builds (or finds in `cache`) the image of `variant`.
///
/// Inside the rig (`KICKVM_IN_RIG` set) the cache is read-only and apt is
/// not asked: the image last built on the host is used.
pub fn build(variant: Variant, cache: &Cache) -> Result<GuestImage> {
    let images = cache.root().join("images");
    if std::env::var_os("KICKVM_IN_RIG").is_some() {
        // The host named the image it resolved (the pointer file is only
        // the last one built, maybe by another checkout's packages).
        if let Some(dir) = std::env::var_os(image_env(variant)) {
            return image_at(PathBuf::from(dir));
        }
        return last_built_image(&images, variant, cache);
    }
    let img = build_on_host(variant, cache, &images)?;
    let mut seen = RESOLVED.lock().unwrap_or_else(|e| e.into_inner());
    if !seen.iter().any(|(v, _)| *v == variant) {
        seen.push((variant, img.dir.clone()));
    }
    Ok(img)
}

/// The images this process resolved on the host, by variant: a command it
/// runs in the rig is told them ([`resolved_env`]), so L1 uses the same
/// ones.
static RESOLVED: std::sync::Mutex<Vec<(Variant, PathBuf)>> = std::sync::Mutex::new(Vec::new());

/// The variable naming `variant`'s image directory inside the rig.
fn image_env(variant: Variant) -> String {
    format!("KICKVM_RIG_IMAGE_{}", variant.name().to_uppercase().replace('-', "_"))
}

/// `NAME=DIR` for every image this process resolved on the host.
pub fn resolved_env() -> Vec<(String, PathBuf)> {
    let seen = RESOLVED.lock().unwrap_or_else(|e| e.into_inner());
    seen.iter().map(|(v, d)| (image_env(*v), d.clone())).collect()
}

fn build_on_host(variant: Variant, cache: &Cache, images: &Path) -> Result<GuestImage> {

    // Versions first (cheap, offline): they name the image.
    let pkgs = image_packages(variant)?;
    let dir = images.join(format!(
        "{}-{:016x}",
        variant.name(),
        image_key(variant, &pkgs.pinned)
    ));
    if dir.join("initrd.img").is_file() {
        return image_at(dir);
    }

    let _lock = cache.lock()?;
    if dir.join("initrd.img").is_file() {
        return image_at(dir); // another process built it while we waited
    }
    let started = Instant::now();
    progress(&format!(
        "building the {} image ({})",
        variant.name(),
        pkgs.kernel.pinned()
    ));
    let roots = debs::unpack_all(cache, &pkgs.all)?;
    let tmp = images.join(format!(".tmp-{}-{}", variant.name(), std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(|e| Error::io("cannot create", &tmp, e))?;

    let contents = write_kernel_and_initramfs(&tmp, variant, &roots)?;
    fs::write(
        tmp.join("manifest.txt"),
        manifest(variant, &contents, &pkgs.pinned),
    )
    .map_err(|e| Error::io("cannot write manifest in", &tmp, e))?;
    publish(&tmp, &dir, images, variant)?;
    progress(&format!(
        "{} image built in {:.1} s: {}",
        variant.name(),
        started.elapsed().as_secs_f64(),
        dir.display()
    ));
    image_at(dir)
}

/// Inside the rig: the image of `variant` the host built last, named by
/// its pointer file.
fn last_built_image(images: &Path, variant: Variant, cache: &Cache) -> Result<GuestImage> {
    let ptr = current_pointer(images, variant);
    let name = fs::read_to_string(&ptr).map_err(|_| {
        Error::with_hint(
            format!(
                "no {} image in the cache {}",
                variant.name(),
                cache.root().display()
            ),
            format!(
                "build it on the host first: kickvm-rig image{}",
                match variant {
                    Variant::Tools => " --with-tools",
                    Variant::Minimal => " --minimal",
                    Variant::Rig => " --rig",
                    Variant::Guest => "",
                }
            ),
        )
    })?;
    image_at(images.join(name.trim()))
}

/// The Debian packages an image is made from.
struct ImagePackages {
    /// The kernel package (the meta package resolved).
    kernel: Package,
    /// Kernel, `busybox-static`, then the extra packages (socat; tools)
    /// and their libraries; unpacked in this order.
    all: Vec<Package>,
    /// `all` as `name=version`.
    pinned: Vec<String>,
}

/// The packages of `variant` at the versions apt would install now.
fn image_packages(variant: Variant) -> Result<ImagePackages> {
    let found = debs::candidates(&[
        variant.kernel_meta().to_owned(),
        "busybox-static".to_owned(),
    ])?;
    let kernel = debs::resolve_meta(&found[0], "linux-image-")?;
    let mut all = vec![kernel.clone(), found[1].clone()];
    let (extras, _) = variant.extras();
    if !extras.is_empty() {
        let roots: Vec<String> = extras.iter().map(|s| s.to_string()).collect();
        all.extend(debs::library_closure(&roots)?);
    }
    let pinned: Vec<String> = all.iter().map(Package::pinned).collect();
    Ok(ImagePackages {
        kernel,
        all,
        pinned,
    })
}

/// The hash that names an image: variant, `/init`, module list, package
/// versions and builder version.
fn image_key(variant: Variant, pinned: &[String]) -> u64 {
    let mut key_parts: Vec<&str> = vec![variant.name(), variant.init()];
    key_parts.extend(variant.modules());
    key_parts.extend(pinned.iter().map(String::as_str));
    let builder = BUILDER_VERSION.to_string();
    key_parts.push(&builder);
    fnv1a(&key_parts)
}

/// What went into an image, for its manifest.
struct ImageContents {
    /// The kernel release, e.g. `6.1.0-56-cloud-amd64`.
    kernel_release: String,
    /// The modules, in load order, with their `.ko` paths.
    modules: Vec<(String, PathBuf)>,
    /// The extra programs and their libraries (not in the rig's image).
    tools: Files,
}

/// Writes `vmlinuz` and `initrd.img` into `tmp` from the unpacked packages
/// `roots` (in [`ImagePackages::all`] order).
fn write_kernel_and_initramfs(
    tmp: &Path,
    variant: Variant,
    roots: &[PathBuf],
) -> Result<ImageContents> {
    let tree = ModuleTree::open(&roots[0])?;
    let kernel_src = roots[0].join(format!("boot/vmlinuz-{}", tree.version));
    fs::copy(&kernel_src, tmp.join("vmlinuz"))
        .map_err(|e| Error::io("cannot copy kernel", &kernel_src, e))?;
    let modules = tree.resolve(variant.modules())?;
    let (_, programs) = variant.extras();
    let tools = if programs.is_empty() {
        Vec::new()
    } else {
        collect_tools(&roots[2..], &programs)?
    };

    progress(&format!(
        "writing initramfs: {} modules, {} tool files",
        modules.len(),
        tools.len()
    ));
    let busybox = roots[1].join("bin/busybox");
    let busybox =
        fs::read(&busybox).map_err(|e| Error::io("cannot read busybox from", &busybox, e))?;
    cpio::write_gzipped(&tmp.join("initrd.img"), |a| {
        fill_initramfs(a, variant, &busybox, &modules, &tools)
    })?;
    Ok(ImageContents {
        kernel_release: tree.version,
        modules,
        tools,
    })
}

/// The text of `manifest.txt`: variant, kernel release, then one line per
/// package, module and tool file.
fn manifest(variant: Variant, contents: &ImageContents, pinned: &[String]) -> String {
    let mut manifest = format!(
        "variant {}\nkernel-release {}\n",
        variant.name(),
        contents.kernel_release
    );
    pinned
        .iter()
        .for_each(|p| manifest.push_str(&format!("package {p}\n")));
    contents
        .modules
        .iter()
        .for_each(|(m, _)| manifest.push_str(&format!("module {m}\n")));
    contents
        .tools
        .iter()
        .for_each(|(t, _)| manifest.push_str(&format!("file {t}\n")));
    manifest
}

/// Moves the finished image from `tmp` to `dir` and points the variant's
/// pointer file at it.
fn publish(tmp: &Path, dir: &Path, images: &Path, variant: Variant) -> Result<()> {
    let _ = fs::remove_dir_all(dir);
    fs::rename(tmp, dir).map_err(|e| Error::io("cannot move image to", dir, e))?;
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let ptr = current_pointer(images, variant);
    fs::write(&ptr, name).map_err(|e| Error::io("cannot write", &ptr, e))
}

type Files = Vec<(String, Vec<u8>)>;

fn fill_initramfs(
    a: &mut Archive<&mut dyn std::io::Write>,
    variant: Variant,
    busybox: &[u8],
    modules: &[(String, PathBuf)],
    tools: &Files,
) -> Result<()> {
    let io = |e: std::io::Error| Error::new(format!("cannot write initramfs: {e}"));
    for d in [
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "root",
        "mnt",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc/kickvm",
        "lib/modules",
    ] {
        a.dir(d).map_err(io)?;
    }
    a.char_dev("dev/console", 0o600, 5, 1).map_err(io)?;
    a.file("bin/busybox", 0o755, busybox).map_err(io)?;
    a.symlink("bin/sh", "busybox").map_err(io)?;
    a.file("init", 0o755, variant.init().as_bytes())
        .map_err(io)?;
    let mut order = String::new();
    for (name, path) in modules {
        let ko = fs::read(path).map_err(|e| Error::io("cannot read module", path, e))?;
        a.file(&format!("lib/modules/{name}.ko"), 0o644, &ko)
            .map_err(io)?;
        order.push_str(name);
        order.push('\n');
    }
    a.file("etc/kickvm/modules", 0o644, order.as_bytes())
        .map_err(io)?;
    a.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
        .map_err(io)?;
    a.file("etc/group", 0o644, b"root:x:0:\n").map_err(io)?;
    for (path, data) in tools {
        a.file(path, 0o755, data).map_err(io)?;
    }
    if !tools.is_empty() {
        a.symlink("usr/lib/x86_64-linux-gnu", "../../lib/x86_64-linux-gnu")
            .map_err(io)?;
    }
    Ok(())
}

/// Every regular file or symlink under the library directories of the
/// unpacked packages, by file name (a soname is looked up there).
fn library_index(roots: &[PathBuf]) -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, out: &mut BTreeMap<String, PathBuf>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() && !path.is_symlink() {
                walk(&path, out);
            } else if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                out.entry(name.to_owned()).or_insert(path);
            }
        }
    }
    let mut index = BTreeMap::new();
    for r in roots {
        for sub in ["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64"] {
            walk(&r.join(sub), &mut index);
        }
    }
    index
}

/// The `programs` and, by a `DT_NEEDED` walk, every shared library they
/// load, as (initramfs path, contents). Libraries go flat into
/// `lib/x86_64-linux-gnu` (the guest sets `LD_LIBRARY_PATH` to it).
fn collect_tools(roots: &[PathBuf], programs: &[&str]) -> Result<Files> {
    let index = library_index(roots);
    let mut files: Files = Vec::new();
    let mut queue: Vec<(String, PathBuf)> = Vec::new();
    for prog in programs {
        if let Some(src) = roots.iter().map(|r| r.join(prog)).find(|p| p.is_file()) {
            queue.push((prog.to_string(), src));
        }
    }
    let mut seen: std::collections::BTreeSet<String> =
        queue.iter().map(|(p, _)| p.clone()).collect();
    while let Some((dest, src)) = queue.pop() {
        let data = fs::read(&src).map_err(|e| Error::io("cannot read", &src, e))?;
        if let Ok(elf) = Elf::parse(&data) {
            let mut wanted = elf.needed();
            if let Some(interp) = elf.interpreter() {
                let soname = interp.rsplit('/').next().unwrap_or(&interp).to_owned();
                if seen.insert(interp.trim_start_matches('/').to_owned()) {
                    let lib = index
                        .get(&soname)
                        .ok_or_else(|| Error::new(format!("no {soname} in the tool packages")))?;
                    queue.push((interp.trim_start_matches('/').to_owned(), lib.clone()));
                }
                wanted.retain(|w| w != &soname);
            }
            for soname in wanted {
                let dest = format!("lib/x86_64-linux-gnu/{soname}");
                if seen.insert(dest.clone()) {
                    // A library no walked package provides (a Depends we
                    // skipped) is taken from the host, which runs the same
                    // Debian release.
                    let host = Path::new("/lib/x86_64-linux-gnu").join(&soname);
                    let lib = index
                        .get(&soname)
                        .cloned()
                        .or_else(|| host.is_file().then_some(host))
                        .ok_or_else(|| {
                            Error::new(format!(
                                "{} needs {soname}, which no unpacked package provides",
                                src.display()
                            ))
                        })?;
                    queue.push((dest, lib));
                }
            }
        }
        files.push((dest, data));
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_resolved_on_the_host_are_named_for_the_rig() {
        RESOLVED.lock().unwrap().push((Variant::Tools, PathBuf::from("/c/images/guest-tools-1234")));
        let env = resolved_env();
        assert!(
            env.contains(&("KICKVM_RIG_IMAGE_GUEST_TOOLS".to_string(), PathBuf::from("/c/images/guest-tools-1234"))),
            "{env:?}"
        );
        assert_eq!(image_env(Variant::Rig), "KICKVM_RIG_IMAGE_RIG_L1");
    }

    #[test]
    fn exit_status_is_parsed() {
        assert_eq!(parse_exit_status("x\nKICKVM-EXIT-STATUS=3\r\n"), Some(3));
        assert_eq!(parse_exit_status("KICKVM-INIT-START\n"), None);
    }

    #[test]
    fn script_disk_has_magic_and_whole_blocks() {
        let p = std::env::temp_dir().join(format!("kickvm-disk-test-{}", std::process::id()));
        write_script_disk("echo hi", &p).unwrap();
        let b = fs::read(&p).unwrap();
        assert!(b.starts_with(b"#kickvm-script\necho hi\n"));
        assert_eq!(b.len(), 4096);
        let _ = fs::remove_file(p);
    }

    #[test]
    fn cmdline_is_base64() {
        assert_eq!(script_cmdline("exit 3"), "kickvm.cmd=ZXhpdCAz");
    }
}
