//! The io_uring engine: a copy loop where every read and write is one
//! io_uring submission (tokio-uring), so a direction costs no readiness
//! wake-up and no extra system call per chunk.
//!
//! The shape is the epoll engine's: each direction reads into its buffer,
//! writes all of it to the other socket, passes EOF on as
//! `shutdown(SHUT_WR)`, and any error resets both sockets. Two things are
//! specific to io_uring:
//!
//! - The kernel owns a read's buffer while the read is pending, even when
//!   the connection is idle. Each direction therefore reads into a small
//!   buffer unless the last read filled its buffer: then into one twice as
//!   large (up to 256 KiB), or straight back to the size the stream had
//!   reached if it is resuming after a read that did not fill. A read
//!   that does not fill means the socket is drained, and the next read
//!   is likely to wait: it gets the small buffer again, so a connection
//!   that went idle after a bulk transfer holds 1 KiB per direction, not
//!   256 KiB (measured: 1,000 idle connections after 1 MiB each way cost
//!   521 KiB each before this, against 5 KiB on epoll).
//! - So the read that wakes an idle direction has only 1 KiB, and a
//!   message larger than that would leave in pieces, each write waking the
//!   receiver for a part it cannot use yet (16 KiB round trips took 73 µs
//!   at p50 against epoll's 40). A read that fills its buffer is therefore
//!   topped up at once with a non-blocking `recv` of what else the socket
//!   holds, into the buffer grown to the size the stream had reached (at
//!   least twice as large), and the whole goes out in one write. A reset
//!   seen by the top-up is passed on after the bytes before it.
//! - Dropping a pending read does not cancel it, and the socket is closed
//!   only when it completes. To end a connection early (error or idle
//!   timeout) we `shutdown(SHUT_RD)` both sockets first, which completes
//!   any pending read at once; with SO_LINGER 0 the close then sends RST.
//!
//! [`Abort::current`](super::Abort::current) (drain timeout, forced exit) takes the same early exit,
//! with RST.
//!
//! Docker's default seccomp profile (since 25.0) blocks io_uring, so
//! [`probe`] checks `io_uring_setup` at start-up and reports the errno.

use super::{Activity, Conn, set_reset_on_close};
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::AtomicU64;
use tokio_uring::net::TcpStream;

/// The buffer an idle direction waits on. 1 KiB rather than 4: idle
/// connections cost 6 KiB less each, and a larger message costs one
/// non-blocking `recv` more (the top-up), not a write more.
const BUF_START: usize = 1024;
const BUF_MAX: usize = 256 * 1024;

/// Can this process use io_uring? The error names the syscall, the errno
/// and the most likely cause.
pub fn probe() -> Result<(), String> {
    match io_uring::IoUring::new(8) {
        Ok(_) => Ok(()),
        Err(e) => {
            let errno = nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0));
            let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .unwrap_or(0);
            let why = match errno {
                nix::errno::Errno::ENOSYS => "kernel built without io_uring".to_string(),
                nix::errno::Errno::EPERM if disabled > 0 => {
                    format!("disabled by sysctl kernel.io_uring_disabled={disabled}")
                }
                nix::errno::Errno::EPERM => {
                    "blocked by a seccomp filter (Docker's default profile blocks io_uring since 25.0)"
                        .to_string()
                }
                nix::errno::Errno::ENOMEM => "cannot lock ring memory (RLIMIT_MEMLOCK)".to_string(),
                other => other.desc().to_string(),
            };
            Err(format!("io_uring_setup: {errno:?} — {why}"))
        }
    }
}

/// A worker's io_uring runtime. The ring is set up for one thread that
/// enters the kernel often anyway: completions wait for its next system
/// call instead of interrupting it (`COOP_TASKRUN`), and only the thread
/// that made the ring submits to it (`SINGLE_ISSUER`). A kernel without
/// those flags (before 5.19 and 6.0) gets the default ring.
pub fn runtime() -> io::Result<tokio_uring::Runtime> {
    let mut urb = tokio_uring::uring_builder();
    urb.setup_coop_taskrun().setup_single_issuer();
    match tokio_uring::Runtime::new(tokio_uring::builder().uring_builder(&urb)) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tokio_uring::Runtime::new(&tokio_uring::builder())
        }
        r => r,
    }
}

/// Move bytes both ways until both directions have seen EOF, an error, or
/// the idle timeout.
///
/// Not an `async fn`: that would keep `conn` twice in the connection's
/// state (as the argument and as the local it is bound to).
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
pub fn relay(conn: Conn) -> impl Future<Output = io::Result<()>> {
    async move {
        let fds = [conn.client.as_raw_fd(), conn.upstream.as_raw_fd()];
        // On an O_NONBLOCK socket io_uring returns EAGAIN to us instead of
        // waiting for readiness itself.
        let (client, upstream) = (conn.client.into_std()?, conn.upstream.into_std()?);
        client.set_nonblocking(false)?;
        upstream.set_nonblocking(false)?;
        let client = TcpStream::from_std(client);
        let upstream = TcpStream::from_std(upstream);
        // Ends the connection early. Both streams are alive for the whole of
        // `relay`, so `fds` are open whenever this runs.
        let cut = |reset: bool| {
            for fd in fds {
                // Safety: see above; the borrow does not outlive this loop.
                let fd = unsafe { BorrowedFd::borrow_raw(fd) };
                if reset {
                    set_reset_on_close(&fd);
                }
                // Completes any pending read at once, so the socket can close.
                let _ = socket2::SockRef::from(&fd).shutdown(Shutdown::Read);
            }
        };
        let activity = Activity::new();
        let aborted = super::Abort::current();
        let stats = &conn.stats;

        // The two directions are made inside the block that joins them: made
        // outside, the block would hold them twice (800 bytes more).
        let both = async {
            tokio::try_join!(
                copy(&client, &upstream, &stats.bytes_to_upstream, &activity),
                copy(&upstream, &client, &stats.bytes_to_client, &activity)
            )
        };
        let result = tokio::select! {
            r = both => r.map(|_| ()),
            () = activity.idle(conn.settings.idle_timeout) => {
                tracing::debug!(id = conn.id, client = %conn.client_addr, "idle timeout");
                cut(false);
                return Ok(());
            }
            () = aborted.raised() => {
                tracing::debug!(id = conn.id, client = %conn.client_addr, "aborted: resetting both sides");
                cut(true);
                return Ok(());
            }
        };
        if result.is_err() {
            cut(true);
        }
        result
    }
}

