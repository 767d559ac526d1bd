//! The virtio-pci *common configuration* structure (virtio 1.x, 4.1.4.3):
//! feature negotiation, device status, and the per-queue registers the
//! driver programs before it makes the device live.
//!
//! This is pure state: it says when the driver reset the device or set
//! DRIVER_OK, and the transport ([`super::virtio_pci`]) does the rest.
//!
//! `config_generation` moves on at every reset. A device whose
//! configuration changes while the driver runs has no way to tell the
//! transport yet (`VirtioDevice` has no such hook), so the generation does
//! not move then; none of our devices changes its configuration live.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};

use super::msix::NO_VECTOR;

/// Register offsets (`struct virtio_pci_common_cfg`).
pub const DEVICE_FEATURE_SELECT: usize = 0x00;
pub const DEVICE_FEATURE: usize = 0x04;
pub const DRIVER_FEATURE_SELECT: usize = 0x08;
pub const DRIVER_FEATURE: usize = 0x0c;
pub const MSIX_CONFIG: usize = 0x10;
pub const NUM_QUEUES: usize = 0x12;
pub const DEVICE_STATUS: usize = 0x14;
pub const CONFIG_GENERATION: usize = 0x15;
pub const QUEUE_SELECT: usize = 0x16;
pub const QUEUE_SIZE: usize = 0x18;
pub const QUEUE_MSIX_VECTOR: usize = 0x1a;
pub const QUEUE_ENABLE: usize = 0x1c;
pub const QUEUE_NOTIFY_OFF: usize = 0x1e;
pub const QUEUE_DESC: usize = 0x20;
pub const QUEUE_DRIVER: usize = 0x28;
pub const QUEUE_DEVICE: usize = 0x30;
/// Length of the structure.
pub const LEN: usize = 0x38;

/// Every register as (offset, width). 64-bit queue addresses are two
/// 32-bit halves, as the spec and Linux access them.
const FIELDS: [(usize, usize); 20] = [
    (DEVICE_FEATURE_SELECT, 4),
    (DEVICE_FEATURE, 4),
    (DRIVER_FEATURE_SELECT, 4),
    (DRIVER_FEATURE, 4),
    (MSIX_CONFIG, 2),
    (NUM_QUEUES, 2),
    (DEVICE_STATUS, 1),
    (CONFIG_GENERATION, 1),
    (QUEUE_SELECT, 2),
    (QUEUE_SIZE, 2),
    (QUEUE_MSIX_VECTOR, 2),
    (QUEUE_ENABLE, 2),
    (QUEUE_NOTIFY_OFF, 2),
    (QUEUE_DESC, 4),
    (QUEUE_DESC + 4, 4),
    (QUEUE_DRIVER, 4),
    (QUEUE_DRIVER + 4, 4),
    (QUEUE_DEVICE, 4),
    (QUEUE_DEVICE + 4, 4),
    (LEN, 0),
];

const FEATURES_OK: u8 = VIRTIO_CONFIG_S_FEATURES_OK as u8;
const DRIVER_OK: u8 = VIRTIO_CONFIG_S_DRIVER_OK as u8;
/// DEVICE_NEEDS_RESET is the device's to set, never the driver's.
pub const NEEDS_RESET: u8 = VIRTIO_CONFIG_S_NEEDS_RESET as u8;

/// What the driver has programmed for one virtqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRegs {
    pub max_size: u16,
    pub size: u16,
    pub msix_vector: u16,
    pub enabled: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        QueueRegs {
            max_size,
            size: max_size,
            msix_vector: NO_VECTOR,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

/// A driver write that the transport must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusChange {
    /// The driver wrote 0 to device_status.
    Reset,
    /// The driver set DRIVER_OK: start the queue threads.
    DriverOk,
    /// The driver set FEATURES_OK with features the device refuses (not
    /// offered, or no VERSION_1); the bit stays clear. A guest mistake the
    /// transport counts.
    FeaturesRefused { driver: u64, offered: u64 },
}

