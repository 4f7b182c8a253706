//! The rules of a spliced connection, as state machines that do no I/O:
//! they are handed what the kernel counters say ([`Observed`]) and answer
//! with what the driver (`spliced.rs`) must do next. Every rule that keeps
//! the byte stream exact lives here, so it is unit-tested without root.
//!
//! A connection is on one of three paths ([`Path`]):
//!
//! - `Spliced`: both sockets are in `VERDICT`; the kernel program redirects
//!   every skb to the peer. Userspace only watches the FINs and the
//!   in-flight bytes (redirected but not yet in the destination's send
//!   queue: the kernel queues them without limit).
//! - `Leaving`: a half outran its destination by more than the in-flight
//!   cap (a bulk stream, which the copy loop moves faster anyway). Both
//!   sockets have been taken out of `VERDICT`, so no verdict runs any more
//!   and new bytes wait in the plain TCP receive queues, where TCP flow
//!   control reaches the senders. A half is copied in userspace only once
//!   its destination has taken every byte redirected to it (invariant 1,
//!   [`Route::may_copy`]); the other half may still be draining, and must
//!   be able to, since its destination peer may read only while its own
//!   answers are taken (`leaving.rs`). The sockets leave `PEERS` once both
//!   halves drained.
//! - `Left`: both sockets are out of every map, plain TCP sockets again; the
//!   epoll copy loop carries the connection to its end. Plain reads honour
//!   TCP sequence offsets.
//!
//! Why the kernel path is left for good, and why userspace never reads a
//! socket that is in a sockmap: in verdict-only mode the kernel hands the
//! program whole skbs from `tcp_read_skb()`, which ignores an skb's overlap
//! with bytes already consumed (`seq < copied_seq`). TCP makes such skbs
//! itself (a spurious retransmission merged with new data in the socket
//! backlog while the socket is owned, or a partly read skb), and the
//! overlap is then delivered twice. A socket taken out of `VERDICT` but
//! left in `PEERS` keeps a receive path that returns `EAGAIN` while bytes
//! wait, so both sockets leave together. See docs/sockmap.md.
//!
//! Each direction ([`Half`]) has its FIN state: [`Fin::Open`], [`Fin::Seen`]
//! (`src` reached EOF), [`Fin::Forwarded`] (`dst` shut for writing).
//! Invariant 2: the FIN is forwarded only after `dst` took every byte
//! before it.
//!
//! Byte conservation (the integrity check, fail closed): the bytes the
//! program consumed from `src` since the insert can never exceed the bytes
//! TCP received in order on `src` (each byte once), no byte may be dropped
//! on a failed redirect or passed (this engine never copies passed bytes),
//! and `dst` can never take more than was redirected; when the FIN is
//! forwarded, received = redirected + 1 (the FIN) = taken + 1. A violation
//! is an [`Integrity`] error: the driver resets both sockets.

use std::fmt;

/// Where a connection's bytes move. See the module doc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Spliced,
    Leaving,
    Left,
}

/// How far the FIN of a half got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fin {
    Open,
    /// `src` returned EOF: every byte before the FIN went through the
    /// verdict.
    Seen,
    /// `dst` is shut for writing: the FIN was passed on.
    Forwarded,
}

/// What the driver read from the kernel for one half, counted since the
/// insert. Read the program's counters first and the TCP counters after,
/// so a concurrent arrival can only make `received` larger.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// Bytes the program redirected to `dst` (`DirStats::redirected_bytes`).
    pub redirected: u64,
    /// Bytes the program left on `src` (`passed_bytes`): must stay 0.
    pub passed: u64,
    /// skbs whose redirect failed and were dropped (`misses`).
    pub misses: u64,
    /// skbs whose sequence numbers did not follow on (`seq_anomalies`).
    pub seq_anomalies: u64,
    /// Bytes TCP received in order on `src` since the insert, FIN included
    /// (`tcpi_bytes_received` delta, less what userspace read before).
    pub received: u64,
    /// Bytes `dst` took into its send queue since the insert
    /// (`tcpi_bytes_acked + SIOCOUTQ` delta; can only under-count).
    pub dst_taken: u64,
    /// For the error's numbers only: bytes the program cut and its
    /// `seq_state` (2: it stopped judging skbs on this socket).
    pub trimmed: u64,
    pub seq_state: u32,
    pub next_seq: u32,
}

