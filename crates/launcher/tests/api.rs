//! `kickvm --api-socket` driven by curl through every endpoint, with a
//! guest of a few instructions (it runs on the local kvm_pvm at native
//! speed), and `vm.add-net` with a real TAP's fd passed over the socket.

mod api_common;
mod common;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use api_common::*;

/// Names of the threads of process `pid`.
fn thread_names(pid: u32) -> Vec<String> {
    let mut names = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        if let Ok(n) = std::fs::read_to_string(t.path().join("comm")) {
            names.push(n.trim().to_string());
        }
    }
    names
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(10), "{what}: not within 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_endpoint_with_curl() {
    if let Some(why) = missing(true) {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = common::scratch("api-endpoints");
    let api = Api::start(&dir);
    let pid = api.child.id();

    let (code, body) = api.curl("GET", "vmm.ping", None);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((code, v["version"].as_str()), (200, Some(env!("CARGO_PKG_VERSION"))));
    assert_eq!(v["pid"].as_u64(), Some(u64::from(pid)));

    let kernel = halting_guest(&dir, b"hello from the API\n");
    assert_eq!(api.curl("PUT", "vm.create", Some(&create_body(&kernel))).0, 204);
    assert_eq!(api.state(), "Created");

    let disk = common::write(&dir, "disk.img", &vec![0u8; 1 << 20]);
    let (code, body) = api.curl("PUT", "vm.add-disk", Some(&format!(r#"{{"path":"{}","readonly":true}}"#, disk.display())));
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((v["id"].as_str(), v["bdf"].as_str()), (Some("blk0"), Some("0000:00:01.0")));

    // Nothing changes: a no-op; more vCPUs than max_vcpus: refused.
    assert_eq!(api.curl("PUT", "vm.resize", Some(r#"{"desired_vcpus":2}"#)).0, 204);
    assert_eq!(api.curl("PUT", "vm.resize", Some(r#"{"desired_vcpus":3}"#)).0, 400);

    let (code, body) = api.curl("GET", "vm.info", None);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(code, 200);
    assert_eq!(v["config"]["cpus"]["boot_vcpus"], 2);
    assert_eq!(v["config"]["disks"][0]["readonly"], true);
    assert_eq!(v["memory_actual_size"], 16u64 << 20);
    assert_eq!(v["device_tree"]["rng0"]["pci_bdf"], "0000:00:02.0");

    let (code, body) = api.curl("PUT", "vm.boot", None);
    assert_eq!(code, 204, "vm.boot: {body}");
    assert_eq!(api.state(), "Running");
    wait_for("vcpu0 and vcpu1 threads", || {
        let names = thread_names(pid);
        names.iter().any(|n| n == "vcpu0") && names.iter().any(|n| n == "vcpu1")
    });

    let (code, body) = api.curl("GET", "vm.counters", None);
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    for dev in ["blk0", "rng0"] {
        for key in ["q0_kicks", "q0_chains", "q0_bytes", "q0_interrupts", "q0_interrupts_suppressed", "q0_errors", "needs_reset"] {
            assert!(v[dev][key].is_u64(), "{dev}.{key} in {body}");
        }
    }

    // Hotplug: a disk added after boot goes into the first free slot
    // (blk0 is 01, rng0 02) and its queue counters are listed at once; the
    // same image again is refused as before boot. (That the guest sees it
    // is the rig's api_rig test.)
    let disk2 = common::write(&dir, "disk2.img", &vec![0u8; 1 << 20]);
    let (code, body) = api.curl("PUT", "vm.add-disk", Some(&format!(r#"{{"path":"{}"}}"#, disk2.display())));
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((v["id"].as_str(), v["bdf"].as_str()), (Some("blk1"), Some("0000:00:03.0")));
    let (code, body) = api.curl("PUT", "vm.add-disk", Some(&format!(r#"{{"path":"{}"}}"#, disk2.display())));
    assert!(code == 400 && body.contains("given twice"), "{code} {body}");
    let (_, info) = api.curl("GET", "vm.info", None);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["device_tree"]["blk1"]["pci_bdf"], "0000:00:03.0", "{info}");
    assert_eq!(v["config"]["disks"][1]["path"], disk2.to_str().unwrap());
    let (_, counters) = api.curl("GET", "vm.counters", None);
    assert!(serde_json::from_str::<serde_json::Value>(&counters).unwrap()["blk1"]["q0_kicks"].is_u64(), "{counters}");
    assert_eq!(api.curl("PUT", "vm.resize", Some(r#"{"desired_vcpus":1}"#)).0, 409);
    assert_eq!(api.curl("PUT", "vm.resize", Some(r#"{"desired_vcpus":2}"#)).0, 204);
    // The power button: pressed (this guest does not listen).
    let (code, body) = api.curl("PUT", "vm.power-button", None);
    assert_eq!(code, 204, "{body}");
    // Removal: only the last disk or card (ids follow the order); that the
    // guest ejects it is the rig's api_rig test (this guest never would).
    let (code, body) = api.curl("PUT", "vm.remove-device", Some(r#"{"id":"blk0"}"#));
    assert!(code == 400 && body.contains("only the last") && body.contains("blk1") && body.lines().count() == 1, "{code} {body}");
    let (code, body) = api.curl("PUT", "vm.remove-device", Some(r#"{"id":"rng0"}"#));
    assert!(code == 400 && body.contains("only disks"), "{code} {body}");
    assert_eq!(api.curl("PUT", "vm.remove-device", Some("{}")).0, 400);
    assert_eq!(api.state(), "Running");

    // A reboot builds the VM anew, with the disk plugged in since boot
    // now in the configuration's order: the guest prints again.
    assert_eq!(api.curl("PUT", "vm.reboot", None).0, 204);
    wait_for("Running after vm.reboot", || api.state() == "Running" && api.curl("GET", "vm.counters", None).0 == 200);
    let (_, info) = api.curl("GET", "vm.info", None);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["device_tree"]["blk1"]["pci_bdf"], "0000:00:02.0", "{info}");
    assert_eq!(v["device_tree"]["rng0"]["pci_bdf"], "0000:00:03.0", "{info}");

    assert_eq!(api.curl("PUT", "vm.shutdown", None).0, 204);
    assert_eq!(api.state(), "Shutdown");
    let left: Vec<String> = thread_names(pid).into_iter().filter(|n| n.starts_with("vcpu") || n.contains("-q")).collect();
    assert!(left.is_empty(), "threads left after vm.shutdown: {left:?}");
    assert_eq!(api.curl("GET", "vm.counters", None).0, 409);

    // Booted again from the same configuration.
    assert_eq!(api.curl("PUT", "vm.boot", None).0, 204);
    assert_eq!(api.state(), "Running");

    let out = api.exit_within_3s();
    assert_eq!(out.matches("hello from the API\n").count(), 3, "serial output: {out:?}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn delete_then_create_again() {
    if let Some(why) = missing(false) {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = common::scratch("api-delete");
    let api = Api::start(&dir);
    let kernel = halting_guest(&dir, b"x\n");
    assert_eq!(api.curl("PUT", "vm.create", Some(&create_body(&kernel))).0, 204);
    assert_eq!(api.curl("PUT", "vm.delete", None).0, 204);
    assert_eq!(api.curl("GET", "vm.info", None).0, 409);
    assert_eq!(api.curl("PUT", "vm.create", Some(&create_body(&kernel))).0, 204);
    api.exit_within_3s();
    let _ = std::fs::remove_dir_all(dir);
}

/// A TAP queue fd opened with a virtio-net header, in a network namespace
/// of its own (no interface appears in the host's): the fd, or why not.
fn private_tap(name: &str) -> Result<std::os::fd::OwnedFd, String> {
    let name = name.to_string();
    std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread, which ends here.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!("cannot unshare a network namespace: {}", std::io::Error::last_os_error()));
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|e| format!("/dev/net/tun: {e}"))?;
        let mut req = [0u8; 40];
        req[..name.len()].copy_from_slice(name.as_bytes());
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u16;
        req[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes one 40-byte struct ifreq.
        if unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, req.as_mut_ptr()) } != 0 {
            return Err(format!("TUNSETIFF: {}", std::io::Error::last_os_error()));
        }
        Ok(f.into())
    })
    .join()
    .unwrap()
}

#[test]
fn add_net_takes_a_tap_fd_over_the_socket() {
    if let Some(why) = missing(true) {
        eprintln!("skipped: {why}");
        return;
    }
    let tap = match private_tap("kvapi0") {
        Ok(t) => t,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let dir = common::scratch("api-net");
    let api = Api::start(&dir);
    let kernel = halting_guest(&dir, b"net\n");
    assert_eq!(api.curl("PUT", "vm.create", Some(&create_body(&kernel))).0, 204);

    let s = UnixStream::connect(&api.sock).unwrap();
    // Two fds for one queue pair: refused, nothing kept.
    let (code, body) = raw_request(&s, "PUT", "vm.add-net", r#"{"mac":"52:54:00:aa:bb:01"}"#, &[tap.as_raw_fd(), tap.as_raw_fd()]);
    assert!(code == 400 && body.contains("one TAP fd per pair"), "{code} {body}");
    // Not a TAP: refused with what to do.
    let not_tap = std::fs::File::open("/dev/null").unwrap();
    let (code, body) = raw_request(&s, "PUT", "vm.add-net", "{}", &[not_tap.as_raw_fd()]);
    assert!(code == 400 && body.contains("IFF_VNET_HDR"), "{code} {body}");
    // On the same keep-alive connection, the real one.
    let (code, body) = raw_request(&s, "PUT", "vm.add-net", r#"{"mac":"52:54:00:aa:bb:01"}"#, &[tap.as_raw_fd()]);
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((v["id"].as_str(), v["bdf"].as_str()), (Some("net0"), Some("0000:00:01.0")));
    drop(tap); // kickvm holds its own copy now

    let (_, info) = api.curl("GET", "vm.info", None);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["config"]["net"][0]["tap"], "kvapi0");
    assert_eq!(v["config"]["net"][0]["mac"], "52:54:00:aa:bb:01");

    let (code, body) = api.curl("PUT", "vm.boot", None);
    assert_eq!(code, 204, "vm.boot: {body}");
    let (_, counters) = api.curl("GET", "vm.counters", None);
    let v: serde_json::Value = serde_json::from_str(&counters).unwrap();
    assert!(v["net0"]["q2_kicks"].is_u64(), "rx, tx and control queues: {counters}");

    // After boot: plugged in (net0 01, rng0 02), with its queues; a card
    // by TAP name is refused after boot (its fd must come along).
    let tap2 = private_tap("kvapi1").unwrap();
    let (code, body) = raw_request(&s, "PUT", "vm.add-net", r#"{"mac":"52:54:00:aa:bb:02"}"#, &[tap2.as_raw_fd()]);
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((v["id"].as_str(), v["bdf"].as_str()), (Some("net1"), Some("0000:00:03.0")));
    let (_, counters) = api.curl("GET", "vm.counters", None);
    let v: serde_json::Value = serde_json::from_str(&counters).unwrap();
    assert!(v["net1"]["q1_kicks"].is_u64(), "{counters}");
    let (code, body) = raw_request(&s, "PUT", "vm.add-net", r#"{"tap":"kvnew0"}"#, &[]);
    assert!(code == 400 && body.contains("comes with its TAP fd"), "{code} {body}");
    drop(s);
    api.exit_within_3s();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn run_prints_a_counter_summary_at_exit_under_rust_log_info() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = common::scratch("api-summary");
    let code = common::serial_then_out(b"bye\n", 0x3c0, (5 << 2) | (1 << 5));
    let k = common::write(&dir, "bzImage", &common::fake_bzimage(&code));
    let out = common::kickvm()
        .args(["run", "--kernel", k.to_str().unwrap(), "--memory", "16M", "--rng", "--allow-slow-kvm"])
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("rng0: 1 queues: 0 kicks, 0 chains, 0 bytes, 0 interrupts (0 suppressed), 0 errors"),
        "{stderr}"
    );
    let quiet = common::kickvm()
        .args(["run", "--kernel", k.to_str().unwrap(), "--memory", "16M", "--rng", "--allow-slow-kvm"])
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&quiet.stderr).contains("kicks"), "no summary without RUST_LOG=info");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_api_socket_paths_are_one_line() {
    let dir = common::scratch("api-paths");
    let file = common::write(&dir, "file", b"x");
    let long = format!("/tmp/{}", "s".repeat(120));
    for (path, words) in [
        ("/nonexistent/dir/x.sock".to_string(), "directory /nonexistent/dir does not exist"),
        (file.display().to_string(), "exists and is not a socket"),
        (long, "at most 107 bytes"),
        ("fd=3".to_string(), "give path=PATH"),
    ] {
        let out = common::run(&["--api-socket", &path]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(words) && err.lines().count() == 1, "{path}: {err}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
