//! The in-kernel engine: both sockets of a connection go into eBPF SOCKHASH
//! maps and the verdict program (`ambassador-ebpf`) redirects every received
//! skb to the peer socket's send path. Userspace copies nothing in the
//! steady state; it only watches each connection's edges.
//!
//! Per connection ([`relay`]):
//! 1. Insert: counters and budget, then `PEERS` for both sockets, then
//!    `VERDICT`, then a non-blocking `recv` "kick" on each socket so bytes
//!    that arrived before the insert go through the verdict too. A map that
//!    is full or refuses the pair sends the connection to the epoll engine
//!    and bumps `splice_fallbacks` (logged as a warning).
//! 2. Watch (`watcher.rs`): one thread waits on epoll with `EPOLLRDHUP`
//!    only, so a spliced connection costs no wake-ups while bytes flow.
//! 3. Each direction ("half", `half.rs`) is a state machine: redirecting in
//!    the kernel, leaving it, or copied in userspace. The kernel acknowledges
//!    redirected bytes at once and queues them on the peer without limit, so
//!    a half whose in-flight bytes (redirected, not yet taken by the
//!    destination) pass [`INFLIGHT_CAP`] leaves the kernel for good: both
//!    sockets are taken out of `VERDICT` (new bytes wait in the TCP receive
//!    queues, where flow control reaches the senders), userspace waits until
//!    each destination took every redirected byte, then copies. A half never
//!    returns to the kernel, and userspace never copies from a socket that
//!    is in `VERDICT`: in verdict-only mode the kernel can hand the program
//!    bytes twice (docs/sockmap.md, "Duplicated data"). The program's own
//!    budget is only a backstop far above the cap, rolled forward as the
//!    destination takes bytes (`budget.rs`).
//! 4. Half-close: on RDHUP, a read takes the source's socket lock (so the
//!    verdict has seen every byte before the FIN); once the destination has
//!    taken every byte, `shutdown(SHUT_WR)` it. The other half keeps flowing.
//! 5. Integrity: every tick checks byte conservation per half (what left
//!    the source never exceeds what TCP received; at the FIN they are
//!    equal). A violation logs one error with the numbers, counts
//!    `integrity_resets` and resets both sockets.
//! 6. Reset: EPOLLERR (or a hang-up we did not cause) on either side closes
//!    both with RST. Close: only when both halves are done; `close()` unlinks
//!    the sockets from the sockmaps, and we delete their counters.

mod budget;
mod half;
mod leaving;
mod rest;
mod spliced;
mod tuning;
mod watcher;

pub use budget::Budget;
pub use half::{Fin, Half, Integrity, Move, Observed, Path, Plan, Route};
pub use tuning::Tuning;

use super::epoll::{Outcome, Promote};
use super::{Conn, Side};
use crate::bpf::{self, Sock, Splicer};
use crate::config::{Settings, SplicePolicy};
use crate::metrics::ForwardStats;
use spliced::{Base, End, HALF_NAMES, Outcome as SplicedOutcome, Spliced};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use watcher::Watcher;

/// Bytes the kernel may hold per direction beyond what the destination
/// socket has taken into its send queue (the unaccounted psock backlog)
/// before the connection leaves the kernel for the copy loop.
pub const INFLIGHT_CAP: u64 = 4 << 20;
/// The program's own budget per direction (`DirCtrl::limit`), a backstop
/// far above [`INFLIGHT_CAP`] in case userspace is starved: past it the
/// program passes bytes, which the integrity check turns into a reset
/// (this engine never copies from a socket in a sockmap). It rolls: kept at
/// (bytes the destination took) + this (`budget.rs`).
pub const BACKSTOP: u64 = 2 << 30;
/// `--splice adaptive`: splice a connection after 8 changes of direction
/// (4 round trips) with no read over 32 KiB in between.
pub const PROMOTE: Promote = Promote {
    turns: 8,
    small: 32 * 1024,
};
const _: () = assert!(PROMOTE.small < super::epoll::BUF_SIZE);
/// Connections the maps hold by default (each map holds two sockets per
/// connection). `AMBASSADOR_SOCKMAP_CONNS` overrides it (`tuning.rs`).
pub const DEFAULT_CAPACITY: u32 = 32_768;

