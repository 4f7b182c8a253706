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
//!
//! A connection that cannot rest because it is *stalled* — bytes in flight
//! to a destination that is not reading, or, while leaving, a half copied
//! in userspace that waits for its source or its destination — waits for
//! the socket events that end the stall instead of ticking ([`stall`],
//! [`Wait::Stall`]):
//!
//! - a destination that took nothing of what was redirected to it gets
//!   `TCP_NOTSENT_LOWAT` 1 and `EPOLLOUT`: it polls writable only once it
//!   sent every byte it holds, and its `tcp_poll` sets `SOCK_NOSPACE`, so
//!   the ACKs that free it call `sk_write_space()` — which runs the psock
//!   worker (the poke, done by the kernel) and wakes the watcher;
//! - a copied half's destination that was full gets `EPOLLOUT`, its empty
//!   source `EPOLLIN` (with `SO_RCVLOWAT` back at 1: out of `VERDICT`, no
//!   verdict can run for it).
//!
//! Every change goes back when the wait ends. A wake that was not progress
//! (an interest already true when armed) gets one plain slow tick before
//! the next stall wait, so it cannot spin; [`TICK_REST`] is again only a
//! safety net.
//!
//! Sans-IO: [`Pace`], [`restful`] and [`stall`] decide; the driver acts.

use super::half::{Observed, Path};
use std::time::Duration;

/// Tick while bytes move or an edge is pending.
pub const TICK_FAST: Duration = Duration::from_millis(2);
/// Slowest tick of a connection that can neither rest nor wait on a stall
/// (say a verdict that has not seen every byte yet).
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
    /// Arm the stall's socket interests ([`stall`]) and wait for an event
    /// (or [`TICK_REST`]).
    Stall,
}

/// The driver's tick, backing off while the connection is quiet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pace {
    tick: Duration,
    /// The last wait was a stall wait that an event ended.
    after_stall: bool,
}

impl Default for Pace {
    fn default() -> Self {
        Pace {
            tick: TICK_FAST,
            after_stall: false,
        }
    }
}

impl Pace {
    /// After a tick on `path` that saw the connection `busy` (bytes moved,
    /// an edge pending) and `restful` (see [`restful`]): what to wait for.
    /// `stalled`: [`stall`] found what would end the stall.
    pub fn next(&mut self, path: Path, busy: bool, restful: bool, stalled: bool) -> Wait {
        let after_stall = std::mem::take(&mut self.after_stall);
        if busy {
            self.tick = TICK_FAST;
            return Wait::Tick(TICK_FAST);
        }
        let slowest = if path == Path::Leaving {
            TICK_LEAVING
        } else {
            TICK_SLOW
        };
        if after_stall {
            // The event was no progress (say an interest that was already
            // true): one plain tick before waiting on the stall again.
            self.tick = slowest;
            return Wait::Tick(slowest);
        }
        if self.tick == slowest && restful {
            return Wait::Rest;
        }
        if self.tick == slowest && stalled {
            return Wait::Stall;
        }
        self.tick = (self.tick * 2).min(slowest);
        Wait::Tick(self.tick)
    }

    /// An event arrived: look again soon.
    pub fn woken(&mut self) {
        self.tick = TICK_FAST;
    }

    /// A stall wait ended (an event, or the safety tick): look now; if
    /// nothing moved, one plain tick comes before the next stall wait.
    pub fn stall_ended(&mut self) {
        self.after_stall = true;
    }
}

/// Whether a spliced connection may rest: both sockets are in the kernel
/// path, each half's verdict has seen every byte TCP received
/// (`settled`), and each destination took every byte redirected to it
/// (nothing for a poke to push, nothing for a check to wait on).
pub fn restful(path: Path, o: [&Observed; 2], settled: [bool; 2]) -> bool {
    path == Path::Spliced && (0..2).all(|d| settled[d] && o[d].in_flight() == 0)
}

/// One half as [`stall`] sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stalled {
    /// Redirected bytes its destination has not taken.
    pub in_flight: u64,
    /// Its destination took bytes since the last look.
    pub took: bool,
    /// The verdict saw every byte its source received (see `settled`).
    pub settled: bool,
    /// While leaving: where its userspace copy stands, once it may copy.
    pub copy: Option<Copying>,
}

/// Where a half's userspace copy (`leaving.rs`) stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Copying {
    /// Bytes wait in its pipe: the destination was full.
    Held,
    /// Its source had nothing more.
    Empty,
    /// Its source is at EOF (the copy loop passes the FIN on later).
    Eof,
}

/// What a stall waits for on one socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Interest {
    /// `EPOLLIN` (a copied half's empty source).
    pub readable: bool,
    /// `EPOLLOUT` (a copied half's full destination).
    pub writable: bool,
    /// `TCP_NOTSENT_LOWAT` 1 and `EPOLLOUT`: a destination that took none
    /// of the bytes redirected to it.
    pub sent: bool,
}

impl Interest {
    pub fn any(&self) -> bool {
        self.readable || self.writable || self.sent
    }
}

