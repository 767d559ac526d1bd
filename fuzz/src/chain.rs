//! The `chain` target: [`kickvm_virtio::chain::walk`] over arbitrary guest
//! memory layouts, descriptor tables and indirect tables.
//!
//! The input lays out guest RAM ([`MemLayout`]), a descriptor table of a
//! power-of-two queue size (1..=256) wherever the guest put it, indirect
//! tables (lists, 65 535-entry loops, repeated entries), raw pokes over
//! all of it, then walks the chain at `head` under arbitrary [`Rules`].
//!
//! What the walk promises, checked on every run:
//! - it ends, quickly (a loop is an error, never a hang);
//! - an Ok chain has at most `max_descriptors` descriptors: at most
//!   `max_descriptors × regions` segments (a descriptor splits where it
//!   crosses from one memory region into the next), and at most
//!   [`MAX_CHAIN_BYTES`] bytes;
//! - no indirect table is followed when `indirect` is off, and the chain is
//!   what the spec says it is: a reference walk written from virtio 1.2
//!   2.7.5 (below, [`model`]) agrees on Ok/Err and on the readable and
//!   writable byte counts;
//! - [`GuestIovecs`] operations on the result (`read_at`, `write_at`,
//!   `skip`, `truncate`, `last_byte`) stay inside the buffers: every
//!   length they report is exactly what the arithmetic says.
//!
//! [`Place`], [`DLen`] and [`Link`] are shared with the `devices` target.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use kickvm_virtio::chain::{self, Rules, MAX_CHAIN_BYTES};
use kickvm_virtio::memory::GuestIovecs;
use kickvm_virtio::GuestMemory;
use vm_memory::{Bytes as _, GuestAddress, GuestMemoryBackend};

use crate::checks;
use crate::enc::{Bytes, Enc, Encode};
use crate::guest::{self, MemLayout, LOW_RAM, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};

// ---- shared pieces (also used by `devices`) --------------------------

/// A guest-physical address, mostly where RAM is.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Low RAM: `v % 1 MiB`.
    Ram(u32),
    /// Region `r % regions`, at `off % its length`.
    Region(u8, u32),
    /// The end of region `r % regions`, plus `delta` (just inside or
    /// just past it).
    End(u8, i16),
    /// Anything.
    Raw(u64),
    /// Indirect table `k`'s address plus `off` (a scratch slot if there is
    /// no table `k` yet).
    Table(u8, u16),
}

/// Scratch slots for indirect tables that were not placed anywhere.
pub const TABLE_SLOTS: u64 = 0x7_0000;

impl Place {
    pub fn resolve(self, ranges: &[(GuestAddress, usize)], tables: &[u64]) -> u64 {
        let region = |r: u8| ranges[usize::from(r) % ranges.len()];
        match self {
            Place::Ram(v) => u64::from(v) % LOW_RAM,
            Place::Region(r, off) => {
                let (base, len) = region(r);
                base.0 + u64::from(off) % len as u64
            }
            Place::End(r, d) => {
                let (base, len) = region(r);
                (base.0 + len as u64).wrapping_add_signed(d.into())
            }
            Place::Raw(v) => v,
            Place::Table(k, off) => {
                let at = match tables.get(usize::from(k)) {
                    Some(&t) => t,
                    None => TABLE_SLOTS + u64::from(k % 16) * 0x1000,
                };
                at.wrapping_add(off.into())
            }
        }
    }
}

impl Encode for Place {
    fn encode(&self, e: &mut Enc) {
        const N: u32 = 5;
        match *self {
            Place::Ram(v) => e.tag(0, N).u32(v),
            Place::Region(r, off) => e.tag(1, N).u8(r).u32(off),
            Place::End(r, d) => e.tag(2, N).u8(r).u16(d as u16),
            Place::Raw(v) => e.tag(3, N).u64(v),
            Place::Table(k, off) => e.tag(4, N).u8(k).u16(off),
        };
    }
}

