//! Just enough ELF64 (little-endian) reading for the image builder: the
//! `.modinfo` strings of a kernel module (for `depends=`), and the
//! `DT_NEEDED` / `PT_INTERP` entries of a program (to copy the shared
//! libraries it loads). Written by hand because it is ~100 lines and the
//! workspace carries no ELF crate; anything malformed is an error, never a
//! panic.

use crate::error::{Error, Result};

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<usize> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?) as usize)
}

/// A section header: where its bytes are in the file.
#[derive(Debug, Clone, Copy)]
struct Section {
    name: u32,
    kind: u32,
    offset: usize,
    size: usize,
    link: u32,
}

/// A parsed view over the bytes of an ELF64 file.
pub struct Elf<'a> {
    bytes: &'a [u8],
    sections: Vec<Section>,
    shstrndx: usize,
}

const SHT_DYNAMIC: u32 = 6;
const PT_INTERP: u32 = 3;
const DT_NEEDED: usize = 1;

impl<'a> Elf<'a> {
    /// Parses the ELF header and section headers.
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        let bad = || Error::new("not a 64-bit little-endian ELF file");
        if bytes.get(0..4) != Some(b"\x7fELF")
            || bytes.get(4) != Some(&2)
            || bytes.get(5) != Some(&1)
        {
            return Err(bad());
        }
        let shoff = u64_at(bytes, 0x28).ok_or_else(bad)?;
        let shentsize = u16_at(bytes, 0x3a).ok_or_else(bad)? as usize;
        let shnum = u16_at(bytes, 0x3c).ok_or_else(bad)? as usize;
        let shstrndx = u16_at(bytes, 0x3e).ok_or_else(bad)? as usize;
        let mut sections = Vec::with_capacity(shnum);
        for i in 0..shnum {
            let h = shoff + i * shentsize;
            sections.push(Section {
                name: u32_at(bytes, h).ok_or_else(bad)?,
                kind: u32_at(bytes, h + 4).ok_or_else(bad)?,
                offset: u64_at(bytes, h + 0x18).ok_or_else(bad)?,
                size: u64_at(bytes, h + 0x20).ok_or_else(bad)?,
                link: u32_at(bytes, h + 0x28).ok_or_else(bad)?,
            });
        }
        Ok(Elf {
            bytes,
            sections,
            shstrndx,
        })
    }

    fn data(&self, s: &Section) -> &'a [u8] {
        self.bytes
            .get(s.offset..s.offset.saturating_add(s.size))
            .unwrap_or(&[])
    }

    fn cstr(b: &[u8], off: usize) -> Option<&str> {
        let rest = b.get(off..)?;
        let end = rest.iter().position(|&c| c == 0)?;
        std::str::from_utf8(&rest[..end]).ok()
    }

    /// The bytes of the section called `name`, if there is one.
    pub fn section(&self, name: &str) -> Option<&'a [u8]> {
        let names = self.data(self.sections.get(self.shstrndx)?);
        self.sections
            .iter()
            .find(|s| Self::cstr(names, s.name as usize) == Some(name))
            .map(|s| self.data(s))
    }

    /// The `key=value` strings of a kernel module's `.modinfo` section.
    pub fn modinfo(&self) -> Vec<&'a str> {
        self.section(".modinfo")
            .unwrap_or(&[])
            .split(|&c| c == 0)
            .filter_map(|s| std::str::from_utf8(s).ok())
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// The sonames a program or library asks the dynamic loader for.
    pub fn needed(&self) -> Vec<String> {
        let Some(dynamic) = self.sections.iter().find(|s| s.kind == SHT_DYNAMIC) else {
            return Vec::new();
        };
        let Some(strtab) = self.sections.get(dynamic.link as usize) else {
            return Vec::new();
        };
        let (dyn_bytes, strs) = (self.data(dynamic), self.data(strtab));
        dyn_bytes
            .chunks_exact(16)
            .filter_map(|e| Some((u64_at(e, 0)?, u64_at(e, 8)?)))
            .take_while(|&(tag, _)| tag != 0)
            .filter(|&(tag, _)| tag == DT_NEEDED)
            .filter_map(|(_, off)| Self::cstr(strs, off).map(str::to_owned))
            .collect()
    }

    /// The program interpreter (dynamic loader path), if any.
    pub fn interpreter(&self) -> Option<String> {
        let phoff = u64_at(self.bytes, 0x20)?;
        let phentsize = u16_at(self.bytes, 0x36)? as usize;
        let phnum = u16_at(self.bytes, 0x38)? as usize;
        (0..phnum).find_map(|i| {
            let h = phoff + i * phentsize;
            if u32_at(self.bytes, h)? != PT_INTERP {
                return None;
            }
            let (off, size) = (u64_at(self.bytes, h + 8)?, u64_at(self.bytes, h + 0x20)?);
            Self::cstr(self.bytes.get(off..off + size)?, 0).map(str::to_owned)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_non_elf() {
        assert!(Elf::parse(b"#!/bin/sh\n").is_err());
        assert!(Elf::parse(b"\x7fELF\x02\x01").is_err());
    }

    #[test]
    fn reads_own_test_binary() {
        // The test binary itself is a dynamically linked ELF with libc.
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let elf = Elf::parse(&exe).unwrap();
        assert!(elf.needed().iter().any(|n| n.starts_with("libc.so")));
        assert!(elf.interpreter().unwrap().contains("ld-linux"));
    }
}