impl Observed {
    /// Redirected bytes not yet in the destination's send queue.
    pub fn in_flight(&self) -> u64 {
        self.redirected.saturating_sub(self.dst_taken)
    }
}

/// A broken stream: the numbers that prove it. Logged, then both sockets
/// are reset and `integrity_resets` is counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Integrity {
    pub what: &'static str,
    pub observed: Observed,
}

impl fmt::Display for Integrity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.observed;
        write!(
            f,
            "{}: received={} redirected={} passed={} misses={} seq_anomalies={} dst_taken={} \
             trimmed={} seq_state={} next_seq={}",
            self.what,
            o.received,
            o.redirected,
            o.passed,
            o.misses,
            o.seq_anomalies,
            o.dst_taken,
            o.trimmed,
            o.seq_state,
            o.next_seq
        )
    }
}

fn violation(what: &'static str, o: &Observed) -> Integrity {
    Integrity { what, observed: *o }
}

/// The conservation rules that hold at every moment.
pub fn check(o: &Observed) -> Result<(), Integrity> {
    if o.misses > 0 {
        return Err(violation("redirect missed (bytes dropped)", o));
    }
    if o.seq_anomalies > 0 {
        return Err(violation(
            "an skb did not follow on from the previous one (gap or uncut overlap)",
            o,
        ));
    }
    if o.passed > 0 {
        return Err(violation(
            "bytes passed to a spliced socket (in-flight backstop exceeded)",
            o,
        ));
    }
    if o.redirected > o.received {
        return Err(violation(
            "more bytes left the source than TCP received (duplicated)",
            o,
        ));
    }
    if o.dst_taken > o.redirected {
        return Err(violation("destination took more than was sent to it", o));
    }
    Ok(())
}

/// What the driver must do for a half now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Kick `src` (`bpf::kick_verdict`): run the verdict over bytes still
    /// queued on it, here the last ones before a FIN.
    pub kick: bool,
    /// Shut `dst` for writing (then call [`Half::forwarded`]).
    pub shutdown: bool,
    /// Something is pending: tick again soon.
    pub busy: bool,
}

/// One direction of a spliced connection.
#[derive(Clone, Debug)]
pub struct Half {
    fin: Fin,
    /// `src` reported RDHUP: the FIN has arrived (maybe not yet consumed).
    rdhup: bool,
}

impl Default for Half {
    fn default() -> Self {
        Half {
            fin: Fin::Open,
            rdhup: false,
        }
    }
}

impl Half {
    pub fn fin(&self) -> Fin {
        self.fin
    }

    pub fn done(&self) -> bool {
        self.fin == Fin::Forwarded
    }

    pub fn saw_rdhup(&mut self) {
        self.rdhup = true;
    }

    /// `src` reported RDHUP (its peer's FIN arrived).
    pub fn rdhup(&self) -> bool {
        self.rdhup
    }

    /// `dst` was shut for writing.
    pub fn forwarded(&mut self) {
        assert_eq!(
            self.fin,
            Fin::Seen,
            "invariant 2: a FIN is forwarded only once seen"
        );
        self.fin = Fin::Forwarded;
    }

    /// Has `dst` taken every byte redirected into it?
    pub fn drained(o: &Observed) -> bool {
        o.dst_taken >= o.redirected
    }

    /// The next actions of a spliced half, after the conservation check.
    /// The FIN has been consumed (and every byte before it went through the
    /// verdict) once `src` reported RDHUP and everything TCP received but
    /// the FIN itself was redirected: `received` counts the FIN as 1.
    pub fn plan(&mut self, o: &Observed) -> Result<Plan, Integrity> {
        check(o)?;
        let mut p = Plan::default();
        if self.fin == Fin::Open && self.rdhup {
            if o.redirected + 1 == o.received {
                self.fin = Fin::Seen;
            } else {
                p.kick = true;
                p.busy = true;
            }
        }
        match self.fin {
            Fin::Forwarded | Fin::Open => {}
            Fin::Seen if Self::drained(o) => {
                // Every byte before the FIN is in dst's send queue, and the
                // books balance: redirected + the FIN = received.
                check_final(o)?;
                p.shutdown = true;
            }
            Fin::Seen => p.busy = true,
        }
        Ok(p)
    }
}

