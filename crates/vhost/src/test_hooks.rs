//! Test hooks: code a test makes the back-end's own main or protocol
//! thread run right after that thread installed its seccomp filter, to
//! show what the filter refuses. Compiled only for this crate's tests.

use std::sync::Mutex;

/// The thread a hook runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thread {
    Main,
    Protocol,
}

type Hook = Box<dyn FnOnce() + Send>;

static HOOKS: Mutex<Vec<(Thread, Hook)>> = Mutex::new(Vec::new());

/// Runs `f` on the next `thread` to install its filter.
pub fn set(thread: Thread, f: impl FnOnce() + Send + 'static) {
    HOOKS.lock().unwrap().push((thread, Box::new(f)));
}

/// Called by `thread` once filtered.
pub fn run(thread: Thread) {
    let hook = {
        let mut hooks = HOOKS.lock().unwrap_or_else(|e| e.into_inner());
        hooks.iter().position(|(t, _)| *t == thread).map(|i| hooks.remove(i).1)
    };
    if let Some(f) = hook {
        f();
    }
}
