//! Deterministic randomness: [`Rng`] (the `rand_chacha` crate's ChaCha8, which is
//! reproducible by design: the same seed gives the same numbers on every platform) draws the
//! script's decisions, [`ByteStream`] (the shared test stream) is the content of one direction
//! of one connection. Both ends build the same generators from the connection's seed, so the
//! receiver checks every byte as it arrives and nothing is ever buffered beyond one read.

use ambassador_test_support::Stream;
use rand::{Rng as _, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A 64-bit value derived from `z` (the first output of the generator seeded with it): seeds of
/// connections and directions, and the header's check.
pub fn mix(z: u64) -> u64 {
    ChaCha8Rng::seed_from_u64(z).next_u64()
}

/// The script's decisions (sizes, end, pauses), in the few shapes it needs.
#[derive(Clone)]
pub struct Rng(ChaCha8Rng);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(ChaCha8Rng::seed_from_u64(seed))
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0.gen_range(0..n)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        self.0.gen_range(lo..=hi)
    }

    /// True with probability `1/n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

/// The bytes of one direction: `ambassador_test_support`'s stream, whose
/// bytes do not depend on how it is cut into reads and writes. `pos` counts
/// the bytes produced so far (the stream offset).
pub struct ByteStream {
    stream: Stream,
    pub pos: u64,
}

impl ByteStream {
    pub fn new(seed: u64) -> Self {
        ByteStream {
            stream: Stream::new(mix(seed)),
            pos: 0,
        }
    }

    /// The next `buf.len()` bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        self.pos += buf.len() as u64;
        self.stream.fill(buf);
    }
}

/// The checking end of a direction: compares what arrives with the stream.
pub struct Checker {
    seed: u64,
    expect: ByteStream,
    scratch: Vec<u8>,
}

impl Checker {
    pub fn new(seed: u64) -> Self {
        Checker {
            seed,
            expect: ByteStream::new(seed),
            scratch: Vec::new(),
        }
    }

    /// Bytes verified so far (the offset of the next byte expected).
    pub fn pos(&self) -> u64 {
        self.expect.pos
    }

    /// Check `got` as the next bytes; Err carries the stream offset of the
    /// first byte that differs and, if found, where in the stream the bytes
    /// that arrived there come from.
    pub fn check(&mut self, got: &[u8]) -> Result<(), (u64, Option<u64>)> {
        let start = self.expect.pos;
        self.scratch.resize(got.len(), 0);
        self.expect.fill(&mut self.scratch);
        if self.scratch == got {
            return Ok(());
        }
        let i = got
            .iter()
            .zip(&self.scratch)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        let at = start + i as u64;
        Err((at, locate(self.seed, &got[i..], at)))
    }
}

/// Where the stream `seed` holds `wrong` (the bytes that arrived at offset
/// `at`), searching offsets up to `at` + 8 MiB: a duplicate shows an earlier
/// origin, a loss a later one. Needs at least 16 bytes to be meaningful.
fn locate(seed: u64, wrong: &[u8], at: u64) -> Option<u64> {
    let pat = &wrong[..wrong.len().min(64)];
    if pat.len() < 16 {
        return None;
    }
    let mut all = vec![0u8; (at + (8 << 20)) as usize];
    ByteStream::new(seed).fill(&mut all);
    all.windows(pat.len())
        .position(|w| w == pat)
        .map(|p| p as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_does_not_change_the_stream() {
        let mut whole = vec![0u8; 1000];
        ByteStream::new(7).fill(&mut whole);
        let mut s = ByteStream::new(7);
        let mut parts = Vec::new();
        for n in [1usize, 3, 8, 13, 0, 200, 7, 768] {
            let mut b = vec![0u8; n];
            s.fill(&mut b);
            parts.extend(b);
        }
        assert_eq!(parts, whole);
        let mut c = Checker::new(7);
        assert_eq!(c.check(&whole[..10]), Ok(()));
        let mut bad = whole[10..20].to_vec();
        bad[4] ^= 1;
        assert_eq!(c.check(&bad).map_err(|e| e.0), Err(14));
    }
}
