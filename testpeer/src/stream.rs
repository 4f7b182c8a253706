//! Deterministic byte streams (`ambassador_test_support::stream`): the sender generates `n` bytes from a seed, the
//! receiver regenerates them and compares byte by byte, so a lost, repeated or reordered
//! segment is reported by offset without ever storing the stream.

use crate::*;
use ambassador_test_support::stream::{Stream, send_stream};
use std::io::{self, Read, Write};

/// Write `n` bytes of the stream `seed`.
pub(crate) fn write_stream(w: &mut impl Write, seed: u64, n: usize) -> io::Result<()> {
    send_stream(w, seed, n as u64)
}

/// Read exactly `n` bytes and compare them with the stream `seed`; report the first difference.
pub(crate) fn verify_stream(r: &mut impl Read, seed: u64, n: usize) -> Res<()> {
    let mut g = Stream::new(seed);
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
                Err(e) => {
                    // Judge what did arrive first: a reset after a wrong byte must say so.
                    if let Some(i) = (0..have).find(|&i| want[i] != got[i]) {
                        return Err(format!("byte {} differs (then read: {e})", off + i));
                    }
                    return Err(format!("read after {} of {n} bytes: {e}", off + have));
                }
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
