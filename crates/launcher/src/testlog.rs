//! A `log::Log` for tests that counts what one test thread logs, so a test
//! can bound the lines a guest's mistakes cost (docs/security.md, class 4).
//!
//! Installed once for the whole test binary, at trace level; it keeps the
//! lines of threads inside [`capture`] only, so tests running in parallel
//! do not see each other's lines.

use std::cell::RefCell;
use std::sync::Once;

struct Capture;

static CAPTURE: Capture = Capture;

thread_local! {
    static LINES: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        LINES.with(|l| {
            if let Some(lines) = l.borrow_mut().as_mut() {
                lines.push(format!("{} {}", record.level(), record.args()));
            }
        });
    }

    fn flush(&self) {}
}

/// Runs `f` and returns what it logged on this thread, one string per
/// line (`"WARN message"`).
pub fn capture<R>(f: impl FnOnce() -> R) -> (R, Vec<String>) {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        log::set_logger(&CAPTURE).expect("no other logger in the kickvm test binary");
        log::set_max_level(log::LevelFilter::Trace);
    });
    LINES.with(|l| *l.borrow_mut() = Some(Vec::new()));
    let r = f();
    let lines = LINES.with(|l| l.borrow_mut().take()).unwrap_or_default();
    (r, lines)
}
