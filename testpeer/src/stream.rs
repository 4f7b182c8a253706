//! Deterministic byte streams (xorshift64*): the sender generates `n` bytes from a seed, the
//! receiver regenerates them and compares byte by byte, so a lost, repeated or reordered
//! segment is reported by offset without ever storing the stream.

use crate::*;
use std::io::{self, Read, Write};
// Pseudo-random bytes: xorshift64*, so both ends can regenerate and compare a stream byte by byte.

pub(crate) struct Prng(u64);

impl Prng {
    fn new(seed: u64) -> Self {
        Prng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Write `n` bytes of the stream `seed` (chunks of 64 KiB; chunk boundaries don't change the
/// stream because every chunk but the last is a multiple of 8 bytes).
pub(crate) fn write_stream(w: &mut impl Write, seed: u64, n: usize) -> io::Result<()> {
    let mut g = Prng::new(seed);
    let mut buf = vec![0u8; 64 << 10];
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len());
        g.fill(&mut buf[..k]);
        w.write_all(&buf[..k])?;
        left -= k;
    }
    Ok(())
}

/// Read exactly `n` bytes and compare them with the stream `seed`; report the first difference.
pub(crate) fn verify_stream(r: &mut impl Read, seed: u64, n: usize) -> Res<()> {
    let mut g = Prng::new(seed);
    let mut want = vec![0u8; 64 << 10];
    let mut got = vec![0u8; 64 << 10];
    let mut off = 0usize;
    while off < n {
        let k = (n - off).min(want.len());
        g.fill(&mut want[..k]);
        let mut have = 0;
        while have < k {
            match r.read(&mut got[have..k]) {
                Ok(0) => return Err(format!("EOF after {} of {n} bytes", off + have)),
                Ok(m) => have += m,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("read after {} of {n} bytes: {e}", off + have)),
            }
        }
        if let Some(i) = (0..k).find(|&i| want[i] != got[i]) {
            return Err(format!("byte {} differs", off + i));
        }
        off += k;
    }
    Ok(())
}

/// Read until EOF (bounded by the socket timeout); return how many bytes came.
pub(crate) fn read_to_eof(r: &mut impl Read) -> io::Result<usize> {
    let mut buf = [0u8; 16 << 10];
    let mut n = 0;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(n),
            Ok(m) => n += m,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}
