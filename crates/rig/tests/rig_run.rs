//! `kickvm-rig run`: output and exit status of a failing command come back
//! from L1, and a command that hangs is killed at the timeout. One L1 boot
//! per test; the tests take turns (two L1s on two cores would crawl).

use std::process::Command;
use std::sync::Mutex;
use std::time::Instant;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn rig_run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kickvm-rig"))
        .arg("run")
        .args(args)
        .output()
        .expect("kickvm-rig runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn failing_command_reports_its_status_and_output() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let t = Instant::now();
    let (code, out, err) = rig_run(&["--", "sh", "-c", "echo boom; echo in-rig=$KICKVM_IN_RIG; test -c /dev/kvm && echo has-kvm; echo bang >&2; exit 3"]);
    eprintln!("{err}");
    assert_eq!(code, 3, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("boom"), "{out}");
    assert!(out.contains("in-rig=1"), "{out}");
    assert!(out.contains("has-kvm"), "L1 has no /dev/kvm: {out}");
    assert!(err.contains("bang"), "{err}");
    assert!(err.contains("rig: L1 booted in"), "{err}");
    assert!(err.contains("exit status 3"), "{err}");
    eprintln!(
        "failing_command_reports_its_status_and_output: {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

#[test]
fn hanging_command_is_killed_at_the_timeout() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let t = Instant::now();
    let (code, out, err) = rig_run(&[
        "--timeout",
        "20",
        "--",
        "sh",
        "-c",
        "echo started; sleep 600",
    ]);
    assert_eq!(code, 124, "stdout: {out}\nstderr: {err}");
    let line = err
        .lines()
        .find(|l| l.contains("timed out"))
        .unwrap_or_else(|| panic!("no timeout message: {err}"));
    assert!(
        line.contains("rig timed out after 20 s")
            && line.contains("L1 was killed")
            && line.contains("console log"),
        "{line}"
    );
    assert!(
        t.elapsed().as_secs() < 60,
        "the rig did not stop at its timeout"
    );
    eprintln!("{line}");
    // The rig keeps the failed run's directory for its console log: remove it.
    if let Some(log) = line
        .split("L1 console log: ")
        .nth(1)
        .and_then(|r| r.split(';').next())
    {
        let log = std::path::Path::new(log.trim());
        assert!(
            log.is_file(),
            "the console log {} is missing",
            log.display()
        );
        // L1's vCPUs as QEMU's monitor saw them before the kill, twice.
        let cpus = log.with_file_name("l1-cpus.txt");
        let regs = std::fs::read_to_string(&cpus).unwrap_or_default();
        assert!(
            regs.matches("RIP=").count() >= 2 && line.contains(&cpus.display().to_string()),
            "{}: {regs}",
            cpus.display()
        );
        if let Some(dir) = log
            .parent()
            .filter(|d| d.to_string_lossy().contains("kickvm-rig-"))
        {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    eprintln!(
        "hanging_command_is_killed_at_the_timeout: {:.1} s",
        t.elapsed().as_secs_f64()
    );
}