/// The engine's start-up state: the loaded program and maps, the watcher
/// thread, and the live spliced connections (for `refresh_stats`).
pub struct Sockmap {
    splicer: RefCell<Splicer>,
    watcher: Watcher,
    policy: SplicePolicy,
    /// Connections the maps can hold.
    capacity: u32,
    /// Spliced connections now.
    active: Cell<u32>,
    live: RefCell<HashMap<u64, Rc<Record>>>,
    /// Connections whose upstream could not join `VERDICT` (see
    /// `bpf::Inserted::FirstOnly`), for tests and diagnostics.
    half_spliced: Cell<u64>,
    /// Connections that left the kernel (a half ran past the cap) so far.
    left: Cell<u64>,
    /// Connections reset because a half broke byte conservation.
    integrity_resets: Cell<u64>,
    /// In-flight cap per half ([`INFLIGHT_CAP`] unless
    /// `AMBASSADOR_SOCKMAP_INFLIGHT` overrides it).
    cap: u64,
    /// The program's rolling budget per half ([`BACKSTOP`] unless
    /// `AMBASSADOR_SOCKMAP_BACKSTOP` overrides it; see `budget.rs`).
    backstop: u64,
    /// When `--splice adaptive` promotes (`AMBASSADOR_SOCKMAP_PROMOTE_TURNS`
    /// overrides the turns, e.g. 0 to promote at the first quiet point).
    promote: Promote,
    /// Leave the kernel once a connection redirected this many bytes (a
    /// test hook: makes the leave happen at a known point).
    leave_after: Option<u64>,
    next_token: Cell<u64>,
}

/// What `refresh_stats` needs of a live spliced connection.
struct Record {
    cookies: [u64; 2],
    stats: Arc<ForwardStats>,
    /// Redirected bytes already added to `stats`, per half.
    reported: [Cell<u64>; 2],
    /// Trimmed bytes already added to `stats`, per half.
    trimmed: [Cell<u64>; 2],
}

impl Record {
    /// Add what the kernel redirected since the last call to the forward's
    /// `spliced_*` counters.
    fn fold(&self, splicer: &Splicer) {
        for (d, cookie) in self.cookies.iter().enumerate() {
            if let Ok(st) = splicer.stats(*cookie) {
                let delta = st.redirected_bytes.saturating_sub(self.reported[d].get());
                if delta > 0 {
                    self.reported[d].set(st.redirected_bytes);
                    let c = if d == 0 {
                        &self.stats.spliced_to_upstream
                    } else {
                        &self.stats.spliced_to_client
                    };
                    ForwardStats::add(c, delta);
                }
                let cut = st.trimmed_bytes.saturating_sub(self.trimmed[d].get());
                if cut > 0 {
                    self.trimmed[d].set(st.trimmed_bytes);
                    ForwardStats::add(&self.stats.spliced_trimmed, cut);
                }
            }
        }
    }
}

impl Sockmap {
    /// Load and attach the program once at start-up. The error is the exact
    /// reason (syscall, errno, what is missing, or the bad
    /// `AMBASSADOR_SOCKMAP_*` variable).
    pub fn start(settings: &Settings) -> Result<Sockmap, String> {
        let tuning = Tuning::from_env()?;
        Self::with_tuning(settings.splice, tuning, None)
    }

    /// Whether the kernel program cuts skbs that repeat bytes already
    /// spliced, or why not (see [`bpf::Splicer::trims`]).
    pub fn trims(&self) -> Result<(), String> {
        self.splicer.borrow().trims().map_err(str::to_string)
    }