/// One direction: `src` → `dst` until EOF, then half-close `dst`.
async fn copy(
    src: &TcpStream,
    dst: &TcpStream,
    counter: &AtomicU64,
    activity: &Activity,
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(BUF_START);
    // The size full reads have reached: where a stream resumes.
    let mut reached = BUF_START;
    loop {
        buf.clear();
        let (res, b) = src.read(buf).await;
        buf = b;
        let n = res?;
        if n == 0 {
            let _ = dst.shutdown(Shutdown::Write);
            return Ok(());
        }
        activity.touch();
        // A full read: take the rest of what is queued (see the module doc).
        let failed = if n == buf.capacity() {
            top_up(src, &mut buf, reached).err()
        } else {
            None
        };
        let n = buf.len();
        let (res, b) = dst.write_all(buf).await;
        buf = b;
        res?;
        crate::metrics::ForwardStats::add(counter, n as u64);
        if let Some(e) = failed {
            return Err(e);
        }
        let next = next_buf_size(buf.capacity(), n, &mut reached);
        if next != buf.capacity() {
            buf = Vec::with_capacity(next);
        }
    }
}

/// After a read that filled `buf`: grow it to the size the stream had
/// reached (at least twice as large, at most [`BUF_MAX`]) and append what
/// `src` holds now, without waiting. EOF is left for the next read to see;
/// an error is returned after the bytes already in `buf` (the caller writes
/// them first).
fn top_up(src: &TcpStream, buf: &mut Vec<u8>, reached: usize) -> io::Result<()> {
    let want = reached.max(2 * buf.len()).min(BUF_MAX);
    if want <= buf.len() {
        return Ok(());
    }
    buf.reserve_exact(want - buf.len());
    // Safety: `src` is open for the whole call; the borrow ends with it.
    let fd = unsafe { BorrowedFd::borrow_raw(src.as_raw_fd()) };
    let spare: &mut [MaybeUninit<u8>] = buf.spare_capacity_mut();
    match socket2::SockRef::from(&fd).recv_with_flags(spare, libc::MSG_DONTWAIT) {
        Ok(m) => {
            // Safety: `recv` initialised the first `m` bytes of the spare
            // capacity.
            unsafe { buf.set_len(buf.len() + m) };
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
        Err(e) => Err(e),
    }
}

/// The capacity of the next read's buffer, after a read of `n` bytes into
/// `cap` (see the module doc); `reached` is the size full reads have
/// reached so far.
fn next_buf_size(cap: usize, n: usize, reached: &mut usize) -> usize {
    if n < cap {
        // Drained: the next read may wait for a long time.
        return BUF_START;
    }
    if cap < *reached {
        // A stream resuming: back to its size at once.
        return *reached;
    }
    *reached = (cap * 2).min(BUF_MAX);
    *reached
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sizes a direction reads with, for a sequence of read lengths
    /// (`usize::MAX`: a read that fills its buffer).
    fn sizes(reads: &[usize]) -> Vec<usize> {
        let (mut cap, mut reached) = (BUF_START, BUF_START);
        let mut out = vec![cap];
        for &r in reads {
            cap = next_buf_size(cap, r.min(cap), &mut reached);
            out.push(cap);
        }
        out
    }

    #[test]
    fn full_reads_double_the_buffer_up_to_the_maximum() {
        let full = [usize::MAX; 9];
        let k = 1024;
        assert_eq!(
            sizes(&full),
            [
                k,
                2 * k,
                4 * k,
                8 * k,
                16 * k,
                32 * k,
                64 * k,
                128 * k,
                256 * k,
                256 * k
            ]
        );
    }

    #[test]
    fn a_drained_socket_waits_on_a_small_buffer_and_a_resuming_stream_gets_its_size_back() {
        let k = 1024;
        let f = usize::MAX;
        // Bulk up to 64 KiB, a short read (drained: idle on 1 KiB), then
        // the stream resumes: 64 KiB at once, and doubling from there.
        assert_eq!(
            sizes(&[f, f, f, f, f, f, 100, f, f]),
            [
                k,
                2 * k,
                4 * k,
                8 * k,
                16 * k,
                32 * k,
                64 * k,
                k,
                64 * k,
                128 * k
            ]
        );
        // Small messages never grow it.
        assert_eq!(sizes(&[10, 200, 1000]), [k; 4]);
    }
}
