//! The pace of a spliced connection's driver, and how an idle connection
//! stops costing CPU.
//!
//! The kernel moves a spliced connection's bytes without userspace, but the
//! driver (`spliced.rs`) must still look: it forwards FINs once drained,
//! pokes a psock that gave up on a full send buffer, rolls the program's
//! budget and checks byte conservation. It ticks every [`TICK_FAST`] while
//! anything moves and backs off, doubling, to [`TICK_SLOW`] — or to
//! [`TICK_LEAVING`] while the connection leaves the kernel: then the tick
//! also copies a drained half in userspace, so a quiet tick costs latency
//! there. (It used to stay at 2 ms until both destinations drained: 400
//! connections whose upstream stopped reading kept a core 17% busy.)
//!
//! A connection that is still quiet at the slowest tick and whose books are
//! settled ([`restful`]: every byte TCP received went through the verdict,
//! every redirected byte is in its destination, nothing pending) *rests*.
//! The driver writes each half's redirected count to `DirCtrl::wake`, takes
//! each socket's lock once (a verdict that read the old controls has
//! finished), and reads the counts again: unchanged, nothing can move
//! without the program pushing the cookie to `EVENTS` (the redirect past
//! the mark does). It then waits only for an event: that push, or an edge
//! (RDHUP, ERR, HUP) from the watcher thread. [`TICK_REST`] is a safety net
//! for a lost event (the ring buffer was full), not a poll.
//!
//! A rest costs per connection one map update per half and a few
//! syscalls, once per idle period; a resting connection costs nothing.
//! Sans-IO: [`Pace`] and [`restful`] decide; the driver acts.

use super::half::{Observed, Path};
use std::time::Duration;

/// Tick while bytes move or an edge is pending.
pub const TICK_FAST: Duration = Duration::from_millis(2);
/// Slowest tick of a connection that cannot rest (bytes in flight to a
/// destination that is not reading: its psock needs a poke now and then).
pub const TICK_SLOW: Duration = Duration::from_millis(500);
/// Slowest tick while leaving the kernel (`Path::Leaving`).
pub const TICK_LEAVING: Duration = Duration::from_millis(100);
/// Safety tick of a resting connection: only matters if a wake-up was lost.
pub const TICK_REST: Duration = Duration::from_secs(30);

/// What the driver waits for after a tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Sleep this long (or until an event).
    Tick(Duration),
    /// Arm the wake marks and rest until an event (or [`TICK_REST`]).
    Rest,
}

/// The driver's tick, backing off while the connection is quiet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pace {
    tick: Duration,
}

impl Default for Pace {
    fn default() -> Self {
        Pace { tick: TICK_FAST }
    }
}

impl Pace {
    /// After a tick on `path` that saw the connection `busy` (bytes moved,
    /// an edge pending) and `restful` (see [`restful`]): what to wait for.
    pub fn next(&mut self, path: Path, busy: bool, restful: bool) -> Wait {
        if busy {
            self.tick = TICK_FAST;
            return Wait::Tick(TICK_FAST);
        }
        if self.tick == TICK_SLOW && restful {
            return Wait::Rest;
        }
        let slowest = if path == Path::Leaving {
            TICK_LEAVING
        } else {
            TICK_SLOW
        };
        self.tick = (self.tick * 2).min(slowest);
        Wait::Tick(self.tick)
    }

    /// An event arrived: look again soon.
    pub fn woken(&mut self) {
        self.tick = TICK_FAST;
    }
}

/// Whether a spliced connection may rest: both sockets are in the kernel
/// path, each half's verdict has seen every byte TCP received
/// (`settled`), and each destination took every byte redirected to it
/// (nothing for a poke to push, nothing for a check to wait on).
pub fn restful(path: Path, o: [&Observed; 2], settled: [bool; 2]) -> bool {
    path == Path::Spliced && (0..2).all(|d| settled[d] && o[d].in_flight() == 0)
}

/// The wake marks for a rest: each half's redirected count now.
pub fn marks(o: [&Observed; 2]) -> [u64; 2] {
    [o[0].redirected, o[1].redirected]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(redirected: u64, dst_taken: u64) -> Observed {
        Observed {
            redirected,
            received: redirected,
            dst_taken,
            ..Observed::default()
        }
    }

    #[test]
    fn backs_off_to_the_slow_tick_then_rests() {
        let mut p = Pace::default();
        let mut waits = vec![];
        for _ in 0..12 {
            match p.next(Path::Spliced, false, true) {
                Wait::Rest => break,
                Wait::Tick(t) => waits.push(t.as_millis()),
            }
        }
        assert_eq!(waits, [4, 8, 16, 32, 64, 128, 256, 500]);
        assert_eq!(
            p.next(Path::Spliced, false, true),
            Wait::Rest,
            "stays restful"
        );
    }

    #[test]
    fn never_rests_while_busy_or_unsettled() {
        let mut p = Pace::default();
        for _ in 0..20 {
            assert_ne!(p.next(Path::Spliced, false, false), Wait::Rest);
        }
        assert_eq!(
            p.next(Path::Spliced, false, false),
            Wait::Tick(TICK_SLOW),
            "slowest tick"
        );
        assert_eq!(
            p.next(Path::Spliced, true, true),
            Wait::Tick(TICK_FAST),
            "busy: fast again"
        );
        assert_eq!(
            p.next(Path::Spliced, false, true),
            Wait::Tick(2 * TICK_FAST)
        );
    }

    #[test]
    fn leaving_backs_off_less_and_never_rests() {
        let mut p = Pace::default();
        for _ in 0..20 {
            assert_ne!(p.next(Path::Leaving, false, false), Wait::Rest);
        }
        assert_eq!(
            p.next(Path::Leaving, false, false),
            Wait::Tick(TICK_LEAVING)
        );
    }

    #[test]
    fn an_event_restarts_the_back_off() {
        let mut p = Pace::default();
        while p.next(Path::Spliced, false, true) != Wait::Rest {}
        p.woken();
        assert_eq!(
            p.next(Path::Spliced, false, true),
            Wait::Tick(2 * TICK_FAST)
        );
    }

    #[test]
    fn rests_only_with_nothing_in_flight_and_every_byte_seen() {
        let (idle, lagging) = (obs(100, 100), obs(100, 40));
        assert!(restful(Path::Spliced, [&idle, &idle], [true, true]));
        assert!(
            !restful(Path::Spliced, [&idle, &lagging], [true, true]),
            "a destination still owes bytes: its psock may need a poke"
        );
        assert!(
            !restful(Path::Spliced, [&idle, &idle], [true, false]),
            "the verdict has not seen every received byte yet"
        );
        for path in [Path::Leaving, Path::Left] {
            assert!(!restful(path, [&idle, &idle], [true, true]), "{path:?}");
        }
        assert_eq!(marks([&idle, &obs(7, 7)]), [100, 7]);
    }
}
