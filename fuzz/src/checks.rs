//! Oracles besides "no panic": log floods, leaked threads and fds.
//!
//! - Every log record (info and above) is counted per call site
//!   (`file:line`) during one run of the target. A site that logs more than
//!   [`log_limit`] lines in one run is not rate-limited: a guest can flood
//!   the host's log through it (issue 8, class 4). `KICKVM_FUZZ_LOG=1`
//!   prints every line (and the count per site at the end of a run);
//!   `KICKVM_FUZZ_LOG_IGNORE=virtio-queue` skips sites whose `file:line`
//!   contains that text (to fuzz on past a known, open flood).
//! - [`Census`]: the process's threads and fds before a run must be the
//!   same after it (queue threads stopped, eventfds closed): always on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

/// Call sites left out of the flood check (`KICKVM_FUZZ_LOG_IGNORE`:
/// comma-separated parts of `file:line`), to fuzz on past a known, open
/// flood.
fn ignored(site: &str) -> bool {
    static IGNORE: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    IGNORE
        .get_or_init(|| {
            std::env::var("KICKVM_FUZZ_LOG_IGNORE")
                .map(|v| v.split(',').filter(|p| !p.is_empty()).map(String::from).collect())
                .unwrap_or_default()
        })
        .iter()
        .any(|p| site.contains(p.as_str()))
}

/// Lines one call site may log in one run (`KICKVM_FUZZ_LOG_LIMIT`,
/// default 64: a [`kickvm_virtio::ratelimit::Throttle`] logs 10 + one per
/// power of two, 23 lines for 65 536 events, per device).
pub fn log_limit() -> usize {
    static LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var("KICKVM_FUZZ_LOG_LIMIT").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
    })
}

struct Site {
    lines: usize,
    first: String,
}

static SITES: Mutex<Option<HashMap<String, Site>>> = Mutex::new(None);
static PRINT: AtomicBool = AtomicBool::new(false);

struct CountingLogger;

impl log::Log for CountingLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Info
    }

    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        // Formatting runs the Display impls a real logger would.
        let line = format!("{} {}: {}", r.level(), r.target(), r.args());
        if PRINT.load(Ordering::Relaxed) {
            eprintln!("[log] {line}");
        }
        let site = format!("{}:{}", r.file().unwrap_or("?"), r.line().unwrap_or(0));
        let mut sites = SITES.lock().unwrap_or_else(|e| e.into_inner());
        let s = sites.get_or_insert_with(HashMap::new).entry(site).or_insert(Site { lines: 0, first: line });
        s.lines += 1;
    }

    fn flush(&self) {}
}

/// Installs the counting logger (once per process).
pub fn install_logger() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        PRINT.store(std::env::var("KICKVM_FUZZ_LOG").is_ok_and(|v| v == "1"), Ordering::Relaxed);
        let _ = log::set_logger(&CountingLogger);
        log::set_max_level(log::LevelFilter::Info);
    });
}

/// Forgets the counts (start of a run).
pub fn log_begin() {
    install_logger();
    let mut sites = SITES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = sites.as_mut() {
        s.clear();
    }
}

/// End of a run: panics if a call site logged more than [`log_limit`]
/// lines.
pub fn log_end() {
    let mut sites = SITES.lock().unwrap_or_else(|e| e.into_inner());
    let Some(map) = sites.as_mut() else { return };
    if PRINT.load(Ordering::Relaxed) {
        for (site, s) in map.iter() {
            eprintln!("[log] {site}: {} lines this run", s.lines);
        }
    }
    if let Some((site, s)) = map.iter().find(|(site, s)| s.lines > log_limit() && !ignored(site)) {
        let (site, lines, first) = (site.clone(), s.lines, s.first.clone());
        map.clear();
        drop(sites);
        panic!(
            "log flood: {site} logged {lines} lines in one run (limit {}): a guest-triggerable \
             message is not rate-limited; first: {first}",
            log_limit()
        );
    }
    map.clear();
}

/// Threads and open fds of the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Census {
    pub threads: usize,
    pub fds: usize,
}

fn count_dir(p: &str) -> usize {
    std::fs::read_dir(p).map(|d| d.count()).unwrap_or(0)
}

impl Census {
    pub fn take() -> Census {
        Census { threads: count_dir("/proc/self/task"), fds: count_dir("/proc/self/fd") }
    }

    /// Panics unless the process is back to `self` within a short grace
    /// period (a joined thread may linger in /proc for a moment).
    pub fn expect_back(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_millis(200);
        loop {
            let now = Census::take();
            if now.threads <= self.threads && now.fds <= self.fds {
                return;
            }
            if Instant::now() > deadline {
                let names = thread_names();
                panic!(
                    "{what} leaked: {} threads and {} fds before, {} and {} after teardown; threads now: {names:?}",
                    self.threads, self.fds, now.threads, now.fds
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn thread_names() -> Vec<String> {
    let Ok(d) = std::fs::read_dir("/proc/self/task") else { return Vec::new() };
    d.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
        .map(|s| s.trim().to_string())
        .collect()
}
