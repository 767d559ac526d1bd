//! The bench tools' command lines: help on stdout with status 0, one line
//! for a mistake with status 2, and no panic when the reader of either
//! stream has gone away (`kickvm-bench --help | head -c1`). Nothing is
//! measured here.

use std::process::{Command, Stdio};

const TOOLS: [&str; 2] = [env!("CARGO_BIN_EXE_kickvm-bench"), env!("CARGO_BIN_EXE_kickvm-vmm-bench")];

fn closed() -> Stdio {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    writer.into()
}

#[test]
fn help_is_on_stdout_with_status_0() {
    for tool in TOOLS {
        let out = Command::new(tool).arg("--help").output().expect("the tool runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{tool} --help: {}", String::from_utf8_lossy(&out.stderr));
        assert!(text.starts_with("usage: "), "{tool} --help:\n{text}");
    }
}

#[test]
fn a_mistake_is_one_line_naming_it() {
    for (tool, args, needle) in [
        (TOOLS[0], &["--bogus"][..], "--bogus"),
        (TOOLS[0], &["--seconds", "x"], "--seconds"),
        (TOOLS[0], &["first-touch", "--file"], "--file"),
        (TOOLS[1], &["--bogus"], "--bogus"),
        (TOOLS[1], &["--boot-runs", "x"], "--boot-runs x"),
        (TOOLS[1], &["--only", "boots"], "boots"),
        (TOOLS[1], &["--boot-runs"], "needs a value"),
    ] {
        let out = Command::new(tool).args(args).output().expect("the tool runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{tool} {args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{tool} {args:?}: want one line, got:\n{err}");
        assert!(err.contains(needle) && err.contains("--help"), "{tool} {args:?}: {err}");
        assert!(out.stdout.is_empty(), "{tool} {args:?}");
    }
}

#[test]
fn closed_stdout_and_stderr_are_not_a_panic() {
    for tool in TOOLS {
        for (args, code) in [(&["--help"][..], 0), (&["--bogus"], 2)] {
            let status =
                Command::new(tool).args(args).stdout(closed()).stderr(closed()).status().expect("the tool runs");
            assert_eq!(status.code(), Some(code), "{tool} {args:?} with stdout and stderr closed (101 is a panic)");
        }
    }
}

/// A QEMU that is not installed is skipped once, with the reason and the
/// fix, before anything runs (not one failed launch per run).
#[test]
fn a_missing_qemu_is_skipped_with_the_reason() {
    let out = Command::new(TOOLS[1])
        .args(["--only", "boot", "--boot-vmm", "pc", "--boot-runs", "1", "--out"])
        .arg(std::env::temp_dir().join(format!("kickvm-bench-cli-{}", std::process::id())))
        .env("KICKVM_QEMU", "/nonexistent/qemu-system-x86_64")
        .output()
        .expect("the tool runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("skipping QEMU: /nonexistent/qemu-system-x86_64 not found") && err.contains("install-deps.sh"),
        "{err}"
    );
    assert!(!err.contains("FAILED"), "{err}");
    // Nothing else was asked for: nothing is left to do, and it says so.
    assert!(err.contains("no VMM left to measure"), "{err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
}

/// `first-touch` on a file it cannot use: one line naming the file, status 1.
#[test]
fn first_touch_names_a_file_it_cannot_use() {
    let dir = std::env::temp_dir().join(format!("kickvm-bench-ft-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let small = dir.join("small");
    std::fs::write(&small, [7u8; 4096]).expect("a small file");
    for (file, needle) in [(dir.join("missing"), "cannot open"), (small, "shorter than 1 MiB")] {
        let out = Command::new(TOOLS[0]).arg("first-touch").arg("--file").arg(&file).output().expect("the tool runs");
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("");
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(last.contains(needle) && last.contains(&*file.to_string_lossy()), "{err}");
        assert!(out.stdout.is_empty(), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `first-touch` measures: its table has every row, and on any host a
/// first touch (allocate and zero) costs more than writing to the same
/// memory again.
#[test]
fn first_touch_measures_a_first_touch_dearer_than_a_second() {
    let dir = std::env::temp_dir().join(format!("kickvm-bench-ft2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let file = dir.join("four-mib");
    std::fs::write(&file, vec![0x5au8; 4 << 20]).expect("a 4 MiB file");
    let out = Command::new(TOOLS[0]).arg("first-touch").arg("--file").arg(&file).output().expect("the tool runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let row = |name: &str| -> f64 {
        let line = text.lines().find(|l| l.starts_with(&format!("| {name} |"))).unwrap_or_else(|| panic!("no row {name}:\n{text}"));
        line.split('|').nth(2).and_then(|v| v.trim().parse().ok()).unwrap_or_else(|| panic!("row {name}: {line}"))
    };
    for name in ["pread into fresh memory", "pread into backed memory", "memcpy from a mapping into backed memory"] {
        assert!(row(name) > 0.0, "{name}:\n{text}");
    }
    assert!(row("first touch") > row("touch again"), "{text}");
    assert!(text.contains("copies of the first 4 MiB"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
