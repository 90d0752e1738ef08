//! A tiny deterministic random number generator for synthetic data.
//!
//! [`SplitMix64`] (Steele, Lea and Flood, "Fast splittable pseudorandom number generators", 2014; the
//! reference constants are Vigna's) is written out here instead of taken from a crate on purpose:
//! synthetic calibration samples are part of a plan's provenance ("synthetic:passkey, seed 7"), so the
//! same seed must give the same tokens forever. A crate's generator or its sampling helpers may change
//! their output stream between versions; these twenty lines never will, and a test pins the stream.

/// SplitMix64: a 64-bit state advanced by a constant and mixed on output. Not cryptographic.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A new generator for a sub-stream (one per sample), seeded from this one's next output, so that
    /// sample `i` does not depend on how many samples follow it.
    pub(crate) fn split(&mut self) -> Self {
        Self::new(self.next_u64())
    }

    /// Uniform in `0..n`; 0 when `n` is 0. Lemire's multiply-shift with rejection, so unbiased.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let threshold = n.wrapping_neg() % n;
        loop {
            let product = u128::from(self.next_u64()) * u128::from(n);
            // Truncation intended: the low 64 bits decide rejection, the high 64 bits are the value.
            let low = product as u64;
            if low >= threshold {
                return (product >> 64) as u64;
            }
        }
    }

    /// Uniform in `lo..=hi` (requires `lo <= hi`; returns `lo` otherwise).
    pub(crate) fn range_inclusive(&mut self, lo: u64, hi: u64) -> u64 {
        match hi.checked_sub(lo).and_then(|span| span.checked_add(1)) {
            Some(n) => lo + self.below(n),
            None if hi >= lo => self.next_u64(), // the full u64 range
            None => lo,
        }
    }

    /// One item of a non-empty word list (the lists are constants of this crate); "" if empty.
    pub(crate) fn pick(&mut self, items: &[&'static str]) -> &'static str {
        let len = u64::try_from(items.len()).unwrap_or(u64::MAX);
        let i = usize::try_from(self.below(len)).unwrap_or(0);
        items.get(i).copied().unwrap_or("")
    }

    /// A random version-4 UUID in the canonical lowercase 8-4-4-4-12 form.
    pub(crate) fn uuid(&mut self) -> String {
        let hi = (self.next_u64() & !0xF000) | 0x4000; // version nibble = 4
        let lo = (self.next_u64() & !(0b11 << 62)) | (0b10 << 62); // RFC 4122 variant
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            hi >> 32,
            (hi >> 16) & 0xFFFF,
            hi & 0xFFFF,
            lo >> 48,
            lo & 0xFFFF_FFFF_FFFF
        )
    }
}

#[cfg(test)]
mod tests {
    use super::SplitMix64;

    /// The stream is pinned: changing it changes every synthetic sample ever recorded in a plan.
    #[test]
    fn stream_matches_reference() {
        let mut rng = SplitMix64::new(1_234_567);
        let got: Vec<u64> = (0..5).map(|_| rng.next_u64()).collect();
        assert_eq!(
            got,
            [
                6_457_827_717_110_365_317,
                3_203_168_211_198_807_973,
                9_817_491_932_198_370_423,
                4_593_380_528_125_082_431,
                16_408_922_859_458_223_821,
            ]
        );
    }

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut rng = SplitMix64::new(3);
        let mut seen = [false; 7];
        for _ in 0..1000 {
            let v = rng.below(7);
            assert!(v < 7);
            seen[v as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(rng.below(0), 0);
        assert!((10..=20).contains(&rng.range_inclusive(10, 20)));
    }

    #[test]
    fn uuid_has_canonical_form() {
        let mut rng = SplitMix64::new(9);
        let u = rng.uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(u.chars().nth(14), Some('4'));
        assert!(matches!(u.chars().nth(19), Some('8' | '9' | 'a' | 'b')));
        assert_eq!(u.matches('-').count(), 4);
    }
}
