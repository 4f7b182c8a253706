//! The driver of one spliced connection: it reads the kernel counters of
//! both halves, asks the state machines (`half.rs`) what to do, and does it
//! (forward a FIN, take the sockets out of the maps). It is the only place
//! that touches the sockets of a spliced connection.
//!
//! Wake-ups: the watcher thread (RDHUP and errors, and the kernel
//! program's `EVENTS`), plus a tick that is fast while bytes move and backs
//! off when the connection is quiet; an idle connection rests, without a
//! tick, until the kernel wakes it (`rest.rs`). Every tick checks byte
//! conservation for both halves; a violation resets both sockets.

use super::Sockmap;
use super::budget::Budget;
use super::half::{self, Half, Integrity, Move, Observed, Path, Route};
use super::leaving;
use super::rest::{self, Interest, Pace, TICK_REST, Wait};
use super::watcher::{EV_KERNEL, Slot};
use crate::bpf;
use crate::engine::Activity;
use crate::metrics::ForwardStats;
use nix::sys::epoll::EpollFlags;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

/// Names of the halves, for logs: half d reads socks[d], writes socks[1-d].
pub const HALF_NAMES: [&str; 2] = ["client->server", "server->client"];

/// Where each half's counters start, taken before the insert.
#[derive(Clone, Copy, Debug, Default)]
pub struct Base {
    /// Bytes userspace read from `src` before the insert (the adaptive
    /// policy's copy loop); `tcpi_bytes_received` minus this is what the
    /// kernel path is accountable for.
    pub pre_read: u64,
    /// `queued_total(dst)` before the insert.
    pub dst_queued: u64,
    /// `tcpi_bytes_received` and unread bytes (`SIOCINQ`) of `src` just
    /// before the insert: for the integrity error's numbers (received less
    /// unread is what userspace read, which must be `pre_read`).
    pub src_received: u64,
    pub src_unread: u64,
}

pub struct Spliced<'a> {
    pub sm: &'a Sockmap,
    pub id: u64,
    /// The connection's token with the watcher.
    pub token: u64,
    pub socks: [&'a TcpStream; 2],
    pub cookies: [u64; 2],
    pub base: [Base; 2],
    /// Which sockets are in `VERDICT` (the upstream may have failed to join).
    pub in_verdict: [bool; 2],
    pub halves: [Half; 2],
    pub route: Route,
    /// The program's rolling budget per half (`budget.rs`).
    pub budget: [Budget; 2],
    /// Test hook: leave once this many bytes were redirected in total.
    pub leave_after: Option<u64>,
    pub activity: Activity,
    /// Where bytes copied in userspace while leaving are counted.
    pub stats: &'a ForwardStats,
    /// The halves copied in userspace while the other drains (`leaving.rs`).
    pub copy: leaving::Copy,
    /// The wake mark each half's `DirCtrl` holds now (`rest.rs`).
    pub marks: [u64; 2],
}

/// How a spliced connection ended.
pub enum Outcome {
    /// Both halves forwarded their FIN.
    Done,
    /// The connection left the kernel: both sockets are plain TCP sockets
    /// again, every redirected byte is in its destination, and the copy
    /// loop must carry the connection on.
    Left,
}

/// Why a spliced connection ended early.
pub enum End {
    Io(io::Error),
    Integrity(usize, Integrity),
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> Self {
        End::Io(e)
    }
}

