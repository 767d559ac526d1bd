//! Debian packages without installing them: ask `apt-cache` for the
//! candidate version, fetch the `.deb` with `apt-get download`, unpack it
//! with `dpkg -x` into the cache. Everything is keyed by package version,
//! so a second run neither downloads nor unpacks anything.
//!
//! Cache layout (under [`Cache::root`]):
//! - `debs/<name>_<version>_<arch>.deb` — what `apt-get download` fetched
//! - `unpacked/<name>_<version>/` — the package's files
//! - `images/` — built images (see [`crate::image`])

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};
use crate::progress;

/// The directory holding downloads, unpacked packages and images.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

/// Held while a process builds into the cache; other builders wait.
pub struct CacheLock {
    _file: fs::File,
}

impl Cache {
    /// `$KICKVM_CACHE`, else `$HOME/.cache/kickvm`.
    pub fn from_env() -> Result<Cache> {
        if let Some(dir) = std::env::var_os("KICKVM_CACHE").filter(|d| !d.is_empty()) {
            return Ok(Cache::at(PathBuf::from(dir)));
        }
        match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
            Some(home) => Ok(Cache::at(Path::new(&home).join(".cache/kickvm"))),
            None => Err(Error::with_hint(
                "neither KICKVM_CACHE nor HOME is set",
                "set KICKVM_CACHE to a cache directory",
            )),
        }
    }

    /// A cache rooted at `root` (created on first use).
    pub fn at(root: PathBuf) -> Cache {
        Cache { root }
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A sub-directory of the cache, created if missing.
    pub fn dir(&self, name: &str) -> Result<PathBuf> {
        let d = self.root.join(name);
        fs::create_dir_all(&d).map_err(|e| Error::io("cannot create cache directory", &d, e))?;
        Ok(d)
    }

    /// Takes the cache's build lock (blocks while another process builds).
    pub fn lock(&self) -> Result<CacheLock> {
        fs::create_dir_all(&self.root)
            .map_err(|e| Error::io("cannot create cache directory", &self.root, e))?;
        let path = self.root.join(".lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io("cannot open lock file", &path, e))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::io(
                "cannot lock",
                &path,
                std::io::Error::last_os_error(),
            ));
        }
        Ok(CacheLock { _file: file })
    }
}

/// One Debian package at the version apt would install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    /// Package name, e.g. `busybox-static`.
    pub name: String,
    /// Full version, epoch included, e.g. `1:1.35.0-4+deb12u1+b1`.
    pub version: String,
    /// `Depends` + `Pre-Depends`: each entry lists alternatives, by name.
    pub depends: Vec<Vec<String>>,
    /// Dependencies pinned to one version (`name (= version)`).
    pub exact: BTreeMap<String, String>,
}

impl Package {
    /// `name=version`, as `apt-get download` takes it and as cache keys use it.
    pub fn pinned(&self) -> String {
        format!("{}={}", self.name, self.version)
    }
}

fn run(cmd: &mut Command, what: &str, hint: &str) -> Result<std::process::Output> {
    let out = cmd
        .output()
        .map_err(|e| Error::with_hint(format!("{what}: {e}"), hint))?;
    Ok(out)
}

const APT_HINT: &str = "run `apt-get update` (scripts/install-deps.sh does when lists are missing) and check the name, then retry";

/// Parses `Depends:`-style text into alternatives of package names.
fn parse_depends(text: &str) -> Vec<Vec<String>> {
    text.split(',')
        .map(|alts| {
            alts.split('|')
                .filter_map(|a| a.split_whitespace().next())
                .map(|n| n.split(':').next().unwrap_or(n).to_owned())
                .collect::<Vec<_>>()
        })
        .filter(|alts| !alts.is_empty())
        .collect()
}

