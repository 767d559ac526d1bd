//! The guest images: what they contain, that the cache makes a second
//! build a lookup, and that they boot and run a script under QEMU TCG.

use std::time::Instant;

use kickvm_rig::image::{self, Variant};
use kickvm_rig::qemu::{self, Accel, BootOptions};

#[test]
fn default_image_has_the_virtio_modules_in_dependency_order() {
    let t = Instant::now();
    let img = kickvm_rig::default_image().expect("guest image builds");
    let first = t.elapsed();
    let t = Instant::now();
    let again = kickvm_rig::default_image().expect("guest image is cached");
    eprintln!(
        "image: first call {:.1} s, cached call {:.2} s",
        first.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    assert_eq!(img, again);
    assert!(
        img.kernel_version.ends_with("-cloud-amd64"),
        "{}",
        img.kernel_version
    );
    let gz = std::fs::read(&img.initrd).unwrap();
    assert_eq!(&gz[..2], &[0x1f, 0x8b], "initrd is gzip");

    let manifest = std::fs::read_to_string(img.dir.join("manifest.txt")).unwrap();
    let modules: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.strip_prefix("module "))
        .collect();
    let pos = |m: &str| {
        modules
            .iter()
            .position(|x| *x == m)
            .unwrap_or_else(|| panic!("no {m} in {modules:?}"))
    };
    for (dep, user) in [
        ("virtio_ring", "virtio_pci"),
        ("virtio_pci_modern_dev", "virtio_pci"),
        ("failover", "net_failover"),
        ("net_failover", "virtio_net"),
        ("virtio", "virtio_blk"),
        ("virtio", "virtio_console"),
    ] {
        assert!(
            pos(dep) < pos(user),
            "{dep} must load before {user}: {modules:?}"
        );
    }
    // rng_core is built into the cloud kernel; were it a module, it would
    // have to come first.
    if let Some(rng) = modules.iter().position(|m| *m == "rng_core") {
        assert!(rng < pos("virtio_rng"), "{modules:?}");
    }
}

#[test]
fn guest_runs_a_script_disk_under_tcg() {
    let t = Instant::now();
    let img = kickvm_rig::default_image().expect("guest image builds");
    let disk = std::env::temp_dir().join(format!("kickvm-script-disk-{}.img", std::process::id()));
    image::write_script_disk(
        "echo from-the-disk; grep -c processor /proc/cpuinfo; exit 4",
        &disk,
    )
    .unwrap();
    let mut opts = BootOptions::new(img);
    opts.accel = Accel::Tcg;
    opts.disks = vec![disk.clone()];
    let out = qemu::boot(&opts);
    let _ = std::fs::remove_file(&disk);
    let out = out.expect("guest boots");
    assert!(
        out.console.contains(image::INIT_START_MARKER),
        "{}",
        out.console
    );
    assert!(out.console.contains("from-the-disk"), "{}", out.console);
    assert_eq!(out.exit_status, Some(4), "{}", out.console);
    eprintln!(
        "guest_runs_a_script_disk_under_tcg: guest {:.1} s, test {:.1} s",
        out.elapsed.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
}

#[test]
fn hung_guest_is_killed_with_a_clear_message() {
    let img = kickvm_rig::default_image().expect("guest image builds");
    let mut opts = BootOptions::new(img);
    opts.accel = Accel::Tcg;
    opts.script = Some("sleep 600".into());
    opts.timeout = std::time::Duration::from_secs(8);
    let e = qemu::boot(&opts).expect_err("the guest hangs").to_string();
    assert!(
        e.contains("did not power off within 8 s and was killed"),
        "{e}"
    );
    assert!(!e.contains('\n'));
}

#[test]
fn tools_image_runs_iperf3_fio_ethtool() {
    let t = Instant::now();
    let img = image::image(Variant::Tools).expect("tools image builds");
    let mut opts = BootOptions::new(img);
    opts.accel = Accel::Tcg;
    opts.memory_mib = 512;
    opts.script = Some("set -e; iperf3 --version; fio --version; ethtool --version".into());
    let out = qemu::boot(&opts).expect("guest boots");
    assert_eq!(out.exit_status, Some(0), "{}", out.console);
    for want in ["iperf 3.", "fio-3.", "ethtool version"] {
        assert!(out.console.contains(want), "no {want}: {}", out.console);
    }
    eprintln!(
        "tools_image_runs_iperf3_fio_ethtool: test {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

/// `kickvm-rig image --print-vmlinux`: the default image's vmlinux, an
/// x86-64 ELF file next to the bzImage, extracted once; `--print-paths`
/// still prints the two paths it always did.
#[test]
fn default_image_has_its_vmlinux() {
    let rig = || std::process::Command::new(env!("CARGO_BIN_EXE_kickvm-rig"));
    let out = rig().args(["image", "--print-vmlinux"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let path = String::from_utf8(out.stdout).unwrap();
    let path = std::path::Path::new(path.trim());
    let img = kickvm_rig::default_image().unwrap();
    assert_eq!(path, img.dir.join("vmlinux"));
    assert_eq!(kickvm_rig::default_vmlinux().unwrap(), path);
    let elf = std::fs::read(path).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 62, "x86-64");
    let modified = std::fs::metadata(path).unwrap().modified().unwrap();
    let again = rig().args(["image", "--print-vmlinux"]).output().unwrap();
    assert!(String::from_utf8_lossy(&again.stderr).is_empty(), "a second call extracts nothing");
    assert_eq!(std::fs::metadata(path).unwrap().modified().unwrap(), modified);
    let paths = rig().args(["image", "--print-paths"]).output().unwrap();
    let paths = String::from_utf8(paths.stdout).unwrap();
    assert_eq!(paths.split_whitespace().count(), 2, "{paths}");
    assert!(paths.starts_with(img.kernel.to_str().unwrap()), "{paths}");
}
