//! One side of a connection on its way to an engine, in the form it is in.
//!
//! The accept loop takes a client with `accept4` and registers it nowhere
//! (see `server/listener.rs`); the upstream socket waited for its connect
//! on this worker's reactor, so it is still registered there. Each engine
//! takes the form it needs: the epoll engine relays registered sockets (so
//! the upstream socket costs no second `epoll_ctl(ADD)` and no `DEL` in
//! between), the uring and sockmap engines take plain ones. Turning one
//! form into the other is one `epoll_ctl`, done only where it is needed.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

pub enum Side {
    /// Registered nowhere; non-blocking.
    Plain(std::net::TcpStream),
    /// Registered with this thread's tokio reactor.
    Registered(tokio::net::TcpStream),
}

impl Side {
    /// Registered with this thread's reactor (`epoll_ctl(ADD)` if plain).
    pub fn into_tokio(self) -> io::Result<tokio::net::TcpStream> {
        match self {
            Side::Plain(s) => tokio::net::TcpStream::from_std(s),
            Side::Registered(s) => Ok(s),
        }
    }

    /// Registered nowhere (`epoll_ctl(DEL)` if registered), still
    /// non-blocking.
    pub fn into_std(self) -> io::Result<std::net::TcpStream> {
        match self {
            Side::Plain(s) => Ok(s),
            Side::Registered(s) => s.into_std(),
        }
    }
}

impl From<std::net::TcpStream> for Side {
    fn from(s: std::net::TcpStream) -> Self {
        Side::Plain(s)
    }
}

impl From<tokio::net::TcpStream> for Side {
    fn from(s: tokio::net::TcpStream) -> Self {
        Side::Registered(s)
    }
}

impl AsFd for Side {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Side::Plain(s) => s.as_fd(),
            Side::Registered(s) => s.as_fd(),
        }
    }
}

impl AsRawFd for Side {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}
