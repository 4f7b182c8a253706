//! The epoll engine: a tokio copy loop, one task per connection.
//!
//! Each direction waits for its source to be readable, reads into a buffer
//! borrowed from a small per-thread pool, writes all of it to the other
//! socket, and returns the buffer. A connection holds a buffer only while
//! bytes are actually in flight, so ten thousand idle connections cost no
//! buffer memory at all.
//!
//! A read that fills less than the buffer has emptied the socket's receive
//! queue, so it also clears the source's readiness (as tokio's own
//! `AsyncRead` does on Linux): the next read waits for the next epoll event
//! instead of costing a `recv` that says EAGAIN. Readiness is cleared only
//! if no event came in since it was seen, and an EOF seen stays seen, so no
//! byte or FIN can be missed.
//!
//! End of a direction: EOF on the source becomes `shutdown(SHUT_WR)` on the
//! destination (half-close), and the other direction carries on until its
//! own EOF. Any error (a reset on either side, a failed write) ends both
//! directions and closes both sockets with RST, so the peer that is still
//! there learns that the connection broke rather than seeing a clean EOF.
//!
//! [`Abort::current`](super::Abort::current) (drain timeout, forced exit) ends both directions at
//! once and closes both sockets with RST.
//!
//! This is also the engine that works everywhere: Docker's default seccomp
//! profile blocks io_uring, and an unprivileged process cannot load BPF.

use super::{Activity, Conn, set_reset_on_close};
use futures_util::FutureExt;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::AtomicU64;
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Size of one copy buffer: large enough that a bulk transfer needs few
/// system calls, small enough to stay in cache.
pub const BUF_SIZE: usize = 64 * 1024;
/// Free buffers kept for reuse per thread; more are freed.
const POOL_MAX: usize = 64;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer from the pool, returned to it when dropped.
struct PooledBuf(Option<Box<[u8]>>);

impl PooledBuf {
    fn take() -> Self {
        let b = POOL.with(|p| p.borrow_mut().pop());
        PooledBuf(Some(
            b.unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice()),
        ))
    }
}

impl std::ops::Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.as_deref().unwrap()
    }
}

impl std::ops::DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().unwrap()
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            POOL.with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < POOL_MAX {
                    p.push(b);
                }
            });
        }
    }
}

/// Move bytes both ways until both directions have seen EOF, an error, or
/// the idle timeout.
pub fn relay(conn: Conn) -> impl Future<Output = io::Result<()>> {
    // `map`, not an `async fn` around it: that would hold its own copy of
    // `conn` for the connection's whole life.
    relay_until(conn, None).map(|r| r.map(|_| ()))
}

/// When the sockmap engine's adaptive policy wants a connection moved into
/// the kernel: after `turns` changes of direction (a request/response
/// pattern, where splicing saves a userspace wake-up per message) with no
/// read larger than `small` in between (bulk, in either or both directions,
/// where the copy loop is faster on one host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Promote {
    pub turns: u32,
    pub small: usize,
}

/// How [`relay_until`] ended.
pub enum Outcome {
    /// Both directions are done.
    Done,
    /// Paused for promotion, at a point where userspace holds no bytes:
    /// everything read so far has been written, both directions are open.
    /// The sockets are back in `Conn`, ready to be spliced, with the bytes
    /// read from each (client→server, server→client) in this call, and
    /// per direction whether its last read in this call filled the buffer
    /// (then an skb may be partly read; a read that returned less than it
    /// asked for emptied the kernel's receive queue). A direction that did
    /// not read in this call reports `false`: the caller keeps the flag of
    /// its earlier calls.
    Paused(Conn, [u64; 2], [bool; 2]),
}

/// What one direction's loop ended with.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    Eof,
    Paused,
}

