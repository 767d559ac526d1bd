//! Opening the files the user names — kernel, initramfs, disks, console
//! file — so that a wrong path is one clear line, never a hang or a silent
//! surprise.
//!
//! The file's type is checked with `stat` *before* it is opened (opening a
//! fifo blocks until someone writes to it; opening a socket fails with a
//! puzzling "No such device or address"), opened with `O_NONBLOCK` so that
//! a path swapped for a fifo in between cannot block either, and checked
//! again on the open file. Nothing here ever creates a file.

use std::fs::{File, FileType, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// What kinds of file a use accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    /// A regular file (kernel, initramfs).
    Regular,
    /// A regular file or a block device (a disk).
    RegularOrBlock,
}

impl Accept {
    fn allows(self, ft: &FileType) -> bool {
        match self {
            Accept::Regular => ft.is_file(),
            Accept::RegularOrBlock => ft.is_file() || ft.is_block_device(),
        }
    }

    fn wanted(self) -> &'static str {
        match self {
            Accept::Regular => "a regular file",
            Accept::RegularOrBlock => "a regular file or a block device",
        }
    }
}

/// A user-named file that cannot be used, as one sentence.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{what} {path}: {reason}")]
    Open { what: &'static str, path: PathBuf, reason: String },
    #[error("{what} {path} is {kind}, not {wanted}")]
    WrongKind { what: &'static str, path: PathBuf, kind: &'static str, wanted: &'static str },
    #[error("{what} {path} is empty")]
    Empty { what: &'static str, path: PathBuf },
}

/// "a directory", "a fifo", ...: what a file is, for messages.
pub fn describe(ft: &FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a fifo"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_file() {
        "a regular file"
    } else {
        "not a file"
    }
}

/// An I/O error as a short phrase ("no such file", "permission denied").
pub fn io_reason(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOENT) => "no such file".into(),
        Some(libc::ENOTDIR) => "a directory on the path is not a directory".into(),
        Some(libc::EACCES) | Some(libc::EPERM) => "permission denied".into(),
        Some(libc::EROFS) => "read-only file system".into(),
        Some(libc::ELOOP) => "too many levels of symbolic links".into(),
        Some(libc::ENAMETOOLONG) => "path too long".into(),
        _ => e.to_string(),
    }
}

/// Opens `path` (read-only, or read-write with `write`) after checking it
/// is a kind of file `accept` allows. `what` names the use in messages
/// ("kernel", "disk"). Returns the file and its length (for a block
/// device, its size).
pub fn open(what: &'static str, path: &Path, accept: Accept, write: bool) -> Result<(File, u64), FileError> {
    let open_err = |e: &std::io::Error| FileError::Open { what, path: path.to_path_buf(), reason: io_reason(e) };
    let wrong = |ft: &FileType| FileError::WrongKind {
        what,
        path: path.to_path_buf(),
        kind: describe(ft),
        wanted: accept.wanted(),
    };
    let meta = std::fs::metadata(path).map_err(|e| open_err(&e))?;
    if !accept.allows(&meta.file_type()) {
        return Err(wrong(&meta.file_type()));
    }
    let mut file = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| open_err(&e))?;
    let meta = file.metadata().map_err(|e| open_err(&e))?;
    if !accept.allows(&meta.file_type()) {
        return Err(wrong(&meta.file_type()));
    }
    let len = if meta.file_type().is_block_device() {
        use std::io::Seek;
        file.seek(std::io::SeekFrom::End(0)).map_err(|e| open_err(&e))?
    } else {
        meta.len()
    };
    Ok((file, len))
}

/// Like [`open`] for a regular file that must not be empty.
pub fn open_nonempty(what: &'static str, path: &Path) -> Result<(File, u64), FileError> {
    let (file, len) = open(what, path, Accept::Regular, false)?;
    if len == 0 {
        return Err(FileError::Empty { what, path: path.to_path_buf() });
    }
    Ok((file, len))
}

/// True if the calling process may create entries in directory `dir`.
pub fn dir_writable(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return false };
    // SAFETY: `c` is a NUL-terminated path; access(2) only reads it.
    unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}

/// The directory a new file at `path` would be created in.
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> vmm_sys_util::tempdir::TempDir {
        vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/kickvm-hostfile").unwrap()
    }

    #[test]
    fn every_kind_of_wrong_file_is_named() {
        let d = scratch();
        let dir = d.as_path();
        let e = open("disk", dir, Accept::RegularOrBlock, false).unwrap_err().to_string();
        assert!(e.contains("is a directory, not a regular file or a block device"), "{e}");

        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Would block forever if it were opened like a file.
        let e = open("kernel", &fifo, Accept::Regular, false).unwrap_err().to_string();
        assert!(e.contains("is a fifo"), "{e}");

        let sock = dir.join("sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let e = open("initrd", &sock, Accept::Regular, false).unwrap_err().to_string();
        assert!(e.contains("is a socket"), "{e}");

        let e = open("disk", Path::new("/dev/null"), Accept::RegularOrBlock, true).unwrap_err().to_string();
        assert!(e.contains("is a character device"), "{e}");

        let e = open("disk", &dir.join("nope"), Accept::RegularOrBlock, true).unwrap_err().to_string();
        assert_eq!(e, format!("disk {}/nope: no such file", dir.display()));

        let empty = dir.join("empty");
        std::fs::write(&empty, b"").unwrap();
        let e = open_nonempty("initrd", &empty).unwrap_err().to_string();
        assert!(e.ends_with("is empty"), "{e}");
        std::fs::write(&empty, b"x").unwrap();
        assert_eq!(open_nonempty("initrd", &empty).unwrap().1, 1);
    }

    #[test]
    fn parent_of_a_bare_name_is_here() {
        assert_eq!(parent_dir(Path::new("sock")), Path::new("."));
        assert_eq!(parent_dir(Path::new("/tmp/sock")), Path::new("/tmp"));
        assert!(dir_writable(Path::new("/tmp")));
        assert!(!dir_writable(Path::new("/nonexistent")));
    }
}
