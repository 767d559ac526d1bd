//! Kernel modules out of an unpacked Debian kernel package. Debian ships
//! no `modules.dep` (depmod runs at install time), so each module's
//! dependencies come from the `depends=` string in its `.modinfo` section.
//! [`ModuleTree::resolve`] turns "the modules I want" into "the `.ko` files
//! to `insmod`, dependencies first".

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use crate::elf::Elf;
use crate::error::{Error, Result};

/// The modules of one kernel version, indexed by name.
pub struct ModuleTree {
    /// `lib/modules/<version>` inside the unpacked package.
    pub dir: PathBuf,
    /// The kernel version, e.g. `6.1.0-56-cloud-amd64`.
    pub version: String,
    /// Module name (with `_`, as the kernel spells it) to its `.ko` file.
    files: BTreeMap<String, PathBuf>,
    /// Modules compiled into the kernel (from `modules.builtin`).
    builtin: BTreeSet<String>,
}

/// The kernel's spelling of a module name: `kvm-amd` and `kvm_amd` are one.
pub fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

impl ModuleTree {
    /// Indexes the single `lib/modules/<version>` of an unpacked kernel package.
    pub fn open(pkg_root: &Path) -> Result<ModuleTree> {
        let base = pkg_root.join("lib/modules");
        let version = fs::read_dir(&base)
            .map_err(|e| Error::io("kernel package has no modules directory", &base, e))?
            .flatten()
            .find(|e| e.path().is_dir())
            .and_then(|e| e.file_name().into_string().ok())
            .ok_or_else(|| {
                Error::new(format!("no kernel version directory in {}", base.display()))
            })?;
        let dir = base.join(&version);
        let mut all = Vec::new();
        walk(&dir.join("kernel"), &mut all)
            .map_err(|e| Error::io("cannot list modules in", &dir, e))?;
        let mut files = BTreeMap::new();
        for path in all {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if let Some(stem) = name.strip_suffix(".ko") {
                files.insert(canonical(stem), path);
            } else if name.contains(".ko.") {
                return Err(Error::new(format!(
                    "compressed kernel module {} is not supported (Debian 12 kernels ship plain .ko files)",
                    path.display()
                )));
            }
        }
        let builtin = fs::read_to_string(dir.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.rsplit('/').next()?.strip_suffix(".ko").map(canonical))
            .collect();
        Ok(ModuleTree {
            dir,
            version,
            files,
            builtin,
        })
    }

    /// The `depends=` list of one module.
    pub fn depends_of(&self, path: &Path) -> Result<Vec<String>> {
        let bytes = fs::read(path).map_err(|e| Error::io("cannot read module", path, e))?;
        let elf = Elf::parse(&bytes).map_err(|e| Error::new(format!("{}: {e}", path.display())))?;
        Ok(elf
            .modinfo()
            .iter()
            .filter_map(|kv| kv.strip_prefix("depends="))
            .flat_map(|d| d.split(','))
            .filter(|d| !d.is_empty())
            .map(canonical)
            .collect())
    }

    /// The `.ko` files to load for `wanted`, every module after all its
    /// dependencies. Modules built into the kernel are skipped; a module
    /// that is neither built in nor shipped is an error.
    pub fn resolve(&self, wanted: &[&str]) -> Result<Vec<(String, PathBuf)>> {
        let mut order = Vec::new();
        let mut done = BTreeSet::new();
        for w in wanted {
            self.visit(&canonical(w), &mut done, &mut Vec::new(), &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        done: &mut BTreeSet<String>,
        stack: &mut Vec<String>,
        order: &mut Vec<(String, PathBuf)>,
    ) -> Result<()> {
        if done.contains(name) || stack.iter().any(|s| s == name) {
            return Ok(());
        }
        let Some(path) = self.files.get(name) else {
            if self.builtin.contains(name) {
                done.insert(name.to_owned());
                return Ok(());
            }
            return Err(Error::new(format!(
                "kernel {} has no module '{name}'",
                self.version
            )));
        };
        stack.push(name.to_owned());
        for dep in self.depends_of(path)? {
            self.visit(&dep, done, stack, order)?;
        }
        stack.pop();
        done.insert(name.to_owned());
        order.push((name.to_owned(), path.clone()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::canonical;

    #[test]
    fn names_are_canonical() {
        assert_eq!(canonical("kvm-amd"), "kvm_amd");
        assert_eq!(canonical("virtio_net"), "virtio_net");
    }
}