/// If the connection is stalled, the socket events that end the stall:
/// per socket, [client, upstream] (half d reads socket d and writes socket
/// 1 − d). `None` when something else may need a tick: bytes moving, a
/// verdict that has not seen every byte, or nothing stalled at all (then
/// it rests, or unlinks).
pub fn stall(path: Path, halves: [Stalled; 2]) -> Option<[Interest; 2]> {
    let mut want = [Interest::default(); 2];
    for (d, h) in halves.iter().enumerate() {
        if h.took || (path == Path::Spliced && !h.settled) {
            return None;
        }
        if h.in_flight > 0 {
            want[1 - d].sent = true;
            continue;
        }
        match (path, h.copy) {
            (Path::Leaving, Some(Copying::Held)) => want[1 - d].writable = true,
            (Path::Leaving, Some(Copying::Empty)) => want[d].readable = true,
            (Path::Leaving, Some(Copying::Eof)) | (Path::Spliced, _) => {}
            // Leaving, may not copy yet (cannot happen with nothing in
            // flight), or left: tick.
            _ => return None,
        }
    }
    (matches!(path, Path::Spliced | Path::Leaving) && want.iter().any(Interest::any))
        .then_some(want)
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
            match p.next(Path::Spliced, false, true, false) {
                Wait::Rest => break,
                Wait::Tick(t) => waits.push(t.as_millis()),
                Wait::Stall => unreachable!("not stalled"),
            }
        }
        assert_eq!(waits, [4, 8, 16, 32, 64, 128, 256, 500]);
        assert_eq!(
            p.next(Path::Spliced, false, true, false),
            Wait::Rest,
            "stays restful"
        );
    }

    #[test]
    fn never_rests_while_busy_or_unsettled() {
        let mut p = Pace::default();
        for _ in 0..20 {
            assert_ne!(p.next(Path::Spliced, false, false, false), Wait::Rest);
        }
        assert_eq!(
            p.next(Path::Spliced, false, false, false),
            Wait::Tick(TICK_SLOW),
            "slowest tick"
        );
        assert_eq!(
            p.next(Path::Spliced, true, true, false),
            Wait::Tick(TICK_FAST),
            "busy: fast again"
        );
        assert_eq!(
            p.next(Path::Spliced, false, true, false),
            Wait::Tick(2 * TICK_FAST)
        );
    }

    #[test]
    fn leaving_backs_off_less_and_never_rests() {
        let mut p = Pace::default();
        for _ in 0..20 {
            assert_ne!(p.next(Path::Leaving, false, false, false), Wait::Rest);
        }
        assert_eq!(
            p.next(Path::Leaving, false, false, false),
            Wait::Tick(TICK_LEAVING)
        );
    }

    #[test]
    fn an_event_restarts_the_back_off() {
        let mut p = Pace::default();
        while p.next(Path::Spliced, false, true, false) != Wait::Rest {}
        p.woken();
        assert_eq!(
            p.next(Path::Spliced, false, true, false),
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

    fn half(in_flight: u64, copy: Option<Copying>) -> Stalled {
        Stalled {
            in_flight,
            took: false,
            settled: true,
            copy,
        }
    }

    #[test]
    fn a_stalled_connection_waits_for_events_after_backing_off() {
        let mut p = Pace::default();
        let mut waits = vec![];
        loop {
            match p.next(Path::Spliced, false, false, true) {
                Wait::Stall => break,
                Wait::Tick(t) => waits.push(t.as_millis()),
                Wait::Rest => unreachable!("not restful"),
            }
        }
        assert_eq!(waits, [4, 8, 16, 32, 64, 128, 256, 500]);
        p.stall_ended();
        assert_eq!(
            p.next(Path::Spliced, false, false, true),
            Wait::Tick(TICK_SLOW),
            "a wake that was no progress: one plain tick, never a spin"
        );
        assert_eq!(p.next(Path::Spliced, false, false, true), Wait::Stall);
        p.stall_ended();
        assert_eq!(
            p.next(Path::Spliced, true, false, true),
            Wait::Tick(TICK_FAST),
            "a wake that was progress: fast again"
        );
        let mut p = Pace::default();
        while p.next(Path::Leaving, false, false, true) != Wait::Stall {}
        assert_eq!(p.tick, TICK_LEAVING);
    }

    #[test]
    fn what_a_stall_waits_for() {
        let none = half(0, None);
        // A destination that took none of its in-flight bytes: until it sent them.
        let want = stall(Path::Spliced, [half(5, None), none]).unwrap();
        assert_eq!(
            want[1],
            Interest {
                sent: true,
                ..Interest::default()
            }
        );
        assert!(!want[0].any());
        let want = stall(Path::Spliced, [none, half(5, None)]).unwrap();
        assert!(want[0].sent && !want[1].any());
        // Nothing stalled: that is a rest, not a stall.
        assert_eq!(stall(Path::Spliced, [none, none]), None);
        // Moving, or a verdict behind: tick.
        let took = Stalled {
            took: true,
            ..half(5, None)
        };
        assert_eq!(stall(Path::Spliced, [took, none]), None);
        let behind = Stalled {
            settled: false,
            ..none
        };
        assert_eq!(stall(Path::Spliced, [half(5, None), behind]), None);
        // Leaving: the drained half is copied; wait for its source or its
        // destination, and for the stalled half's destination.
        let want = stall(
            Path::Leaving,
            [half(5, None), half(0, Some(Copying::Empty))],
        )
        .unwrap();
        assert_eq!(
            want[1],
            Interest {
                readable: true,
                sent: true,
                ..Interest::default()
            },
            "socket 1 is the stalled half's destination and the copied half's source"
        );
        let want = stall(Path::Leaving, [half(5, None), half(0, Some(Copying::Held))]).unwrap();
        assert!(want[0].writable && want[1].sent && !want[1].readable);
        let want = stall(Path::Leaving, [half(5, None), half(0, Some(Copying::Eof))]).unwrap();
        assert!(!want[0].any() && want[1].sent);
        // Leaving does not settle: unsettled is fine there.
        let unsettled = Stalled {
            settled: false,
            ..half(5, None)
        };
        assert!(stall(Path::Leaving, [unsettled, half(0, Some(Copying::Eof))]).is_some());
        assert_eq!(stall(Path::Left, [half(5, None), none]), None);
    }
}
