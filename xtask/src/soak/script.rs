//! One connection's script, derived from its seed alone. The client sends the
//! seed in a 16-byte header; the upstream rebuilds the very same [`Script`],
//! so each side knows every size, the end and what it must receive.

use super::stream::{Rng, mix};

const MIB: u64 = 1 << 20;
const MAGIC: u32 = 0x534F_414B; // "SOAK"

/// How the connection ends (phase 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The client shuts its write side; the upstream, after reading EOF,
    /// still sends `reply` bytes, which the client must receive in full.
    ClientHalfClose { reply: u64 },
    /// The mirror: the upstream shuts first, the client still sends `reply`.
    ServerHalfClose { reply: u64 },
    /// Both sides send a tail of `tail` bytes at once; the client resets
    /// (SO_LINGER 0 + close) after writing `cut` of its own.
    ClientReset { tail: u64, cut: u64 },
    /// One side sends `len` bytes to a reader taking at most 64 KiB per
    /// millisecond; then a plain client half-close.
    SlowReader { client_reads: bool, len: u64 },
}

/// Every decision of one connection.
#[derive(Clone, Debug)]
pub struct Script {
    pub seed: u64,
    /// Request/response turns before the bulk phase: (request, response).
    pub turns_before: Vec<(u64, u64)>,
    /// Bulk bytes client → upstream and upstream → client, sent at once.
    pub bulk_up: u64,
    pub bulk_down: u64,
    pub turns_after: Vec<(u64, u64)>,
    pub end: End,
}

impl Script {
    pub fn new(seed: u64) -> Script {
        let mut r = Rng::new(seed);
        let turns_before = turns(&mut r, 2, 12);
        let bulk_up = bulk_len(&mut r);
        let bulk_down = bulk_len(&mut r);
        let turns_after = turns(&mut r, 1, 6);
        let end = end(&mut r);
        Script {
            seed,
            turns_before,
            bulk_up,
            bulk_down,
            turns_after,
            end,
        }
    }

    /// Seed of the client → upstream bytes.
    pub fn up_seed(&self) -> u64 {
        mix(self.seed ^ 0x5550)
    }

    /// Seed of the upstream → client bytes.
    pub fn down_seed(&self) -> u64 {
        mix(self.seed ^ 0x444F_574E)
    }

    /// The 16-byte header: seed, then the magic and a check of the seed.
    pub fn header(&self) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[..8].copy_from_slice(&self.seed.to_le_bytes());
        h[8..12].copy_from_slice(&MAGIC.to_le_bytes());
        h[12..].copy_from_slice(&(mix(self.seed) as u32).to_le_bytes());
        h
    }

    /// The script a header names, or None if the header is not one of ours.
    pub fn from_header(h: &[u8; 16]) -> Option<Script> {
        let seed = u64::from_le_bytes(h[..8].try_into().ok()?);
        let magic = u32::from_le_bytes(h[8..12].try_into().ok()?);
        let check = u32::from_le_bytes(h[12..].try_into().ok()?);
        (magic == MAGIC && check == mix(seed) as u32).then(|| Script::new(seed))
    }
}

fn turns(r: &mut Rng, lo: u64, hi: u64) -> Vec<(u64, u64)> {
    (0..r.range(lo, hi))
        .map(|_| (r.range(1, 8192), r.range(1, 8192)))
        .collect()
}

/// 0–64 MiB, skewed: a tenth are empty, most are small (log-uniform up to
/// 1 MiB), three in ten are large (uniform 1–64 MiB).
fn bulk_len(r: &mut Rng) -> u64 {
    match r.below(10) {
        0 => 0,
        1..=6 => {
            let base = 1u64 << r.below(20);
            base + r.below(base)
        }
        _ => r.range(MIB, 64 * MIB),
    }
}

fn end(r: &mut Rng) -> End {
    match r.below(4) {
        0 => End::ClientHalfClose {
            reply: r.range(0, 4 * MIB),
        },
        1 => End::ServerHalfClose {
            reply: r.range(0, 4 * MIB),
        },
        2 => {
            let tail = r.range(1, 8 * MIB);
            End::ClientReset {
                tail,
                cut: r.below(tail),
            }
        }
        _ => End::SlowReader {
            client_reads: r.one_in(2),
            len: r.range(64 * 1024, 16 * MIB),
        },
    }
}

/// Uneven write sizes for bulk senders: a quarter small (1 B–1.5 KiB, around
/// one MSS), the rest 1 B–256 KiB; one write in 64 is followed by a pause of
/// 0–5 ms.
pub fn write_size(r: &mut Rng) -> usize {
    if r.one_in(4) {
        r.range(1, 1500) as usize
    } else {
        r.range(1, 256 * 1024) as usize
    }
}

/// The pause after a write, if any.
pub fn pause_ms(r: &mut Rng) -> Option<u64> {
    r.one_in(64).then(|| r.range(0, 5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let s = Script::new(42);
        let t = Script::from_header(&s.header()).unwrap();
        assert_eq!(
            (t.bulk_up, t.bulk_down, t.end),
            (s.bulk_up, s.bulk_down, s.end)
        );
        let mut h = s.header();
        h[3] ^= 1;
        assert!(Script::from_header(&h).is_none());
    }
}