/// Parses the stanzas `apt-cache show` prints.
fn parse_show(text: &str) -> Vec<Package> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut fields: BTreeMap<&str, String> = BTreeMap::new();
        let mut last: Option<&str> = None;
        for line in stanza.lines() {
            if line.starts_with(' ') {
                if let Some(k) = last {
                    fields.entry(k).or_default().push_str(line);
                }
            } else if let Some((k, v)) = line.split_once(':') {
                fields.insert(k, v.trim().to_owned());
                last = Some(k);
            }
        }
        let (Some(name), Some(version)) = (fields.get("Package"), fields.get("Version")) else {
            continue;
        };
        let pre = fields.get("Pre-Depends").map(String::as_str).unwrap_or("");
        let deps = fields.get("Depends").map(String::as_str).unwrap_or("");
        let mut depends = parse_depends(pre);
        depends.extend(parse_depends(deps));
        let exact = deps
            .split([',', '|'])
            .filter_map(|d| {
                let (name, rest) = d.trim().split_once(" (= ")?;
                Some((name.to_owned(), rest.strip_suffix(')')?.to_owned()))
            })
            .collect();
        out.push(Package {
            name: name.clone(),
            version: version.clone(),
            depends,
            exact,
        });
    }
    out
}

/// What apt knows of `names` (candidate versions; unknown names are absent).
fn apt_show(names: &[String]) -> Result<Vec<Package>> {
    let out = run(
        Command::new("apt-cache")
            .arg("show")
            .arg("--no-all-versions")
            .args(names),
        "cannot run apt-cache",
        "the image builder needs a Debian host with apt",
    )?;
    Ok(parse_show(&String::from_utf8_lossy(&out.stdout)))
}

/// The candidate version (what `apt-get install` would pick) of each name.
/// A name apt does not know is a one-line error saying how to fix it.
pub fn candidates(names: &[String]) -> Result<Vec<Package>> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let found = apt_show(names)?;
    names
        .iter()
        .map(|n| {
            found.iter().find(|p| &p.name == n).cloned().ok_or_else(|| {
                Error::with_hint(
                    format!("Debian package '{n}' is not known to apt"),
                    APT_HINT,
                )
            })
        })
        .collect()
}

/// Follows a meta package (e.g. `linux-image-cloud-amd64`) to the real,
/// versioned package it depends on (e.g. `linux-image-6.1.0-56-cloud-amd64`),
/// which Debian pins with `(= version)`.
pub fn resolve_meta(meta_pkg: &Package, prefix: &str) -> Result<Package> {
    let (name, version) = meta_pkg
        .exact
        .iter()
        .find(|(d, _)| d.starts_with(prefix))
        .ok_or_else(|| {
            Error::new(format!(
                "{} {} depends on no {prefix}* package",
                meta_pkg.name, meta_pkg.version
            ))
        })?;
    Ok(Package {
        name: name.clone(),
        version: version.clone(),
        depends: Vec::new(),
        exact: BTreeMap::new(),
    })
}

/// Packages that shared libraries never need at run time inside a guest:
/// skipped when walking `Depends` for the guest tools.
fn is_runtime_library(name: &str) -> bool {
    (name.starts_with("lib") || name == "zlib1g")
        && !name.ends_with("-common")
        && !name.ends_with("-bin")
        && name != "libc-bin"
}

/// `roots` plus every `lib*` package they (transitively) depend on, taking
/// the first alternative of each dependency. Used for the guest tools,
/// whose shared libraries are later picked by a `DT_NEEDED` walk.
pub fn library_closure(roots: &[String]) -> Result<Vec<Package>> {
    let mut seen: BTreeSet<String> = roots.iter().cloned().collect();
    let mut all = Vec::new();
    let mut level: Vec<String> = roots.to_vec();
    while !level.is_empty() {
        let pkgs = candidates_lenient(&level, roots)?;
        level = Vec::new();
        for p in &pkgs {
            for alts in &p.depends {
                if let Some(d) = alts.first() {
                    if is_runtime_library(d) && seen.insert(d.clone()) {
                        level.push(d.clone());
                    }
                }
            }
        }
        all.extend(pkgs);
    }
    all.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(all)
}

/// Like [`candidates`], but only the `required` names must exist (virtual
/// library names in a Depends line are skipped).
fn candidates_lenient(names: &[String], required: &[String]) -> Result<Vec<Package>> {
    let found = apt_show(names)?;
    for r in required.iter().filter(|r| names.contains(r)) {
        if !found.iter().any(|p| &p.name == r) {
            return Err(Error::with_hint(
                format!("Debian package '{r}' is not known to apt"),
                APT_HINT,
            ));
        }
    }
    Ok(found)
}

