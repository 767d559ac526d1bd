//! Boots the guest directly under QEMU TCG with a virtio-blk disk (a real
//! file) and virtio-net on a TAP device inside a network namespace made
//! for the test; the guest pings the TAP's address and copies data to and
//! from the disk. Traffic never leaves the namespace.

use std::process::Command;
use std::time::Instant;

use kickvm_rig::image;
use kickvm_rig::qemu::{self, Accel, BootOptions};

/// A network namespace with a TAP device at 10.0.2.2/24; deleted on drop.
struct TapNamespace {
    name: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2) runs; see scripts/install-deps.sh");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TapNamespace {
    fn new(name: &str, tap: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name]);
        let ns = TapNamespace {
            name: name.to_owned(),
        };
        ip(&["-n", name, "link", "set", "lo", "up"]);
        ip(&["-n", name, "tuntap", "add", "dev", tap, "mode", "tap"]);
        ip(&["-n", name, "addr", "add", "10.0.2.2/24", "dev", tap]);
        ip(&["-n", name, "link", "set", tap, "up"]);
        ns
    }
}

impl Drop for TapNamespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

const PATTERN: &str = "kickvm-disk-pattern\n";

#[test]
fn guest_pings_over_tap_and_uses_a_disk_under_tcg() {
    let t = Instant::now();
    let img = kickvm_rig::default_image().expect("guest image builds");
    let ns = TapNamespace::new(&format!("kickvm-tcg-{}", std::process::id()), "tap0");
    let disk = std::env::temp_dir().join(format!("kickvm-data-disk-{}.img", std::process::id()));
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();

    let script = format!(
        "set -e
ip addr show eth0
ls /sys/class/net/eth0/queues
ping -c 3 10.0.2.2
yes '{p}' | head -c 1048576 > /tmp/pattern
dd if=/tmp/pattern of=/dev/vda bs=64k count=16 conv=fsync
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back bs=64k count=16
cmp /tmp/pattern /tmp/back
echo disk-roundtrip-ok",
        p = PATTERN.trim_end()
    );
    let mut opts = BootOptions::new(img);
    opts.accel = Accel::Tcg;
    opts.netns = Some(ns.name.clone());
    opts.tap = Some("tap0".into());
    opts.disks = vec![disk.clone()];
    opts.script = Some(script);
    opts.append = "kickvm.ip=10.0.2.15/24".into();
    let out = qemu::boot(&opts);
    let written = std::fs::read(&disk).unwrap_or_default();
    let _ = std::fs::remove_file(&disk);
    drop(ns);
    let out = out.expect("guest boots");

    assert!(
        out.console.contains(image::INIT_START_MARKER),
        "{}",
        out.console
    );
    assert!(
        out.console
            .contains("3 packets transmitted, 3 packets received"),
        "{}",
        out.console
    );
    assert!(out.console.contains("disk-roundtrip-ok"), "{}", out.console);
    assert_eq!(out.exit_status, Some(0), "{}", out.console);
    // What the guest wrote reached the host file.
    assert!(
        written.starts_with(PATTERN.repeat(100).as_bytes()),
        "the disk file lacks the guest's pattern"
    );
    eprintln!(
        "guest_pings_over_tap_and_uses_a_disk_under_tcg: guest {:.1} s, test {:.1} s",
        out.elapsed.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
}