    /// The engine with an explicit policy and [`Tuning`] (tests build one
    /// with `Tuning { capacity, ..Tuning::from_env()? }`), and the
    /// `leave_after` test hook: every connection leaves the kernel once it
    /// redirected that many bytes.
    pub fn with_tuning(
        policy: SplicePolicy,
        tuning: Tuning,
        leave_after: Option<u64>,
    ) -> Result<Sockmap, String> {
        let Tuning {
            capacity,
            inflight: cap,
            backstop,
            promote,
        } = tuning;
        let mut splicer = bpf::probe(capacity.saturating_mul(2).max(2))?;
        match splicer.trims() {
            Ok(()) => tracing::info!(
                "sockmap: skbs that repeat bytes already spliced are cut in the kernel"
            ),
            Err(reason) => {
                tracing::warn!(%reason, "sockmap: skbs that repeat bytes already spliced cannot be cut; such a connection is reset instead")
            }
        }
        if splicer.trims().is_ok() {
            match splicer.judges_first_skb() {
                Ok(()) => tracing::info!(
                    "sockmap: bytes read before a promotion are cut from the first skb after it (copied_seq from the kernel's BTF)"
                ),
                Err(reason) => {
                    tracing::warn!(%reason, "sockmap: the first skb after a promotion cannot be judged; bytes it repeats are caught by the books, and the connection is reset")
                }
            }
        }
        let events = splicer
            .take_events()
            .ok_or("EVENTS ring buffer already taken")?;
        let watcher = Watcher::start(events).map_err(|e| format!("epoll watcher: {e}"))?;
        Ok(Sockmap {
            splicer: RefCell::new(splicer),
            watcher,
            policy,
            capacity,
            active: Cell::new(0),
            live: RefCell::new(HashMap::new()),
            half_spliced: Cell::new(0),
            left: Cell::new(0),
            integrity_resets: Cell::new(0),
            cap,
            backstop,
            promote,
            leave_after,
            next_token: Cell::new(1),
        })
    }

    /// Add what the kernel moved since the last call to the forwards'
    /// `spliced_*` counters (called before stats are logged).
    pub fn refresh_stats(&self) {
        let splicer = self.splicer.borrow();
        for r in self.live.borrow().values() {
            r.fold(&splicer);
        }
    }

    /// Spliced connections right now.
    pub fn active(&self) -> u32 {
        self.active.get()
    }

    /// Connections so far whose upstream bytes had to be copied in
    /// userspace because it sent FIN during the insert.
    pub fn half_spliced(&self) -> u64 {
        self.half_spliced.get()
    }

    /// Connections so far that left the kernel for the copy loop.
    pub fn demoted(&self) -> u64 {
        self.left.get()
    }

    /// Connections so far reset by the integrity check.
    pub fn integrity_resets(&self) -> u64 {
        self.integrity_resets.get()
    }

    /// Entries in (`PEERS`, `VERDICT`, `STATS`, `CTRL`): for leak checks.
    pub fn map_entries(&self) -> (usize, usize, usize, usize) {
        self.splicer.borrow().entries()
    }
}

/// Hand both sockets to the kernel and watch them until both directions are
/// done; fall back to the epoll engine if the connection cannot be spliced.
///
/// The copy loops a spliced connection may fall back to are boxed: a
/// connection's future then holds only the state of the phase it is in
/// (a spliced one ~1.4 KiB instead of ~2.8), which is most of what an idle
/// connection costs the process. Not an `async fn`, nor is [`splice`]: an
/// `async fn` keeps each argument twice (as it came in and as the local it
/// is bound to), 150 bytes of `Conn` per connection for nothing.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
pub fn relay(sm: &Rc<Sockmap>, mut conn: Conn) -> impl Future<Output = io::Result<()>> + '_ {
    async move {
        let pre_read = match sm.policy {
            SplicePolicy::Never => return Box::pin(super::epoll::relay(conn)).await,
            SplicePolicy::Always => [0, 0],
            // Start in userspace; move into the kernel only a connection that
            // shows a request/response pattern, at a point where userspace holds
            // no bytes. Short connections never pay for the map inserts, bulk
            // streams keep the faster copy loop. No skb can be partly read at
            // that point (the kernel would hand its read part to the program
            // again): promotion needs every read since the last bulk one to be
            // at most `PROMOTE.small`, less than the copy buffer, and a read
            // that returns less than it asked for has emptied the receive queue
            // (`tcp_recvmsg` stops short only when no skb is left); the copy
            // loop reports whether each direction's last read was short.
            SplicePolicy::Adaptive => {
                let mut read = [0u64; 2];
                // Per direction: its last read (in any call) filled the buffer.
                let mut full = [false; 2];
                loop {
                    match super::epoll::relay_until(conn, Some(sm.promote)).await? {
                        Outcome::Done => return Ok(()),
                        Outcome::Paused(c, r, f) => {
                            read = [read[0] + r[0], read[1] + r[1]];
                            let keep = |d: usize| if r[d] > 0 { f[d] } else { full[d] };
                            full = [keep(0), keep(1)];
                            conn = c;
                            if !full[0] && !full[1] {
                                break read;
                            }
                            // A direction's last read filled the buffer: an skb
                            // may be partly read. Not a safe point; copy on.
                        }
                    }
                }
            }
        };
        splice(sm, conn, pre_read).await
    }
}

