//! The rig's one error type: a sentence saying what went wrong and, where
//! we know it, what to do about it. Printed on one line.

use std::fmt;

/// What went wrong (`what`) and how to fix it (`hint`), shown as one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// What failed, e.g. "apt-get download linux-image-amd64 failed".
    pub what: String,
    /// What the user can do about it, e.g. "run scripts/install-deps.sh".
    pub hint: Option<String>,
}

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An error without a hint.
    pub fn new(what: impl Into<String>) -> Self {
        Error {
            what: what.into(),
            hint: None,
        }
    }

    /// An error with a hint telling the user what to do.
    pub fn with_hint(what: impl Into<String>, hint: impl Into<String>) -> Self {
        Error {
            what: what.into(),
            hint: Some(hint.into()),
        }
    }

    /// Wraps an I/O error with what we were doing and on which path.
    pub fn io(doing: &str, path: &std::path::Path, e: std::io::Error) -> Self {
        Error::new(format!("{doing} {}: {e}", path.display()))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One line, always: callers print it as `kickvm-rig: <error>`.
        let what = self.what.replace('\n', " ");
        match &self.hint {
            Some(h) => write!(f, "{what} ({})", h.replace('\n', " ")),
            None => write!(f, "{what}"),
        }
    }
}

impl std::error::Error for Error {}
