//! Canonical hashing: length-prefixed fields fed to xxh3.
//!
//! Digests cross process and machine boundaries (Warden payload digests, output digests,
//! state digests compared between instances), so they are built from an explicit byte
//! layout, never from `std::hash::Hash`, whose output may change between Rust releases.

use xxhash_rust::xxh3::{xxh3_128, xxh3_64, Xxh3};

/// Streams typed fields into xxh3 in a layout that cannot be ambiguous: every string
/// is prefixed by its length, every integer has a fixed width, every variant a tag.
pub struct CanonicalHasher {
    inner: Xxh3,
}

impl CanonicalHasher {
    pub fn new() -> Self {
        Self { inner: Xxh3::new() }
    }

    pub fn tag(&mut self, tag: u8) -> &mut Self {
        self.inner.update(&[tag]);
        self
    }

    pub fn str(&mut self, value: &str) -> &mut Self {
        let len = u32::try_from(value.len()).expect("hashed strings are bounded far below 4 GiB");
        self.inner.update(&len.to_le_bytes());
        self.inner.update(value.as_bytes());
        self
    }

    pub fn u64(&mut self, value: u64) -> &mut Self {
        self.inner.update(&value.to_le_bytes());
        self
    }

    pub fn i64(&mut self, value: i64) -> &mut Self {
        self.inner.update(&value.to_le_bytes());
        self
    }

    pub fn finish64(&self) -> u64 {
        self.inner.digest()
    }

    pub fn finish128(&self) -> u128 {
        self.inner.digest128()
    }
}

impl Default for CanonicalHasher {
    fn default() -> Self {
        Self::new()
    }
}

/// Digest of an encoded output: what peers compare and what the Clerk retains.
pub fn output_digest(encoded: &[u8]) -> u128 {
    xxh3_128(encoded)
}

/// Fingerprint of an idempotency key. 128 bits, so that at 3,000,000 live keys the
/// chance of two keys sharing a fingerprint is about 1 in 10^25.
pub fn key_fingerprint(key: &str) -> u128 {
    xxh3_128(key.as_bytes())
}

/// Stable hash of an affinity key, for shard placement.
pub fn affinity_hash(bytes: &[u8]) -> u64 {
    xxh3_64(bytes)
}