/// The common configuration registers of one device.
pub struct CommonConfig {
    device_features: u64,
    msix_vectors: u16,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    pub msix_config: u16,
    status: u8,
    generation: u8,
    queue_select: u16,
    queues: Vec<QueueRegs>,
}

impl CommonConfig {
    /// `device_features` are offered to the driver; `msix_vectors` is the
    /// MSI-X table size (vector numbers at or above it are refused).
    pub fn new(device_features: u64, queue_max_sizes: &[u16], msix_vectors: u16) -> Self {
        CommonConfig {
            device_features,
            msix_vectors,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            msix_config: NO_VECTOR,
            status: 0,
            generation: 0,
            queue_select: 0,
            queues: queue_max_sizes.iter().map(|&m| QueueRegs::new(m)).collect(),
        }
    }

    /// Back to the state after power-on, except that the configuration
    /// generation moves on so a driver never mistakes old for new.
    pub fn reset(&mut self) {
        let max: Vec<u16> = self.queues.iter().map(|q| q.max_size).collect();
        let generation = self.generation.wrapping_add(1);
        *self = CommonConfig::new(self.device_features, &max, self.msix_vectors);
        self.generation = generation;
    }

    pub fn status(&self) -> u8 {
        self.status
    }

    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    pub fn queues(&self) -> &[QueueRegs] {
        &self.queues
    }