/// A descriptor's length.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DLen {
    Small(u16),
    Raw(u32),
    /// `16 × entries of table k + delta` (an indirect descriptor's length;
    /// elsewhere `16 × k + delta`).
    Table(u8, i8),
}

impl DLen {
    pub fn get(self, table_entries: &[u32]) -> u32 {
        match self {
            DLen::Small(v) => v.into(),
            DLen::Raw(v) => v,
            DLen::Table(k, d) => {
                let n = table_entries.get(usize::from(k)).copied().unwrap_or(k.into());
                n.wrapping_mul(16).wrapping_add_signed(d.into())
            }
        }
    }
}

impl Encode for DLen {
    fn encode(&self, e: &mut Enc) {
        match *self {
            DLen::Small(v) => e.tag(0, 3).u16(v),
            DLen::Raw(v) => e.tag(1, 3).u32(v),
            DLen::Table(k, d) => e.tag(2, 3).u8(k).u8(d as u8),
        };
    }
}

/// A descriptor's `next`.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// The following entry (mod the table size).
    Follow,
    /// This entry + `d` (mod the table size).
    Rel(i8),
    /// As given, not reduced.
    Raw(u16),
}

impl Link {
    /// `next` of entry `i` of a table of `n` entries.
    pub fn get(self, i: u32, n: u32) -> u16 {
        let n = n.max(1);
        match self {
            Link::Follow => ((i + 1) % n) as u16,
            Link::Rel(d) => (i64::from(i) + i64::from(d)).rem_euclid(n.into()) as u16,
            Link::Raw(v) => v,
        }
    }
}

impl Encode for Link {
    fn encode(&self, e: &mut Enc) {
        match *self {
            Link::Follow => e.tag(0, 3),
            Link::Rel(d) => e.tag(1, 3).u8(d as u8),
            Link::Raw(v) => e.tag(2, 3).u16(v),
        };
    }
}

/// Writes `data` at `at`: the parts that land in guest RAM land, the rest
/// is dropped (as `guest::write_bytes`, but region by region rather than
/// byte by byte: a megabyte-sized table half outside RAM stays cheap).
pub fn put(mem: &GuestMemory, at: u64, data: &[u8]) {
    let start = u128::from(at);
    let end = start + data.len() as u128;
    for r in mem.iter() {
        let rs = u128::from(vm_memory::GuestMemoryRegion::start_addr(r).0);
        let re = rs + u128::from(vm_memory::GuestMemoryRegion::len(r));
        let (from, to) = (start.max(rs), end.min(re));
        if from < to {
            let piece = &data[(from - start) as usize..(to - start) as usize];
            let _ = mem.write_slice(piece, GuestAddress(from as u64));
        }
    }
}

/// The 16 bytes of a split-ring descriptor.
pub fn desc_bytes(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&addr.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..14].copy_from_slice(&flags.to_le_bytes());
    b[14..16].copy_from_slice(&next.to_le_bytes());
    b
}

// ---- input ----------------------------------------------------------

/// One descriptor: flags as given (bit 0 NEXT, 1 WRITE, 2 INDIRECT).
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub struct CDesc {
    pub addr: Place,
    pub len: DLen,
    pub flags: u8,
    pub next: Link,
}

impl Encode for CDesc {
    fn encode(&self, e: &mut Enc) {
        e.put(&self.addr).put(&self.len).u8(self.flags).put(&self.next);
    }
}

/// An indirect table's entries.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Body {
    List(Vec<CDesc>),
    /// [`entries`]`(n)` entries, entry i → i + 1, the last → 0, each `len`
    /// bytes at `addr` (issue 8's 65 535-entry loop).
    Loop { n: u16, addr: Place, len: u16, write: bool },
    /// [`entries`]`(n)` copies of `desc` (its `next` relative to each entry).
    Fill { n: u16, desc: CDesc },
}

#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct ITable {
    pub at: Place,
    pub body: Body,
}

