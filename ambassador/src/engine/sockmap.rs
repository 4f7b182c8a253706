//! The in-kernel engine: both sockets of a connection go into eBPF SOCKHASH
//! maps and the verdict program (`ambassador-ebpf`) redirects every received
//! skb to the peer socket's send path. Userspace copies nothing in the
//! steady state; it only watches each connection's edges.
//!
//! Per connection ([`relay`]), following `shared/notes/sockmap.md`:
//! 1. Insert: counters and budget, then `PEERS` for both sockets, then
//!    `VERDICT` (rule 2), then a non-blocking `recv` "kick" on each socket so
//!    bytes that arrived before the insert go through the verdict too
//!    (rule 5). A map that is full or refuses the pair sends the connection
//!    to the epoll engine and bumps `splice_fallbacks`.
//! 2. Watch: a dedicated thread waits on epoll with `EPOLLRDHUP` only (rule 8:
//!    `EPOLLIN` would wake it for every redirected batch), so a spliced
//!    connection costs no wake-ups while bytes flow. A per-connection tick
//!    (fast while bytes move, backing off to 500 ms when idle) reads the
//!    kernel counters for `--idle-timeout`, stats and the budget.
//! 3. Backpressure (rule 11): the kernel acknowledges redirected bytes at
//!    once and queues them on the peer without limit. The program therefore
//!    redirects only within a per-direction budget `limit`, which the tick
//!    keeps at (bytes the destination has taken into its send queue) +
//!    [`INFLIGHT_CAP`]. Past the budget the program passes bytes to the
//!    source socket instead, where they are charged to its receive buffer, so
//!    TCP flow control reaches the sender. Userspace then copies those passed
//!    bytes itself once the destination has drained everything redirected
//!    before them, and tells the program (`forwarded`) so it resumes
//!    redirecting exactly when nothing passed is left: order is kept.
//! 4. Half-close (rule 9): on RDHUP from one side, wait until the other side
//!    has taken every redirected and copied byte into its send queue, then
//!    `shutdown(SHUT_WR)` it. The other direction keeps flowing.
//! 5. Reset (rule 12): EPOLLERR (or a hang-up we did not cause) on either
//!    side closes both with RST. Close (rule 10): both sockets are closed
//!    only when both directions are done; `close()` unlinks them from the
//!    sockmaps, and we delete their counters.

use super::epoll::{Outcome, Promote};
use super::{Activity, Conn};
use crate::bpf::{self, Sock, Splicer};
use crate::config::{Settings, SplicePolicy};
use crate::metrics::ForwardStats;
use ambassador_common::DirCtrl;
use aya::maps::{MapData, RingBuf};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{self, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// Bytes the kernel may hold per direction beyond what the destination
/// socket has taken into its send queue (the unaccounted psock backlog).
/// 4 MiB lets one loopback stream run at full speed with 2 ms ticks.
pub const INFLIGHT_CAP: u64 = 4 << 20;
/// `--splice adaptive`: splice a connection after 8 changes of direction
/// (4 round trips) with no read over 32 KiB in between.
pub const PROMOTE: Promote = Promote {
    turns: 8,
    small: 32 * 1024,
};
/// Connections the maps hold by default (each map holds two sockets per
/// connection). `AMBASSADOR_SOCKMAP_CONNS` overrides it.
pub const DEFAULT_CAPACITY: u32 = 32_768;
/// Adaptive policy: a direction is copied in userspace for good (a bulk
/// stream) after this many pass episodes, or once one episode has copied
/// this many times the in-flight cap.
pub const DEMOTE_AFTER: u32 = 3;
/// Tick while bytes move or an edge is pending.
const TICK_FAST: Duration = Duration::from_millis(2);
/// Slowest tick for an idle connection.
const TICK_SLOW: Duration = Duration::from_millis(500);
/// Bytes of passed data userspace reads per direction per tick.
const COPY_CHUNK: usize = 256 * 1024;

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
    /// Directions the adaptive policy moved to userspace copying.
    demoted: Cell<u64>,
    /// In-flight cap per direction ([`INFLIGHT_CAP`] unless
    /// `AMBASSADOR_SOCKMAP_INFLIGHT` overrides it, for experiments).
    cap: u64,
    /// SO_SNDBUF for spliced sockets (0 = kernel autotuning;
    /// `AMBASSADOR_SOCKMAP_SNDBUF`, for experiments).
    sndbuf: usize,
    next_token: Cell<u64>,
}