/// How `apt-get download` spells a version in a file name.
fn file_version(version: &str) -> String {
    version.replace(':', "%3a")
}

fn find_deb(dir: &Path, p: &Package) -> Option<PathBuf> {
    let prefix = format!("{}_{}_", p.name, file_version(&p.version));
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|path| {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with(&prefix) && name.ends_with(".deb")
        })
}

/// Makes sure each package is downloaded and unpacked in the cache, and
/// returns the unpacked directories (same order as `pkgs`). Needs the
/// cache lock held by the caller.
pub fn unpack_all(cache: &Cache, pkgs: &[Package]) -> Result<Vec<PathBuf>> {
    let debs = cache.dir("debs")?;
    let unpacked = cache.dir("unpacked")?;
    let missing: Vec<&Package> = pkgs
        .iter()
        .filter(|p| find_deb(&debs, p).is_none())
        .collect();
    if !missing.is_empty() {
        progress(&format!(
            "downloading {} Debian package(s): {}",
            missing.len(),
            missing
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        ));
        let out = run(
            Command::new("apt-get")
                .arg("download")
                .arg("-q")
                .args(missing.iter().map(|p| p.pinned()))
                .current_dir(&debs),
            "cannot run apt-get",
            "the image builder needs a Debian host with apt",
        )?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let first = err
                .lines()
                .find(|l| l.starts_with("E:"))
                .unwrap_or("apt-get download failed");
            return Err(Error::with_hint(
                format!("cannot download packages: {first}"),
                APT_HINT,
            ));
        }
    }
    pkgs.iter()
        .map(|p| {
            let target = unpacked.join(format!("{}_{}", p.name, file_version(&p.version)));
            if target.is_dir() {
                return Ok(target);
            }
            let deb = find_deb(&debs, p).ok_or_else(|| {
                Error::with_hint(
                    format!("apt-get download left no .deb for {}", p.pinned()),
                    APT_HINT,
                )
            })?;
            let tmp = unpacked.join(format!(".tmp-{}-{}", p.name, std::process::id()));
            let _ = fs::remove_dir_all(&tmp);
            let out = run(
                Command::new("dpkg").arg("-x").arg(&deb).arg(&tmp),
                "cannot run dpkg",
                "the image builder needs a Debian host with dpkg",
            )?;
            if !out.status.success() {
                return Err(Error::new(format!(
                    "dpkg -x {} failed: {}",
                    deb.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            fs::rename(&tmp, &target)
                .map_err(|e| Error::io("cannot move unpacked package to", &target, e))?;
            Ok(target)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_show_and_depends() {
        let text = "Package: fio\nVersion: 3.33-3\nDepends: libaio1 (>= 0.3.93), libc6 (>= 2.34),\n zlib1g, debconf (>= 0.5) | debconf-2.0\nPre-Depends: init-system-helpers\n\nPackage: x\nVersion: 1:2-3\n";
        let p = parse_show(text);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].name, "fio");
        assert_eq!(p[0].depends[0], vec!["init-system-helpers"]);
        assert_eq!(p[0].depends[3], vec!["zlib1g"]);
        assert_eq!(p[0].depends[4], vec!["debconf", "debconf-2.0"]);
        let meta = parse_show("Package: linux-image-amd64\nVersion: 6.1.192-2\nDepends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)\n");
        let real = resolve_meta(&meta[0], "linux-image-").unwrap();
        assert_eq!(real.pinned(), "linux-image-6.1.0-56-amd64=6.1.192-2");
        assert_eq!(p[1].pinned(), "x=1:2-3");
        assert_eq!(file_version("1:2-3"), "1%3a2-3");
    }

    #[test]
    fn library_filter() {
        assert!(is_runtime_library("libssl3"));
        assert!(!is_runtime_library("libc-bin"));
        assert!(!is_runtime_library("debconf"));
    }
}