impl Encode for Body {
    fn encode(&self, e: &mut Enc) {
        match self {
            Body::List(v) => e.tag(0, 3).vec(v),
            Body::Loop { n, addr, len, write } => e.tag(1, 3).u16(*n).put(addr).u16(*len).bool(*write),
            Body::Fill { n, desc } => e.tag(2, 3).u16(*n).put(desc),
        };
    }
}
impl Encode for ITable {
    fn encode(&self, e: &mut Enc) {
        e.put(&self.at).put(&self.body);
    }
}

#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct Poke {
    pub at: Place,
    pub data: Bytes<32>,
}

impl Encode for Poke {
    fn encode(&self, e: &mut Enc) {
        e.put(&self.at).put(&self.data);
    }
}

/// `Rules::max_descriptors`.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxD {
    /// 256: a device's queue maximum.
    Max256,
    /// The queue size.
    QueueSize,
    Raw(u16),
}

impl Encode for MaxD {
    fn encode(&self, e: &mut Enc) {
        match *self {
            MaxD::Max256 => e.tag(0, 3),
            MaxD::QueueSize => e.tag(1, 3),
            MaxD::Raw(v) => e.tag(2, 3).u16(v),
        };
    }
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// `v % queue size`.
    In(u16),
    Raw(u16),
}

impl Encode for Head {
    fn encode(&self, e: &mut Enc) {
        match *self {
            Head::In(v) => e.tag(0, 2).u16(v),
            Head::Raw(v) => e.tag(1, 2).u16(v),
        };
    }
}

/// An operation on the walked chain's readable or writable buffers (the
/// working copy: `Skip` and `Truncate` replace it).
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Read { writable: bool, offset: u32, len: u16 },
    Write { writable: bool, offset: u32, data: Bytes<64> },
    Skip { writable: bool, at: u32 },
    Truncate { writable: bool, len: u32 },
    LastByte { writable: bool },
}

impl Encode for Probe {
    fn encode(&self, e: &mut Enc) {
        const N: u32 = 5;
        match self {
            Probe::Read { writable, offset, len } => e.tag(0, N).bool(*writable).u32(*offset).u16(*len),
            Probe::Write { writable, offset, data } => e.tag(1, N).bool(*writable).u32(*offset).put(data),
            Probe::Skip { writable, at } => e.tag(2, N).bool(*writable).u32(*at),
            Probe::Truncate { writable, len } => e.tag(3, N).bool(*writable).u32(*len),
            Probe::LastByte { writable } => e.tag(4, N).bool(*writable),
        };
    }
}

#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct ChainInput {
    pub layout: MemLayout,
    /// Queue size `1 << (size_log2 % 9)`: 1..=256.
    pub size_log2: u8,
    pub max: MaxD,
    pub indirect: bool,
    /// Where the descriptor table is.
    pub table: Place,
    pub head: Head,
    /// Descriptor table entries 0, 1, … (at most the queue size).
    pub descs: Vec<CDesc>,
    pub tables: Vec<ITable>,
    pub pokes: Vec<Poke>,
    pub probes: Vec<Probe>,
}

impl Encode for ChainInput {
    fn encode(&self, e: &mut Enc) {
        e.put(&self.layout)
            .u8(self.size_log2)
            .put(&self.max)
            .bool(self.indirect)
            .put(&self.table)
            .put(&self.head)
            .vec(&self.descs)
            .vec(&self.tables)
            .vec(&self.pokes)
            .vec(&self.probes);
    }
}

// ---- the run ---------------------------------------------------------

/// Indirect tables per run, and entries per listed table.
const MAX_TABLES: usize = 8;
const MAX_LIST: usize = 1024;
/// A walk of at most 65 535 descriptors takes milliseconds; this is a
/// hang by any measure (libFuzzer's own limit is 1 s).
const WALK_LIMIT: Duration = Duration::from_millis(500);

/// Entries of a generated table: `n % 1024`, except the top 16 values
/// (65 520..=65 535), taken as they are: huge tables stay possible (the
/// seeds have them) without most inputs spending milliseconds on one.
pub fn entries(n: u16) -> u32 {
    if n >= 0xfff0 {
        n.into()
    } else {
        u32::from(n % 1024)
    }
}