/// Shared by the two directions of one connection: the request/response
/// detector and the pause request.
///
/// A pause needs both directions at their pause point (after a completed
/// write, before the next read). A direction that gets there first holds:
/// it stops reading. That is a deadlock if the other direction is waiting
/// to write to a peer that itself waits to write to us (an echo server with
/// full buffers: it reads no more until the held direction drains it). So a
/// direction that has to wait to write calls the pause off, and no pause is
/// requested while one waits; promotion comes at a later quiet point.
struct Pause {
    promote: Option<Promote>,
    requested: Cell<bool>,
    /// A pause was requested, called off, or a direction stopped.
    change: Notify,
    /// Direction of the last read (0 = client→server), and turns seen.
    last_dir: Cell<u8>,
    turns: Cell<u32>,
    /// Directions that have seen EOF.
    eofs: Cell<u8>,
    /// Directions that are at their pause point or have ended.
    stopped: Cell<u8>,
    /// Directions waiting for their destination to become writable.
    blocked: Cell<u8>,
    /// Per direction: the last read filled the buffer (an skb may be
    /// partly read).
    full: [Cell<bool>; 2],
}

impl Pause {
    fn new(promote: Option<Promote>) -> Self {
        Pause {
            promote,
            requested: Cell::new(false),
            change: Notify::new(),
            last_dir: Cell::new(1),
            turns: Cell::new(0),
            eofs: Cell::new(0),
            stopped: Cell::new(0),
            blocked: Cell::new(0),
            full: [Cell::new(false), Cell::new(false)],
        }
    }

    /// A read of `n` bytes in direction `dir`.
    fn saw_read(&self, dir: u8, n: usize) {
        self.full[usize::from(dir)].set(n >= BUF_SIZE);
        let Some(p) = self.promote else { return };
        if n > p.small {
            self.turns.set(0); // bulk: stay in userspace
        } else if self.last_dir.replace(dir) != dir {
            self.turns.set(self.turns.get() + 1);
        }
        if self.turns.get() >= p.turns && !self.requested.get() && self.blocked.get() == 0 {
            self.requested.set(true);
            self.change.notify_waiters();
        }
    }

    /// This direction is at its pause point. True once both directions are
    /// (or the other one ended): pause. False if the pause was called off:
    /// copy on.
    async fn hold(&self) -> bool {
        self.stopped.set(self.stopped.get() + 1);
        loop {
            let changed = self.change.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            if self.stopped.get() >= 2 {
                self.change.notify_waiters();
                return true;
            }
            if !self.requested.get() {
                self.stopped.set(self.stopped.get() - 1);
                return false;
            }
            changed.await;
        }
    }

    /// This direction ended (EOF): a holding direction need not wait for it.
    fn ended(&self) {
        self.stopped.set(self.stopped.get() + 1);
        self.change.notify_waiters();
    }

    /// Wait until `dst` is writable. Waiting calls off a pending pause (the
    /// other direction must keep reading, see [`Pause`]).
    async fn writable(&self, dst: &TcpStream) -> io::Result<()> {
        let mut waited = false;
        let r = std::future::poll_fn(|cx| {
            let ready = dst.poll_write_ready(cx);
            if ready.is_pending() && !waited {
                waited = true;
                self.blocked.set(self.blocked.get() + 1);
                if self.requested.replace(false) {
                    self.turns.set(0);
                    self.change.notify_waiters();
                }
            }
            ready
        })
        .await;
        if waited {
            self.blocked.set(self.blocked.get() - 1);
        }
        r
    }
}