    /// A driver read. `needs_reset` is the device's DEVICE_NEEDS_RESET.
    pub fn read(&self, offset: usize, data: &mut [u8], needs_reset: bool) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset + i;
            *b = match field_of(at) {
                Some(f) => (self.get(f, needs_reset) >> (8 * (at - f))) as u8,
                None => 0,
            };
        }
    }

    /// A driver write. A write narrower than a register changes only the
    /// bytes it covers.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Option<StatusChange> {
        let mut change = None;
        let mut i = 0;
        while i < data.len() {
            let at = offset + i;
            let Some(f) = field_of(at) else {
                i += 1;
                continue;
            };
            let width = width_of(f);
            let mut value = self.get(f, false);
            let mut j = at - f;
            while j < width && i < data.len() {
                value = (value & !(0xff << (8 * j))) | (u64::from(data[i]) << (8 * j));
                j += 1;
                i += 1;
            }
            if let Some(c) = self.set(f, value) {
                change = Some(c);
            }
        }
        change
    }

    fn selected(&self) -> Option<&QueueRegs> {
        self.queues.get(usize::from(self.queue_select))
    }

    fn get(&self, field: usize, needs_reset: bool) -> u64 {
        let q = self.selected();
        let qv = |f: fn(&QueueRegs) -> u64| q.map_or(0, f);
        match field {
            DEVICE_FEATURE_SELECT => self.device_feature_select.into(),
            DEVICE_FEATURE => half(self.device_features, self.device_feature_select),
            DRIVER_FEATURE_SELECT => self.driver_feature_select.into(),
            DRIVER_FEATURE => half(self.driver_features, self.driver_feature_select),
            MSIX_CONFIG => self.msix_config.into(),
            NUM_QUEUES => self.queues.len() as u64,
            DEVICE_STATUS => u64::from(self.status | if needs_reset { NEEDS_RESET } else { 0 }),
            CONFIG_GENERATION => self.generation.into(),
            QUEUE_SELECT => self.queue_select.into(),
            QUEUE_SIZE => qv(|q| q.size.into()),
            QUEUE_MSIX_VECTOR => q.map_or(NO_VECTOR, |q| q.msix_vector).into(),
            QUEUE_ENABLE => qv(|q| q.enabled.into()),
            QUEUE_NOTIFY_OFF => q.map_or(0, |_| self.queue_select.into()),
            QUEUE_DESC => qv(|q| q.desc & 0xffff_ffff),
            0x24 => qv(|q| q.desc >> 32),
            QUEUE_DRIVER => qv(|q| q.driver & 0xffff_ffff),
            0x2c => qv(|q| q.driver >> 32),
            QUEUE_DEVICE => qv(|q| q.device & 0xffff_ffff),
            0x34 => qv(|q| q.device >> 32),
            _ => 0,
        }
    }

    fn set(&mut self, field: usize, v: u64) -> Option<StatusChange> {
        match field {
            DEVICE_FEATURE_SELECT => self.device_feature_select = v as u32,
            DRIVER_FEATURE_SELECT => self.driver_feature_select = v as u32,
            // Features are fixed once the driver said FEATURES_OK.
            DRIVER_FEATURE if self.status & FEATURES_OK == 0 => match self.driver_feature_select {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | (v & 0xffff_ffff),
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                _ => {}
            },
            MSIX_CONFIG => self.msix_config = self.vector(v as u16),
            DEVICE_STATUS => return self.set_status(v as u8),
            QUEUE_SELECT => self.queue_select = v as u16,
            QUEUE_MSIX_VECTOR => {
                let vector = self.vector(v as u16);
                if let Some(q) = self.queues.get_mut(usize::from(self.queue_select)) {
                    q.msix_vector = vector;
                }
            }
            QUEUE_SIZE | QUEUE_ENABLE | QUEUE_DESC..=0x37 => self.set_queue(field, v),
            _ => {}
        }
        None
    }

    /// A vector the MSI-X table does not have reads back as NO_VECTOR:
    /// that is how the driver learns the device refused it.
    fn vector(&self, v: u16) -> u16 {
        if v < self.msix_vectors {
            v
        } else {
            NO_VECTOR
        }
    }

    fn set_queue(&mut self, field: usize, v: u64) {
        let live = self.status & DRIVER_OK != 0;
        let Some(q) = self.queues.get_mut(usize::from(self.queue_select)) else { return };
        // A queue's layout is frozen once it is enabled.
        if q.enabled || live {
            return;
        }
        let lo = |old: u64| (old & !0xffff_ffff) | (v & 0xffff_ffff);
        let hi = |old: u64| (old & 0xffff_ffff) | (v << 32);
        match field {
            QUEUE_SIZE => {
                let size = v as u16;
                if size.is_power_of_two() && size <= q.max_size {
                    q.size = size;
                }
            }
            QUEUE_ENABLE => q.enabled = v & 1 == 1,
            QUEUE_DESC => q.desc = lo(q.desc),
            0x24 => q.desc = hi(q.desc),
            QUEUE_DRIVER => q.driver = lo(q.driver),
            0x2c => q.driver = hi(q.driver),
            QUEUE_DEVICE => q.device = lo(q.device),
            0x34 => q.device = hi(q.device),
            _ => {}
        }
    }

    fn set_status(&mut self, v: u8) -> Option<StatusChange> {
        if v == 0 {
            return Some(StatusChange::Reset);
        }
        let old = self.status;
        // The driver only ever adds bits; clearing one takes a reset.
        let mut new = (old | v) & !NEEDS_RESET;
        let mut change = None;
        if new & FEATURES_OK != 0 && old & FEATURES_OK == 0 && !self.features_acceptable() {
            new &= !FEATURES_OK;
            change = Some(StatusChange::FeaturesRefused { driver: self.driver_features, offered: self.device_features });
        }
        if new & DRIVER_OK != 0 && new & FEATURES_OK == 0 {
            new &= !DRIVER_OK;
        }
        self.status = new;
        if new & DRIVER_OK != 0 && old & DRIVER_OK == 0 {
            return Some(StatusChange::DriverOk);
        }
        change
    }

    /// The driver accepted only offered features, and virtio 1.x.
    fn features_acceptable(&self) -> bool {
        self.driver_features & !self.device_features == 0
            && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0
    }
}