fn table_entries(t: &ITable) -> u32 {
    match &t.body {
        Body::List(v) => v.len().min(MAX_LIST) as u32,
        Body::Loop { n, .. } | Body::Fill { n, .. } => entries(*n),
    }
}

/// Writes the guest's memory as the input says; returns the descriptor
/// table's address.
fn lay_out(input: &ChainInput, mem: &GuestMemory, ranges: &[(GuestAddress, usize)], qsize: u16) -> u64 {
    let tables: Vec<&ITable> = input.tables.iter().take(MAX_TABLES).collect();
    let entries: Vec<u32> = tables.iter().map(|t| table_entries(t)).collect();
    let mut at: Vec<u64> = Vec::with_capacity(tables.len());
    for t in &tables {
        let a = t.at.resolve(ranges, &at);
        at.push(a);
    }
    let table = input.table.resolve(ranges, &at);
    let desc = |d: &CDesc, i: u32, n: u32| {
        desc_bytes(d.addr.resolve(ranges, &at), d.len.get(&entries), d.flags.into(), d.next.get(i, n))
    };
    // The descriptor table, then the indirect tables, then the pokes:
    // later writes win where they overlap.
    let n = u32::from(qsize);
    let mut buf = Vec::with_capacity(16 * input.descs.len().min(qsize.into()));
    for (i, d) in input.descs.iter().take(qsize.into()).enumerate() {
        buf.extend_from_slice(&desc(d, i as u32, n));
    }
    put(mem, table, &buf);
    for (k, t) in tables.iter().enumerate() {
        let n = entries[k];
        let mut buf = Vec::with_capacity(16 * n as usize);
        match &t.body {
            Body::List(v) => {
                for (i, d) in v.iter().take(MAX_LIST).enumerate() {
                    buf.extend_from_slice(&desc(d, i as u32, n));
                }
            }
            Body::Loop { n: _, addr, len, write } => {
                let a = addr.resolve(ranges, &at);
                let flags = VIRTQ_DESC_F_NEXT | if *write { VIRTQ_DESC_F_WRITE } else { 0 };
                for i in 0..n {
                    buf.extend_from_slice(&desc_bytes(a, (*len).into(), flags, ((i + 1) % n) as u16));
                }
            }
            Body::Fill { n: _, desc: d } => {
                for i in 0..n {
                    buf.extend_from_slice(&desc(d, i, n));
                }
            }
        }
        put(mem, at[k], &buf);
    }
    for p in &input.pokes {
        put(mem, p.at.resolve(ranges, &at), &p.data.0);
    }
    table
}

pub fn run(input: &ChainInput) {
    checks::log_begin();
    let ranges = input.layout.ranges();
    let mem = Arc::new(guest::memory(input.layout));
    let qsize = 1u16 << (input.size_log2 % 9);
    let table = lay_out(input, &mem, &ranges, qsize);
    let rules = Rules {
        queue_size: qsize,
        max_descriptors: match input.max {
            MaxD::Max256 => 256,
            MaxD::QueueSize => qsize,
            MaxD::Raw(v) => v,
        },
        indirect: input.indirect,
    };
    let head = match input.head {
        Head::In(v) => v % qsize,
        Head::Raw(v) => v,
    };

    let t0 = Instant::now();
    let got = chain::walk(&mem, GuestAddress(table), head, rules);
    let took = t0.elapsed();
    assert!(took < WALK_LIMIT, "the walk took {took:?} under {rules:?}");

    let want = model(&mem, table, head, rules);
    match (&got, &want) {
        (Ok(c), Ok(m)) => {
            assert_eq!(
                (c.readable.len(), c.writable.len()),
                (m.readable, m.writable),
                "the walk's chain is not the spec's: {rules:?}, head {head}"
            );
            assert_eq!(c.head, head);
            let regions = ranges.len();
            let segments = c.readable.segments() + c.writable.segments();
            assert!(
                segments <= usize::from(rules.max_descriptors) * regions,
                "{segments} segments from at most {} descriptors in {regions} regions",
                rules.max_descriptors
            );
            assert!(m.descriptors <= u32::from(rules.max_descriptors));
            assert!(c.readable.len() + c.writable.len() <= MAX_CHAIN_BYTES);
            assert!(!m.followed_indirect || rules.indirect, "an indirect table was followed without INDIRECT_DESC");
            probe(c.readable.clone(), c.writable.clone(), &input.probes);
        }
        (Err(_), Err(_)) => {}
        (g, w) => panic!(
            "the walk and the spec disagree under {rules:?}, head {head}: walk {:?}, spec {:?}",
            g.as_ref().map(|c| (c.readable.len(), c.writable.len())),
            w
        ),
    }
    drop(got);
    checks::log_end();
}

