//! A deterministic pseudo-random byte stream (xorshift64), so both ends of a connection can
//! generate and check gigabytes without storing them.
//!
//! The generator produces 64-bit words and hands them out byte by byte, so the stream does not
//! depend on how it is cut into reads and writes: `fill(10)` then `fill(6)` gives the same 16
//! bytes as `fill(16)`. The seed is spread by a multiply so that nearby seeds give unrelated
//! streams.

use std::io::{self, Read, Write};

/// The generator: state, the current word and how many of its bytes are used.
pub struct Stream(u64, [u8; 8], usize);

impl Stream {
    pub fn new(seed: u64) -> Self {
        Stream(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1, [0; 8], 8)
    }

    /// The next `buf.len()` bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            if self.2 == 8 {
                let x = &mut self.0;
                *x ^= *x << 13;
                *x ^= *x >> 7;
                *x ^= *x << 17;
                self.1 = x.to_le_bytes();
                self.2 = 0;
            }
            *b = self.1[self.2];
            self.2 += 1;
        }
    }

    /// The first `n` bytes of stream `seed`.
    pub fn bytes(seed: u64, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        Stream::new(seed).fill(&mut v);
        v
    }
}

/// Write `n` bytes of stream `seed` to `w`.
pub fn send_stream(w: &mut impl Write, seed: u64, n: u64) -> io::Result<()> {
    let mut s = Stream::new(seed);
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        s.fill(&mut buf[..k]);
        w.write_all(&buf[..k])?;
        left -= k as u64;
    }
    Ok(())
}

/// Read from `r` until EOF, checking every byte against stream `seed`: the byte count, or an
/// error at the first wrong byte.
pub fn recv_stream(r: &mut impl Read, seed: u64) -> io::Result<u64> {
    let mut s = Stream::new(seed);
    let mut buf = vec![0u8; 256 * 1024];
    let mut want = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let k = r.read(&mut buf)?;
        if k == 0 {
            return Ok(got);
        }
        s.fill(&mut want[..k]);
        if let Some(i) = buf[..k].iter().zip(&want[..k]).position(|(a, b)| a != b) {
            return Err(io::Error::other(format!("byte {} differs", got + i as u64)));
        }
        got += k as u64;
    }
}

/// Read from `r` until EOF and check it is exactly `n` bytes of stream `seed`.
pub fn check_stream(r: &mut impl Read, seed: u64, n: u64) -> Result<u64, String> {
    let got = recv_stream(&mut LimitCheck(r, n, 0), seed).map_err(|e| e.to_string())?;
    if got != n {
        return Err(format!("EOF after {got} of {n} bytes"));
    }
    Ok(got)
}

/// A reader that fails once more than `limit` bytes came.
struct LimitCheck<'a, R>(&'a mut R, u64, u64);

impl<R: Read> Read for LimitCheck<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let k = self
            .0
            .read(buf)
            .map_err(|e| io::Error::other(format!("read error after {} bytes: {e}", self.2)))?;
        self.2 += k as u64;
        if self.2 > self.1 {
            return Err(io::Error::other(format!(
                "more than {} bytes received",
                self.1
            )));
        }
        Ok(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_does_not_change_the_stream() {
        let whole = Stream::bytes(7, 100);
        let mut s = Stream::new(7);
        let mut parts = Vec::new();
        for n in [1usize, 3, 8, 13, 0, 75] {
            let mut b = vec![0u8; n];
            s.fill(&mut b);
            parts.extend(b);
        }
        assert_eq!(parts, whole);
        assert_eq!(check_stream(&mut &whole[..], 7, 100), Ok(100));
        assert!(check_stream(&mut &whole[..], 7, 99).is_err());
        let mut bad = whole.clone();
        bad[50] ^= 1;
        assert_eq!(
            check_stream(&mut &bad[..], 7, 100),
            Err("byte 50 differs".to_string())
        );
    }
}
