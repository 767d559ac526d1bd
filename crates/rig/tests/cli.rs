//! The CLI's help and its one-line errors (no guest boots here).

use std::process::Command;

fn rig() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kickvm-rig"))
}

/// Runs the CLI and returns (exit code, stdout, stderr).
fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().expect("kickvm-rig runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn help_teaches_every_command() {
    let (code, out, _) = run(rig().arg("--help"));
    assert_eq!(code, 0);
    for word in [
        "kickvm-rig image",
        "kickvm-rig run",
        "kickvm-rig boot-qemu",
        "KICKVM-EXIT-STATUS",
        "KICKVM_CACHE",
    ] {
        assert!(out.contains(word), "help lacks {word}:\n{out}");
    }
}

#[test]
fn unknown_option_is_one_line_pointing_at_help() {
    let (code, _, err) = run(rig().args(["run", "--bogus"]));
    assert_eq!(code, 2);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("--bogus") && err.contains("kickvm-rig help"),
        "{err}"
    );
}

#[test]
fn missing_image_files_say_how_to_build_them() {
    let (code, _, err) = run(rig().args([
        "boot-qemu",
        "--kernel",
        "/nonexistent/vmlinuz",
        "--initrd",
        "/nonexistent/initrd",
        "--cmd",
        "true",
    ]));
    assert_eq!(code, 2);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("/nonexistent/vmlinuz does not exist") && err.contains("kickvm-rig image"),
        "{err}"
    );
}

#[test]
fn missing_image_inside_rig_says_build_on_host() {
    let empty = std::env::temp_dir().join(format!("kickvm-empty-cache-{}", std::process::id()));
    let (code, _, err) = run(rig()
        .arg("image")
        .env("KICKVM_IN_RIG", "1")
        .env("KICKVM_CACHE", &empty));
    let _ = std::fs::remove_dir_all(&empty);
    assert_eq!(code, 2);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("no guest image")
            && err.contains("build it on the host first: kickvm-rig image"),
        "{err}"
    );
}

#[test]
fn missing_package_is_one_line_with_the_fix() {
    let e = kickvm_rig::debs::candidates(&["kickvm-no-such-package".to_owned()])
        .unwrap_err()
        .to_string();
    assert!(!e.contains('\n'), "{e}");
    assert!(
        e.contains("'kickvm-no-such-package' is not known to apt") && e.contains("apt-get update"),
        "{e}"
    );
}

#[test]
fn missing_qemu_says_how_to_install_it() {
    let img = kickvm_rig::default_image().expect("guest image builds");
    let (code, _, err) = run(rig()
        .args(["boot-qemu", "--cmd", "true", "--kernel"])
        .arg(&img.kernel)
        .arg("--initrd")
        .arg(&img.initrd)
        .env("KICKVM_QEMU", "/nonexistent/qemu-system-x86_64"));
    assert_eq!(code, 2);
    assert!(
        err.contains("not found") && err.contains("scripts/install-deps.sh"),
        "{err}"
    );
}

#[test]
fn print_vmlinux_is_one_path_and_does_not_mix_with_print_paths() {
    let (code, _, err) = run(rig().args(["image", "--print-paths", "--print-vmlinux"]));
    assert_eq!(code, 2);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("use one"), "{err}");
    // Inside the rig the cache is read-only: a vmlinux not extracted on the
    // host is a one-line error saying so.
    let cache = std::env::temp_dir().join(format!("kickvm-novmlinux-cache-{}", std::process::id()));
    let dir = cache.join("images/guest-0");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(cache.join("images/guest.current"), "guest-0").unwrap();
    std::fs::write(dir.join("vmlinuz"), b"not extracted").unwrap();
    let (code, out, err) = run(rig()
        .args(["image", "--print-vmlinux"])
        .env("KICKVM_IN_RIG", "1")
        .env("KICKVM_CACHE", &cache));
    let _ = std::fs::remove_dir_all(&cache);
    assert_ne!(code, 0);
    assert!(out.is_empty(), "{out}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("no vmlinux") && err.contains("kickvm-rig image --print-vmlinux"), "{err}");
}

/// A reader that went away before the answer (`| head -c0`) is not a
/// crash: the answer is dropped, the status is the command's own. The same
/// for stderr, where every error and progress line goes.
#[test]
fn a_closed_stdout_or_stderr_is_not_a_panic() {
    let closed = || {
        let (reader, writer) = std::io::pipe().expect("a pipe");
        drop(reader);
        writer
    };
    let out = rig().arg("host-kvm").stdout(closed()).output().expect("kickvm-rig runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(matches!(out.status.code(), Some(0 | 1)), "{:?}: {err}", out.status);
    // Errors and help with both streams closed: the status tells.
    for (args, code) in [(&["run", "--bogus"][..], 2), (&["bogus"], 2), (&["help"], 0), (&["image", "--help"], 0)] {
        let status = rig().args(args).stdout(closed()).stderr(closed()).status().expect("kickvm-rig runs");
        assert_eq!(status.code(), Some(code), "kickvm-rig {args:?} with stdout and stderr closed");
    }
}

/// Every command's `--help` is the help, on stdout, status 0 (not an
/// "unknown option").
#[test]
fn every_command_takes_help() {
    for cmd in ["image", "run", "boot-qemu"] {
        for flag in ["--help", "-h"] {
            let (code, out, err) = run(rig().args([cmd, flag]));
            assert_eq!(code, 0, "kickvm-rig {cmd} {flag}: {err}");
            assert!(out.contains(&format!("kickvm-rig {cmd}")), "kickvm-rig {cmd} {flag}:\n{out}");
        }
    }
}