/// The rule that holds when a half's FIN is forwarded: every byte TCP
/// received (less the FIN itself) was redirected, exactly once, and is in
/// `dst`.
pub fn check_final(o: &Observed) -> Result<(), Integrity> {
    check(o)?;
    if o.redirected + 1 != o.received {
        return Err(violation("bytes received were not all forwarded", o));
    }
    if o.dst_taken != o.redirected {
        return Err(violation(
            "bytes forwarded did not all reach the destination",
            o,
        ));
    }
    Ok(())
}

/// The connection's path, and the rule that moves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    path: Path,
    cap: u64,
}

/// What the driver must do for the connection now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Move {
    /// Stay as it is.
    Stay,
    /// Take both sockets out of `VERDICT`, then read each socket's TCP
    /// counters (the lock barrier), then call [`Route::left_verdict`].
    LeaveVerdict,
    /// Both destinations took every redirected byte: take both sockets out
    /// of `PEERS`, then hand the connection to the copy loop.
    Unlink,
}

impl Route {
    /// A spliced connection whose halves may each have at most `cap` bytes
    /// in flight.
    pub fn spliced(cap: u64) -> Self {
        Route {
            path: Path::Spliced,
            cap,
        }
    }

    pub fn path(&self) -> Path {
        self.path
    }

    /// Decide from both halves' counters. `force`: leave as soon as it is
    /// safe anyway (a half of the connection cannot be spliced). `settled`
    /// per half: every byte TCP received went through the verdict (nothing
    /// waits in the queue), or the half has no verdict at all.
    ///
    /// A connection leaves only when both halves are settled: then the
    /// conservation check is exact at that moment (a byte the kernel
    /// duplicated shows as `redirected > received`), whereas with bytes
    /// queued a duplicate could hide behind them, and once the sockets are
    /// plain again TCP would skip as many bytes as were duplicated
    /// (`copied_seq` ran ahead by them): the counts would balance over a
    /// corrupted stream.
    pub fn decide(&self, halves: [&Observed; 2], settled: [bool; 2], force: bool) -> Move {
        match self.path {
            Path::Spliced
                if (force || halves.iter().any(|o| o.in_flight() > self.cap))
                    && settled.iter().all(|&s| s) =>
            {
                Move::LeaveVerdict
            }
            Path::Leaving if halves.iter().all(|o| Half::drained(o)) => Move::Unlink,
            _ => Move::Stay,
        }
    }

    /// Both sockets are out of `VERDICT` and the barrier was taken.
    pub fn left_verdict(&mut self) {
        assert_eq!(self.path, Path::Spliced);
        self.path = Path::Leaving;
    }

    /// Invariant 1 while leaving: userspace may copy a half (read its
    /// source, write its destination) only once the destination took
    /// every byte redirected to it, so the copied bytes follow them.
    pub fn may_copy(&self, half: &Observed) -> bool {
        self.path == Path::Leaving && Half::drained(half)
    }

