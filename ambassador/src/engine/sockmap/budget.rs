//! The program's own budget per half (`DirCtrl::limit`): a backstop in case
//! userspace is starved, far above the in-flight cap the engine enforces on
//! every tick. The program compares it with the half's *cumulative*
//! redirected bytes, so a connection that stays in the kernel (request and
//! response: nothing ever lags by the cap) would run into a fixed limit
//! after that many bytes and be reset. The budget rolls instead: it is kept
//! at (bytes the destination has taken) + backstop.
//!
//! Raising it costs one map update, so it is raised in steps of an eighth
//! of the backstop: the headroom left is always at least 7/8 of it minus
//! the bytes in flight. That headroom must cover what a connection can
//! redirect between two ticks; the slowest tick is 500 ms (a resting or
//! stalled connection has none, but its wake mark is at most a quarter of
//! the in-flight cap ahead, see `rest.rs`), so the 2 GiB default covers a
//! burst at 28 Gbit/s from idle (the engine measured about 8–12 Gbit/s for
//! one stream on loopback).
//!
//! Sans-IO: [`Budget::raise`] says when and to what; the driver writes it.

/// The rolling budget of one half.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    backstop: u64,
    /// The limit the program has now.
    limit: u64,
}

impl Budget {
    /// The budget a half is inserted with: nothing taken yet.
    pub fn new(backstop: u64) -> Self {
        Budget {
            backstop,
            limit: backstop,
        }
    }

    /// The limit to insert the half with.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Given what the destination has taken so far, the new limit to write
    /// to the program, if it is time to raise it.
    pub fn raise(&mut self, dst_taken: u64) -> Option<u64> {
        let want = dst_taken.saturating_add(self.backstop);
        if want > self.limit && want - self.limit >= self.backstop / 8 {
            self.limit = want;
            Some(want)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_at_the_backstop_and_rolls_with_what_was_taken() {
        let mut b = Budget::new(800);
        assert_eq!(b.limit(), 800);
        assert_eq!(b.raise(0), None, "nothing taken: no update");
        assert_eq!(b.raise(99), None, "less than a step: no update");
        assert_eq!(b.raise(100), Some(900), "a step: taken + backstop");
        assert_eq!(b.raise(150), None);
        assert_eq!(b.raise(10_000), Some(10_800), "never stuck behind");
        assert_eq!(b.limit(), 10_800);
    }

    #[test]
    fn headroom_never_falls_below_seven_eighths_of_the_backstop() {
        let mut b = Budget::new(1 << 20);
        for taken in (0..64u64 << 20).step_by(4096) {
            b.raise(taken);
            assert!(b.limit() - taken >= (7 << 20) / 8, "taken {taken}");
        }
    }

    #[test]
    fn a_huge_backstop_does_not_overflow() {
        let mut b = Budget::new(u64::MAX);
        assert_eq!(b.raise(u64::MAX / 2), None);
        assert_eq!(b.limit(), u64::MAX);
    }
}
