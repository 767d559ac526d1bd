//! End to end with hardware-speed virtualization: boots the guest image
//! with QEMU `-enable-kvm`. On hosts whose /dev/kvm cannot run a stock
//! kernel this test re-runs itself inside the rig's L1 (nested SVM).

use std::time::Instant;

use kickvm_rig::image;
use kickvm_rig::qemu::{self, Accel, BootOptions};

#[test]
fn guest_boots_under_kvm() {
    let t = Instant::now();
    if let Some(passed) = kickvm_rig::reexec_test_in_rig_if_needed("guest_boots_under_kvm") {
        eprintln!(
            "guest_boots_under_kvm (via the rig): {:.1} s",
            t.elapsed().as_secs_f64()
        );
        assert!(
            passed,
            "guest_boots_under_kvm failed inside the rig (output above)"
        );
        return;
    }
    assert!(
        kickvm_rig::host_kvm_is_usable(),
        "/dev/kvm must be usable here"
    );
    let img =
        kickvm_rig::default_image().expect("guest image is built (on the host, before the rig)");
    // /tmp is L1's own tmpfs inside the rig: fine for a scratch disk.
    let disk = std::env::temp_dir().join(format!("kickvm-kvm-script-{}.img", std::process::id()));
    image::write_script_disk(
        "echo l2-script-ran; grep -qw hypervisor /proc/cpuinfo && echo l2-is-a-guest; exit 5",
        &disk,
    )
    .unwrap();
    let mut opts = BootOptions::new(img);
    opts.accel = Accel::Kvm;
    opts.disks = vec![disk.clone()];
    let out = qemu::boot(&opts);
    let _ = std::fs::remove_file(&disk);
    let out = out.expect("guest boots under KVM");
    assert!(
        out.console.contains(image::INIT_START_MARKER),
        "{}",
        out.console
    );
    assert!(out.console.contains("l2-script-ran"), "{}", out.console);
    assert!(out.console.contains("l2-is-a-guest"), "{}", out.console);
    assert_eq!(out.exit_status, Some(5), "{}", out.console);
    eprintln!(
        "guest_boots_under_kvm: L2 boot-to-poweroff {:.1} s",
        out.elapsed.as_secs_f64()
    );
}