/// What `refresh_stats` needs of a live spliced connection.
struct Record {
    cookies: [u64; 2],
    stats: Arc<ForwardStats>,
    /// Redirected bytes already added to `stats`, per direction.
    reported: [Cell<u64>; 2],
}

impl Record {
    /// Add what the kernel redirected since the last call to the forward's
    /// `spliced_*` counters.
    fn fold(&self, splicer: &Splicer) -> [Option<ambassador_common::DirStats>; 2] {
        let mut out = [None, None];
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
                out[d] = Some(st);
            }
        }
        out
    }
}

impl Sockmap {
    /// Load and attach the program once at start-up. The error is the exact
    /// reason (syscall, errno, what is missing).
    pub fn start(settings: &Settings) -> Result<Sockmap, String> {
        let capacity = std::env::var("AMBASSADOR_SOCKMAP_CONNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_CAPACITY);
        Self::with_capacity(settings.splice, capacity)
    }

    /// [`Sockmap::start`] with an explicit policy and capacity (connections).
    pub fn with_capacity(policy: SplicePolicy, capacity: u32) -> Result<Sockmap, String> {
        let mut splicer = bpf::probe(capacity.saturating_mul(2).max(2))?;
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
            demoted: Cell::new(0),
            cap: env_num("AMBASSADOR_SOCKMAP_INFLIGHT").unwrap_or(INFLIGHT_CAP),
            sndbuf: env_num("AMBASSADOR_SOCKMAP_SNDBUF").unwrap_or(0) as usize,
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

    /// Directions so far that the adaptive policy moved to userspace.
    pub fn demoted(&self) -> u64 {
        self.demoted.get()
    }

    /// Entries in (`PEERS`, `VERDICT`, `STATS`, `CTRL`): for leak checks.
    pub fn map_entries(&self) -> (usize, usize, usize, usize) {
        self.splicer.borrow().entries()
    }
}

fn env_num(k: &str) -> Option<u64> {
    std::env::var(k).ok().and_then(|v| v.parse().ok())
}

/// Hand both sockets to the kernel and watch them until both directions are
/// done; fall back to the epoll engine if the connection cannot be spliced.
pub async fn relay(sm: &Rc<Sockmap>, conn: Conn) -> io::Result<()> {
    let conn = match sm.policy {
        SplicePolicy::Never => return super::epoll::relay(conn).await,
        SplicePolicy::Always => conn,
        // Start in userspace; move into the kernel only a connection that
        // shows a request/response pattern, at a point where userspace holds
        // no bytes (everything it read is already written, so the kernel's
        // redirects follow them in order). Short connections never pay for
        // the map inserts, bulk streams keep the faster copy loop.
        SplicePolicy::Adaptive => match super::epoll::relay_until(conn, Some(PROMOTE)).await? {
            Outcome::Done => return Ok(()),
            Outcome::Paused(conn) => conn,
        },
    };
    if sm.active.get() >= sm.capacity {
        ForwardStats::add(&conn.stats.splice_fallbacks, 1);
        tracing::debug!(
            id = conn.id,
            capacity = sm.capacity,
            "sockmap full, copying in userspace"
        );
        return super::epoll::relay(conn).await;
    }
    let socks = [&conn.client, &conn.upstream];
    let mut cookies = [0u64; 2];
    let mut base = [0u64; 2];
    for i in 0..2 {
        cookies[i] = bpf::socket_cookie(socks[i])?;
        // Baseline for the drain checks, taken before anything can be
        // redirected into the socket.
        base[i] = bpf::queued_total(socks[i])?;
    }
    let token = sm.next_token.get();
    sm.next_token.set(token + 1);
    let fds = [conn.client.as_raw_fd(), conn.upstream.as_raw_fd()];
    let slot = sm.watcher.add(token, fds, cookies)?;
    let _unwatch = Unwatch(&sm.watcher, token, fds, cookies);

    let a = Sock {
        fd: conn.client.as_raw_fd(),
        cookie: cookies[0],
    };
    let b = Sock {
        fd: conn.upstream.as_raw_fd(),
        cookie: cookies[1],
    };
    if sm.sndbuf > 0 {
        for s in socks {
            let _ = socket2::SockRef::from(s).set_send_buffer_size(sm.sndbuf);
        }
    }
    let inserted = sm.splicer.borrow_mut().insert_pair(a, b, sm.cap);
    match inserted {
        Err(e) => {
            ForwardStats::add(&conn.stats.splice_fallbacks, 1);
            tracing::debug!(id = conn.id, reason = %e, "cannot splice, copying in userspace");
            drop(_unwatch);
            return super::epoll::relay(conn).await;
        }
        // The upstream already sent FIN (it answered and closed between the
        // two inserts): its remaining bytes are copied by the same code that
        // handles pass mode, since its socket never gets a verdict.
        Ok(bpf::Inserted::FirstOnly(errno)) => {
            sm.watcher.watch_input(token, fds[1], 1)?;
            sm.half_spliced.set(sm.half_spliced.get() + 1);
            tracing::debug!(id = conn.id, errno = %bpf::errno_name(errno), "upstream not spliced, copying its bytes in userspace");
        }
        Ok(bpf::Inserted::Both) => {}
    }
    sm.active.set(sm.active.get() + 1);
    let record = Rc::new(Record {
        cookies,
        stats: conn.stats.clone(),
        reported: [Cell::new(0), Cell::new(0)],
    });
    sm.live.borrow_mut().insert(token, record.clone());
    let _forget = Forget { sm, token, cookies };

    let upstream_userspace = matches!(inserted, Ok(bpf::Inserted::FirstOnly(_)));
    let mut c = Spliced {
        sm,
        token,
        adaptive: sm.policy == SplicePolicy::Adaptive,
        socks: [&conn.client, &conn.upstream],
        dirs: [
            Dir::new(cookies[0], base[1], sm.cap),
            Dir::new(cookies[1], base[0], sm.cap),
        ],
        record: &record,
        activity: Activity::new(),
        stats: &conn.stats,
    };
    c.dirs[1].userspace = upstream_userspace;
    let activity = c.activity.clone();
    let result = tokio::select! {
        r = async {
            // The kick: run the verdict over anything queued before the insert.
            for d in 0..2 {
                c.pull(d)?;
            }
            c.run(&slot).await
        } => r,
        () = activity.idle(conn.settings.idle_timeout) => {
            tracing::debug!(id = conn.id, client = %conn.client_addr, "idle timeout");
            Ok(())
        }
    };
    record.fold(&sm.splicer.borrow());
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

/// One direction of a spliced connection: bytes received on `src`
/// (index d) and sent on the other socket (index 1-d).
struct Dir {
    /// Cookie of the source socket (the key of its counters and budget).
    cookie: u64,
    /// `queued_total(dst)` before the insert.
    dst_base: u64,
    /// Last budget written to `CTRL`.
    ctrl: DirCtrl,
    /// Passed bytes read from `src` (all of them end up in `dst`).
    user_read: u64,
    /// Bytes userspace wrote to `dst`.
    user_written: u64,
    /// Passed bytes read but not yet written.
    pending: Vec<u8>,
    /// `src` reported RDHUP (the peer sent FIN).
    rdhup: bool,
    /// `recv(src)` returned 0: nothing more will come.
    eof: bool,
    /// `dst` is shut down for writing (the FIN was passed on).
    shut: bool,
    /// The source socket has no verdict (see `bpf::Inserted::FirstOnly`):
    /// everything it receives is copied here, woken by EPOLLIN.
    userspace: bool,
    /// Nothing can be redirected into `dst` any more and everything that
    /// was has been drained: copying needs no further drain checks.
    clean: bool,
    /// Pass episodes so far (the budget ran out and userspace copied).
    episodes: u32,
    /// Last counters seen, to notice activity.
    last_seen: (u64, u64),
}

impl Dir {
    fn new(cookie: u64, dst_base: u64, cap: u64) -> Self {
        Dir {
            cookie,
            dst_base,
            ctrl: DirCtrl {
                limit: cap,
                forwarded: 0,
            },
            user_read: 0,
            user_written: 0,
            pending: Vec::new(),
            rdhup: false,
            eof: false,
            shut: false,
            userspace: false,
            episodes: 0,
            clean: false,
            last_seen: (0, 0),
        }
    }
}

struct Spliced<'a> {
    sm: &'a Rc<Sockmap>,
    /// The connection's watcher token.
    token: u64,
    /// Demote bulk directions to userspace copying (`--splice adaptive`).
    adaptive: bool,
    /// [client, upstream]; direction d reads socks[d] and writes socks[1-d].
    socks: [&'a TcpStream; 2],
    dirs: [Dir; 2],
    record: &'a Rc<Record>,
    activity: Activity,
    stats: &'a ForwardStats,
}

impl Spliced<'_> {
    /// Watch the connection until both directions are closed.
    async fn run(&mut self, slot: &Slot) -> io::Result<()> {
        let mut tick = TICK_FAST;
        loop {
            let ev = [
                slot.events[0].swap(0, Ordering::AcqRel),
                slot.events[1].swap(0, Ordering::AcqRel),
            ];
            for (i, e) in ev.iter().enumerate() {
                if e & (libc::EPOLLRDHUP as u32) != 0 {
                    self.dirs[i].rdhup = true;
                }
                // An error, or a hang-up we did not cause by shutting it
                // down ourselves: the connection is broken both ways.
                let hup = e & (libc::EPOLLHUP as u32) != 0 && !self.dirs[1 - i].shut;
                if e & (libc::EPOLLERR as u32) != 0 || hup {
                    let err = bpf::so_error(self.socks[i]);
                    let err = if err != 0 { err } else { libc::ECONNRESET };
                    return Err(io::Error::from_raw_os_error(err));
                }
            }
            let busy = self.step()?;
            if self.dirs[0].shut && self.dirs[1].shut {
                return Ok(());
            }
            tick = if busy {
                TICK_FAST
            } else {
                (tick * 2).min(TICK_SLOW)
            };
            tokio::select! {
                () = slot.notify.notified() => tick = TICK_FAST,
                () = tokio::time::sleep(tick) => {}
            }
        }
    }

    /// One pass over both directions. Returns whether anything is moving or
    /// pending (so the next tick comes soon).
    fn step(&mut self) -> io::Result<bool> {
        let st = self.record.fold(&self.sm.splicer.borrow());
        let mut busy = false;
        for (d, s) in st.into_iter().enumerate() {
            let Some(s) = s else { continue };
            let seen = (s.redirected_bytes, s.passed_bytes);
            if seen != self.dirs[d].last_seen {
                self.dirs[d].last_seen = seen;
                self.activity.touch();
                busy = true;
            }
            if self.dirs[d].shut {
                continue;
            }
            // Userspace owes `dst` passed bytes, or the peer sent FIN.
            let owes = self.dirs[d].userspace
                || s.passed_bytes > self.dirs[d].ctrl.forwarded
                || !self.dirs[d].pending.is_empty();
            if owes || self.dirs[d].rdhup {
                let moved = self.dirs[d].user_read;
                busy |= !self.dirs[d].userspace;
                if self.dirs[d].rdhup && !self.dirs[d].eof {
                    // Taking the socket lock (and reading passed bytes) makes
                    // sure the verdict has seen every byte before the FIN.
                    self.pull(d)?;
                }
                // Nothing redirected may still be queued ahead of what we
                // copy. A `clean` direction redirects no more, and was
                // drained once: skip the check. Otherwise re-read the
                // counters (the pull may have let the verdict run).
                let ready = self.dirs[d].clean || {
                    let s = self.sm.splicer.borrow().stats(self.dirs[d].cookie)?;
                    self.drained(d, s.redirected_bytes)?
                };
                if ready {
                    // A userspace-only source never redirects: once drained,
                    // it stays drained.
                    self.dirs[d].clean |= self.dirs[d].userspace;
                    // Nothing redirected is still queued ahead of us, and
                    // while `forwarded` stays behind, the program passes
                    // every new byte to us: copy until src is empty or dst
                    // is full, then hand back to the kernel.
                    for _ in 0..64 {
                        self.pull(d)?;
                        let before = self.dirs[d].pending.len();
                        self.push(d)?;
                        let after = self.dirs[d].pending.len();
                        if after > 0 || before == 0 {
                            break;
                        }
                    }
                    let dir = &self.dirs[d];
                    let episode = dir.pending.is_empty() && dir.ctrl.forwarded != dir.user_read;
                    // Bytes copied in the episode still under way: a stream
                    // that never lets us catch up is bulk as well.
                    let long =
                        dir.user_read - dir.ctrl.forwarded >= u64::from(DEMOTE_AFTER) * self.sm.cap;
                    if self.adaptive
                        && !dir.userspace
                        && (long || episode && dir.episodes + 1 >= DEMOTE_AFTER)
                    {
                        // Instead of handing back: the program keeps passing.
                        self.demote(d)?;
                    } else {
                        self.handback(d)?;
                    }
                    busy |= self.dirs[d].user_read != moved || !self.dirs[d].pending.is_empty();
                    if self.dirs[d].eof && self.dirs[d].pending.is_empty() && {
                        self.dirs[d].clean || {
                            let s = self.sm.splicer.borrow().stats(self.dirs[d].cookie)?;
                            self.drained(d, s.redirected_bytes)?
                        }
                    } {
                        // Every byte before the FIN is in dst's send queue:
                        // pass the FIN on.
                        let _ = self.socks[1 - d].shutdown(Shutdown::Write);
                        self.dirs[d].shut = true;
                        continue;
                    }
                }
            }
            // Keep the budget ahead of the destination's progress.
            if !self.dirs[d].userspace
                && s.redirected_bytes + self.sm.cap / 2 > self.dirs[d].ctrl.limit
            {
                busy = true;
                let taken = self.dst_taken(d)?;
                let limit = taken.saturating_sub(self.dirs[d].user_written) + self.sm.cap;
                if limit > self.dirs[d].ctrl.limit {
                    self.dirs[d].ctrl.limit = limit;
                    self.write_ctrl(d)?;
                }
            }
        }
        Ok(busy)
    }

    /// Bytes `dst` of direction d has taken into its send queue since the
    /// insert.
    fn dst_taken(&self, d: usize) -> io::Result<u64> {
        Ok(bpf::queued_total(self.socks[1 - d])?.saturating_sub(self.dirs[d].dst_base))
    }

    /// Has `dst` taken every byte redirected (and copied) into it?
    fn drained(&self, d: usize, redirected: u64) -> io::Result<bool> {
        Ok(self.dst_taken(d)? >= redirected + self.dirs[d].user_written)
    }

    /// Read passed bytes from src (non-blocking) into `pending`.
    fn pull(&mut self, d: usize) -> io::Result<()> {
        let dir = &mut self.dirs[d];
        while !dir.eof && dir.pending.len() < COPY_CHUNK {
            let old = dir.pending.len();
            dir.pending.resize(old + 64 * 1024, 0);
            let r = bpf::kick(self.socks[d], &mut dir.pending[old..]);
            match r {
                Ok(0) => {
                    dir.pending.truncate(old);
                    dir.eof = true;
                    dir.rdhup = true;
                }
                Ok(n) => {
                    dir.pending.truncate(old + n);
                    dir.user_read += n as u64;
                }
                Err(e) => {
                    dir.pending.truncate(old);
                    if e.kind() == io::ErrorKind::WouldBlock {
                        break;
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Write `pending` to dst (non-blocking); once all passed bytes read so
    /// far are written, let the program redirect again.
    fn push(&mut self, d: usize) -> io::Result<()> {
        let dir = &mut self.dirs[d];
        let mut done = 0;
        while done < dir.pending.len() {
            match (&mut &*self.socks[1 - d]).write(&dir.pending[done..]) {
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        dir.pending.drain(..done);
        dir.user_written += done as u64;
        let counter = if d == 0 {
            &self.stats.bytes_to_upstream
        } else {
            &self.stats.bytes_to_client
        };
        ForwardStats::add(counter, done as u64);
        if done > 0 {
            self.activity.touch();
        }
        Ok(())
    }

    /// Adaptive policy: this direction outran the kernel's redirect path
    /// again and again (a bulk stream, which the kworker-driven redirect
    /// moves slower than a copy loop, see docs/sockmap.md): from now on the
    /// program passes all of it (`limit` 0, the socket stays in the map as
    /// rule 13 asks) and we copy it, woken by EPOLLIN like the epoll engine.
    /// Call only instead of `handback`, right after a drained check: since
    /// `forwarded` stays behind, nothing is redirected from here on, so the
    /// direction is `clean`.
    fn demote(&mut self, d: usize) -> io::Result<()> {
        self.dirs[d].userspace = true;
        self.dirs[d].clean = true;
        self.dirs[d].ctrl.limit = 0;
        self.write_ctrl(d)?;
        self.sm
            .watcher
            .watch_input(self.token, self.socks[d].as_raw_fd(), d)?;
        self.sm.demoted.set(self.sm.demoted.get() + 1);
        Ok(())
    }

    /// Once every passed byte read so far is written, let the program
    /// redirect again (it does so only while `passed == forwarded`). Until
    /// this update the program keeps passing, so no redirected byte can
    /// overtake one we copy. Call only right after a drained check.
    fn handback(&mut self, d: usize) -> io::Result<()> {
        let dir = &mut self.dirs[d];
        if dir.userspace {
            // Passing for good (limit 0): nothing to hand back. Leaving
            // `forwarded` behind also keeps the program from waking us
            // through `EVENTS`; EPOLLIN does.
            return Ok(());
        }
        if dir.pending.is_empty() && dir.ctrl.forwarded != dir.user_read {
            dir.ctrl.forwarded = dir.user_read;
            dir.episodes += 1;
            dir.pending = Vec::new(); // idle connections hold no buffer
            // Raise the budget too, or the program would pass again at once.
            let taken = bpf::queued_total(self.socks[1 - d])?.saturating_sub(dir.dst_base);
            dir.ctrl.limit = dir
                .ctrl
                .limit
                .max(taken.saturating_sub(dir.user_written) + self.sm.cap);
            self.write_ctrl(d)?;
        }
        Ok(())
    }

    fn write_ctrl(&self, d: usize) -> io::Result<()> {
        self.sm
            .splicer
            .borrow_mut()
            .set_ctrl(self.dirs[d].cookie, self.dirs[d].ctrl)
    }
}

/// On every exit from a spliced relay: forget the connection.
struct Forget<'a> {
    sm: &'a Sockmap,
    token: u64,
    cookies: [u64; 2],
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        let mut s = self.sm.splicer.borrow_mut();
        for c in self.cookies {
            s.forget(c);
        }
        self.sm.live.borrow_mut().remove(&self.token);
        self.sm.active.set(self.sm.active.get() - 1);
    }
}

struct Unwatch<'a>(&'a Watcher, u64, [RawFd; 2], [u64; 2]);

impl Drop for Unwatch<'_> {
    fn drop(&mut self) {
        self.0.remove(self.1, self.2, self.3);
    }
}

/// Extra bit in `Slot::events`: the program started passing bytes of this
/// socket (an `EVENTS` record), so userspace has copying to do.
const EV_PASS: u32 = 1 << 31;
/// epoll token of the `EVENTS` ring buffer.
const RING_TOKEN: u64 = u64::MAX;

/// Events seen for one connection: [client, upstream] epoll bits, and a
/// wake-up for its relay task.
struct Slot {
    events: [AtomicU32; 2],
    notify: Notify,
}

/// A thread blocked in `epoll_wait` on every spliced socket, registered for
/// `EPOLLRDHUP` (ERR and HUP are implicit) and edge-triggered, so it wakes
/// only at a connection's edges, never for the bytes the kernel moves.
/// It also owns the `EVENTS` ring buffer and wakes the connection whose
/// socket just started passing bytes (see `ambassador_common::DirCtrl`).
struct Watcher {
    epfd: Arc<OwnedFd>,
    slots: Arc<Mutex<Slots>>,
    stop: Arc<AtomicBool>,
}

#[derive(Default)]
struct Slots {
    by_token: HashMap<u64, Arc<Slot>>,
    /// cookie -> (token, side)
    by_cookie: HashMap<u64, (u64, usize)>,
}

impl Watcher {
    fn start(mut ring: RingBuf<MapData>) -> io::Result<Self> {
        // Safety: plain syscall; the fd is owned right away.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // Safety: `fd` is a fresh fd nobody else owns.
        let epfd = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: RING_TOKEN,
        };
        // Safety: live fds, valid event struct.
        if unsafe { libc::epoll_ctl(fd, libc::EPOLL_CTL_ADD, ring.as_raw_fd(), &mut ev) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let slots: Arc<Mutex<Slots>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (e, s, st) = (epfd.clone(), slots.clone(), stop.clone());
        std::thread::Builder::new()
            .name("sockmap-watch".into())
            .spawn(move || {
                let mut evs = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
                while !st.load(Ordering::Relaxed) {
                    // Safety: `evs` has room for the count passed.
                    let n = unsafe {
                        libc::epoll_wait(e.as_raw_fd(), evs.as_mut_ptr(), evs.len() as i32, 200)
                    };
                    for ev in evs.iter().take(n.max(0) as usize) {
                        let slots = s.lock().unwrap();
                        let wake = |token: u64, side: usize, bits: u32| {
                            if let Some(slot) = slots.by_token.get(&token) {
                                slot.events[side].fetch_or(bits, Ordering::AcqRel);
                                slot.notify.notify_one();
                            }
                        };
                        if ev.u64 != RING_TOKEN {
                            wake(ev.u64 >> 1, (ev.u64 & 1) as usize, ev.events);
                            continue;
                        }
                        while let Some(item) = ring.next() {
                            let Ok(b) = <[u8; 8]>::try_from(&item[..]) else {
                                continue;
                            };
                            if let Some(&(token, side)) =
                                slots.by_cookie.get(&u64::from_ne_bytes(b))
                            {
                                wake(token, side, EV_PASS);
                            }
                        }
                    }
                }
            })?;
        Ok(Watcher { epfd, slots, stop })
    }

    fn add(&self, token: u64, fds: [RawFd; 2], cookies: [u64; 2]) -> io::Result<Arc<Slot>> {
        let slot = Arc::new(Slot {
            events: [AtomicU32::new(0), AtomicU32::new(0)],
            notify: Notify::new(),
        });
        {
            let mut slots = self.slots.lock().unwrap();
            slots.by_token.insert(token, slot.clone());
            slots.by_cookie.insert(cookies[0], (token, 0));
            slots.by_cookie.insert(cookies[1], (token, 1));
        }
        for (side, fd) in fds.iter().enumerate() {
            let mut ev = libc::epoll_event {
                events: (libc::EPOLLRDHUP | libc::EPOLLET) as u32,
                u64: (token << 1) | side as u64,
            };
            // Safety: live fds, valid event struct.
            let r = unsafe {
                libc::epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, *fd, &mut ev)
            };
            if r != 0 {
                let e = io::Error::last_os_error();
                self.remove(token, fds, cookies);
                return Err(e);
            }
        }
        Ok(slot)
    }

    /// Also wake on every arrival of data on `fd` (a socket whose bytes are
    /// copied in userspace).
    fn watch_input(&self, token: u64, fd: RawFd, side: usize) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLRDHUP | libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: (token << 1) | side as u64,
        };
        // Safety: live fd, valid event struct.
        let r = unsafe { libc::epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_MOD, fd, &mut ev) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn remove(&self, token: u64, fds: [RawFd; 2], cookies: [u64; 2]) {
        for fd in fds {
            // Safety: at worst ENOENT/EBADF, which we ignore.
            unsafe {
                libc::epoll_ctl(
                    self.epfd.as_raw_fd(),
                    libc::EPOLL_CTL_DEL,
                    fd,
                    std::ptr::null_mut(),
                )
            };
        }
        let mut slots = self.slots.lock().unwrap();
        slots.by_token.remove(&token);
        for c in cookies {
            slots.by_cookie.remove(&c);
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