fn probe(mut readable: GuestIovecs, mut writable: GuestIovecs, probes: &[Probe]) {
    for p in probes.iter().take(64) {
        let w = match p {
            Probe::Read { writable: w, .. }
            | Probe::Write { writable: w, .. }
            | Probe::Skip { writable: w, .. }
            | Probe::Truncate { writable: w, .. }
            | Probe::LastByte { writable: w } => *w,
        };
        let iov = if w { &mut writable } else { &mut readable };
        let total = iov.len();
        let segs = iov.segments();
        // Bytes available from `offset` for a buffer of `n`.
        let fits = |offset: u64, n: usize| (n as u64).min(total.saturating_sub(offset)) as usize;
        match p {
            Probe::Read { offset, len, .. } => {
                let mut buf = vec![0u8; usize::from(*len) % 4097];
                let n = iov.read_at(*offset as usize, &mut buf);
                assert_eq!(n, fits((*offset).into(), buf.len()), "read_at({offset}, {}) of {total} bytes", buf.len());
            }
            Probe::Write { offset, data, .. } => {
                let n = iov.write_at(*offset as usize, &data.0);
                assert_eq!(n, fits((*offset).into(), data.0.len()), "write_at({offset}, {}) of {total} bytes", data.0.len());
            }
            Probe::Skip { at, .. } => {
                let s = iov.skip((*at).into());
                assert_eq!(s.len(), total.saturating_sub((*at).into()), "skip({at}) of {total} bytes");
                assert!(s.segments() <= segs);
                assert_eq!(s.is_empty(), s.segments() == 0, "skip({at}) left empty segments");
                *iov = s;
            }
            Probe::Truncate { len, .. } => {
                iov.truncate((*len).into());
                assert_eq!(iov.len(), total.min((*len).into()), "truncate({len}) of {total} bytes");
                assert!(iov.segments() <= segs);
                let mut all = vec![0u8; 0];
                assert_eq!(iov.read_at(iov.len() as usize, &mut all), 0);
            }
            Probe::LastByte { .. } => match iov.last_byte() {
                Some(b) => {
                    assert!(total > 0);
                    assert_eq!((b.len(), b.segments()), (1, 1), "last_byte of {total} bytes");
                    let mut x = [0u8; 2];
                    assert_eq!(b.read_at(0, &mut x), 1);
                }
                None => assert_eq!(total, 0, "no last byte in {total} bytes"),
            },
        }
    }
}

/// What the spec says the chain is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Model {
    pub readable: u64,
    pub writable: u64,
    pub descriptors: u32,
    pub followed_indirect: bool,
}