/// [`relay`], optionally pausing for promotion to the kernel (see
/// [`Promote`]). Without `promote` it always returns [`Outcome::Done`].
///
/// Not an `async fn`: its future would keep `conn` as it came in next to
/// the parts taken out of it, 150 bytes per connection for nothing. The
/// `async` block below captures only the parts.
pub fn relay_until(
    conn: Conn,
    promote: Option<Promote>,
) -> impl Future<Output = io::Result<Outcome>> {
    let Conn {
        id,
        forward,
        client,
        upstream,
        client_addr,
        upstream_addr,
        stats,
        settings,
    } = conn;
    async move {
        let abort = super::Abort::current();
        let client = client.into_tokio()?;
        let upstream = upstream.into_tokio()?;
        let activity = Activity::new();
        let pause = Pause::new(promote);
        let (up, down) = (&stats.bytes_to_upstream, &stats.bytes_to_client);
        let read = [Cell::new(0u64), Cell::new(0u64)];
        let both = async {
            let steps = tokio::try_join!(
                copy(&client, &upstream, up, &read[0], &activity, &pause, 0),
                copy(&upstream, &client, down, &read[1], &activity, &pause, 1)
            )?;
            // A direction that reached EOF while the other paused cannot be
            // spliced (a socket that got FIN cannot enter a sockmap): finish
            // the other one here.
            let full = [pause.full[0].get(), pause.full[1].get()];
            // No promotion from here on, and no pending request either: the
            // other direction must run to its EOF.
            let no_pause = Pause::new(None);
            no_pause.eofs.set(pause.eofs.get());
            match steps {
                (Step::Paused, Step::Paused) => {
                    return Ok(Some(full));
                }
                (Step::Paused, Step::Eof) => {
                    copy(&client, &upstream, up, &read[0], &activity, &no_pause, 0).await?;
                }
                (Step::Eof, Step::Paused) => {
                    copy(&upstream, &client, down, &read[1], &activity, &no_pause, 1).await?;
                }
                (Step::Eof, Step::Eof) => {}
            }
            Ok::<Option<[bool; 2]>, io::Error>(None)
        };
        let result = tokio::select! {
            r = both => r,
            () = activity.idle(settings.idle_timeout) => {
                tracing::debug!(id, client = %client_addr, "idle timeout");
                Ok(None)
            }
            () = abort.raised() => {
                tracing::debug!(id, client = %client_addr, "aborted: resetting both sides");
                set_reset_on_close(&client);
                set_reset_on_close(&upstream);
                Ok(None)
            }
        };
        match result {
            Ok(Some(full)) => Ok(Outcome::Paused(
                Conn {
                    id,
                    forward,
                    // Still registered: an engine that needs them plain
                    // (sockmap) takes them off the reactor itself.
                    client: client.into(),
                    upstream: upstream.into(),
                    client_addr,
                    upstream_addr,
                    stats,
                    settings,
                },
                [read[0].get(), read[1].get()],
                full,
            )),
            Ok(None) => Ok(Outcome::Done),
            Err(e) => {
                set_reset_on_close(&client);
                set_reset_on_close(&upstream);
                Err(e)
            }
        }
    }
}

/// Wait until `src` is readable. Unlike `TcpStream::readable`, whose
/// future holds a waiter of its own (64 bytes, in every connection's state
/// for its whole life), this uses the socket's one reader slot in tokio's
/// registration: the direction that reads `src` is its only reader.
fn readable(src: &TcpStream) -> impl Future<Output = io::Result<()>> + '_ {
    std::future::poll_fn(|cx| src.poll_read_ready(cx))
}

/// Read from `src`; a short read also clears its readiness (see the
/// module doc).
fn read_draining(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut short = None;
    let r = src.try_io(tokio::io::Interest::READABLE, || match src.try_read(buf) {
        Ok(n) if 0 < n && n < buf.len() => {
            short = Some(n);
            Err(io::ErrorKind::WouldBlock.into())
        }
        other => other,
    });
    match short {
        Some(n) => Ok(n),
        None => r,
    }
}

/// One direction: `src` → `dst` until EOF (then half-close `dst`) or a
/// pause request (only ever between a completed write and the next read).
async fn copy(
    src: &TcpStream,
    dst: &TcpStream,
    counter: &AtomicU64,
    read: &Cell<u64>,
    activity: &Activity,
    pause: &Pause,
    dir: u8,
) -> io::Result<Step> {
    loop {
        if pause.requested.get() && pause.hold().await {
            return Ok(Step::Paused);
        }
        tokio::select! {
            r = readable(src) => r?,
            () = pause.change.notified(), if pause.promote.is_some() => continue,
        }
        let mut buf = PooledBuf::take();
        let n = match read_draining(src, &mut buf) {
            Ok(0) => {
                // The peer will send no more: pass the FIN on, while the other
                // direction still flows. (When this is the last direction, the
                // close right after sends the FIN: save the system call.)
                // ENOTCONN means the other side is already gone, which its own
                // direction reports.
                pause.eofs.set(pause.eofs.get() + 1);
                if pause.eofs.get() < 2 {
                    let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
                }
                pause.ended();
                return Ok(Step::Eof);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        activity.touch();
        let mut done = 0;
        while done < n {
            pause.writable(dst).await?;
            match dst.try_write(&buf[done..n]) {
                Ok(w) => done += w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        crate::metrics::ForwardStats::add(counter, n as u64);
        read.set(read.get() + n as u64);
        pause.saw_read(dir, n);
    }
}
