//! A listening socket that accepts without registering the client.
//!
//! `tokio::net::TcpListener::accept` registers every accepted socket with
//! the accept loop's reactor (one `epoll_ctl(ADD)`), and the hand-over to
//! the worker that relays it takes it off again (`epoll_ctl(DEL)`), only
//! for the engine to register it once more on its own thread. Here the
//! listener alone is registered (for readability), and a client is taken
//! with one `accept4(SOCK_NONBLOCK | SOCK_CLOEXEC)`: it reaches its engine
//! as a plain descriptor, already non-blocking, with no syscall in between.
//!
//! The listener is created with TCP_NODELAY set (see [`super::bind`]);
//! Linux copies it to every socket accepted from it, so clients need no
//! `setsockopt` of their own.

use socket2::SockAddr;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::task::{Context, Poll, ready};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// A bound, listening, non-blocking socket, registered with the current
/// runtime for readability.
pub struct Listener(AsyncFd<TcpListener>);

impl Listener {
    /// Register `listener` (non-blocking, see [`super::bind`]) with the
    /// runtime of the calling thread.
    pub fn from_std(listener: TcpListener) -> io::Result<Self> {
        // SAFETY: the AsyncFd owns the listener, so its descriptor stays
        // open and names the same socket until the AsyncFd is dropped.
        unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }
            .map(Listener)
            .map_err(|e| e.into())
    }

    /// The next client, or the error of the accept that failed.
    pub fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(TcpStream, SocketAddr)>> {
        loop {
            let mut ready = ready!(self.0.poll_read_ready(cx))?;
            match ready.try_io(|l| accept(l.get_ref())) {
                Ok(result) => return Poll::Ready(result),
                // Nothing in the backlog: readiness cleared, poll again.
                Err(_would_block) => continue,
            }
        }
    }
}

/// One `accept4(2)`: the client comes out non-blocking and close-on-exec.
fn accept(listener: &TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
    let fd = listener.as_raw_fd();
    // SAFETY: accept4 writes at most `len` bytes of address into the
    // storage try_init hands it, and sets `len` to what it wrote.
    let (client, addr) = unsafe {
        SockAddr::try_init(|storage, len| {
            let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
            match libc::accept4(fd, storage.cast(), len, flags) {
                -1 => Err(io::Error::last_os_error()),
                // SAFETY: a new descriptor that nothing else owns.
                client => Ok(TcpStream::from_raw_fd(client)),
            }
        })
    }?;
    let addr = addr
        .as_socket()
        .ok_or_else(|| io::Error::other("accepted a client without an IP address"))?;
    Ok((client, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nonblocking(s: &TcpStream) -> bool {
        // SAFETY: F_GETFL on a descriptor we own.
        let flags = unsafe { libc::fcntl(s.as_raw_fd(), libc::F_GETFL) };
        flags & libc::O_NONBLOCK != 0
    }

    #[tokio::test]
    async fn accepts_a_nonblocking_client_with_nodelay_from_the_listener() {
        let l = super::super::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let l = Listener::from_std(l).unwrap();
        let dialer = std::thread::spawn(move || TcpStream::connect(addr).unwrap());
        let (client, peer) = std::future::poll_fn(|cx| l.poll_accept(cx)).await.unwrap();
        let dialed = dialer.join().unwrap();
        assert_eq!(peer, dialed.local_addr().unwrap());
        assert!(nonblocking(&client), "accept4 asked for SOCK_NONBLOCK");
        assert!(
            client.nodelay().unwrap(),
            "TCP_NODELAY is inherited from the listener"
        );
        // SAFETY: F_GETFD on a descriptor we own.
        let fd_flags = unsafe { libc::fcntl(client.as_raw_fd(), libc::F_GETFD) };
        assert!(
            fd_flags & libc::FD_CLOEXEC != 0,
            "accept4 asked for SOCK_CLOEXEC"
        );
    }
}
