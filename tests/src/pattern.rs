//! A deterministic byte stream both ends of a test can generate, so data
//! integrity is checked without shipping the data, and the stream moves
//! both tier-3 vsock ends share.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use sha2::{Digest, Sha256};

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

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Feeds `bytes` of `Pattern(seed)` to `sink` in 64 KiB pieces; returns the
/// SHA-256 of what was fed.
pub fn generate(bytes: u64, seed: u64, mut sink: impl FnMut(&[u8]) -> std::io::Result<()>) -> std::io::Result<String> {
    let mut pattern = Pattern::new(seed);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        pattern.fill(&mut buf[..n]);
        hash.update(&buf[..n]);
        sink(&buf[..n])?;
        left -= n as u64;
    }
    Ok(hex(&hash.finalize()))
}

/// The SHA-256 of `bytes` of `Pattern(seed)`.
pub fn pattern_sha256(bytes: u64, seed: u64) -> String {
    generate(bytes, seed, |_| Ok(())).unwrap_or_default()
}

/// Reads `stream` to its end; returns (SHA-256, byte count).
pub fn drain(stream: &mut UnixStream) -> std::io::Result<(String, u64)> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok((hex(&hash.finalize()), total));
        }
        hash.update(&buf[..n]);
        total += n as u64;
    }
}

/// Sends `bytes` of `Pattern(seed)` on one thread, shuts the write side,
/// while reading to the end on this one. Returns (sent SHA-256, received
/// SHA-256, received bytes).
pub fn exchange(stream: UnixStream, bytes: u64, seed: u64) -> std::io::Result<(String, String, u64)> {
    let mut writer = stream.try_clone()?;
    let sender = std::thread::spawn(move || -> std::io::Result<String> {
        let sha = generate(bytes, seed, |chunk| writer.write_all(chunk))?;
        writer.shutdown(std::net::Shutdown::Write)?;
        Ok(sha)
    });
    let mut reader = stream;
    let (got, n) = drain(&mut reader)?;
    let sent = sender.join().map_err(|_| std::io::Error::other("the sender panicked"))??;
    Ok((sent, got, n))
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
