//! Writing inputs the way `arbitrary` reads them, so that committed seeds
//! are real structures (a negotiating driver, a bzImage header, an argv)
//! rather than random bytes.
//!
//! `arbitrary` 1.x (pinned in `fuzz/Cargo.lock`) reads, for derived types:
//! integers as little-endian bytes; `bool` as one byte (`& 1`); an enum as a
//! `u32` `x` selecting variant `(x * count) >> 32`; struct fields in order;
//! `Vec<T>` as elements each preceded by a "keep going" `bool`, ended by a
//! `false` (or the end of the input); `Option<T>` as a `bool` then `T`;
//! `Box<T>` as `T`. Byte strings and text here are [`Bytes`], which read a
//! `u16` length first (not `arbitrary`'s length-from-the-end encoding,
//! which cannot be written front to back). The tests in `lib.rs` check
//! every encoder round-trips through `arbitrary`.

use arbitrary::{Arbitrary, Unstructured};

/// Bytes in `arbitrary`'s order.
#[derive(Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    pub fn new() -> Self {
        Enc(Vec::new())
    }
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(v.into())
    }
    /// Enum variant `index` of `count`: the smallest `u32` that selects it.
    pub fn tag(&mut self, index: u32, count: u32) -> &mut Self {
        assert!(index < count, "variant {index} of {count}");
        let x = ((u64::from(index) << 32) + u64::from(count) - 1) / u64::from(count);
        self.u32(x as u32)
    }
    pub fn vec<T: Encode>(&mut self, items: &[T]) -> &mut Self {
        for i in items {
            self.bool(true);
            i.encode(self);
        }
        self.bool(false)
    }
    pub fn option<T: Encode>(&mut self, v: &Option<T>) -> &mut Self {
        match v {
            Some(x) => {
                self.bool(true);
                x.encode(self);
            }
            None => {
                self.bool(false);
            }
        }
        self
    }
    pub fn put<T: Encode>(&mut self, v: &T) -> &mut Self {
        v.encode(self);
        self
    }
}

/// The inverse of `Arbitrary` for an input type.
pub trait Encode {
    fn encode(&self, e: &mut Enc);

    fn to_bytes(&self) -> Vec<u8> {
        let mut e = Enc::new();
        self.encode(&mut e);
        e.0
    }
}

macro_rules! encode_int {
    ($($t:ident),*) => {$(
        impl Encode for $t {
            fn encode(&self, e: &mut Enc) {
                e.$t(*self);
            }
        }
    )*};
}
encode_int!(u8, u16, u32, u64);

impl Encode for bool {
    fn encode(&self, e: &mut Enc) {
        e.bool(*self);
    }
}

impl<T: Encode> Encode for Box<T> {
    fn encode(&self, e: &mut Enc) {
        (**self).encode(e);
    }
}

impl<T: Encode> Encode for Option<T> {
    fn encode(&self, e: &mut Enc) {
        e.option(self);
    }
}

impl<T: Encode> Encode for Vec<T> {
    fn encode(&self, e: &mut Enc) {
        e.vec(self);
    }
}

/// At most `MAX` bytes: a `u16` length (taken modulo `MAX + 1`), then the
/// bytes (fewer if the input ends first).
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash)]
pub struct Bytes<const MAX: usize>(pub Vec<u8>);

impl<const MAX: usize> Bytes<MAX> {
    pub fn new(b: impl Into<Vec<u8>>) -> Self {
        let v = b.into();
        assert!(v.len() <= MAX && MAX <= usize::from(u16::MAX), "{} bytes > {MAX}", v.len());
        Bytes(v)
    }
    /// The bytes as text (invalid UTF-8 replaced).
    pub fn lossy(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
    /// The bytes as an OS string (any bytes, as in a real argv).
    pub fn os(&self) -> std::ffi::OsString {
        use std::os::unix::ffi::OsStringExt;
        std::ffi::OsString::from_vec(self.0.clone())
    }
}

impl<'a, const MAX: usize> Arbitrary<'a> for Bytes<MAX> {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let n = usize::from(u16::arbitrary(u)?) % (MAX + 1);
        let n = n.min(u.len());
        Ok(Bytes(u.bytes(n)?.to_vec()))
    }

    fn size_hint(_depth: usize) -> (usize, Option<usize>) {
        (2, Some(2 + MAX))
    }
}

impl<const MAX: usize> Encode for Bytes<MAX> {
    fn encode(&self, e: &mut Enc) {
        e.u16(self.0.len() as u16);
        e.0.extend_from_slice(&self.0);
    }
}

/// Text of at most `MAX` bytes (a [`Bytes`] read as UTF-8, lossily).
pub type Text<const MAX: usize> = Bytes<MAX>;

/// Builds a [`Text`] from a `&str`.
pub fn text<const MAX: usize>(s: &str) -> Text<MAX> {
    Bytes::new(s.as_bytes())
}

/// Decodes `bytes` as `T` the way `fuzz_target!` does.
pub fn decode<'a, T: Arbitrary<'a>>(bytes: &'a [u8]) -> arbitrary::Result<T> {
    T::arbitrary_take_rest(Unstructured::new(bytes))
}
