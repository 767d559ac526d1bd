//! kickvm's fuzz targets, as a library: the input types (`arbitrary`,
//! structure-aware), the runs the targets in `fuzz_targets/` call, the
//! fakes and oracles they share, and the seeds committed in `fuzz/seeds/`.
//!
//! | target | module | what |
//! |---|---|---|
//! | `bzimage` | [`bz`] | kernel loader: setup header, initrd placement, boot structures |
//! | `cli` | [`cli`] | `kickvm run` argv → clap → `VmConfig` → `validate`; each option parser |
//! | `virtio_pci` | [`vpci`] | PCI config space, ECAM, BAR0, MSI-X, queues, resets, with real devices |
//! | `chain` | [`chain`] | the descriptor chain walker over arbitrary memory, tables and indirect tables |
//! | `devices` | [`devices`] | blk, net, console, rng request handling, served inline, with resets |
//! | `api` | [`api`] | `kickvm --api-socket` bytes → HTTP framing → routes, JSON shapes, `VmConfig`, `validate` |
//! | `vhost_user` | [`vhost_user`] | a vhost-user back-end's message handling over a real socket, real fds |
//!
//! Shared pieces for targets to come (the chain walker, per-device
//! request handling): [`guest`] (guest memory layouts, split rings,
//! descriptors), [`fake_kvm`] (MSI routing and ioeventfds by KVM's rules),
//! [`checks`] (log-flood, thread and fd leak oracles), [`enc`] (seeds).
//!
//! `cargo test` here (stable is enough) checks that every seed decodes to
//! what it was written from and runs each seed once through its target's
//! code. `KICKVM_FUZZ_WRITE_SEEDS=1 cargo test write_seeds` rewrites
//! `fuzz/seeds/`.

pub mod api;
pub mod bz;
pub mod chain;
pub mod checks;
pub mod cli;
pub mod devices;
pub mod enc;
pub mod fake_kvm;
pub mod guest;
pub mod seeds;
pub mod vhost_user;
pub mod vpci;

/// Every target name, in `scripts/fuzz.sh` order.
pub const TARGETS: [&str; 7] = ["bzimage", "cli", "virtio_pci", "chain", "devices", "api", "vhost_user"];

#[cfg(test)]
mod tests {
    use super::*;
    use enc::{decode, Encode};

    /// Runs count the process's threads and fds: one at a time.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    fn serial() -> std::sync::MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn round_trip<'a, T>(name: &str, v: &T, bytes: &'a [u8])
    where
        T: Encode + arbitrary::Arbitrary<'a> + PartialEq + std::fmt::Debug,
    {
        let back: T = decode(bytes).unwrap_or_else(|e| panic!("seed {name} does not decode: {e}"));
        assert_eq!(&back, v, "seed {name} decodes to something else");
    }

    #[test]
    fn seeds_round_trip() {
        let _one = serial();
        for (name, v) in seeds::bzimage() {
            round_trip(name, &v, &v.to_bytes());
        }
        for (name, v) in seeds::cli() {
            round_trip(name, &v, &v.to_bytes());
        }
        for (name, v) in seeds::virtio_pci() {
            round_trip(name, &v, &v.to_bytes());
        }
        for (name, v) in seeds::chain() {
            round_trip(name, &v, &v.to_bytes());
        }
        for (name, v) in seeds::device_requests() {
            round_trip(name, &v, &v.to_bytes());
        }
        for (name, v) in vhost_user::seeds() {
            round_trip(name, &v, &v.to_bytes());
        }
    }

    #[test]
    fn seeds_run_clean() {
        let _one = serial();
        for (_, v) in seeds::bzimage() {
            bz::run(&v);
        }
        for (_, v) in seeds::cli() {
            cli::run(&v);
        }
        for (_, v) in seeds::virtio_pci() {
            vpci::run(&v);
        }
        for (_, v) in seeds::chain() {
            chain::run(&v);
        }
        for (_, v) in seeds::device_requests() {
            devices::run(&v);
        }
        for (_, v) in seeds::api() {
            api::run(&v);
        }
        for (_, v) in vhost_user::seeds() {
            vhost_user::run(&v);
        }
    }

    /// The transport seeds get real work done: devices started, requests served.
    #[test]
    fn pci_seeds_reach_the_devices() {
        let _one = serial();
        // (seed, devices active at the end, used entries at least); the
        // seeds that reset right after a kick race with the queue thread.
        let want = [
            ("blk-read-write-flush-id", 1, 4),
            ("blk-indirect", 1, 1),
            ("console-tx-rx", 1, 1),
            ("all-devices-reset-cycles", 2, 0),
            ("single-thread-mode", 2, 2),
            ("msix-mask-pba", 1, 1),
            ("notify-odd-widths", 1, 1),
            ("console-socket-no-client", 2, 0),
        ];
        let seeds = seeds::virtio_pci();
        for (name, active, used) in want {
            let v = &seeds.iter().find(|(n, _)| *n == name).expect(name).1;
            let o = vpci::run_outcome(v);
            assert!(o.active == active && o.used >= used, "{name}: {o:?}");
        }
    }

    /// The committed seed files are what the generator writes (or, with
    /// KICKVM_FUZZ_WRITE_SEEDS=1, become it).
    #[test]
    fn write_seeds() {
        let _one = serial();
        let write = std::env::var("KICKVM_FUZZ_WRITE_SEEDS").is_ok_and(|v| v == "1");
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
        let all: Vec<(&str, Vec<(&str, Vec<u8>)>)> = vec![
            ("bzimage", seeds::bzimage().into_iter().map(|(n, v)| (n, v.to_bytes())).collect()),
            ("cli", seeds::cli().into_iter().map(|(n, v)| (n, v.to_bytes())).collect()),
            ("virtio_pci", seeds::virtio_pci().into_iter().map(|(n, v)| (n, v.to_bytes())).collect()),
            ("chain", seeds::chain().into_iter().map(|(n, v)| (n, v.to_bytes())).collect()),
            ("devices", seeds::device_requests().into_iter().map(|(n, v)| (n, v.to_bytes())).collect()),
            ("api", seeds::api()),
            ("vhost_user", vhost_user::seeds().into_iter().map(|(n, v)| (n, v.to_bytes())).collect()),
        ];
        for (target, files) in all {
            let dir = root.join(target);
            if write {
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir).unwrap();
            }
            for (name, bytes) in files {
                let p = dir.join(name);
                if write {
                    std::fs::write(&p, &bytes).unwrap();
                } else {
                    let have = std::fs::read(&p).unwrap_or_default();
                    assert!(
                        have == bytes,
                        "{} is stale: run KICKVM_FUZZ_WRITE_SEEDS=1 cargo test write_seeds in fuzz/",
                        p.display()
                    );
                }
            }
        }
    }

    #[test]
    fn tags_select_their_variant() {
        let _one = serial();
        for count in 1..40u32 {
            for i in 0..count {
                let mut e = enc::Enc::new();
                e.tag(i, count);
                let x = u32::from_le_bytes(e.0[..4].try_into().unwrap());
                assert_eq!(((u64::from(x) * u64::from(count)) >> 32) as u32, i);
            }
        }
    }
}
