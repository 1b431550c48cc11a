//! SplitMix64: tiny, fast, the same on every machine. The simulator picks which channel
//! delivers next with it; the sample workload, the crash tests and the Clerk's fault
//! injection draw from it too, so a run replays from its seed.

pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..bound`.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }

    /// A value in `[0, 1)`: the top 53 bits, so every value is exact in an f64.
    pub fn next_unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::SplitMix64;

    #[test]
    fn the_sequence_is_the_reference_splitmix64() {
        // The first outputs for seed 0 of the reference implementation (Vigna).
        let mut rng = SplitMix64(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn units_lie_in_zero_to_one() {
        let mut rng = SplitMix64(42);
        for _ in 0..10_000 {
            let unit = rng.next_unit();
            assert!((0.0..1.0).contains(&unit), "{unit}");
        }
    }
}