    /// Both sockets are out of every map.
    pub fn unlinked(&mut self, halves: [&Observed; 2]) {
        assert_eq!(self.path, Path::Leaving);
        assert!(
            halves.iter().all(|o| Half::drained(o)),
            "invariant 1: userspace copies only once every redirected byte is in its destination"
        );
        self.path = Path::Left;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: u64 = 1000;

    fn obs(redirected: u64, received: u64, dst_taken: u64) -> Observed {
        Observed {
            redirected,
            passed: 0,
            misses: 0,
            seq_anomalies: 0,
            received,
            dst_taken,
            ..Observed::default()
        }
    }

    #[test]
    fn while_leaving_only_a_drained_half_is_copied() {
        let mut r = Route::spliced(CAP);
        let drained = obs(500, 500, 500);
        let draining = obs(5000, 5000, 1200);
        // Spliced: userspace copies nothing.
        assert!(!r.may_copy(&drained));
        r.left_verdict();
        assert!(r.may_copy(&drained), "the other half may drain meanwhile");
        assert!(
            !r.may_copy(&draining),
            "copied bytes would overtake redirected ones"
        );
        assert_eq!(
            r.decide([&drained, &draining], [true, true], false),
            Move::Stay
        );
        assert_eq!(
            r.decide([&drained, &obs(5000, 5000, 5000)], [true, true], false),
            Move::Unlink
        );
    }

    #[test]
    fn a_half_past_the_cap_takes_the_connection_out_of_the_kernel() {
        let mut r = Route::spliced(CAP);
        let quiet = obs(10, 10, 10);
        assert_eq!(
            r.decide([&obs(1500, 1500, 600), &quiet], [true, true], false),
            Move::Stay
        );
        // Over the cap, but bytes wait in the queue: not yet.
        assert_eq!(
            r.decide([&obs(1700, 1700, 600), &quiet], [false, true], false),
            Move::Stay
        );
        assert_eq!(
            r.decide([&obs(1700, 1700, 600), &quiet], [true, true], false),
            Move::LeaveVerdict
        );
        r.left_verdict();
        // Not drained yet: nothing is copied.
        assert_eq!(
            r.decide([&obs(1700, 1900, 1600), &quiet], [false, true], false),
            Move::Stay
        );
        assert_eq!(
            r.decide([&obs(1700, 1900, 1700), &quiet], [false, true], false),
            Move::Unlink
        );
        r.unlinked([&obs(1700, 1900, 1700), &quiet]);
        assert_eq!(r.path(), Path::Left);
    }

    #[test]
    #[should_panic(expected = "invariant 1")]
    fn unlinking_before_the_drain_is_refused() {
        let mut r = Route::spliced(CAP);
        r.left_verdict();
        r.unlinked([&obs(10, 10, 5), &obs(0, 0, 0)]);
    }

    #[test]
    fn a_forced_leave_ignores_the_cap() {
        let r = Route::spliced(CAP);
        assert_eq!(
            r.decide([&obs(0, 0, 0), &obs(0, 0, 0)], [true, true], true),
            Move::LeaveVerdict
        );
    }

    #[test]
    fn fin_is_forwarded_only_after_the_destination_took_everything() {
        let mut h = Half::default();
        assert_eq!(h.plan(&obs(50, 50, 10)).unwrap(), Plan::default());
        h.saw_rdhup();
        // The FIN arrived but 10 bytes before it still wait for the verdict.
        let p = h.plan(&obs(40, 51, 10)).unwrap();
        assert!(p.kick && !p.shutdown);
        assert_eq!(h.fin(), Fin::Open);
        let p = h.plan(&obs(50, 51, 40)).unwrap();
        assert_eq!(h.fin(), Fin::Seen);
        assert!(!p.shutdown && p.busy);
        let p = h.plan(&obs(50, 51, 50)).unwrap();
        assert!(p.shutdown);
        h.forwarded();
        assert!(h.done());
    }

    #[test]
    #[should_panic(expected = "invariant 2")]
    fn a_fin_not_seen_is_never_forwarded() {
        Half::default().forwarded();
    }

    #[test]
    fn duplicated_bytes_are_a_violation() {
        // One MSS handed to the program twice: more left than arrived.
        let e = check(&obs(65483 * 3, 65483 * 2, 0)).unwrap_err();
        assert!(e.what.contains("duplicated"), "{e}");
        assert!(Half::default().plan(&obs(10, 5, 0)).is_err());
    }

    #[test]
    fn drops_and_passes_are_violations() {
        let mut o = obs(10, 20, 10);
        o.misses = 1;
        assert!(check(&o).unwrap_err().what.contains("missed"));
        let mut o = obs(10, 20, 10);
        o.passed = 5;
        assert!(check(&o).unwrap_err().what.contains("passed"));
    }

    #[test]
    fn lost_bytes_fail_the_final_check() {
        // 100 received (+FIN), only 90 redirected and taken.
        let e = check_final(&obs(90, 101, 90)).unwrap_err();
        assert!(e.what.contains("not all forwarded"), "{e}");
    }

    #[test]
    fn a_destination_taking_more_than_sent_is_a_violation() {
        assert!(check(&obs(10, 10, 11)).is_err());
    }
}
