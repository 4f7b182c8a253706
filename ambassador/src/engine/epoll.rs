//! The epoll engine: a tokio copy loop, one task per connection.
//!
//! Each direction waits for its source to be readable, reads into a buffer
//! borrowed from a small per-thread pool, writes all of it to the other
//! socket, and returns the buffer. A connection holds a buffer only while
//! bytes are actually in flight, so ten thousand idle connections cost no
//! buffer memory at all.
//!
//! End of a direction: EOF on the source becomes `shutdown(SHUT_WR)` on the
//! destination (half-close), and the other direction carries on until its
//! own EOF. Any error (a reset on either side, a failed write) ends both
//! directions and closes both sockets with RST, so the peer that is still
//! there learns that the connection broke rather than seeing a clean EOF.
//!
//! This is also the engine that works everywhere: Docker's default seccomp
//! profile blocks io_uring, and an unprivileged process cannot load BPF.

use super::{Activity, Conn, set_reset_on_close};
use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::AtomicU64;
use tokio::net::TcpStream;

/// Size of one copy buffer: large enough that a bulk transfer needs few
/// system calls, small enough to stay in cache.
const BUF_SIZE: usize = 64 * 1024;
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
pub async fn relay(conn: Conn) -> io::Result<()> {
    let client = TcpStream::from_std(conn.client)?;
    let upstream = TcpStream::from_std(conn.upstream)?;
    let activity = Activity::new();
    let stats = &conn.stats;

    let client_to_server = copy(&client, &upstream, &stats.bytes_to_upstream, &activity);
    let server_to_client = copy(&upstream, &client, &stats.bytes_to_client, &activity);
    let result = tokio::select! {
        r = async { tokio::try_join!(client_to_server, server_to_client) } => r.map(|_| ()),
        () = activity.idle(conn.settings.idle_timeout) => {
            tracing::debug!(id = conn.id, client = %conn.client_addr, "idle timeout");
            Ok(())
        }
    };
    if result.is_err() {
        set_reset_on_close(&client);
        set_reset_on_close(&upstream);
    }
    result
}

/// One direction: `src` → `dst` until EOF, then half-close `dst`.
async fn copy(
    src: &TcpStream,
    dst: &TcpStream,
    counter: &AtomicU64,
    activity: &Activity,
) -> io::Result<()> {
    loop {
        src.readable().await?;
        let mut buf = PooledBuf::take();
        let n = match src.try_read(&mut buf) {
            Ok(0) => {
                // The peer will send no more: pass the FIN on. ENOTCONN means
                // the other side is already gone, which its own direction reports.
                let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        activity.touch();
        let mut done = 0;
        while done < n {
            dst.writable().await?;
            match dst.try_write(&buf[done..n]) {
                Ok(w) => done += w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        crate::metrics::ForwardStats::add(counter, n as u64);
    }
}
