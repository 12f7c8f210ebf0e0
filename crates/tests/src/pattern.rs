//! A deterministic byte stream both ends of a test can generate, so data
//! integrity is checked without shipping the data.

/// xorshift64* bytes from a seed.
pub struct Pattern(u64);

impl Pattern {
    /// The stream for `seed`.
    pub fn new(seed: u64) -> Self {
        Pattern(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// Fills `buf` with the next bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_does_not_depend_on_chunking() {
        let mut a = Pattern::new(7);
        let mut whole = [0u8; 40];
        a.fill(&mut whole);
        let mut b = Pattern::new(7);
        let mut parts = [0u8; 40];
        b.fill(&mut parts[..16]);
        b.fill(&mut parts[16..]);
        assert_eq!(whole, parts);
        assert_ne!(whole, [0u8; 40]);
    }
}
