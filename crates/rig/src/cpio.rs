//! Writes initramfs archives: the "newc" cpio format the kernel unpacks
//! at boot, compressed with the system's `gzip`. Small enough to write by
//! hand (a header of 13 hex fields per entry); written here so the image
//! builder needs no `cpio` tool and no extra crate.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{Error, Result};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// A cpio "newc" archive being written to `out`. Parent directories of
/// every entry are added automatically, once each.
pub struct Archive<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
    dirs: BTreeSet<String>,
}

fn pad4(n: u64) -> usize {
    ((4 - (n % 4)) % 4) as usize
}

impl<W: Write> Archive<W> {
    /// Starts an archive on `out`.
    pub fn new(out: W) -> Self {
        Archive {
            out,
            next_ino: 1,
            written: 0,
            dirs: BTreeSet::new(),
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0,
            0,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.written += (header.len() + name.len() + 1) as u64;
        let p = pad4(self.written);
        self.out.write_all(&[0; 4][..p])?;
        self.written += p as u64;
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        let p = pad4(self.written);
        self.out.write_all(&[0; 4][..p])?;
        self.written += p as u64;
        Ok(())
    }

    fn parents(&mut self, path: &str) -> io::Result<()> {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if self.dirs.insert(prefix.clone()) {
                self.entry(&prefix.clone(), S_IFDIR | 0o755, (0, 0), &[])?;
            }
        }
        Ok(())
    }

    /// Adds a directory (and its parents). `path` is relative, e.g. `usr/bin`.
    pub fn dir(&mut self, path: &str) -> io::Result<()> {
        let path = path.trim_matches('/');
        self.parents(path)?;
        if self.dirs.insert(path.to_owned()) {
            self.entry(path, S_IFDIR | 0o755, (0, 0), &[])?;
        }
        Ok(())
    }

    /// Adds a regular file with the given permission bits.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let path = path.trim_matches('/');
        self.parents(path)?;
        self.entry(path, S_IFREG | (perm & 0o7777), (0, 0), data)
    }

    /// Adds a symbolic link `path` -> `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let path = path.trim_matches('/');
        self.parents(path)?;
        self.entry(path, S_IFLNK | 0o777, (0, 0), target.as_bytes())
    }

    /// Adds a character device node (e.g. `dev/console`, 5:1).
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        let path = path.trim_matches('/');
        self.parents(path)?;
        self.entry(path, S_IFCHR | (perm & 0o7777), (major, minor), &[])
    }

    /// Writes the trailer and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Builds `dest` (a gzip-compressed initramfs) by streaming the archive
/// that `fill` writes through `gzip`. The file appears only when complete.
pub fn write_gzipped(
    dest: &Path,
    fill: impl FnOnce(&mut Archive<&mut dyn Write>) -> Result<()>,
) -> Result<()> {
    let tmp = PathBuf::from(format!("{}.tmp{}", dest.display(), std::process::id()));
    let file = fs::File::create(&tmp).map_err(|e| Error::io("cannot create", &tmp, e))?;
    let mut gzip = Command::new("gzip")
        .args(["-6", "-n", "-c"])
        .stdin(Stdio::piped())
        .stdout(file)
        .spawn()
        .map_err(|e| Error::with_hint(format!("cannot run gzip: {e}"), "install gzip"))?;
    let result = (|| {
        let stdin = gzip
            .stdin
            .as_mut()
            .ok_or_else(|| Error::new("gzip has no stdin"))?;
        let mut buffered = io::BufWriter::with_capacity(1 << 20, stdin);
        let mut archive = Archive::new(&mut buffered as &mut dyn Write);
        fill(&mut archive)?;
        archive
            .finish()
            .map_err(|e| Error::io("cannot write initramfs", dest, e))?;
        buffered
            .flush()
            .map_err(|e| Error::io("cannot write initramfs", dest, e))?;
        Ok(())
    })();
    drop(gzip.stdin.take());
    let status = gzip.wait().map_err(|e| Error::new(format!("gzip: {e}")))?;
    result?;
    if !status.success() {
        return Err(Error::new(format!(
            "gzip failed writing {}",
            dest.display()
        )));
    }
    fs::rename(&tmp, dest).map_err(|e| Error::io("cannot move initramfs to", dest, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let mut a = Archive::new(Vec::new());
        a.file("bin/x", 0o755, b"hello").unwrap();
        a.symlink("bin/sh", "busybox").unwrap();
        let out = a.finish().unwrap();
        let text = String::from_utf8_lossy(&out);
        // Parent dir first, then the file, the symlink and the trailer.
        assert!(text.starts_with("070701"));
        let bin = text.find("bin\0").unwrap();
        let x = text.find("bin/x\0").unwrap();
        assert!(bin < x);
        assert!(text.contains("hello"));
        assert!(text.contains("TRAILER!!!"));
        assert_eq!(out.len() % 4, 0);
        // The file entry's header says regular file 0755 and size 5.
        let hdr = &text[x - 110..x];
        assert_eq!(&hdr[14..22], "000081ed");
        assert_eq!(&hdr[54..62], "00000005");
    }

    #[test]
    fn cpio_tool_can_read_it_if_present() {
        let mut a = Archive::new(Vec::new());
        a.file("etc/hello", 0o644, b"hi\n").unwrap();
        a.char_dev("dev/console", 0o600, 5, 1).unwrap();
        let out = a.finish().unwrap();
        let Ok(mut child) = Command::new("cpio")
            .args(["-t"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
        else {
            return; // no cpio tool: the layout test above covers the format
        };
        child.stdin.take().unwrap().write_all(&out).unwrap();
        let listing = String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap();
        assert!(listing.contains("etc/hello"), "{listing}");
        assert!(listing.contains("dev/console"), "{listing}");
    }
}