fn half(v: u64, select: u32) -> u64 {
    match select {
        0 => v & 0xffff_ffff,
        1 => v >> 32,
        _ => 0,
    }
}

/// The register that contains byte `at`.
fn field_of(at: usize) -> Option<usize> {
    FIELDS.iter().find(|&&(off, w)| at >= off && at < off + w).map(|&(off, _)| off)
}

fn width_of(field: usize) -> usize {
    FIELDS.iter().find(|&&(off, _)| off == field).map_or(0, |&(_, w)| w)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;

    fn w32(c: &mut CommonConfig, off: usize, v: u32) -> Option<StatusChange> {
        c.write(off, &v.to_le_bytes())
    }
    fn w16(c: &mut CommonConfig, off: usize, v: u16) -> Option<StatusChange> {
        c.write(off, &v.to_le_bytes())
    }
    fn r32(c: &CommonConfig, off: usize) -> u32 {
        let mut d = [0u8; 4];
        c.read(off, &mut d, false);
        u32::from_le_bytes(d)
    }
    fn r16(c: &CommonConfig, off: usize) -> u16 {
        let mut d = [0u8; 2];
        c.read(off, &mut d, false);
        u16::from_le_bytes(d)
    }
    fn status(c: &mut CommonConfig, s: u8) -> Option<StatusChange> {
        c.write(DEVICE_STATUS, &[s])
    }

    fn negotiate(c: &mut CommonConfig, features: u64) -> u8 {
        status(c, 1);
        status(c, 1 | 2);
        w32(c, DRIVER_FEATURE_SELECT, 0);
        w32(c, DRIVER_FEATURE, features as u32);
        w32(c, DRIVER_FEATURE_SELECT, 1);
        w32(c, DRIVER_FEATURE, (features >> 32) as u32);
        status(c, 1 | 2 | FEATURES_OK);
        let mut s = [0u8];
        c.read(DEVICE_STATUS, &mut s, false);
        s[0]
    }

    #[test]
    fn features_are_read_in_halves() {
        let mut c = CommonConfig::new(VERSION_1 | 0x20, &[256, 128], 3);
        assert_eq!(r32(&c, DEVICE_FEATURE), 0x20);
        w32(&mut c, DEVICE_FEATURE_SELECT, 1);
        assert_eq!(r32(&c, DEVICE_FEATURE), 1);
        w32(&mut c, DEVICE_FEATURE_SELECT, 2);
        assert_eq!(r32(&c, DEVICE_FEATURE), 0);
        assert_eq!(r16(&c, NUM_QUEUES), 2);
    }

    #[test]
    fn features_ok_only_for_a_subset_with_version_1() {
        let mut c = CommonConfig::new(VERSION_1 | 0x20, &[256], 2);
        status(&mut c, 1 | 2);
        w32(&mut c, DRIVER_FEATURE, 0x40);
        assert_eq!(
            status(&mut c, 1 | 2 | FEATURES_OK),
            Some(StatusChange::FeaturesRefused { driver: 0x40, offered: VERSION_1 | 0x20 }),
            "the refusal is reported, for the transport to count"
        );
        c.reset();
        assert_eq!(negotiate(&mut c, 0x20) & FEATURES_OK, 0, "no VERSION_1");
        c.reset();
        assert_eq!(negotiate(&mut c, VERSION_1 | 0x40) & FEATURES_OK, 0, "not offered");
        c.reset();
        assert_ne!(negotiate(&mut c, VERSION_1 | 0x20) & FEATURES_OK, 0);
        assert_eq!(c.driver_features(), VERSION_1 | 0x20);
        // Frozen after FEATURES_OK.
        w32(&mut c, DRIVER_FEATURE_SELECT, 0);
        w32(&mut c, DRIVER_FEATURE, 0);
        assert_eq!(c.driver_features(), VERSION_1 | 0x20);
    }

    #[test]
    fn driver_ok_needs_features_ok() {
        let mut c = CommonConfig::new(VERSION_1, &[256], 2);
        assert_eq!(status(&mut c, 1 | 2 | DRIVER_OK), None);
        assert_eq!(c.status() & DRIVER_OK, 0);
        negotiate(&mut c, VERSION_1);
        assert_eq!(status(&mut c, 1 | 2 | FEATURES_OK | DRIVER_OK), Some(StatusChange::DriverOk));
        assert_eq!(status(&mut c, 1 | 2 | FEATURES_OK | DRIVER_OK), None, "only once");
        let mut s = [0u8];
        c.read(DEVICE_STATUS, &mut s, true);
        assert_eq!(s[0], 1 | 2 | FEATURES_OK | DRIVER_OK | NEEDS_RESET);
        assert_eq!(status(&mut c, 0), Some(StatusChange::Reset));
    }

    #[test]
    fn queue_programming_and_reset() {
        let mut c = CommonConfig::new(VERSION_1, &[256, 64], 3);
        w16(&mut c, QUEUE_SELECT, 1);
        assert_eq!(r16(&c, QUEUE_SIZE), 64);
        assert_eq!(r16(&c, QUEUE_NOTIFY_OFF), 1);
        assert_eq!(r16(&c, QUEUE_MSIX_VECTOR), NO_VECTOR);
        w16(&mut c, QUEUE_SIZE, 100);
        assert_eq!(r16(&c, QUEUE_SIZE), 64, "not a power of two");
        w16(&mut c, QUEUE_SIZE, 128);
        assert_eq!(r16(&c, QUEUE_SIZE), 64, "above the maximum");
        w16(&mut c, QUEUE_SIZE, 32);
        assert_eq!(r16(&c, QUEUE_SIZE), 32);
        w16(&mut c, QUEUE_MSIX_VECTOR, 2);
        assert_eq!(r16(&c, QUEUE_MSIX_VECTOR), 2);
        w16(&mut c, QUEUE_MSIX_VECTOR, 3);
        assert_eq!(r16(&c, QUEUE_MSIX_VECTOR), NO_VECTOR, "no such vector");
        w16(&mut c, MSIX_CONFIG, 0);
        assert_eq!(r16(&c, MSIX_CONFIG), 0);
        w32(&mut c, QUEUE_DESC, 0x1000);
        w32(&mut c, QUEUE_DESC + 4, 0x1);
        c.write(QUEUE_DRIVER, &0x2_0000_2000u64.to_le_bytes());
        w32(&mut c, QUEUE_DEVICE, 0x3000);
        w16(&mut c, QUEUE_ENABLE, 1);
        let q = &c.queues()[1];
        assert_eq!(
            (q.desc, q.driver, q.device, q.size, q.enabled),
            (0x1_0000_1000, 0x2_0000_2000, 0x3000, 32, true)
        );
        assert_eq!(r32(&c, QUEUE_DESC + 4), 1);
        // Frozen once enabled.
        w32(&mut c, QUEUE_DESC, 0x5000);
        assert_eq!(c.queues()[1].desc, 0x1_0000_1000);
        // A queue that does not exist reads zero and ignores writes.
        w16(&mut c, QUEUE_SELECT, 7);
        assert_eq!(r16(&c, QUEUE_SIZE), 0);
        w16(&mut c, QUEUE_ENABLE, 1);
        let gen = c.generation;
        c.reset();
        assert_eq!(c.queues()[1], QueueRegs::new(64));
        assert_eq!(c.msix_config, NO_VECTOR);
        assert_ne!(c.generation, gen);
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let mut c = CommonConfig::new(VERSION_1, &[256], 2);
        for off in 0..0x40 {
            for len in [1usize, 2, 3, 4, 8] {
                let mut d = vec![0u8; len];
                c.read(off, &mut d, false);
                c.write(off, &vec![0xa5; len]);
            }
        }
    }
}