impl Spliced<'_> {
    /// Watch the connection until both halves forwarded their FIN, or it
    /// left the kernel.
    pub async fn run(&mut self, slot: &Slot) -> Result<Outcome, End> {
        // The kick: run the verdict over anything queued before the insert.
        for d in 0..2 {
            if self.in_verdict[d] {
                bpf::kick_verdict(self.socks[d])?;
            }
        }
        let force = !self.in_verdict.iter().all(|&v| v);
        let mut redirected_at_leave = [0u64; 2];
        let mut last = [0u64; 2];
        let mut last_taken = [0u64; 2];
        let mut pace = Pace::default();
        let mut resting = false;
        loop {
            let ev = [
                slot.events[0].swap(0, Ordering::AcqRel),
                slot.events[1].swap(0, Ordering::AcqRel),
            ];
            if std::mem::take(&mut resting) && ev.iter().any(|e| e & EV_KERNEL != 0) {
                ForwardStats::add(&self.stats.spliced_wakes, 1);
            }
            for (i, e) in ev.iter().enumerate() {
                if e & (libc::EPOLLRDHUP as u32) != 0 {
                    self.halves[i].saw_rdhup();
                }
                // An error, or a hang-up we did not cause by shutting the
                // socket down ourselves: the connection is broken both ways.
                let hup = e & (libc::EPOLLHUP as u32) != 0 && !self.halves[1 - i].done();
                if e & (libc::EPOLLERR as u32) != 0 || hup {
                    let err = bpf::so_error(self.socks[i]);
                    let err = if err != 0 { err } else { libc::ECONNRESET };
                    return Err(End::Io(io::Error::from_raw_os_error(err)));
                }
            }
            let o = [self.observe(0)?, self.observe(1)?];
            ForwardStats::add(&self.stats.splice_checks, 1);
            tracing::trace!(id = self.id, path = ?self.route.path(), fin = ?[self.halves[0].fin(), self.halves[1].fin()], ?o, "tick");
            let mut busy = false;
            let took = [0, 1].map(|d| o[d].dst_taken != last_taken[d]);
            for d in 0..2 {
                if o[d].redirected != last[d] {
                    last[d] = o[d].redirected;
                    self.activity.touch();
                    busy = true;
                }
                // Bytes wait in the psock but the destination took none
                // since the last tick: the psock worker may have given up
                // on a full send buffer (see `bpf::poke_sender`).
                if o[d].in_flight() > 0 && o[d].dst_taken == last_taken[d] {
                    bpf::poke_sender(self.socks[1 - d])?;
                }
                // A destination draining what was redirected is progress too.
                if o[d].dst_taken != last_taken[d] {
                    self.activity.touch();
                    busy = true;
                }
                last_taken[d] = o[d].dst_taken;
            }
            let hook = self
                .leave_after
                .is_some_and(|n| o[0].redirected + o[1].redirected >= n);
            let settled = [self.settled(0, &o[0]), self.settled(1, &o[1])];
            match self.route.decide([&o[0], &o[1]], settled, force || hook) {
                Move::LeaveVerdict => {
                    self.leave_verdict()?;
                    for (r, cookie) in redirected_at_leave.iter_mut().zip(self.cookies) {
                        // After the barrier the program cannot redirect any
                        // more: these counts are final.
                        *r = self.sm.splicer.borrow().stats(cookie)?.redirected_bytes;
                    }
                    self.route.left_verdict();
                    self.sm.left.set(self.sm.left.get() + 1);
                    tracing::debug!(id = self.id, in_flight = ?[o[0].in_flight(), o[1].in_flight()], "connection leaves the kernel");
                    continue;
                }
                // Bytes still in a pipe: the copy below writes them first.
                Move::Unlink if self.copy.held() == 0 => {
                    for (d, od) in o.iter().enumerate() {
                        half::check(od).map_err(|e| End::Integrity(d, e))?;
                    }
                    {
                        let mut s = self.sm.splicer.borrow_mut();
                        s.unlink(self.cookies[0])?;
                        s.unlink(self.cookies[1])?;
                    }
                    self.route.unlinked([&o[0], &o[1]]);
                    self.check_left(&redirected_at_leave, &o)?;
                    return Ok(Outcome::Left);
                }
                Move::Unlink | Move::Stay => {}
            }
            match self.route.path() {
                Path::Spliced => {
                    for (d, od) in o.iter().enumerate() {
                        busy |= self.step(d, od)?;
                        self.roll_budget(d, od)?;
                    }
                    if self.halves.iter().all(Half::done) {
                        return Ok(Outcome::Done);
                    }
                }
                Path::Leaving => {
                    for (d, od) in o.iter().enumerate() {
                        half::check(od).map_err(|e| End::Integrity(d, e))?;
                        if od.redirected != redirected_at_leave[d] {
                            return Err(End::Integrity(
                                d,
                                Integrity {
                                    what: "redirected after leaving the kernel",
                                    observed: *od,
                                },
                            ));
                        }
                    }
                    // A half whose destination took every redirected byte
                    // is copied on while the other drains (`leaving.rs`).
                    // Busy while bytes move; a destination that does not
                    // read lets the tick back off (`rest.rs`).
                    for (d, od) in o.iter().enumerate() {
                        if self.route.may_copy(od) {
                            let read = self.copy.read[d];
                            let n = self.copy.pump(d, self.socks[d], self.socks[1 - d])?;
                            let c = if d == 0 {
                                &self.stats.bytes_to_upstream
                            } else {
                                &self.stats.bytes_to_client
                            };
                            ForwardStats::add(c, n);
                            if n > 0 || self.copy.read[d] != read {
                                self.activity.touch();
                                busy = true;
                            }
                        }
                    }
                }
                Path::Left => unreachable!("returned above"),
            }
            let settled = [self.settled(0, &o[0]), self.settled(1, &o[1])];
            let restful = rest::restful(self.route.path(), [&o[0], &o[1]], settled);
            let stall = rest::stall(
                self.route.path(),
                [0, 1].map(|d| rest::Stalled {
                    in_flight: o[d].in_flight(),
                    took: took[d],
                    settled: settled[d],
                    copy: self.route.may_copy(&o[d]).then(|| self.copy.state(d)),
                }),
            );
            let wait = match pace.next(self.route.path(), busy, restful, stall.is_some()) {
                Wait::Tick(t) => {
                    // Backing off: a burst wakes the driver after a quarter
                    // of the in-flight cap, not at the next slow tick.
                    if t > rest::TICK_FAST && self.route.path() == Path::Spliced {
                        let slack = self.sm.cap / 4;
                        self.set_marks(o.map(|od| od.redirected.saturating_add(slack)))?;
                    }
                    t
                }
                Wait::Rest if self.arm(&o)? => {
                    resting = true;
                    ForwardStats::add(&self.stats.spliced_rests, 1);
                    TICK_REST
                }
                // Bytes moved while arming: look again soon.
                Wait::Rest => {
                    pace.woken();
                    continue;
                }
                Wait::Stall => {
                    let want = stall.expect("a stall wait only when stalled");
                    if self.route.path() == Path::Spliced {
                        // New bytes from a source wake the driver too.
                        let slack = self.sm.cap / 4;
                        self.set_marks(o.map(|od| od.redirected.saturating_add(slack)))?;
                    }
                    ForwardStats::add(&self.stats.spliced_stalls, 1);
                    self.stall_interest(&want, true)?;
                    tokio::select! {
                        () = slot.notify.notified() => {}
                        () = tokio::time::sleep(TICK_REST) => {}
                    }
                    self.stall_interest(&want, false)?;
                    pace.stall_ended();
                    continue;
                }
            };
            tokio::select! {
                () = slot.notify.notified() => pace.woken(),
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Arm (`on`) or undo what a stall waits for (`rest::stall`): the
    /// watcher's extra events, `TCP_NOTSENT_LOWAT` on a destination that
    /// took nothing, `SO_RCVLOWAT` 1 on a copied half's source (the value
    /// the verdict is held back with goes back afterwards; the socket is
    /// out of `VERDICT`, so no verdict runs either way).
    fn stall_interest(&self, want: &[Interest; 2], on: bool) -> io::Result<()> {
        for (s, w) in want.iter().enumerate() {
            if !w.any() {
                continue;
            }
            let sock = self.socks[s];
            // Socket s is half s's source: its RDHUP, once seen, stays out.
            let mut events = if self.halves[s].rdhup() {
                EpollFlags::empty()
            } else {
                EpollFlags::EPOLLRDHUP
            };
            if on {
                if w.readable {
                    debug_assert!(!self.in_verdict[s], "read interest only out of VERDICT");
                    bpf::kick_verdict(sock)?;
                    events |= EpollFlags::EPOLLIN;
                }
                if w.sent {
                    bpf::wake_when_sent(sock)?;
                }
                if w.sent || w.writable {
                    events |= EpollFlags::EPOLLOUT;
                }
            }
            self.sm
                .watcher
                .interest(self.token, s, sock.as_raw_fd(), events)?;
            if !on {
                if w.sent {
                    bpf::poke_sender(sock)?;
                }
                if w.readable {
                    bpf::pause_verdict(sock)?;
                }
            }
        }
        Ok(())
    }

    /// Write the wake marks that differ from what the program has.
    fn set_marks(&mut self, want: [u64; 2]) -> io::Result<()> {
        for (d, &mark) in want.iter().enumerate() {
            if self.in_verdict[d] && self.marks[d] != mark {
                let limit = self.budget[d].limit();
                self.sm
                    .splicer
                    .borrow_mut()
                    .set_ctrl(self.cookies[d], limit, mark)?;
                self.marks[d] = mark;
            }
        }
        Ok(())
    }

    /// Settled: the verdict has seen every byte TCP received on half `d`'s
    /// source (the FIN counts 1 once it arrived), or the half gets no
    /// verdict.
    fn settled(&self, d: usize, o: &Observed) -> bool {
        let fin = u64::from(self.halves[d].fin() != half::Fin::Open);
        !self.in_verdict[d] || o.redirected + fin == o.received
    }

    /// Prepare a rest (`rest.rs`): write each half's redirected count as its
    /// wake mark, take each socket's lock once (TCP_INFO: a verdict that
    /// read the old controls has finished), then look again. True if
    /// nothing moved, so from now on the program's next redirect on either
    /// half pushes an event.
    fn arm(&mut self, o: &[Observed; 2]) -> Result<bool, End> {
        let marks = rest::marks([&o[0], &o[1]]);
        self.set_marks(marks)?;
        for s in self.socks {
            bpf::bytes_received(s)?;
        }
        let again = [self.observe(0)?, self.observe(1)?];
        let settled = [self.settled(0, &again[0]), self.settled(1, &again[1])];
        Ok(rest::marks([&again[0], &again[1]]) == marks
            && rest::restful(self.route.path(), [&again[0], &again[1]], settled))
    }

    /// The counters of half `d`, read in the order that makes the checks
    /// sound under concurrent progress: what `dst` took before what was
    /// redirected to it (so `dst_taken <= redirected` cannot fail by
    /// timing), and what was redirected before what `src` received (so
    /// `redirected <= received` cannot either).
    fn observe(&self, d: usize) -> Result<Observed, End> {
        let queued = bpf::queued_total(self.socks[1 - d])?;
        let st = self.sm.splicer.borrow().stats(self.cookies[d])?;
        let received = bpf::bytes_received(self.socks[d])?.saturating_sub(self.base[d].pre_read);
        // Once the FIN is forwarded it sits in dst's send queue too.
        let fin = u64::from(self.halves[d].done());
        // Bytes userspace wrote to dst while leaving were not redirected.
        let dst_taken = queued.saturating_sub(self.base[d].dst_queued + fin + self.copy.written[d]);
        Ok(Observed {
            redirected: st.redirected_bytes,
            passed: st.passed_bytes,
            misses: st.misses,
            seq_anomalies: st.seq_anomalies,
            received,
            dst_taken,
            trimmed: st.trimmed_bytes,
            seq_state: st.seq_state,
            next_seq: st.next_seq,
        })
    }

    /// Plan and act for a spliced half. Returns whether it is busy.
    fn step(&mut self, d: usize, o: &Observed) -> Result<bool, End> {
        let plan = self.halves[d].plan(o).map_err(|e| End::Integrity(d, e))?;
        if plan.kick {
            bpf::kick_verdict(self.socks[d])?;
        }
        if plan.shutdown {
            let _ = self.socks[1 - d].shutdown(Shutdown::Write);
            self.halves[d].forwarded();
        }
        Ok(plan.busy)
    }

    /// Keep the program's budget for half `d` ahead of what its destination
    /// took, so a connection that stays in the kernel is never cut by it.
    fn roll_budget(&mut self, d: usize, o: &Observed) -> io::Result<()> {
        if !self.in_verdict[d] {
            return Ok(());
        }
        if let Some(limit) = self.budget[d].raise(o.dst_taken) {
            self.sm
                .splicer
                .borrow_mut()
                .set_ctrl(self.cookies[d], limit, self.marks[d])?;
        }
        Ok(())
    }

    /// After both sockets left the maps: restore `SO_RCVLOWAT` for the copy
    /// loop, then check each source's books exactly. Every byte consumed
    /// from it (its `copied_seq`) was read by userspace before the insert
    /// or redirected by the program; more means the kernel consumed an skb
    /// without the program (the race `bpf::pause_verdict` narrows), and the
    /// copy loop would carry on a stream with a hole.
    fn check_left(&self, redirected: &[u64; 2], o: &[Observed; 2]) -> Result<(), End> {
        for s in self.socks {
            bpf::kick_verdict(s)?;
        }
        for d in 0..2 {
            // Read before the insert, redirected, or copied while leaving.
            let consumed = bpf::consumed(self.socks[d])?
                .saturating_sub(self.base[d].pre_read + self.copy.read[d]);
            if consumed != redirected[d] {
                return Err(End::Integrity(
                    d,
                    Integrity {
                        what: "bytes consumed from the source were not all redirected \
                               (an skb was lost leaving the kernel; received shows consumed)",
                        observed: Observed {
                            received: consumed,
                            ..o[d]
                        },
                    },
                ));
            }
        }
        Ok(())
    }

    /// Take both sockets out of `VERDICT` (no verdict runs for them any
    /// more), then take each socket's lock once: a verdict that was still
    /// running in softirq on another CPU has finished when it returns.
    fn leave_verdict(&mut self) -> io::Result<()> {
        // Hold the verdicts back first: removing a socket from a sockmap
        // while a verdict runs for it can drop an skb (`bpf::pause_verdict`).
        for d in 0..2 {
            if self.in_verdict[d] {
                bpf::pause_verdict(self.socks[d])?;
            }
        }
        for d in 0..2 {
            if self.in_verdict[d] {
                self.sm.splicer.borrow_mut().leave(self.cookies[d])?;
                self.in_verdict[d] = false;
            }
        }
        for s in self.socks {
            // TCP_INFO takes the socket lock (lock_sock_fast).
            bpf::bytes_received(s)?;
        }
        Ok(())
    }
}