/// A reference walk, written from virtio 1.2 2.7.5 / 2.7.5.3 and the
/// limits `walk` documents (each table entry at most once, at most
/// `max_descriptors` buffers, at most [`MAX_CHAIN_BYTES`], every buffer
/// inside guest RAM, no zero-length buffer, readable before writable).
pub fn model(mem: &GuestMemory, table: u64, head: u16, rules: Rules) -> Result<Model, &'static str> {
    if head >= rules.queue_size {
        return Err("head out of table");
    }
    let read = |t: u64, i: u32| -> Result<(u64, u32, u16, u16), &'static str> {
        let at = t.checked_add(16 * u64::from(i)).ok_or("table wraps")?;
        let mut b = [0u8; 16];
        mem.read_slice(&mut b, GuestAddress(at)).map_err(|_| "table outside memory")?;
        Ok((
            u64::from_le_bytes(b[0..8].try_into().unwrap()),
            u32::from_le_bytes(b[8..12].try_into().unwrap()),
            u16::from_le_bytes(b[12..14].try_into().unwrap()),
            u16::from_le_bytes(b[14..16].try_into().unwrap()),
        ))
    };
    let max = u32::from(rules.max_descriptors);
    let (mut t, mut size, mut i) = (table, u32::from(rules.queue_size), u32::from(head));
    let mut seen = vec![false; size as usize];
    let mut m = Model { readable: 0, writable: 0, descriptors: 0, followed_indirect: false };
    loop {
        let (addr, len, flags, next) = read(t, i)?;
        if flags & VIRTQ_DESC_F_INDIRECT != 0 {
            if !rules.indirect {
                return Err("indirect not negotiated");
            }
            if m.followed_indirect {
                return Err("nested indirect");
            }
            if flags & VIRTQ_DESC_F_NEXT != 0 {
                return Err("indirect with next");
            }
            if len == 0 || len % 16 != 0 || len / 16 > max {
                return Err("bad indirect length");
            }
            if !mem.check_range(GuestAddress(addr), len as usize) {
                return Err("indirect table outside memory");
            }
            m.followed_indirect = true;
            (t, size, i) = (addr, len / 16, 0);
            seen = vec![false; size as usize];
            continue;
        }
        if std::mem::replace(&mut seen[i as usize], true) {
            return Err("loop");
        }
        m.descriptors += 1;
        if m.descriptors > max {
            return Err("too many descriptors");
        }
        if len == 0 {
            return Err("zero length");
        }
        if !mem.check_range(GuestAddress(addr), len as usize) {
            return Err("buffer outside memory");
        }
        if flags & VIRTQ_DESC_F_WRITE != 0 {
            m.writable += u64::from(len);
        } else {
            if m.writable > 0 {
                return Err("readable after writable");
            }
            m.readable += u64::from(len);
        }
        if m.readable + m.writable > MAX_CHAIN_BYTES {
            return Err("too many bytes");
        }
        if flags & VIRTQ_DESC_F_NEXT == 0 {
            return Ok(m);
        }
        if u32::from(next) >= size {
            return Err("next out of table");
        }
        i = next.into();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each seed's chain is what its name says: (readable, writable) bytes
    /// of an Ok chain, or an error.
    #[test]
    fn seeds_walk_as_named() {
        let want: [(&str, Option<(u64, u64)>); 11] = [
            ("read-request", Some((16, 513))),
            ("write-request-high-region", Some((528, 1))),
            ("top-region", Some((16, 513))),
            ("buffer-past-ram-end", None),
            ("next-poked-out-of-table", None),
            ("loop-in-descriptor-table", None),
            ("indirect", Some((16, 513))),
            ("indirect-not-negotiated", None),
            ("indirect-loop-65535", None),
            ("indirect-loop-65535-max-256", None),
            ("indirect-fill-256-loops", None),
        ];
        let seeds = crate::seeds::chain();
        assert_eq!(seeds.len(), want.len());
        for (name, ok) in want {
            let v = &seeds.iter().find(|(n, _)| *n == name).expect(name).1;
            let mem = guest::memory(v.layout);
            let qsize = 1u16 << (v.size_log2 % 9);
            let table = lay_out(v, &mem, &v.layout.ranges(), qsize);
            let max = match v.max {
                MaxD::Max256 => 256,
                MaxD::QueueSize => qsize,
                MaxD::Raw(m) => m,
            };
            let head = match v.head {
                Head::In(h) => h % qsize,
                Head::Raw(h) => h,
            };
            let rules = Rules { queue_size: qsize, max_descriptors: max, indirect: v.indirect };
            let got = chain::walk(&Arc::new(mem), GuestAddress(table), head, rules);
            assert_eq!(got.as_ref().ok().map(|c| (c.readable.len(), c.writable.len())), ok, "{name}: {got:?}");
            run(v);
        }
    }
}