/// Splice a connection from which userspace has already read `pre_read`
/// bytes per half (client→server, server→client), with nothing left unread
/// in a partly read skb. Public so that tests can show what the integrity
/// check does when that rule is broken.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
pub fn splice(
    sm: &Rc<Sockmap>,
    mut conn: Conn,
    pre_read: [u64; 2],
) -> impl Future<Output = io::Result<()>> + '_ {
    async move {
        if sm.active.get() >= sm.capacity {
            ForwardStats::add(&conn.stats.splice_fallbacks, 1);
            tracing::warn!(
                id = conn.id,
                forward = %conn.forward,
                capacity = sm.capacity,
                "sockmap full, copying this connection in userspace"
            );
            return Box::pin(super::epoll::relay(conn)).await;
        }
        // Off any reactor: from here the kernel moves the bytes, and only the
        // watcher thread polls these sockets.
        conn.client = Side::Plain(conn.client.into_std()?);
        conn.upstream = Side::Plain(conn.upstream.into_std()?);
        let (Side::Plain(client), Side::Plain(upstream)) = (&conn.client, &conn.upstream) else {
            unreachable!("both sides were made plain just above")
        };
        let socks = [client, upstream];
        let mut cookies = [0u64; 2];
        let mut queued = [0u64; 2];
        let mut received = [(0u64, 0u64); 2];
        for i in 0..2 {
            cookies[i] = bpf::socket_cookie(socks[i])?;
            // Baseline for the drain checks, taken before anything can be
            // redirected into the socket.
            queued[i] = bpf::queued_total(socks[i])?;
            // (Only worth two more system calls where userspace read first.)
            if sm.policy == SplicePolicy::Adaptive {
                received[i] = (bpf::bytes_received(socks[i])?, bpf::inq(socks[i])?);
            }
        }
        let base = [0, 1].map(|d| Base {
            pre_read: pre_read[d],
            dst_queued: queued[1 - d],
            src_received: received[d].0,
            src_unread: received[d].1,
        });
        let token = sm.next_token.get();
        sm.next_token.set(token + 1);
        let fds = [conn.client.as_raw_fd(), conn.upstream.as_raw_fd()];
        let slot = sm.watcher.add(token, fds, cookies)?;
        let _unwatch = Unwatch(&sm.watcher, token, fds, cookies);
        // From here on every exit forgets the counters (also on a failed insert).
        let _forget = Forget {
            sm,
            token,
            cookies,
            counted: Cell::new(false),
        };

        let a = Sock {
            fd: fds[0],
            cookie: cookies[0],
        };
        let b = Sock {
            fd: fds[1],
            cookie: cookies[1],
        };
        let budget = Budget::new(sm.backstop);
        let inserted = sm.splicer.borrow_mut().insert_pair(a, b, budget.limit());
        let upstream_userspace = match inserted {
            Err(e) => {
                ForwardStats::add(&conn.stats.splice_fallbacks, 1);
                if bpf::established(&conn.client) && bpf::established(&conn.upstream) {
                    tracing::warn!(id = conn.id, forward = %conn.forward, reason = %e, "cannot splice, copying this connection in userspace");
                } else {
                    // A client that connects and hangs up at once (a port
                    // probe, a health check) is not worth a warning.
                    tracing::debug!(id = conn.id, forward = %conn.forward, reason = %e, "a side closed before the splice, copying in userspace");
                }
                drop(_forget);
                drop(_unwatch);
                return Box::pin(super::epoll::relay(conn)).await;
            }
            // The upstream already sent FIN (it answered and closed between the
            // two inserts): its socket never gets a verdict, so the connection
            // leaves the kernel at once (after the client's redirected bytes
            // drained) and is copied in userspace.
            Ok(bpf::Inserted::FirstOnly(errno)) => {
                sm.half_spliced.set(sm.half_spliced.get() + 1);
                tracing::info!(id = conn.id, forward = %conn.forward, errno = %bpf::errno_name(errno), "upstream not spliced (it closed during the insert), copying in userspace");
                true
            }
            Ok(bpf::Inserted::Both) => false,
        };
        sm.active.set(sm.active.get() + 1);
        _forget.counted.set(true);
        tracing::debug!(id = conn.id, pre_read = ?pre_read, "spliced in the kernel");
        let record = Rc::new(Record {
            cookies,
            stats: conn.stats.clone(),
            reported: [Cell::new(0), Cell::new(0)],
            trimmed: [Cell::new(0), Cell::new(0)],
        });
        sm.live.borrow_mut().insert(token, record.clone());

        let mut c = Spliced {
            sm,
            id: conn.id,
            token,
            socks,
            cookies,
            base,
            in_verdict: [true, !upstream_userspace],
            halves: [Half::default(), Half::default()],
            route: Route::spliced(sm.cap),
            budget: [budget; 2],
            leave_after: sm.leave_after,
            activity: super::Activity::new(),
            stats: &conn.stats,
            copy: Default::default(),
            marks: [ambassador_common::WAKE_NEVER; 2],
        };
        let activity = c.activity.clone();
        let aborted = super::Abort::current();
        let result = tokio::select! {
            r = c.run(&slot) => r,
            () = activity.idle(conn.settings.idle_timeout) => {
                tracing::debug!(id = conn.id, client = %conn.client_addr, "idle timeout");
                Ok(SplicedOutcome::Done)
            }
            // Drain timeout or forced exit: a cut stream must look cut.
            () = aborted.raised() => {
                super::set_reset_on_close(&conn.client);
                super::set_reset_on_close(&conn.upstream);
                Ok(SplicedOutcome::Done)
            }
        };
        record.fold(&sm.splicer.borrow());
        let result = match result {
            Ok(SplicedOutcome::Done) => Ok(()),
            Ok(SplicedOutcome::Left) => {
                // Plain TCP sockets again, nothing in flight: the copy loop
                // carries the connection on. Forget it here first.
                drop(_unwatch);
                drop(_forget);
                return Box::pin(super::epoll::relay(conn)).await;
            }
            Err(End::Io(e)) => Err(e),
            Err(End::Integrity(d, e)) => {
                sm.integrity_resets.set(sm.integrity_resets.get() + 1);
                ForwardStats::add(&conn.stats.integrity_resets, 1);
                tracing::error!(
                    id = conn.id,
                    forward = %conn.forward,
                    client = %conn.client_addr,
                    upstream = %conn.upstream_addr,
                    half = HALF_NAMES[d],
                    pre_read = base[d].pre_read,
                    received_at_insert = base[d].src_received,
                    unread_at_insert = base[d].src_unread,
                    "integrity check failed, resetting both sides: {e}"
                );
                Err(io::Error::other(format!(
                    "integrity check failed ({}): {e}",
                    HALF_NAMES[d]
                )))
            }
        };
        if result.is_err() {
            super::set_reset_on_close(&conn.client);
            super::set_reset_on_close(&conn.upstream);
        }
        // Dropping `conn` closes both sockets: the kernel unlinks them from the
        // sockmaps. `_forget` then deletes their counters.
        drop(_unwatch);
        drop(conn);
        drop(_forget);
        result
    }
}

/// On every exit from a spliced relay: forget the connection's counters
/// and controls (removing absent keys is harmless, so this guard exists
/// before the insert is even tried).
struct Forget<'a> {
    sm: &'a Sockmap,
    token: u64,
    cookies: [u64; 2],
    /// Counted in `active`/`live` (the insert succeeded).
    counted: Cell<bool>,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        let mut s = self.sm.splicer.borrow_mut();
        for c in self.cookies {
            s.forget(c);
        }
        if self.counted.get() {
            self.sm.live.borrow_mut().remove(&self.token);
            self.sm.active.set(self.sm.active.get() - 1);
        }
    }
}

struct Unwatch<'a>(&'a Watcher, u64, [std::os::fd::RawFd; 2], [u64; 2]);

impl Drop for Unwatch<'_> {
    fn drop(&mut self) {
        self.0.remove(self.1, self.2, self.3);
    }
}
